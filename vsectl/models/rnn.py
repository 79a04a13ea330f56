"""A bidirectional GRU over padded variable-length sequences: packed (cuDNN), two dense passes, or stepped (CPU).

On a CPU, packing makes the GRU walk time step by time step over shrinking batches, and its backward spends much of
its time filling and slicing per-step buffers. Two dense unidirectional passes run oneDNN's fused kernel instead: the
forward direction on the padded batch as it is (a position never sees the padding after it), the reverse direction
on each sequence reversed within its own length. Both read the weights of the one `nn.GRU(bidirectional=True)`, so
the state_dict keys (`weight_ih_l0`, `weight_ih_l0_reverse`, ...) stay those of the packed model.

The dense passes also compute the padded steps. The stepped path (vsectl.models.gru_cpu) walks the packed layout
with a hand-written backward through time instead, one GEMM per step and direction each way and every weight
gradient as one GEMM over all tokens: the BiGRU text encoder's path on a CPU at fp32 and bf16 (BENCHMARKS.md,
"CPU training speed"). The dense passes stay the default for small GRUs on a CPU (GPO's generator), where oneDNN's
fused kernel beats a Python loop over time. `rnn_path_for` decides the text encoder's path once per run, from
the device; `set_rnn_path` applies it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from vsectl.models.gru_cpu import stepped_bigru

RNN_PATHS = ("packed", "dense", "stepped")


def use_dense(device: torch.device) -> bool:
    """Dense passes everywhere but CUDA, where cuDNN runs packed sequences natively (the default of `bigru`)."""
    return device.type != "cuda"


def rnn_path_for(device: torch.device) -> str:
    """The BiGRU's path on `device`: stepped on a CPU, where it measured faster than packed and dense at fp32 and bf16
    (BENCHMARKS.md, "CPU training speed"); packed elsewhere (cuDNN on CUDA)."""
    return "stepped" if device.type == "cpu" else "packed"


def set_rnn_path(model: nn.Module, path: str) -> None:
    """Put every module of `model` that has an `rnn_path` (the BiGRU text encoder) on `path`, one of RNN_PATHS."""
    if path not in RNN_PATHS:
        raise ValueError(f"unknown BiGRU path '{path}'; use one of {', '.join(RNN_PATHS)}")
    for module in model.modules():
        if isinstance(getattr(module, "rnn_path", None), str):
            module.rnn_path = path


def reverse_index(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) int64 positions that reverse each row within its length; padding stays put.

    The permutation is its own inverse, so the same index reverses the outputs back.
    """
    t = torch.arange(max_len, device=lengths.device)[None, :]                        # (1, T)
    n = lengths[:, None].to(t.device)                                                # (B, 1)
    return torch.where(t < n, n - 1 - t, t)                                          # (B, T)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, F) rows picked along time by a (B, T) index."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.size(-1)))


def direction(gru: nn.GRU, x: torch.Tensor, reverse: bool) -> torch.Tensor:
    """One direction of a 1-layer bidirectional `gru` as a dense forward pass over (B, T, F) → (B, T, H)."""
    suffix = "_reverse" if reverse else ""
    params = [getattr(gru, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    h0 = torch.zeros(1, x.size(0), gru.hidden_size, dtype=x.dtype, device=x.device)
    out, _ = torch.gru(x, h0, params, True, 1, 0.0, gru.training, False, True)
    return out


def dense_bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, F) padded input, (B,) lengths → (B, T, 2H), zero past each length, as `packed_bigru` returns it."""
    check_gru(gru)
    index = reverse_index(lengths, x.size(1))
    fwd = direction(gru, x, reverse=False)                                           # (B, T, H)
    bwd = gather_time(direction(gru, gather_time(x, index), reverse=True), index)    # (B, T, H)
    out = torch.cat([fwd, bwd], dim=-1)                                              # (B, T, 2H)
    valid = torch.arange(x.size(1), device=x.device)[None, :] < lengths[:, None].to(x.device)
    return out * valid[..., None].to(out.dtype)


def packed_bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, F) padded input, (B,) lengths → (B, T, 2H) through a packed sequence (zeros past each length)."""
    lengths_cpu = lengths.cpu()  # packing requires lengths on the CPU; unsorted input is allowed
    packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
    out, _ = gru(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
    return out


def bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """A 1-layer bidirectional GRU over padded sequences on `path` (RNN_PATHS); None picks by device (`use_dense`)."""
    if path is None:
        path = "dense" if use_dense(x.device) else "packed"
    if path == "stepped":
        check_gru(gru)
        return stepped_bigru(gru, x, lengths)
    return dense_bigru(gru, x, lengths) if path == "dense" else packed_bigru(gru, x, lengths)


def check_gru(gru: nn.GRU) -> None:
    if gru.num_layers != 1 or not gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError("the dense and stepped BiGRUs support a 1-layer, batch-first, bidirectional GRU with biases")
