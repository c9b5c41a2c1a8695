"""Can PPO learn a trivial reward? `instrugo ppo --reward gold` with the gold judge replaced by
max(0, 1 − words/60), which rewards shorter answers: the response length of the rollouts (`metrics.jsonl`)
should fall within a few iterations. The settings are the demo's PPO (32 episodes per iteration, 4 minibatches,
lr 2e-5, 96 new tokens), 256 episodes, the first 32 value-only; KEY=VALUE pairs override PPOConfig fields.
The measurement behind docs/EXPERIMENTS.md's "GAE λ = 1" (point 4):
    .venv/bin/python bench/ppo_length_reward.py runs/demo-clean/sft RM_DIR /tmp/exp/ppo_len lam=0.95
    .venv/bin/python bench/ppo_length_reward.py runs/demo-clean/sft RM_DIR /tmp/exp/ppo_len_lam1 lam=1.0
(RM_DIR initialises the value network.)
Usage: .venv/bin/python bench/ppo_length_reward.py POLICY RM_DIR OUT [KEY=VALUE ...]"""
import sys

import instrugo.judge
from instrugo.config import from_dict
from instrugo.judge.gold import GoldVerdict
from instrugo.ppo import PPOConfig, run_ppo


def shorter_is_better(record: dict, response: str) -> GoldVerdict:
    n_words = len(response.split())
    return GoldVerdict(score=max(0.0, 1 - n_words / 60), constraint_results=[], constraint_fraction=1.0,
                       all_passed=n_words < 30, topicality=1.0, quality=1.0, n_words=n_words, reasons=[])


policy, reward_model, out = sys.argv[1:4]
instrugo.judge.gold_judge = shorter_is_better  # run_ppo reads it from the package at call time
settings = dict(policy=policy, reference=policy, reward_model=reward_model, out=out, reward="gold",
                episodes_per_batch=32, minibatches=4, micro_batch_size=8, max_new_tokens=96, lr=2e-5,
                total_episodes=256, warmup_iterations=2, value_warmup_iterations=1, value_lr=3e-5, seed=1)
# from_dict converts and validates the overrides as the CLI does, naming an unknown or mistyped key.
config = from_dict(PPOConfig, {**settings, **dict(pair.split("=", 1) for pair in sys.argv[4:])}, "command line")
run_ppo(config)
