"""Split names: `dev` is the model-selection split in every command and file; `val` (Karpathy's name) is its alias."""

from __future__ import annotations

ALIASES = {"val": "dev"}  # alias → the name used in commands, store files and run folders


def canonical_split(name: str) -> str:
    """The split name vsectl uses for `name` (`val` → `dev`; any other name unchanged)."""
    return ALIASES.get(name, name)


def split_file_names(name: str) -> list[str]:
    """The names a split's files may carry on disk, preferred first (`dev`, then a folder's own `val`)."""
    canonical = canonical_split(name)
    return [canonical, *(alias for alias, target in ALIASES.items() if target == canonical)]
