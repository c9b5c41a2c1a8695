"""InstruGo: topic prompts with verifiable constraints, and readers for users' own data.

    from instrugo.data import load_split, load_examples
    load_split("sft")            # shipped records: prompt, messages, constraints, topic, response
    load_examples("my.jsonl")    # {"prompt", "response"} or {"messages": [...]} lines, validated

Splits: sft (prompt + demonstration), rm and ppo (prompts), eval (held-out prompts), eval_unseen (prompts
with constraint kinds no training split uses) and pretrain (plain text; `heldout` marks the part kept
for measuring the alignment tax). `python -m instrugo.data.build` regenerates the shipped files.
"""

from instrugo.data.files import load_examples, load_split
from instrugo.data.generate import DATASET_SEED, DATASET_VERSION, SPLITS, UNSEEN_KINDS, generate
from instrugo.data.stats import dataset_stats

__all__ = ["DATASET_SEED", "DATASET_VERSION", "SPLITS", "UNSEEN_KINDS", "dataset_stats", "generate",
           "load_examples", "load_split"]
