"""A bidirectional GRU over padded variable-length sequences: packed (cuDNN) or two dense passes (CPU).

On a CPU, packing makes the GRU walk time step by time step over shrinking batches, and its backward spends much of
its time filling and slicing per-step buffers. Two dense unidirectional passes run oneDNN's fused kernel instead: the
forward direction on the padded batch as it is (a position never sees the padding after it), the reverse direction
on each sequence reversed within its own length. Both read the weights of the one `nn.GRU(bidirectional=True)`, so
the state_dict keys (`weight_ih_l0`, `weight_ih_l0_reverse`, ...) stay those of the packed model.

The dense passes also compute the padded steps, so they pay only where the per-step overhead outweighs that: under
bf16 autocast on a CPU (parity on an AVX512-BF16 EPYC, 1.75x faster on an AMX Xeon), not at fp32 on a CPU whose
matrix products are slow (the packed BiGRU took 0.84x the dense one's CPU time on the EPYC). `Precision.dense_rnn`
decides it once per run; `set_dense` applies it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def use_dense(device: torch.device) -> bool:
    """Dense passes everywhere but CUDA, where cuDNN runs packed sequences natively (the default of `bigru`)."""
    return device.type != "cuda"


def set_dense(model: nn.Module, dense: bool) -> None:
    """Choose the dense or the packed path for every module of `model` that has the switch (the BiGRU text encoder)."""
    for module in model.modules():
        if isinstance(getattr(module, "dense_rnn", None), bool):
            module.dense_rnn = dense


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


def bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
    """A 1-layer bidirectional GRU over padded sequences; `dense` None picks by device (see `use_dense`)."""
    if dense is None:
        dense = use_dense(x.device)
    return dense_bigru(gru, x, lengths) if dense else packed_bigru(gru, x, lengths)


def check_gru(gru: nn.GRU) -> None:
    if gru.num_layers != 1 or not gru.bidirectional or not gru.batch_first or not gru.bias:
        raise ValueError("dense_bigru supports a 1-layer, batch-first, bidirectional GRU with biases")
