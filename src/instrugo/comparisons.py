"""The comparison-task format: K responses to one prompt and their ranking, one JSON object per line.

`instrugo sample` writes tasks with an empty ranking; the simulated labelers (`instrugo label simulate`)
and the labeling web app (`instrugo label export`) fill it; `instrugo rm` trains on the ranked ones.

    {"id": "r1-000017",              # unique within the file
     "prompt": "Describe honeybees in exactly 3 bullet points.",
     "responses": ["...", "...", "...", "..."],          # K >= 2 distinct, non-empty texts
     "ranking": [[2], [0, 3], [1]],   # response indices, best group first; a group holds ties
     "labeler": "sim-2",              # who ranked it ("" while unlabeled)
     "scores": [6, 3, 5, 5],          # optional 1..7 quality score per response
     "flags": [[], ["fails_instruction"], [], []],        # optional flags per response
     "example": {...},                # optional: the InstruGo record (constraints, topic) for gold judging
     "policy": "runs/demo/sft", "time": 1764000000.0}    # optional provenance

A flat ranking `[2, 0, 3, 1]` is shorthand for no ties. Pairwise data in TRL's format
(`{"prompt", "chosen", "rejected"}`) is read as the K = 2 case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from instrugo.runio import InputError, iter_jsonl

FLAGS = ("fails_instruction", "satisfies_constraint", "inappropriate", "hallucination", "harmful_advice")
MIN_K, MAX_K = 2, 9


@dataclass
class ComparisonTask:
    id: str
    prompt: str
    responses: list[str]
    ranking: list[list[int]] = field(default_factory=list)  # empty while unlabeled
    labeler: str = ""
    scores: list[int] | None = None
    flags: list[list[str]] | None = None
    example: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_labeled(self) -> bool:
        return bool(self.ranking)

    def rank_levels(self) -> list[int]:
        """Rank level of each response (0 = best); responses in one tie group share a level."""
        levels = [0] * len(self.responses)
        for level, group in enumerate(self.ranking):
            for index in group:
                levels[index] = level
        return levels

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs the ranking implies; ties give no pair."""
        levels = self.rank_levels()
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if levels[i] < levels[j]]

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "responses": self.responses,
                               "ranking": self.ranking, "labeler": self.labeler}
        if self.scores is not None:
            row["scores"] = self.scores
        if self.flags is not None:
            row["flags"] = self.flags
        if self.example is not None:
            row["example"] = self.example
        row.update(self.extra)
        return row


def normalize_ranking(ranking: Any, k: int, where: tuple[str, int | None]) -> list[list[int]]:
    """Check that `ranking` orders each of the k responses exactly once; return it as tie groups."""
    path, line = where
    if not isinstance(ranking, list):
        raise InputError(path, "must be a list of response indices, best first", line=line, field="ranking")
    groups = [g if isinstance(g, list) else [g] for g in ranking]
    seen: list[int] = []
    for group in groups:
        if not group:
            raise InputError(path, "contains an empty tie group", line=line, field="ranking")
        for index in group:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < k:
                raise InputError(path, f"index {index!r} is not a response index 0..{k - 1}", line=line,
                                 field="ranking")
            seen.append(index)
    if sorted(seen) != list(range(k)):
        raise InputError(path, f"is not a permutation of the {k} responses (got {ranking})", line=line,
                         field="ranking")
    return groups


def parse_task(row: dict[str, Any], path: str, line: int | None, require_ranking: bool) -> ComparisonTask:
    """Validate one JSON object as a comparison task (or a TRL chosen/rejected pair)."""
    if "chosen" in row or "rejected" in row:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise InputError(path, "missing or not a string", line=line, field=key)
        row = {"id": row.get("id", f"pair-{line}"), "prompt": row["prompt"],
               "responses": [row["chosen"], row["rejected"]], "ranking": [[0], [1]],
               "labeler": row.get("labeler", "pairwise")}
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(path, "missing or empty", line=line, field="prompt")
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise InputError(path, "the prompt has no responses", line=line, field="responses")
    if len(responses) < MIN_K or len(responses) > MAX_K:
        raise InputError(path, f"K = {len(responses)} responses; K must be {MIN_K}..{MAX_K}", line=line,
                         field="responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise InputError(path, f"response {i} is empty or not a string", line=line, field="responses")
    if len(set(responses)) != len(responses):
        raise InputError(path, "contains duplicate responses", line=line, field="responses")
    ranking = row.get("ranking") or []
    if ranking:
        ranking = normalize_ranking(ranking, len(responses), (path, line))
    elif require_ranking:
        raise InputError(path, "missing: the task is not labeled", line=line, field="ranking")
    scores = row.get("scores")
    if scores is not None:
        if (not isinstance(scores, list) or len(scores) != len(responses)
                or not all(isinstance(s, int) and 1 <= s <= 7 for s in scores)):
            raise InputError(path, "must be one integer 1..7 per response", line=line, field="scores")
    flags = row.get("flags")
    if flags is not None:
        if (not isinstance(flags, list) or len(flags) != len(responses)
                or not all(isinstance(f, list) and set(f) <= set(FLAGS) for f in flags)):
            raise InputError(path, f"must be one list per response with flags from {', '.join(FLAGS)}",
                             line=line, field="flags")
    known = {"id", "prompt", "responses", "ranking", "labeler", "scores", "flags", "example"}
    return ComparisonTask(id=str(row.get("id", f"task-{line}")), prompt=prompt, responses=list(responses),
                          ranking=ranking, labeler=str(row.get("labeler") or ""), scores=scores, flags=flags,
                          example=row.get("example"), extra={k: v for k, v in row.items() if k not in known})


def read_tasks(path: str | os.PathLike, require_ranking: bool = False) -> list[ComparisonTask]:
    """Read and validate a comparison-task JSONL file; the first bad line raises an InputError."""
    tasks = []
    ids: set[str] = set()
    for line, row in iter_jsonl(path):
        task = parse_task(row, str(path), line, require_ranking)
        if task.id in ids:
            raise InputError(path, f"duplicate task id '{task.id}'", line=line, field="id")
        ids.add(task.id)
        tasks.append(task)
    return tasks


def task_rows(tasks: Iterable[ComparisonTask]) -> list[dict[str, Any]]:
    return [t.to_json() for t in tasks]
