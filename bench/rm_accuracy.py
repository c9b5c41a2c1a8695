"""Reward models' pairwise accuracy on one labeled comparison file, against its labels and against the
noise-free gold judge: the test set behind the reward-model and labeler-noise numbers in docs/EXPERIMENTS.md.
Build a test set from prompts no run trains on, e.g.
    instrugo sample --policy runs/demo-clean/sft --prompts instrugo:rm --offset 1000 --n-prompts 128 --k 6 \
        --max-new-tokens 128 --seed 77 --id-prefix test --out /tmp/exp/test_tasks.jsonl
    instrugo label simulate --tasks /tmp/exp/test_tasks.jsonl --out /tmp/exp/test_labeled.jsonl
Usage: .venv/bin/python bench/rm_accuracy.py LABELED.jsonl RM_DIR [RM_DIR ...]"""
import json
import sys
import time

from instrugo import models, reward
from instrugo.comparisons import read_tasks

tasks = [t for t in read_tasks(sys.argv[1], require_ranking=True) if t.pairs()]
precision = models.setup_compute("auto")
for path in sys.argv[2:]:
    started = time.perf_counter()
    model, tokenizer = reward.load_reward_model(path)
    result = reward.heldout_accuracy(model, tokenizer, tasks, precision, int(model.config.reward_max_length))
    print(json.dumps({"rm": path, **result, "seconds": round(time.perf_counter() - started)}), flush=True)
