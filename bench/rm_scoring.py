"""Reward-model scoring as best-of-n calls it: 16 `eval` prompts x 16 responses (demonstrations of the `sft`
split drawn at random, for a spread of lengths), the default backbone with a fresh head, bf16; three timed
calls of `reward.score_texts`. Run it with another commit's src on PYTHONPATH to compare.
Usage: .venv/bin/python bench/rm_scoring.py"""
import random
import statistics
import time

from instrugo import models
from instrugo.data import load_split
from instrugo.reward import init_reward_model, score_texts

precision = models.setup_compute("bf16")
tokenizer = models.load_tokenizer("default")
model = init_reward_model("default", tokenizer, 0, 384).eval()
demonstrations, rng = load_split("sft"), random.Random(0)
prompts = [r["messages"] for r in load_split("eval")[:16] for _ in range(16)]
responses = [rng.choice(demonstrations)["response"] for _ in prompts]
seconds = []
for _ in range(3):
    started = time.perf_counter()
    scores = score_texts(model, tokenizer, prompts, responses, precision)
    seconds.append(time.perf_counter() - started)
print(f"{len(prompts)} texts: seconds {[round(s, 2) for s in seconds]}, median {statistics.median(seconds):.2f}; "
      f"first scores {[round(s, 3) for s in scores[:3]]}")
