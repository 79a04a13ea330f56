"""Strict conversion between nested dicts and frozen config dataclasses: coercion by field type, dotted keys.

An unknown key fails with a did-you-mean naming the dotted key the user typed; a value is coerced by the field's
annotation (PyYAML reads `1e-4` as a string). A section class with a `from_mapping(data, prefix)` classmethod builds
itself (the pooler options, whose `name` picks the class).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from vsectl.errors import ConfigError
from vsectl.recipe_yaml import shown  # a value in a message is cut short: never a 10 MB line
from vsectl.registry import did_you_mean


def to_dict(cfg: Any) -> dict:
    """Convert a config dataclass (recursively) to plain dicts."""
    return dataclasses.asdict(cfg)


def coerce(value: Any, tp: Any, key: str) -> Any:
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {shown(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {shown(value)}")
    if tp == tuple[str, ...]:
        return _coerce_names(value, key)
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def _coerce_names(value: Any, key: str) -> tuple[str, ...]:
    """A list of names: a YAML list, or (from --set) 'a,b', '[a, b]', '' or '[]'."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{key}: expected a list of names, e.g. [tensorboard], got {shown(value)}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, strictly.

    Unknown keys fail with a did-you-mean naming the dotted key; values are coerced by field type.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {shown(data)}")
    if hasattr(cls, "from_mapping"):  # a polymorphic section (pool: its `name` picks the options class)
        return cls.from_mapping(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = [prefix + name for name in fields]
            raise ConfigError(f"unknown key '{prefix}{key}'{did_you_mean(prefix + str(key), dotted)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields today
            raise TypeError(f"unsupported union at {prefix}{name}")
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)
