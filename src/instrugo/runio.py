"""Run directories: atomic writes, metrics logs, completion markers and input errors.

Every stage reads its inputs from files and writes its outputs into its own directory, so a stage can
run alone from the CLI and the pipeline is only their sequence. Everything here is written so that a
killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

COMPLETE_MARKER = "complete.json"


class InputError(Exception):
    """Bad user input: reported as one line naming the file, line and field, then a non-zero exit."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path + (f":{line}" if line is not None else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses from a stage's process to `instrugo run` (pickle would
        # otherwise call InputError(formatted message) and fail).
        return InputError, (self.path, self.message, self.line, self.field)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line; a malformed line is an InputError."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(path, f"not valid JSON ({e.msg} at column {e.colno})", line=number) from None
            if not isinstance(obj, dict):
                raise InputError(path, "each line must be a JSON object", line=number)
            yield number, obj


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final` in one rename.

    Used for checkpoints and the model cache: a kill during saving leaves the previous directory untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the fully written directory `staged` in the place of `final` by renames. A kill between them
    leaves the previous `final` as `.NAME.old`, which readers of checkpoints fall back to."""
    staged, final = Path(staged), Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # else `old` may be the only complete copy left by an earlier kill: keep it
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged step, flushed and fsynced per line.

    On resume, lines past the resumed step are dropped so the log never holds a step twice.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in _complete_lines(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_jsonl(self.path, kept)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _complete_lines(path: Path) -> list[dict]:
    """The log's rows, without a last line that a kill cut short mid-write."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    return [r for _, r in iter_jsonl(path)] if path.exists() else []


def is_complete(stage_dir: str | os.PathLike) -> bool:
    return (Path(stage_dir) / COMPLETE_MARKER).exists()


def mark_complete(stage_dir: str | os.PathLike, info: dict) -> None:
    atomic_write_json(Path(stage_dir) / COMPLETE_MARKER, {"finished_at": time.time(), **info})


def update_json(path: str | os.PathLike, update: dict) -> dict:
    """Deep-merge `update` into the JSON object at `path` (created if missing), atomically."""
    path = Path(path)
    current = read_json(path) if path.exists() else {}

    def merge(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(current, update)
    atomic_write_json(path, current)
    return current


def format_percent(value: float | None) -> str:
    """0.654 -> '65.4%'; None (nothing to measure) -> 'n/a'."""
    return "n/a" if value is None else f"{100 * value:.1f}%"
