"""The stepped CPU BiGRU (hand-written backward through time) gives nn.GRU's outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vsectl.models.gru_cpu import PackedLayout, stepped_bigru
from vsectl.models.pooling.gpo import GPO
from vsectl.models.rnn import bigru, packed_bigru, rnn_path_for, set_rnn_path
from vsectl.models.text_encoders import BiGRUTextEncoder

LENGTHS = torch.tensor([3, 7, 1, 7, 5, 2, 7, 4])  # unsorted, repeated, 1 and the full length


def reference_bigru(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Slow reference: the GRU equations written out, one sequence and one step at a time, zeros past each length."""
    hidden = gru.hidden_size
    out = torch.zeros(x.size(0), x.size(1), 2 * hidden, dtype=x.dtype)
    for d, suffix in enumerate(("", "_reverse")):
        w_ih, w_hh = getattr(gru, f"weight_ih_l0{suffix}"), getattr(gru, f"weight_hh_l0{suffix}")
        b_ih, b_hh = getattr(gru, f"bias_ih_l0{suffix}"), getattr(gru, f"bias_hh_l0{suffix}")
        for b, n in enumerate(lengths.tolist()):
            h = torch.zeros(hidden, dtype=x.dtype)
            for t in range(n) if d == 0 else range(n - 1, -1, -1):
                gi, gh = w_ih @ x[b, t] + b_ih, w_hh @ h + b_hh
                r = torch.sigmoid(gi[:hidden] + gh[:hidden])
                z = torch.sigmoid(gi[hidden: 2 * hidden] + gh[hidden: 2 * hidden])
                cand = torch.tanh(gi[2 * hidden:] + r * gh[2 * hidden:])
                h = (1 - z) * cand + z * h
                out[b, t, d * hidden: (d + 1) * hidden] = h
    return out


def run(fn, gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # noqa: ANN001
    gru.zero_grad()
    xi = x.clone().requires_grad_()
    out = fn(gru, xi, lengths)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [xi.grad] + [p.grad.clone() for p in gru.parameters()]


def test_packed_layout_matches_the_packed_sequence_order() -> None:
    layout = PackedLayout(LENGTHS, 7)
    assert layout.sizes == [8, 7, 6, 5, 4, 3, 3]
    assert layout.n == int(LENGTHS.sum()) and layout.offsets[:3] == [0, 8, 15]
    x = torch.arange(8 * 7.0).view(8, 7, 1)
    packed = nn.utils.rnn.pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False)
    assert torch.equal(x.reshape(-1)[layout.index], packed.data[:, 0])


def test_stepped_equals_the_written_out_reference() -> None:
    torch.manual_seed(0)
    gru = nn.GRU(5, 4, batch_first=True, bidirectional=True).double()
    x = torch.randn(8, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_bigru(gru, x, LENGTHS)
        got = stepped_bigru(gru, x, LENGTHS)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_stepped_outputs_and_every_gradient_match_packed_nn_gru(dtype: torch.dtype, atol: float) -> None:
    torch.manual_seed(1)
    gru = nn.GRU(6, 5, batch_first=True, bidirectional=True).to(dtype)
    x = torch.randn(8, 9, 6, dtype=dtype)  # padded past the longest length (7): those steps stay 0
    (out_p, grads_p), (out_s, grads_s) = run(packed_bigru, gru, x, LENGTHS), run(stepped_bigru, gru, x, LENGTHS)
    assert out_s.shape == (8, 9, 10)
    assert torch.allclose(out_s, out_p, atol=atol)
    assert out_s[2, 1:].abs().max() == 0 and out_s[:, 7:].abs().max() == 0
    names = ["input"] + [n for n, _ in gru.named_parameters()]
    for name, a, b in zip(names, grads_p, grads_s, strict=True):
        assert torch.allclose(a, b, atol=atol), name
    assert grads_s[0][2, 1:].abs().max() == 0  # no gradient into padding


def test_stepped_without_an_input_gradient() -> None:
    torch.manual_seed(2)
    gru = nn.GRU(3, 4, batch_first=True, bidirectional=True)
    x = torch.randn(8, 7, 3)
    stepped_bigru(gru, x, LENGTHS).sum().backward()
    ref = [p.grad.clone() for p in gru.parameters()]
    gru.zero_grad()
    packed_bigru(gru, x, LENGTHS).sum().backward()
    for a, b in zip(ref, [p.grad for p in gru.parameters()], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_stepped_under_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(3)
    gru = nn.GRU(16, 16, batch_first=True, bidirectional=True)
    x = torch.randn(8, 7, 16)
    out32, grads32 = run(stepped_bigru, gru, x, LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, grads16 = run(stepped_bigru, gru, x, LENGTHS)
    assert out16.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads16[1:])  # fp32 parameters get fp32 gradients
    assert (out16.float() - out32).abs().max() < 3e-2
    for a, b in zip(grads32, grads16, strict=True):
        assert (a - b.float()).abs().max() < 5e-2 * (1 + a.abs().max())


def test_text_encoder_stepped_equals_packed_with_the_same_state_dict() -> None:
    torch.manual_seed(4)
    enc = BiGRUTextEncoder(30, 8, 6, GPO())
    keys = list(enc.state_dict())
    tokens = torch.randint(1, 30, (5, 9))
    lengths = torch.tensor([9, 4, 1, 6, 9])
    results = []
    for path in ("packed", "stepped"):
        enc.zero_grad()
        set_rnn_path(enc, path)
        emb, _ = enc(tokens, lengths)
        (emb * torch.arange(6.0)).sum().backward()
        results.append((emb.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    assert list(enc.state_dict()) == keys
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for name, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][name], atol=1e-5), name


def test_the_path_is_chosen_once_by_the_device_and_refuses_unknown_names() -> None:
    assert rnn_path_for(torch.device("cpu")) == "stepped"
    enc = nn.ModuleDict({"text": BiGRUTextEncoder(10, 4, 4, GPO()), "other": nn.Linear(2, 2)})
    set_rnn_path(enc, "stepped")
    assert enc["text"].rnn_path == "stepped"
    set_rnn_path(enc, "packed")
    assert enc["text"].rnn_path == "packed"
    with pytest.raises(ValueError, match="unknown BiGRU path"):
        set_rnn_path(enc, "fast")
    with pytest.raises(ValueError, match="1-layer"):
        bigru(nn.GRU(3, 3, batch_first=True), torch.zeros(1, 2, 3), torch.tensor([2]), path="stepped")
