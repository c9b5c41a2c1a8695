"""Sampling with and without `models.packed_linears`, alternating, in the precision instrugo picks on this
CPU: the default policy's responses to the first `ppo` prompts at the TRL benchmark's two generation
settings (bench/run.py: 8 rows, up to 32 new tokens; 128 rows, up to 128 tokens), temperature 1, same
seeds on both sides, the order of the two swapped every round. Prints each round's tokens/s and the medians' ratio.
Usage: .venv/bin/python bench/packed_decode.py [ROUNDS]   (default 3)"""
import contextlib
import statistics
import sys
import time

from instrugo import generation, models
from instrugo.data import load_split
from instrugo.generation import SamplingConfig, sample_responses

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SETTINGS = ((8, 32), (128, 128))  # (rows, new tokens)

precision = models.setup_compute("auto")
tokenizer = models.load_tokenizer("default")
model = models.load_causal_lm("default", tokenizer).eval()
packed_linears = generation.packed_linears
print(f"precision {precision}; {ROUNDS} rounds, packed and unpacked alternating")
for rows, new_tokens in SETTINGS:
    prompts = [r["messages"] for r in load_split("ppo")[:rows]]
    config = SamplingConfig(new_tokens, 1.0, 1.0, rows)
    rates = {"packed": [], "unpacked": []}
    for round_index in range(ROUNDS + 1):  # round 0 warms up both
        for variant in ("packed", "unpacked")[::1 if round_index % 2 else -1]:
            generation.packed_linears = packed_linears if variant == "packed" else (
                lambda model, precision: contextlib.nullcontext())
            started = time.perf_counter()
            samples = sample_responses(model, tokenizer, prompts, config=config, precision=precision, seed=round_index)
            seconds = time.perf_counter() - started
            if round_index:
                rates[variant].append(sum(len(s[0].token_ids) for s in samples) / seconds)
    generation.packed_linears = packed_linears
    medians = {variant: statistics.median(r) for variant, r in rates.items()}
    print(f"{rows} rows, up to {new_tokens} tokens: " + "; ".join(
        f"{variant} {', '.join(f'{r:.1f}' for r in rates[variant])} tokens/s" for variant in rates)
        + f"; median ratio {medians['packed'] / medians['unpacked']:.2f}x")
