"""Where a decode step's time goes: one `sample_responses` call of the default policy on the first 8 `ppo`
prompts, up to 32 new tokens (the PPO benchmark's rollout), in the precision instrugo picks on this CPU
(`--precision` of the stages: auto), with a torch.profiler table. The
counterpart of bench/profile_train.py for generation.  Usage: .venv/bin/python bench/profile_decode.py"""
import time

from torch.profiler import ProfilerActivity, profile

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, sample_responses

ROWS, NEW_TOKENS = 8, 32

precision = models.setup_compute("auto")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
prompts = [r["messages"] for r in load_split("ppo")[:ROWS]]
config = SamplingConfig(NEW_TOKENS, 1.0, 1.0, ROWS)


def sample() -> int:
    samples = sample_responses(model, tokenizer, prompts, config=config, precision=precision, seed=0)
    return sum(len(s[0].token_ids) for s in samples)


sample()  # warm-up
with profile(activities=[ProfilerActivity.CPU]) as profiler:
    started = time.perf_counter()
    tokens = sample()
    seconds = time.perf_counter() - started
print(f"{ROWS} prompts, {tokens} new tokens in {seconds:.2f} s (under the profiler)")
print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
