"""Config plumbing shared by every stage: dataclass fields with help text, YAML files, and validation.

Each stage module defines its own documented config dataclass (`SFTConfig` in sft.py, ...), with every
field declared through `option(default, "help")`. The CLI turns those fields into flags, a YAML file can
set them too, and unknown or mistyped keys are reported with the file and key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from instrugo.runio import InputError

T = TypeVar("T")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a default and a help string (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, annotation: Any, source: str, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise an InputError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(v, args[0], source, key) for v in items if v != ""]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise InputError(source, f"expected {getattr(annotation, '__name__', annotation)}, got {value!r}",
                         field=key) from None
    return value


def from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build `cls` from a dict; unknown keys and wrong types are InputErrors naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise InputError(source, f"unknown setting (known: {', '.join(sorted(fields))})", field=key)
        kwargs[name] = _coerce(value, field_type(cls, name), source, key)
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(path, f"invalid YAML: {getattr(e, 'problem', e)}",
                         line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise InputError(path, "the top level must be a mapping of settings")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def require(condition: bool, field: str, message: str) -> None:
    """Config validation helper: raise an InputError about `field` unless `condition` holds."""
    if not condition:
        raise InputError("config", message, field=field)
