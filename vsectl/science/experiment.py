"""The experiments' recipes: the shipped ones found through the package (package data of a wheel, `recipes/` of a
source checkout), and the one reader of their YAML files (pattern studies, planted benchmarks, grid files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, TypeVar

from vsectl.config import apply_overrides
from vsectl.errors import ConfigError
from vsectl.recipe_yaml import load_yaml_file
from vsectl.strict import from_dict

T = TypeVar("T")


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The YAML mapping in `path`; a missing file, invalid YAML or a non-mapping fails in one line naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    data = load_yaml_file(path, what) or {}  # bounded: size, nesting, alias expansion, UTF-8
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of settings")
    return data


def load_experiment(cls: type[T], path: str | Path, overrides: list[str] | None, what: str) -> T:
    """Read an experiment recipe into the dataclass `cls`, with dotted overrides, strictly (unknown keys fail)."""
    return from_dict(cls, apply_overrides(read_mapping(path, what), overrides or []))


def recipe_dir() -> Path:
    """The folder of the shipped recipes (`tiny.yaml`, `patterns/`, ...)."""
    try:  # an installed wheel carries them as the data package vsectl.recipes (a namespace package: no __init__.py)
        spec = importlib.util.find_spec("vsectl.recipes")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location, "tiny.yaml").is_file():
            return Path(location)
    return Path(__file__).resolve().parents[2] / "recipes"  # a source checkout (editable or on PYTHONPATH)


def shipped_recipe(name: str) -> Path:
    """A shipped recipe by file name (relative to the recipe folder), e.g. "tiny.yaml" or "patterns/quick.yaml"."""
    path = recipe_dir() / name
    if not path.is_file():
        raise ConfigError(f"vsectl ships no recipe {name} (looked in {recipe_dir()}); pass a RECIPE file")
    return path
