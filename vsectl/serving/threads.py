"""How many threads the two serving stages (text encoding, search) use, decided once when the engine opens.

OpenMP thread counts belong to the thread that sets them (faiss run from a worker thread would otherwise use every
core, whatever the main thread set), so each worker sets its own before its first batch.
"""

from __future__ import annotations

import sys

from vsectl.errors import ConfigError


def stage_threads(requested: int | None, scanned: bool) -> int:
    """Intra-op threads for each of the two serving stages (text encoding, search): `requested` if given; all usable
    CPUs when a side is scanned exactly (a scan is bound by memory bandwidth and gains from every core); half of them
    each otherwise: under load the two stages run side by side, one batch encoding while another searches, and more
    threads would only make them take turns (at 10M on 2 cores, 2 threads each answered 131–142 requests/s against
    161–163 with 1, docs/scaling.md)."""
    from vsectl.runtime import usable_cpus

    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be at least 1, got {requested}")
        return requested
    cpus = usable_cpus()
    return cpus if scanned else max(1, cpus // 2)


def get_threads() -> tuple[int, int | None]:
    """torch's and (when loaded) faiss' thread counts in the calling thread."""
    import torch

    faiss = sys.modules.get("faiss")
    return torch.get_num_threads(), None if faiss is None else faiss.omp_get_max_threads()


def set_threads(n: int, n_faiss: int | None = None) -> None:
    """torch's and (when loaded) faiss' OpenMP thread counts (faiss': `n_faiss`, default n) in the calling thread
    (and, for torch, the threads it starts)."""
    import torch

    torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n if n_faiss is None else n_faiss)
