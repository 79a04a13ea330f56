"""The one reader of the experiments' YAML files: pattern studies, planted benchmarks and grid files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from vsectl.config import apply_overrides
from vsectl.errors import ConfigError
from vsectl.strict import from_dict

T = TypeVar("T")


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping in `path`; a missing file, invalid YAML or a non-mapping fails in one line naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of settings")
    return data


def load_experiment(cls: type[T], path: str | Path, overrides: list[str] | None, what: str) -> T:
    """Read an experiment recipe into the dataclass `cls`, with dotted overrides, strictly (unknown keys fail)."""
    return from_dict(cls, apply_overrides(read_mapping(path, what), overrides or []))
