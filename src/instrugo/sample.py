"""Comparisons, part 1: sample K responses per prompt from the current policy as comparison tasks.

The tasks (format in `comparisons.py`) go to people through the labeling app or to the simulated labeler
pool; both fill in the ranking that the reward model trains on. Each task carries its InstruGo record
(`example`: constraints and topic), so the gold judge can score it later.

    instrugo sample --policy runs/sft --prompts instrugo:rm --k 4 --out runs/demo/tasks.jsonl
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from instrugo import models
from instrugo.comparisons import MAX_K, MIN_K, ComparisonTask, task_rows
from instrugo.config import option, require
from instrugo.generation import DECODE_BATCH_SIZE, SamplingConfig, sample_responses
from instrugo.runio import atomic_write_jsonl


@dataclass
class SampleConfig:
    """Sample K responses per prompt (temperature 1 by default, as InstructGPT sampled)."""

    policy: str = option("runs/sft", "Policy to sample from ('default', 'tiny', .gguf or a directory).")
    prompts: str = option("instrugo:rm", "Prompts: an InstruGo split ('instrugo:rm') or a JSONL file.")
    out: str = option("tasks.jsonl", "Where to write the comparison tasks (JSONL).")
    k: int = option(4, "Responses per prompt (InstructGPT: 4..9).")
    n_prompts: int = option(0, "Use only the first N prompts (0 = all).")
    offset: int = option(0, "Skip the first N prompts (later rounds use fresh prompts).")
    max_new_tokens: int = option(160, "Response length limit in tokens.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    batch_size: int = option(DECODE_BATCH_SIZE, "Sequences generated together.")
    precision: str = option("auto", "auto (probe bf16 speed), bf16 or fp32.")
    seed: int = option(0, "Sampling seed.")
    id_prefix: str = option("t", "Prefix of task ids (rounds use r1, r2, ...).")

    presets: ClassVar[dict[str, dict]] = {"tiny": dict(policy="tiny", n_prompts=16, max_new_tokens=32)}

    def validate(self) -> None:
        require(MIN_K <= self.k <= MAX_K, "k", f"must be {MIN_K}..{MAX_K} (InstructGPT used 4..9)")
        require(self.max_new_tokens > 0, "max_new_tokens", "must be positive")


def distinct(texts: list[str]) -> list[str]:
    """Drop empty and repeated responses, keeping first occurrences: a ranking needs distinct texts."""
    seen: dict[str, None] = {}
    for text in texts:
        if text.strip() and text not in seen:
            seen[text] = None
    return list(seen)


def run_sample(config: SampleConfig) -> Path:
    from instrugo.data import load_examples

    records = load_examples(config.prompts)[config.offset:]
    if config.n_prompts:
        records = records[:config.n_prompts]
    precision = models.setup_compute(config.precision)
    tokenizer = models.load_tokenizer(config.policy)
    model = models.load_causal_lm(config.policy, tokenizer).eval()
    print(f"sample: {len(records)} prompts x K={config.k} from {config.policy} "
          f"(temperature {config.temperature}, up to {config.max_new_tokens} tokens); "
          f"precision {models.describe_precision(precision)}")
    sampling = SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.batch_size)
    with tqdm(total=len(records) * config.k, desc="sample", dynamic_ncols=True) as bar:
        samples = sample_responses(model, tokenizer, [r["messages"] for r in records], n=config.k,
                                   config=sampling, precision=precision, seed=config.seed, progress=bar.update)
    tasks, dropped = [], 0
    for index, (record, group) in enumerate(zip(records, samples)):
        responses = distinct([s.text for s in group])
        if len(responses) < MIN_K:
            dropped += 1
            continue
        example = {k: record[k] for k in ("id", "topic", "constraints", "prompt") if k in record}
        tasks.append(ComparisonTask(id=f"{config.id_prefix}-{config.offset + index:06d}", prompt=record["prompt"],
                                    responses=responses, example=example or None,
                                    extra={"policy": str(config.policy), "time": time.time()}))
    atomic_write_jsonl(config.out, task_rows(tasks))
    short = sum(len(t.responses) < config.k for t in tasks)
    print(f"sample: wrote {len(tasks)} tasks to {config.out} ({dropped} prompts dropped with < {MIN_K} "
          f"distinct responses, {short} tasks with fewer than K after removing duplicates)")
    return Path(config.out)
