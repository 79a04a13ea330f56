"""The recipes shipped with vsectl: package data of an installed vsectl, the `recipes/` folder of a source checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vsectl.errors import ConfigError


def recipe_dir() -> Path:
    """The folder of the shipped recipes (`tiny.yaml`, `patterns/`, ...)."""
    try:  # an installed wheel carries them as the data package vsectl.recipes (a namespace package: no __init__.py)
        spec = importlib.util.find_spec("vsectl.recipes")
    except ModuleNotFoundError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(location, "tiny.yaml").is_file():
            return Path(location)
    return Path(__file__).resolve().parent.parent / "recipes"  # a source checkout (editable or on PYTHONPATH)


def shipped_recipe(name: str) -> Path:
    """A shipped recipe by file name (relative to the recipe folder), e.g. "tiny.yaml" or "patterns/quick.yaml"."""
    path = recipe_dir() / name
    if not path.is_file():
        raise ConfigError(f"vsectl ships no recipe {name} (looked in {recipe_dir()}); pass a RECIPE file")
    return path
