"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class VsectlError(Exception):
    """Base class for mistakes a user can fix (bad recipe, missing file, wrong shape)."""


class ConfigError(VsectlError):
    """A recipe, override or command-line value is invalid."""


class DataError(VsectlError):
    """A data file is missing, malformed or inconsistent."""


class CheckpointError(VsectlError):
    """A run directory or checkpoint is missing, incomplete or from another configuration."""
