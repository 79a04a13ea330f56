"""Bring models trained by other code into ordinary vsectl run directories (the official VSE∞ checkpoints)."""

from vsectl.importers.official import import_official, read_official

__all__ = ["import_official", "read_official"]
