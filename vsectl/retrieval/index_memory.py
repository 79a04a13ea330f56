"""The build's resident memory by phase: a sampling thread reads /proc/self/status and keeps each phase's peak.

The card records, per phase (train, encode, merge, measure), the largest resident set seen and how much of it was
anonymous memory (the process's own allocations) and how much file pages mapped into it, so a peak can be traced to
what held it. Sampling misses spikes shorter than the interval; `ru_maxrss` (the card's overall peak) does not.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

INTERVAL_S = 0.2
FIELDS = ("VmRSS", "RssAnon", "RssFile")


def read_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of this process in bytes (Linux); {} elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in FIELDS:
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


class PhaseMemory:
    """Peak resident memory per named phase, sampled every `INTERVAL_S` by a daemon thread while running."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}
        self._phase: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        status = read_status()
        with self._lock:
            if self._phase is None or not status:
                return
            peak = self.peaks.setdefault(self._phase, {"rss": 0, "anon": 0, "file": 0})
            if status.get("VmRSS", 0) >= peak["rss"]:
                peak.update(rss=status.get("VmRSS", 0), anon=status.get("RssAnon", 0), file=status.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Samples taken inside the block count towards `name` (one at the start and one at the end as well)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vsectl-memory", daemon=True)
            self._thread.start()
        with self._lock:
            previous, self._phase = self._phase, name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self._phase = previous

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def summary(self) -> dict[str, Any]:
        """{phase: {"rss": bytes, "anon": bytes, "file": bytes}} at each phase's sampled peak."""
        with self._lock:
            return {name: dict(peak) for name, peak in self.peaks.items()}


_TRIM: object = None


def trim_heap() -> None:
    """Hand the allocator's free heap pages back to the system (glibc's `malloc_trim`; elsewhere nothing).

    The merge allocates each inverted list between short-lived temporaries of similar sizes; the holes they leave
    stayed resident: at 1M vectors the merged process held 419 MB, 352 MB when trimmed after each run of lists (the
    lists themselves: 138 MB)."""
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL(None).malloc_trim  # the C library the process already runs on
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


class NoMemory:
    """The same calls, recording nothing (rank > 0, or when no one asked)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    def stop(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}
