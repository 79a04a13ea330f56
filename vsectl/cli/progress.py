"""Progress on stderr for the library's `Progress` protocol: live rich bars on a terminal, plain lines elsewhere.

Without a terminal (a log file, nohup, SLURM, CI) a live bar prints nothing until it ends, so long stages looked
dead. There each tracked stage prints one line every `VSECTL_PROGRESS_EVERY` seconds (30 by default): items done,
rate, time left and the stage's own figures, and one closing line when it took longer than that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")
PROGRESS_EVERY_S = 30.0  # seconds between progress lines without a terminal (VSECTL_PROGRESS_EVERY overrides)


def progress_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("VSECTL_PROGRESS_EVERY", PROGRESS_EVERY_S)))
    except ValueError:
        return PROGRESS_EVERY_S


def duration(seconds: float) -> str:
    """3 s, 4 min 05 s, 2 h 03 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _fields(fields: dict[str, Any]) -> str:
    return "  ".join(f"{k.replace('_per_s', '/s')} {v:.4g}" for k, v in fields.items())


class LineProgress:
    """Progress as plain lines at a steady interval (no terminal: nothing is redrawn, nothing is wrapped)."""

    def __init__(self, console: Console, every: float | None = None) -> None:
        self.console, self.every = console, progress_interval() if every is None else every
        self.fields: dict[str, Any] = {}

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        start = last = time.monotonic()
        done = 0
        try:
            for item in iterable:
                yield item
                done += 1
                now = time.monotonic()
                if now - last >= self.every and (total is None or done < total):
                    last = now
                    self._line(self.status(description, done, total, now - start))
        except GeneratorExit:  # the caller stopped after the item it had (a capped epoch): that one is done too
            done += 1
            raise
        finally:
            elapsed = time.monotonic() - start
            if elapsed >= self.every and done:
                self._line(f"{description}: done, {done} in {duration(elapsed)} ({done / max(elapsed, 1e-9):.3g}/s)"
                           + (f"  {_fields(self.fields)}" if self.fields else ""))

    def status(self, description: str, done: int, total: int | None, elapsed: float) -> str:
        rate = done / max(elapsed, 1e-9)
        if total:
            left = f", {duration((total - done) / rate)} left" if rate > 0 and done < total else ""
            where = f"{done}/{total} ({100 * done / total:.0f}%)"
        else:
            where, left = str(done), ""
        extra = f"  {_fields(self.fields)}" if self.fields else ""
        return f"{description}: {where}, {rate:.3g}/s, {duration(elapsed)} so far{left}{extra}"

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)


class ConsoleProgress:
    """The CLI's progress: rich bars on a terminal, `LineProgress` lines otherwise; nothing when disabled (-q)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.fields: dict[str, Any] = {}
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                            disable=not enabled, transient=True)
        self.lines = LineProgress(console) if enabled and not console.is_terminal else None
        self.task = None

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        if self.lines is not None:
            yield from self.lines.track(iterable, total, description)
            return
        with self.bar:
            self.task = self.bar.add_task(description, total=total, info="")
            for item in iterable:
                yield item
                self.bar.advance(self.task)
            self.bar.remove_task(self.task)
            self.task = None

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self.lines is not None:
            self.lines.update(**fields)
        if self.task is not None:
            self.bar.update(self.task, info=_fields(self.fields))
