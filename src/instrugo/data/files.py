"""Reading examples: the shipped InstruGo splits and users' own JSONL, validated line by line.

Every reader returns normalized records: `prompt` (str), `messages` (the chat so far, WITHOUT the final
assistant turn) and `response` when the data has one; InstruGo records keep their `constraints` and
`topic` so the gold judge can score them. Users' files hold one JSON object per line, either

    {"prompt": "...", "response": "..."}                  # response optional (prompt-only data)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  # last turn: assistant

plus optional `id`, `topic` and `constraints`. The first bad line raises an InputError naming the file,
the line and the field.
"""

from __future__ import annotations

import functools
from pathlib import Path

from instrugo.data.generate import DATASET_VERSION, SPLITS
from instrugo.judge import CONSTRAINT_KINDS, check_constraint
from instrugo.runio import InputError, iter_jsonl

SHIPPED_PREFIX = "instrugo:"
ROLES = ("system", "user", "assistant")


def split_path(split: str, directory: Path | None = None) -> Path:
    return (directory or Path(__file__).parent) / f"instrugo-v{DATASET_VERSION}.{split}.jsonl"


@functools.cache
def read_split(split: str) -> tuple[dict, ...]:
    """The shipped records of one split exactly as stored (cached; treat them as read-only)."""
    if split not in SPLITS:
        raise InputError(f"{SHIPPED_PREFIX}{split}", f"unknown split (known: {', '.join(SPLITS)})")
    path = split_path(split)
    if not path.is_file():
        raise InputError(path, "shipped split is missing; regenerate it with `python -m instrugo.data.build`")
    return tuple(row for _, row in iter_jsonl(path))


def load_split(split: str) -> list[dict]:
    """A shipped split as normalized records (prompt splits gain `messages`); a fresh list each call."""
    return [{**r, "messages": [{"role": "user", "content": r["prompt"]}]} if "prompt" in r else dict(r)
            for r in read_split(split)]


def load_examples(spec: str) -> list[dict]:
    """`instrugo:SPLIT` (a shipped split) or the path of a user JSONL file, as normalized records."""
    if spec.startswith(SHIPPED_PREFIX):
        return load_split(spec[len(SHIPPED_PREFIX):])
    path = Path(spec)
    if not path.is_file():
        raise InputError(path, "file not found (give a JSONL path or instrugo:SPLIT, e.g. instrugo:sft)")
    records = [parse_example(row, str(path), line) for line, row in iter_jsonl(path)]
    if not records:
        raise InputError(path, "contains no examples")
    return records


def text_field(row: dict, key: str, path: str, line: int, field: str | None = None) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        problem = "missing" if value is None else "must be a non-empty string"
        raise InputError(path, problem, line=line, field=field or key)
    return value


def parse_messages(row: dict, path: str, line: int) -> tuple[list[dict], str]:
    """(messages without the final assistant turn, that turn's content)."""
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise InputError(path, "must be a non-empty list of {role, content} objects", line=line, field="messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(path, "must be an object with role and content", line=line, field=where)
        if message.get("role") not in ROLES:
            raise InputError(path, f"must be one of {', '.join(ROLES)} (got {message.get('role')!r})",
                             line=line, field=f"{where}.role")
        text_field(message, "content", path, line, field=f"{where}.content")
    if messages[-1]["role"] != "assistant":
        raise InputError(path, "the last message must be the assistant's response", line=line,
                         field=f"messages[{len(messages) - 1}].role")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise InputError(path, "needs a user message before the assistant's", line=line, field="messages")
    return [dict(m) for m in messages[:-1]], messages[-1]["content"]


def parse_constraints(value: object, path: str, line: int) -> list[dict]:
    if not isinstance(value, list):
        raise InputError(path, "must be a list of {kind, args} objects", line=line, field="constraints")
    for i, constraint in enumerate(value):
        where = f"constraints[{i}]"
        if not isinstance(constraint, dict) or constraint.get("kind") not in CONSTRAINT_KINDS:
            kind = constraint.get("kind") if isinstance(constraint, dict) else constraint
            raise InputError(path, f"unknown constraint kind {kind!r} (known: {', '.join(CONSTRAINT_KINDS)})",
                             line=line, field=f"{where}.kind")
        if not isinstance(constraint.get("args", {}), dict):
            raise InputError(path, "must be an object", line=line, field=f"{where}.args")
        try:  # a verifier run on an empty response tells whether the args have the fields it needs
            check_constraint(constraint, "")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(path, f"do not fit kind '{constraint['kind']}' ({type(e).__name__}: {e})",
                             line=line, field=f"{where}.args") from None
    return value


def parse_example(row: dict, path: str, line: int) -> dict:
    """Validate one user line and normalize it."""
    if "messages" in row:
        messages, response = parse_messages(row, path, line)
        prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        record = {"prompt": prompt, "messages": messages, "response": response}
    elif "prompt" in row:
        record = {"prompt": text_field(row, "prompt", path, line)}
        record["messages"] = [{"role": "user", "content": record["prompt"]}]
        if "response" in row:
            record["response"] = text_field(row, "response", path, line)
    else:
        raise InputError(path, "missing: each line needs 'prompt' (with optional 'response') or 'messages'",
                         line=line, field="prompt")
    if "constraints" in row:
        record["constraints"] = parse_constraints(row["constraints"], path, line)
    if "topic" in row and not isinstance(row["topic"], str):
        raise InputError(path, "must be a string", line=line, field="topic")
    return {"id": str(row.get("id", f"{Path(path).name}:{line}")),
            **{k: v for k, v in row.items() if k not in ("id", "messages")}, **record}


def chat_row(record: dict) -> dict:
    """A record in the chat format (for export): its messages plus the assistant's response."""
    return {"id": record["id"],
            "messages": [*record["messages"], {"role": "assistant", "content": record["response"]}]}

