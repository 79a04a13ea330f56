"""The recipes shipped with vsectl: package data of an installed vsectl, the `recipes/` folder of a source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from vsectl.errors import ConfigError


def recipe_dir() -> Path:
    """The folder of the shipped recipes (`tiny.yaml`, `patterns/`, ...)."""
    try:  # an installed wheel carries them as the data package vsectl.recipes
        folder = Path(str(resources.files("vsectl.recipes")))
        if folder.is_dir():
            return folder
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "recipes"  # a source checkout (editable or on PYTHONPATH)


def shipped_recipe(name: str) -> Path:
    """A shipped recipe by file name (relative to the recipe folder), e.g. "tiny.yaml" or "patterns/quick.yaml"."""
    path = recipe_dir() / name
    if not path.is_file():
        raise ConfigError(f"vsectl ships no recipe {name} (looked in {recipe_dir()}); pass a RECIPE file")
    return path
