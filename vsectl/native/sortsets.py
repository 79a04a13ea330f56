"""GPO's per-dimension sort on a CPU: the C kernel `sortsets.c` as an autograd function.

`torch.sort` sorts each of the B·D columns of a (B, K, D) batch (after a transposing copy) with a general-purpose
sort and returns int64 indices; at GPO's shapes (128 × 1024 columns of ≤ 36 values) that took 115 ms of a 2.2 s
training step on one core. The kernel sorts only each set's valid rows with a sorting network vectorised over
columns, in place of the mask, transpose and sort, and keeps an int16 source row per value for the backward pass
(benchmarks/bench_speed.py measures both).

The sorted values equal `torch.sort`'s exactly (a sort has one result); where a column holds equal values, which of
them receives which rank's gradient may differ from `torch.sort`'s choice, as it may between torch versions. Two
differences from the torch path: a NaN stays where the network leaves it (torch.sort puts NaNs first), and values
below MASK_VALUE (−10000) sort correctly (the torch path's padding fill would rank them after the padding). The
backward is not itself differentiable (no double backward).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from vsectl import native

log = logging.getLogger(__name__)

MAX_ROWS = 32767             # source rows are int16
_P, _I = ctypes.c_void_p, ctypes.c_int64
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_warned = False


def _library() -> ctypes.CDLL | None:
    global _warned
    lib = native.load("sortsets")
    if lib is None:
        if not _warned:
            log.warning("GPO sorts with torch.sort, which is slower: the native sort is %s",
                        native.status().get("sortsets"))
            _warned = True
        return None
    if lib.vsectl_sort_sets.argtypes is None:
        lib.vsectl_sort_sets.argtypes = [_P, _I, _I, _I, _I, _P, _I, _P, _P, _I, _I]
        lib.vsectl_sort_sets.restype = ctypes.c_int
        lib.vsectl_sort_sets_grad.argtypes = [_P, _P, _P, _I, _I, _I, _P, _I, _I]
        lib.vsectl_sort_sets_grad.restype = None
    return lib


def available(feats: torch.Tensor) -> bool:
    """Whether `sort_sets` serves this batch: a CPU float tensor of at most MAX_ROWS rows, and the kernel built."""
    return (feats.device.type == "cpu" and feats.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and feats.dim() == 3 and feats.size(1) <= MAX_ROWS and _library() is not None)


def _spans(batch: int) -> list[tuple[int, int]]:
    """Split the batch into one span of sets per torch thread (the kernel releases the GIL through ctypes)."""
    parts = max(1, min(torch.get_num_threads(), batch))
    edges = [batch * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _run(fn, batch: int) -> list:  # noqa: ANN001
    global _pool, _pool_size
    spans = _spans(batch)
    if len(spans) == 1:
        return [fn(*spans[0])]
    with _pool_lock:
        if _pool is None or _pool_size < len(spans):  # a smaller pool another thread still uses is left to finish
            _pool, _pool_size = ThreadPoolExecutor(max_workers=len(spans), thread_name_prefix="vsectl-sort"), len(spans)
        pool = _pool
    return list(pool.map(lambda s: fn(*s), spans))


def _forget_pool() -> None:
    """A forked child (a DataLoader worker, a sweep job) has none of the parent's threads: it starts its own pool."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


class _SortSets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        lib = _library()
        if lib is None:
            raise RuntimeError(f"the native GPO sort is not available: {native.status().get('sortsets')}")
        batch, rows, dim = feats.shape
        x = feats.float()
        if x.stride(2) != 1:
            x = x.contiguous()
        lengths = lengths.to("cpu", torch.int64).contiguous()
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have one size per set, shape ({batch},), got {tuple(lengths.shape)}")
        kout = int(lengths.max())
        if kout > rows or int(lengths.min()) < 1:
            raise ValueError(f"set sizes must be in 1..{rows}, got {int(lengths.min())}..{kout}")
        grad = ctx.needs_input_grad[0]
        out = torch.empty(batch, kout, dim, dtype=torch.float32, device="cpu")
        src = torch.empty(batch, kout, dim, dtype=torch.int16, device="cpu") if grad else None
        codes = _run(lambda b0, b1: lib.vsectl_sort_sets(
            x.data_ptr(), rows, dim, x.stride(0), x.stride(1), lengths.data_ptr(), kout, out.data_ptr(),
            src.data_ptr() if grad else None, b0, b1), batch)
        if any(codes):
            raise MemoryError("the native GPO sort could not allocate its buffers")
        if grad:
            ctx.save_for_backward(src, lengths)
        ctx.lib, ctx.rows, ctx.dtype = lib, rows, feats.dtype
        return out if feats.dtype == torch.float32 else out.to(feats.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        src, lengths = ctx.saved_tensors
        g = grad.float().contiguous()
        batch, kout, dim = g.shape
        gx = torch.empty(batch, ctx.rows, dim, dtype=torch.float32, device="cpu")
        _run(lambda b0, b1: ctx.lib.vsectl_sort_sets_grad(
            g.data_ptr(), src.data_ptr(), lengths.data_ptr(), kout, ctx.rows, dim, gx.data_ptr(), b0, b1), batch)
        return (gx if ctx.dtype == torch.float32 else gx.to(ctx.dtype)), None


def sort_sets(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sort every dimension of every set descending over its valid rows; zero the rest.

    Args:
        feats: (B, K, D) CPU float tensor (fp32, bf16 or fp16); padded rows are never read.
        lengths: (B,) set sizes, 1 ≤ n ≤ K.

    Returns:
        (B, K', D) contiguous, K' = max(lengths), in feats' dtype, differentiable with respect to feats. Call only
        where `available(feats)`.
    """
    return _SortSets.apply(feats, lengths)
