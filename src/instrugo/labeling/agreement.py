"""Agreement between labelers, measured on the pairwise comparisons their rankings imply.

InstructGPT reports labeler agreement as the share of response pairs that two labelers order the same
way (72.6 ± 1.5 %, REFERENCE §2); a pair that either labeler tied says nothing and is left out.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from typing import Iterable

Ranking = list[list[int]]  # response indices, best tie group first


def preferences(ranking: Ranking) -> dict[tuple[int, int], int]:
    """For each strictly ordered pair (i, j) with i < j: +1 if i is better, -1 if j is better."""
    level = {index: rank for rank, group in enumerate(ranking) for index in group}
    return {(i, j): 1 if level[i] < level[j] else -1
            for i, j in combinations(sorted(level), 2) if level[i] != level[j]}


def pair_agreement(a: Ranking, b: Ranking) -> tuple[int, int]:
    """(agreeing pairs, pairs both labelers ordered) for two rankings of the same responses."""
    pa, pb = preferences(a), preferences(b)
    shared = pa.keys() & pb.keys()
    return sum(pa[p] == pb[p] for p in shared), len(shared)


def inter_labeler_agreement(labels_by_task: Iterable[dict[str, Ranking]]) -> dict:
    """Pooled agreement over every pair of labelers on every task that several people ranked.

    Returns {"agreement": share or None, "pairs": compared pairs, "tasks": tasks with ≥ 2 labels,
    "by_pair": [{"labelers": [a, b], "agreement", "pairs"}]}.
    """
    by_pair: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    tasks = 0
    for labels in labels_by_task:
        if len(labels) < 2:
            continue
        tasks += 1
        for a, b in combinations(sorted(labels), 2):
            agree, total = pair_agreement(labels[a], labels[b])
            by_pair[a, b][0] += agree
            by_pair[a, b][1] += total
    agree = sum(a for a, _ in by_pair.values())
    total = sum(t for _, t in by_pair.values())
    return {"agreement": agree / total if total else None, "pairs": total, "tasks": tasks,
            "by_pair": [{"labelers": list(names), "agreement": a / t if t else None, "pairs": t}
                        for names, (a, t) in sorted(by_pair.items())]}


def majority_agreement(labels_by_task: Iterable[dict[str, Ranking]]) -> dict[str, dict]:
    """Each labeler's agreement with the majority of the *other* labelers of the same tasks.

    Leaving the labeler out keeps their own vote from counting as agreement; a pair on which the others
    are evenly split (or all tied) has no majority and is left out. With two labelers per task this is
    their pairwise agreement. Returns {labeler: {"agreement": share or None, "pairs": n}}.
    """
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for labels in labels_by_task:
        if len(labels) < 2:
            continue
        prefs = {name: preferences(ranking) for name, ranking in labels.items()}
        for name, own in prefs.items():
            for pair, vote in own.items():
                others = sum(p.get(pair, 0) for other, p in prefs.items() if other != name)
                if others:
                    counts[name][0] += (vote > 0) == (others > 0)
                    counts[name][1] += 1
    return {name: {"agreement": a / t if t else None, "pairs": t} for name, (a, t) in sorted(counts.items())}
