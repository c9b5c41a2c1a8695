"""Sampling throughput against the decode batch size, with and without a shared prompt pass: the
measurement behind `generation.DECODE_BATCH_SIZE`. Best-of-n and K-way sampling draw several responses
per prompt; `sample_responses(..., n=N)` runs each prompt's pass once for its N copies, while N copies of
the prompt in the prompt list (n=1) run it N times, as the sampler did before.
Usage: .venv/bin/python bench/decode_batch.py [POLICY] [PROMPTS] [COPIES]
(default: the default model, 64 `eval` prompts, 8 copies; up to 192 new tokens at temperature 1, bf16)"""
import sys
import time

import torch

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import (SamplingConfig, encode_prompts, pad_batch, positions_skipping_padding,
                                 preallocated_cache, sample_responses)

policy = sys.argv[1] if len(sys.argv) > 1 else "default"
n_prompts = int(sys.argv[2]) if len(sys.argv) > 2 else 64
copies = int(sys.argv[3]) if len(sys.argv) > 3 else 8
RUNS = ((32, False), (32, True), (64, True), (128, False), (128, True), (256, True))  # (batch, shared)

precision = models.setup_compute("bf16")
tokenizer = models.load_tokenizer(policy)
model = models.load_causal_lm(policy, tokenizer).eval()
prompts = [r["messages"] for r in load_split("eval")[:n_prompts]]
print(f"{policy}: {n_prompts} eval prompts x {copies} samples, up to 192 new tokens, temperature 1, {precision}")

# What sharing saves per batch: the prompt pass of 128 rows (16 prompts x 8 copies) against that of 16.
encoded = encode_prompts(tokenizer, prompts)
for rows in (16, 128, 16):  # the first call is a warm-up (kernel selection, weight packing)
    ids, mask = pad_batch([encoded[i // (rows // 16)] for i in range(rows)], tokenizer.pad_token_id)
    with torch.no_grad(), models.autocast(precision), models.inference_attention(model), \
            models.packed_linears(model, precision):
        started = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=positions_skipping_padding(mask),
              past_key_values=preallocated_cache(model.config, ids.shape[1] + 192), use_cache=True, logits_to_keep=1)
    print(f"  prompt pass of {rows} rows x {ids.shape[1]} tokens: {time.perf_counter() - started:.2f} s")
for batch, shared in RUNS:
    config = SamplingConfig(192, 1.0, 1.0, batch)
    started = time.perf_counter()
    if shared:
        groups = sample_responses(model, tokenizer, prompts, n=copies, config=config, precision=precision, seed=1)
    else:
        repeated = [p for p in prompts for _ in range(copies)]
        groups = sample_responses(model, tokenizer, repeated, config=config, precision=precision, seed=1)
    seconds = time.perf_counter() - started
    tokens = sum(len(s.token_ids) for group in groups for s in group)
    print(f"  batch {batch:3d}, prompt pass {'shared  ' if shared else 'per copy'}: {seconds:6.1f} s, "
          f"{tokens} tokens, {tokens / seconds:4.0f} tokens/s", flush=True)
