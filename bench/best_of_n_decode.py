"""Decoding as best-of-n runs it: the first PROMPTS `eval` prompts (default 16) x 16 samples at
temperature 1, up to 192 new tokens, batch 128 (each prompt's samples sharing its pass), the default model,
bf16; three calls with seeds 0-2. Run it with another commit's src on PYTHONPATH to compare.
Usage: .venv/bin/python bench/best_of_n_decode.py [PROMPTS]"""
import sys
import time

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, sample_responses

precision = models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
prompts = [r["messages"] for r in load_split("eval")[:int(sys.argv[1]) if len(sys.argv) > 1 else 16]]
runs = []
for seed in range(3):
    started = time.perf_counter()
    samples = sample_responses(model, tokenizer, prompts, n=16, config=SamplingConfig(192, 1.0, 1.0, 128),
                               precision=precision, seed=seed)
    runs.append((time.perf_counter() - started, sum(len(s.token_ids) for row in samples for s in row)))
print("runs (s, new tokens):", [(round(s, 1), n) for s, n in runs], "tokens/s:", [round(n / s) for s, n in runs])
