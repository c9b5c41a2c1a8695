"""The prompt pass in groups of rows (`generation.PROMPT_PASS_ROWS`): the pass alone over the first 128
`eval` prompts, sorted by length as sampling sorts them, at several group sizes, then greedy decoding of
those prompts (batch 128, up to 192 new tokens, as evaluation runs it) with groups of 32 against one pass
over all 128 rows, alternating; the default model, bf16.
Usage: .venv/bin/python bench/prompt_pass.py [ROUNDS]   (default 3)"""
import sys
import time

import torch

from instrugo import generation, models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, encode_prompts, pad_batch, prompt_pass, sample_responses

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
precision = models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
prompts = [r["messages"] for r in load_split("eval")[:128]]
ids, mask = pad_batch(sorted(encode_prompts(tokenizer, prompts), key=len), tokenizer.pad_token_id)
print(f"128 eval prompts: {int(mask.sum())} tokens, {ids.shape[1]} wide once padded; {precision}")

with torch.no_grad(), models.autocast(precision), models.inference_attention(model), \
        models.packed_linears(model, precision):
    prompt_pass(model, ids, mask, ids.shape[1] + 192, 32)  # warm-up: kernel selection
    seconds: dict[int, list[float]] = {}
    for _ in range(rounds):
        for rows in (128, 64, 32, 16):
            started = time.perf_counter()
            prompt_pass(model, ids, mask, ids.shape[1] + 192, rows)
            seconds.setdefault(rows, []).append(time.perf_counter() - started)
for rows, times in seconds.items():
    print(f"  prompt pass in groups of {rows:3d} rows: " + ", ".join(f"{t:.2f}" for t in times) + " s")

greedy = SamplingConfig(max_new_tokens=192, temperature=0.0, batch_size=128)
decoding: dict[int, list[tuple[float, int]]] = {}
for _ in range(rounds):
    for rows in (128, 32):
        generation.PROMPT_PASS_ROWS = rows
        started = time.perf_counter()
        samples = sample_responses(model, tokenizer, prompts, config=greedy, precision=precision)
        decoding.setdefault(rows, []).append((time.perf_counter() - started, sum(len(s[0].token_ids) for s in samples)))
for rows, runs in decoding.items():
    print(f"  greedy decoding, prompt pass in groups of {rows:3d}: " +
          ", ".join(f"{t:.1f} s ({n / t:.0f} tokens/s)" for t, n in runs))
