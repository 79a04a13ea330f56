"""Logging set-up for the CLI: one rich handler on stderr, importable without torch (fast one-line errors)."""

from __future__ import annotations

import logging
import os
from typing import Any


def process_rank() -> int:
    """This process's rank in a torchrun (RANK) or SLURM (SLURM_PROCID) job; 0 outside one. No torch needed."""
    for name in ("RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


class RankPrefix(logging.Filter):
    """Prefix a record with its process's rank ("rank 1: ...")."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"rank {self.rank}: {record.msg}"
        return True


class LineHandler(logging.Handler):
    """One plain line per record ("WARNING  message"), for a stderr that is not a terminal (a log file, CI, a pipe):
    rich would wrap each message at 80 columns there, cutting one warning into several lines."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.file.write(self.format(record) + "\n")
            self.console.file.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(verbose: bool = False, quiet: bool = False, console: Any = None) -> None:
    """Install one rich handler on stderr. Called once, by the CLI.

    Args:
        console: the rich console that also draws the progress bars; logging through it prints each line above a
            live bar instead of into it. A new stderr console when None.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    rank = process_rank()
    level = logging.DEBUG if verbose else logging.WARNING if quiet or rank else logging.INFO  # other ranks: warnings
    console = console or Console(stderr=True)
    handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False, markup=False) \
        if console.is_terminal else LineHandler(console)  # a log file: whole lines, neither wrapped nor padded
    if rank:  # a torchrun job's other processes: said once by rank 0, so only their own warnings and errors, marked
        handler.addFilter(RankPrefix(rank))
    root = logging.getLogger("vsectl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
