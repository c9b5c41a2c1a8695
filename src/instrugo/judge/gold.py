"""The gold judge: the noise-free score that simulated labelers perturb and evaluation reports.

    score = quality * (0.6 * constraint_fraction + 0.25 * topicality + 0.15)

Constraint satisfaction dominates, but everything is gated by quality, so an empty, repetitive or
gibberish response scores near 0 even when it satisfies its constraints ("AAAA AAAA" is uppercase). The
constant 0.15 keeps a fluent on-topic answer that fails its constraint above fluent nonsense.
"""

from __future__ import annotations

from dataclasses import dataclass

from instrugo.judge.constraints import check_constraint
from instrugo.judge.quality import degeneration, topicality
from instrugo.judge.text import words

CONSTRAINT_WEIGHT, TOPIC_WEIGHT, BASE_WEIGHT = 0.6, 0.25, 0.15
OFF_TOPIC_BELOW = 0.5


@dataclass
class GoldVerdict:
    score: float                 # in [0, 1]; the noise-free gold score
    constraint_results: list[bool]
    constraint_fraction: float   # share of constraints passed (1 when there are none)
    all_passed: bool
    topicality: float            # in [0, 1]
    quality: float               # in [0, 1]; 1 = fluent, 0 = empty, gibberish or repetitive
    n_words: int
    reasons: list[str]           # short notes, e.g. "repetitive", "off topic", "fails uppercase"


def gold_judge(example: dict, response: str) -> GoldVerdict:
    """Judge `response` to an InstruGo record (`constraints`, `topic`, `prompt`; all optional)."""
    constraints = example.get("constraints") or []
    results = [check_constraint(c, response) for c in constraints]
    fraction = sum(results) / len(results) if results else 1.0
    tokens = words(response)
    quality, reasons = degeneration(response, tokens)
    topical = topicality(example, tokens)
    if tokens and topical < OFF_TOPIC_BELOW:
        reasons.append("off topic")
    reasons += [f"fails {c['kind']}" for c, ok in zip(constraints, results) if not ok]
    score = quality * (CONSTRAINT_WEIGHT * fraction + TOPIC_WEIGHT * topical + BASE_WEIGHT)
    return GoldVerdict(score=score, constraint_results=results, constraint_fraction=fraction,
                       all_passed=all(results), topicality=topical, quality=quality, n_words=len(tokens),
                       reasons=reasons)
