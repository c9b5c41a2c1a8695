"""The harness's arithmetic: medians over repeats, ratios against TRL, model FLOPs, the result table, and
the best-of-n timer the stand-alone bench scripts share.

Pure functions only (no torch, no subprocesses), so they are tested on their own (tests/test_bench.py)
and shared by the harness and both workers.

Model FLOPs follow the usual convention (Kaplan et al.; nanoGPT's MFU): a forward pass costs 2·N FLOPs
per token and a training step (forward + backward) 6·N, where N counts the parameters that do matmul
work per token: every parameter except the input embedding table (a lookup), plus the LM head even when
it shares its weights with the embedding (it is a full vocab × d matmul). Attention's own score/value
products (∝ sequence length) are left out; at these lengths they are a few per cent of the total.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn`, after one untimed warm-up call (kernel selection,
    allocations)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that were measured; None when none were (a job that failed every repeat)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either side is missing or theirs is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def flop_parameters(total: int, input_embedding: int, lm_head: int) -> int:
    """N of the 2N/6N rule: parameters minus the embedding lookup table, plus the LM head's matmul
    (`lm_head` = vocab × d for a causal LM, 0 for a scalar-head reward/value model)."""
    return total - input_embedding + lm_head


def forward_flops(n_params: int, tokens: float) -> float:
    return 2.0 * n_params * tokens


def train_flops(n_params: int, tokens: float) -> float:
    return 6.0 * n_params * tokens


def ppo_phase_flops(n_policy: int, n_value: int, n_reward: int, episodes: int, tokens_per_episode: float,
                    ppo_epochs: int, recomputes_logprobs: bool) -> dict[str, float]:
    """Model FLOPs of one PPO update, per phase, as instrugo runs it.

    generate: one forward per token of prompt and response through the policy (KV cache);
    score: forward passes of reference, value and reward model, and of the policy (old log-probs) where
    they are recomputed rather than the sampler's (`ppo.reuses_sampler_logprobs`);
    train: forward + backward of policy and value network, once per PPO epoch.
    """
    tokens = episodes * tokens_per_episode
    policy_passes = 2 if recomputes_logprobs else 1  # the reference's, and the policy's own
    return {"generate": forward_flops(n_policy, tokens),
            "score": forward_flops(policy_passes * n_policy + n_value + n_reward, tokens),
            "train": ppo_epochs * train_flops(n_policy + n_value, tokens)}


def ceiling_fraction(flops: float | None, seconds: float | None, ceiling_gflops: float | None) -> float | None:
    """Achieved model FLOP/s as a fraction of the measured matmul ceiling."""
    if not flops or not seconds or not ceiling_gflops:
        return None
    return flops / seconds / (ceiling_gflops * 1e9)


@dataclass
class Row:
    """One line of the result table: a metric measured on both sides (either may be missing)."""

    benchmark: str
    metric: str
    instrugo: float | None
    trl: float | None
    goal: str = ""                      # e.g. "≤ 0.33": a bound on instrugo ÷ TRL
    ceiling: float | None = None        # instrugo's model FLOP/s ÷ the matmul ceiling of the precision in use
    unit: str = ""

    @property
    def ratio(self) -> float | None:
        return ratio(self.instrugo, self.trl)

    def meets_goal(self) -> bool | None:
        """Whether instrugo ÷ TRL satisfies the goal ('≤ x' or '≥ x'); None without a goal or a ratio."""
        if not self.goal or self.ratio is None:
            return None
        sign, bound = self.goal.split()
        return self.ratio <= float(bound) if sign == "≤" else self.ratio >= float(bound)


def format_number(value: float | None, unit: str = "") -> str:
    """Compact human numbers: 3 significant digits, thousands separators for big ones."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{100 * value:.1f}%"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:#.3g}"  # '#' keeps trailing zeros: 2.00, 0.250
    return f"{text} {unit}".rstrip() if unit else text


def markdown_table(rows: Sequence[Row]) -> str:
    """The result table in GitHub markdown (what docs/BENCHMARKS.md records and the terminal prints)."""
    header = ["benchmark", "metric", "instrugo", "TRL 1.12", "instrugo ÷ TRL", "goal", "met", "FLOP/s ÷ matmul ceiling"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        met = {True: "yes", False: "no", None: ""}[row.meets_goal()]
        cells = [row.benchmark, row.metric, format_number(row.instrugo, row.unit), format_number(row.trl, row.unit),
                 format_number(row.ratio), row.goal, met, format_number(row.ceiling, "%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Temp file + rename (the TRL worker runs without instrugo installed, so it cannot use runio)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
