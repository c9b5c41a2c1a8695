"""Decoding as best-of-n runs it: the first PROMPTS `eval` prompts (default 16) x 16 samples at
temperature 1, up to 192 new tokens, the default model, bf16, each prompt's samples sharing its pass; three
calls with seeds 0-2 at each decode batch size given (default 128), the sizes alternating within a seed.
Run it with another commit's src on PYTHONPATH to compare commits.
Usage: .venv/bin/python bench/best_of_n_decode.py [PROMPTS [BATCH ...]]"""
import sys
import time

from instrugo import models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, sample_responses

n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 16
batch_sizes = [int(b) for b in sys.argv[2:]] or [128]
precision = models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
prompts = [r["messages"] for r in load_split("eval")[:n_prompts]]
runs: dict[int, list[tuple[float, int]]] = {batch: [] for batch in batch_sizes}
for seed in range(3):
    for batch in batch_sizes:
        started = time.perf_counter()
        samples = sample_responses(model, tokenizer, prompts, n=16, config=SamplingConfig(192, 1.0, 1.0, batch),
                                   precision=precision, seed=seed)
        runs[batch].append((time.perf_counter() - started, sum(len(s.token_ids) for row in samples for s in row)))
for batch, timed in runs.items():
    print(f"batch {batch}: runs (s, new tokens):", [(round(s, 1), n) for s, n in timed],
          "tokens/s:", [round(n / s) for s, n in timed])
