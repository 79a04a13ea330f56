"""A bidirectional GRU over variable-length sequences with a hand-written backward through time (for CPUs).

PyTorch's packed GRU on a CPU runs its backward through autograd one time step at a time: every step's linear layer
computes its own weight gradient from a GEMM whose inner size is that step's batch (≤ B), and accumulates it, plus
slice and fill buffers per step. Here each time step costs one GEMM forward (h·W_hhᵀ over the rows still active,
the batch sorted by length once, as packing does) and one backward (dh·W_hh), plus fused gate maths; the input
projections of both directions, their gradients and every weight gradient are one large GEMM each over all tokens.

The maths is that of `nn.GRU` (gates in its r, z, n order):

    r = σ(W_ir x + b_ir + W_hr h + b_hr)      z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))      h' = (1 − z) ⊙ n + z ⊙ h

Under bf16 autocast the GEMM operands are bf16 (fp32 accumulation inside the GEMM); the gates, the hidden state and
the gradients stay fp32, and the output is bf16 as autocast would give it.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLayout:
    """Where each valid token of a padded (B, T) batch sits in the time-major packed order of `nn.utils.rnn`.

    Rows are sorted by length (descending, stable) once; at time t the active rows are the first `sizes[t]` of them
    and occupy packed rows `offsets[t]:offsets[t] + sizes[t]`.
    """

    def __init__(self, lengths: torch.Tensor, max_len: int) -> None:
        lengths = lengths.cpu().long()                                                   # plain ints drive the loop
        order = torch.sort(lengths, descending=True, stable=True).indices               # (B,)
        t = torch.arange(max_len)
        valid = lengths[order][None, :] > t[:, None]                                    # (T, B) time-major
        self.sizes = valid.sum(1).tolist()                                               # rows active at each t
        self.offsets = [0]
        for s in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + s)
        flat = order[None, :] * max_len + t[:, None]                                     # (T, B) into (B·T)
        self.index = flat[valid]                                                         # (N,) packed → padded row
        self.n = int(self.index.numel())
        self.batch = int(lengths.numel())
        self.max_len = max_len


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _BiGRUFunction(torch.autograd.Function):
    """(N, F) packed input, the two directions' weights → (N, 2H) packed output; see the module docstring.

    `acc` is the dtype of the gates, state and gradients (fp32, or the input's if wider); `cdt` that of the GEMM
    operands (bf16 under bf16 autocast, else `acc`). Buffers that only feed GEMMs are kept in `cdt`.
    """

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r, layout, cdt):  # noqa: ANN001
        hidden, n_tok = w_hh.size(1), layout.n
        acc = torch.promote_types(x.dtype, torch.float32)
        w_ih_cat = torch.cat([w_ih, w_ih_r]).to(cdt)                                   # (6H, F)
        xc = x.to(cdt)
        gi = torch.addmm(torch.cat([b_ih, b_ih_r]).to(cdt), xc, w_ih_cat.t()).to(acc)  # (N, 6H), both directions
        outs, saved = [], []
        for d, (w, b) in enumerate(((w_hh, b_hh), (w_hh_r, b_hh_r))):
            wc, bias = w.to(cdt), b.to(acc)
            out = x.new_empty(n_tok, hidden, dtype=acc)
            rz = x.new_empty(n_tok, 2 * hidden, dtype=acc)                             # σ gates r | z
            n_all = x.new_empty(n_tok, hidden, dtype=acc)                              # candidate n
            ghn = x.new_empty(n_tok, hidden, dtype=acc)                                # W_hn h + b_hn
            hp_all = x.new_empty(n_tok, hidden, dtype=cdt)                             # h before each step
            h = x.new_zeros(layout.batch, hidden, dtype=acc)
            g_cols = slice(3 * hidden * d, 3 * hidden * (d + 1))
            for t in (range(layout.max_len) if d == 0 else range(layout.max_len - 1, -1, -1)):
                b_t, o = layout.sizes[t], layout.offsets[t]
                if b_t == 0:
                    continue
                rows = slice(o, o + b_t)
                hp = h[:b_t]
                hp_c = hp_all[rows]
                hp_c.copy_(hp)
                gh = torch.mm(hp_c, wc.t()).to(acc).add_(bias)                         # (b, 3H)
                g = gi[rows, g_cols]
                torch.add(g[:, : 2 * hidden], gh[:, : 2 * hidden], out=rz[rows]).sigmoid_()
                ghn[rows] = gh[:, 2 * hidden:]
                n_t = torch.addcmul(g[:, 2 * hidden:], rz[rows, :hidden], ghn[rows], out=n_all[rows]).tanh_()
                h[:b_t] = torch.addcmul(n_t, rz[rows, hidden:], hp - n_t, out=out[rows])  # h' = n + z (h − n)
            outs.append(out)
            saved += [rz, n_all, ghn, hp_all]
        ctx.save_for_backward(xc, w_ih_cat, w_hh, w_hh_r, *saved)
        ctx.layout, ctx.cdt, ctx.acc, ctx.x_dtype = layout, cdt, acc, x.dtype
        return torch.cat(outs, dim=1).to(cdt)                                          # (N, 2H)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        xc, w_ih_cat, w_hh, w_hh_r, *saved = ctx.saved_tensors
        layout, cdt, acc = ctx.layout, ctx.cdt, ctx.acc
        hidden, n_tok = w_hh.size(1), layout.n
        grad_out = grad_out.to(acc)
        dgi = grad_out.new_empty(n_tok, 6 * hidden, dtype=cdt)                         # d pre-activations, input side
        grads_hh = []
        for d, w in enumerate((w_hh, w_hh_r)):
            rz, n_all, ghn, hp_all = saved[4 * d: 4 * d + 4]
            wc = w.to(cdt)
            dgh = grad_out.new_empty(n_tok, 3 * hidden, dtype=cdt)                     # d pre-activations, hidden side
            dh = grad_out.new_zeros(layout.batch, hidden)
            go = grad_out[:, hidden * d: hidden * (d + 1)]
            base = 3 * hidden * d
            for t in (range(layout.max_len - 1, -1, -1) if d == 0 else range(layout.max_len)):
                b_t, o = layout.sizes[t], layout.offsets[t]
                if b_t == 0:
                    continue
                rows = slice(o, o + b_t)
                g = dh[:b_t].add_(go[rows])                                            # dL/dh' at this step
                r, z = rz[rows, :hidden], rz[rows, hidden:]
                n_t, hp = n_all[rows], hp_all[rows].to(acc)
                da_n = (g - g * z).mul_(1 - n_t * n_t)                                 # through h' then tanh
                da_z = (g * (hp - n_t)).mul_(z * (1 - z))
                da_r = (da_n * ghn[rows]).mul_(r * (1 - r))
                dgi[rows, base: base + hidden] = da_r
                dgi[rows, base + hidden: base + 2 * hidden] = da_z
                dgi[rows, base + 2 * hidden: base + 3 * hidden] = da_n
                dgh[rows, : 2 * hidden] = dgi[rows, base: base + 2 * hidden]
                dgh[rows, 2 * hidden:] = da_n * r
                dhp = torch.mm(dgh[rows], wc).to(acc).addcmul_(g, z)                   # (b, H) = dL/dh
                nxt = b_t if d == 0 else (layout.sizes[t + 1] if t + 1 < layout.max_len else 0)
                dh[:nxt] = dhp[:nxt]                                                    # the rest stay 0 / unused
            grads_hh.append(((dgh.t() @ hp_all).to(acc), dgh.sum(0, dtype=acc)))        # one GEMM over all steps
        dx = (dgi @ w_ih_cat).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dw_ih = (dgi.t() @ xc).to(acc)                                                  # (6H, F)
        db_ih = dgi.sum(0, dtype=acc)
        (dw_hh, db_hh), (dw_hh_r, db_hh_r) = grads_hh
        three = 3 * hidden
        return (dx, dw_ih[:three], dw_hh, db_ih[:three], db_hh,
                dw_ih[three:], dw_hh_r, db_ih[three:], db_hh_r, None, None)


def stepped_bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, F) padded input, (B,) lengths → (B, T, 2H), zero past each length, as the packed `nn.GRU` gives it."""
    batch, max_len, feat = x.shape
    layout = PackedLayout(lengths, max_len)
    index = layout.index.to(x.device)
    packed = x.reshape(batch * max_len, feat).index_select(0, index)                   # (N, F)
    params = [getattr(gru, f"{name}_l0{suffix}") for suffix in ("", "_reverse")
              for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    cdt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        out = _BiGRUFunction.apply(packed, *params, layout, cdt)                       # (N, 2H)
    return out.new_zeros(batch * max_len, out.size(1)).index_copy(0, index, out).view(batch, max_len, -1)
