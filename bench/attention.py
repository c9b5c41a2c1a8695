"""Eager vs SDPA attention on this CPU, the measurement behind `models.attention_implementation` and
`models.fused_attention`: forward + backward of the default model at the sequence lengths the stages
train on, and decoding with a KV cache at the sampling stage's batch.
Usage: .venv/bin/python bench/attention.py"""
import contextlib
import time

import torch

from instrugo import generation, models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, sample_responses
from measure import best_seconds

TRAINING_SHAPES = ((8, 95), (8, 320), (4, 512), (2, 1024))  # (rows, tokens)
DECODE_PROMPTS, DECODE_TOKENS, ROUNDS = 32, 128, 2

models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).train()

print("forward + backward, bf16 autocast (best of 2):")
for rows, tokens in TRAINING_SHAPES:
    input_ids = torch.randint(100, 40000, (rows, tokens))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: rows // 2, :20] = 0  # left padding in half the rows, as in PPO batches

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=33).logits
            loss = torch.log_softmax(logits.float(), -1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = {}
    for kernel in ("eager", "sdpa"):
        model.set_attn_implementation(kernel)
        seconds[kernel] = best_seconds(step, 2)
    print(f"  {rows} x {tokens} tokens: eager {seconds['eager']:.2f} s, sdpa {seconds['sdpa']:.2f} s")

model.eval()
prompts = [r["messages"] for r in load_split("ppo")[:DECODE_PROMPTS]]
config = SamplingConfig(DECODE_TOKENS, 1.0, 1.0, DECODE_PROMPTS)
print(f"decoding {DECODE_PROMPTS} ppo prompts x up to {DECODE_TOKENS} tokens, batch {DECODE_PROMPTS} "
      f"(tokens/s, {ROUNDS} rounds):")
for label, kernel, switch in (("sdpa", "sdpa", True), ("eager, no switch", "eager", False),
                              ("eager, switched to sdpa for decoding", "eager", True)):
    model.set_attn_implementation(kernel)
    generation.fused_attention = models.fused_attention if switch else (lambda m: contextlib.nullcontext())
    rates = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        samples = sample_responses(model, tokenizer, prompts, n=1, config=config, precision="bf16", seed=0)
        rates.append(sum(len(s[0].token_ids) for s in samples) / (time.perf_counter() - start))
    print(f"  {label}: " + ", ".join(f"{r:.0f}" for r in rates))
