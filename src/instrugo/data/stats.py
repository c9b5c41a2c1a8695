"""Dataset statistics: counts, constraint kinds, lengths, and how the demonstrations fare with the judge."""

from __future__ import annotations

from collections import Counter

from instrugo.judge import gold_judge
from instrugo.judge.text import words


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def split_stats(records: list[dict]) -> dict:
    with_response = [r for r in records if "response" in r]
    judged = [gold_judge(r, r["response"]) for r in with_response if r.get("constraints")]
    kinds = Counter(c["kind"] for r in records for c in r.get("constraints") or [])
    return {
        "n": len(records),
        "topics": len({r["topic"] for r in records if "topic" in r}),
        "with_response": len(with_response),
        "constraints_per_prompt": mean([len(r.get("constraints") or []) for r in records if "prompt" in r]),
        "kinds": dict(sorted(kinds.items())),
        "prompt_words": mean([len(words(r["prompt"])) for r in records if "prompt" in r]),
        "response_words": mean([len(words(r["response"])) for r in with_response]),
        "text_words": mean([len(words(r["text"])) for r in records if "text" in r]),
        "heldout": sum(bool(r.get("heldout")) for r in records),
        "demonstrations_passing": mean([float(v.all_passed) for v in judged]),
        "demonstration_gold_score": mean([v.score for v in judged]),
    }


def dataset_stats(records: list[dict]) -> dict:
    """Statistics per split (records without a `split` count as "user") and the total count."""
    by_split: dict[str, list[dict]] = {}
    for record in records:
        by_split.setdefault(record.get("split", "user"), []).append(record)
    return {"n": len(records), "splits": {split: split_stats(rows) for split, rows in by_split.items()}}
