"""Logging set-up for the CLI: one rich handler on stderr, importable without torch (fast one-line errors)."""

from __future__ import annotations

import logging
from typing import Any


def setup_logging(verbose: bool = False, quiet: bool = False, console: Any = None) -> None:
    """Install one rich handler on stderr. Called once, by the CLI.

    Args:
        console: the rich console that also draws the progress bars; logging through it prints each line above a
            live bar instead of into it. A new stderr console when None.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=console or Console(stderr=True), show_path=False, show_time=False, markup=False)
    root = logging.getLogger("vsectl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
