"""Regenerate the shipped InstruGo splits: `python -m instrugo.data.build`.

Run it after changing the generator or the topics (and bump DATASET_VERSION when the output changes);
tests/test_data.py checks that the shipped files equal a fresh generation.
"""

from __future__ import annotations

from pathlib import Path

from instrugo.data.files import split_path
from instrugo.data.generate import DATASET_SEED, generate
from instrugo.runio import atomic_write_jsonl


def build(directory: Path | None = None, seed: int = DATASET_SEED) -> dict[str, Path]:
    """Generate every split and write it as JSONL; returns split -> path."""
    paths = {}
    for split, records in generate(seed).items():
        paths[split] = split_path(split, directory)
        atomic_write_jsonl(paths[split], records)
    return paths


def main() -> None:
    for split, path in build().items():
        print(f"{split:12s} {sum(1 for _ in path.open()):6d} records -> {path}")


if __name__ == "__main__":
    main()
