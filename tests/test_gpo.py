"""GPO against the spec's checklist (GPO-1..19) and a slow per-sample reference written here."""

from __future__ import annotations

import math

import pytest
import torch

from vsectl.models.pooling.base import MASK_VALUE, positional_encoding
from vsectl.models.pooling.gpo import GPO


def reference_pe(length: int, d_pe: int) -> torch.Tensor:
    """Closed form, one entry at a time: column 2j = sin(p·10000^(−2j/d)), column 2j+1 = cos(...)."""
    pe = torch.zeros(length, d_pe)
    for p in range(length):
        for j in range(d_pe // 2):
            omega = 10000.0 ** (-2 * j / d_pe)
            pe[p, 2 * j] = math.sin(p * omega)
            pe[p, 2 * j + 1] = math.cos(p * omega)
    return pe


def reference_theta(gpo: GPO, n: int) -> torch.Tensor:
    """θ for one set of size n: the GRU on exactly n PE rows (no padding, no packing), directions averaged."""
    x = reference_pe(n, gpo.d_pe)[None]                      # (1, n, d)
    out, _ = gpo.gru(x)                                      # (1, n, 2H)
    h = (out[..., : gpo.d_hidden] + out[..., gpo.d_hidden :]) / 2
    scores = gpo.scorer(h)[0, :, 0]                          # (n,)
    return torch.softmax(scores / gpo.temperature, dim=0)


def reference_pool(gpo: GPO, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    out = []
    for b in range(feats.size(0)):
        n = int(lengths[b])
        valid = feats[b, :n]                                 # (n, D)
        ranked = torch.stack([valid[:, d].sort(descending=True).values for d in range(valid.size(1))], dim=1)
        theta = reference_theta(gpo, n)
        out.append((theta[:, None] * ranked).sum(0))
    return torch.stack(out)


@pytest.fixture
def gpo() -> GPO:
    torch.manual_seed(0)
    return GPO(d_pe=8, d_hidden=6)


def batch(seed: int = 0, b: int = 5, k: int = 7, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, k, d, generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 3])[:b]
    return feats, lengths


def test_positional_encoding_matches_closed_form_gpo1_to_gpo4():
    torch.testing.assert_close(positional_encoding(9, 32), reference_pe(9, 32), atol=1e-5, rtol=1e-5)


def test_positional_encoding_is_zero_based_and_interleaved_gpo2_gpo4():
    pe = positional_encoding(3, 4)
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))  # sin(0), cos(0) interleaved
    assert pe[1, 0] == pytest.approx(math.sin(1.0))
    assert pe[1, 2] == pytest.approx(math.sin(1.0 / 100.0))  # ω_1 = 10000^(−2/4) = 1/100


def test_odd_pe_size_is_an_error_gpo1():
    with pytest.raises(ValueError):
        positional_encoding(3, 5)
    with pytest.raises(ValueError):
        GPO(d_pe=5)


def test_pe_is_not_in_the_state_dict_gpo5(gpo):
    assert sorted(gpo.state_dict()) == sorted(
        ["gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0", "gru.weight_ih_l0_reverse",
         "gru.weight_hh_l0_reverse", "gru.bias_ih_l0_reverse", "gru.bias_hh_l0_reverse", "scorer.weight"])


def test_gpo_matches_per_sample_reference_gpo7_to_gpo17(gpo):
    feats, lengths = batch()
    pooled, theta = gpo(feats, lengths)
    torch.testing.assert_close(pooled, reference_pool(gpo, feats, lengths), atol=1e-5, rtol=1e-5)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(theta[b, :n, 0], reference_theta(gpo, n), atol=1e-6, rtol=1e-5)


def test_weights_sum_to_one_and_are_zero_on_padding_gpo11(gpo):
    _, lengths = batch()
    theta = gpo.weights_for_lengths(lengths)
    assert theta.shape == (5, 7, 1)
    torch.testing.assert_close(theta.sum(dim=1)[:, 0], torch.ones(5))
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(theta[b, n:] == 0)


def test_padding_values_change_nothing(gpo):
    feats, lengths = batch()
    garbage = feats.clone()
    for b, n in enumerate(lengths.tolist()):
        garbage[b, n:] = 1e3 * torch.randn_like(garbage[b, n:])
    p1, t1 = gpo(feats, lengths)
    p2, t2 = gpo(garbage, lengths)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(t1, t2)


def test_permutation_of_valid_rows_leaves_pooled_unchanged(gpo):
    feats, lengths = batch()
    shuffled = feats.clone()
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths.tolist()):
        shuffled[b, :n] = feats[b, torch.randperm(n, generator=g)]
    torch.testing.assert_close(gpo(feats, lengths)[0], gpo(shuffled, lengths)[0])


def test_weights_depend_only_on_lengths_gpo13(gpo):
    feats, lengths = batch(0)
    other, _ = batch(1)
    torch.testing.assert_close(gpo(feats, lengths)[1], gpo(other, lengths)[1])


def test_sample_pooled_alone_equals_batched_with_longer_ones(gpo):
    feats, lengths = batch()
    alone, _ = gpo(feats[1:2, :3], lengths[1:2])
    torch.testing.assert_close(alone[0], gpo(feats, lengths)[0][1], atol=1e-6, rtol=1e-6)


def test_batched_by_unique_length_equals_per_sample_generator(gpo):
    _, lengths = batch()
    fast = gpo.weights_for_lengths(lengths)
    for b, n in enumerate(lengths.tolist()):
        per_sample = gpo.weights_for_lengths(torch.tensor([n]), max_len=7)
        torch.testing.assert_close(fast[b], per_sample[0])


@pytest.mark.parametrize("kind", ["max", "min", "mean"])
def test_special_theta_gives_max_min_mean(gpo, kind, monkeypatch):
    feats, lengths = batch()

    def fixed(lengths, max_len=None):
        max_len = int(lengths.max()) if max_len is None else max_len
        theta = torch.zeros(len(lengths), max_len, 1)
        for b, n in enumerate(lengths.tolist()):
            if kind == "max":
                theta[b, 0] = 1
            elif kind == "min":
                theta[b, n - 1] = 1
            else:
                theta[b, :n] = 1 / n
        return theta

    monkeypatch.setattr(gpo, "weights_for_lengths", fixed)
    pooled, _ = gpo(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        valid = feats[b, :n]
        expected = {"max": valid.max(0).values, "min": valid.min(0).values, "mean": valid.mean(0)}[kind]
        torch.testing.assert_close(pooled[b], expected)


def test_pooled_lies_between_min_and_max(gpo):
    feats, lengths = batch()
    pooled, _ = gpo(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        valid = feats[b, :n]
        assert torch.all(pooled[b] <= valid.max(0).values + 1e-6)
        assert torch.all(pooled[b] >= valid.min(0).values - 1e-6)


def test_parameter_count_at_default_sizes_gpo19():
    assert sum(p.numel() for p in GPO().parameters()) == 12_704


def test_scorer_has_no_bias_and_theta_is_the_softmax_of_scores_over_a_tenth_gpo9_gpo10():
    torch.manual_seed(0)
    gpo = GPO(d_pe=8, d_hidden=6)
    assert gpo.scorer.bias is None
    lengths = torch.tensor([4, 6])
    scores = gpo.scores(lengths, 6)[..., 0]                                   # (2, 6)
    theta = gpo.weights_for_lengths(lengths, 6)[..., 0]
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(theta[b, :n], torch.softmax(scores[b, :n] / 0.1, dim=0))
        assert torch.equal(theta[b, n:], torch.zeros(6 - n))                  # masked scores weigh exactly 0


def test_padding_is_masked_below_any_realistic_feature_before_sorting():
    gpo = GPO(d_pe=8, d_hidden=6)
    feats = torch.full((1, 4, 2), -5000.0)                                    # valid values far below zero
    feats[0, 3] = 1e9                                                          # a huge padded row
    pooled, _ = gpo(feats, torch.tensor([3]))
    torch.testing.assert_close(pooled, torch.full((1, 2), -5000.0))
    assert MASK_VALUE < -5000.0


def test_weights_stay_fp32_and_finite_under_fp16_autocast():
    """fp16 cannot hold MASK_VALUE / temperature (−1e5): GPO's scores and softmax must stay in fp32."""
    torch.manual_seed(0)
    gpo = GPO(d_pe=8, d_hidden=6)
    feats, lengths = batch()
    _, expected = gpo(feats, lengths)
    with torch.autocast("cpu", dtype=torch.float16):
        _, theta = gpo(feats.half(), lengths)
    assert theta.dtype == torch.float32 and torch.isfinite(theta).all()
    torch.testing.assert_close(theta, expected)
    assert torch.isinf(torch.tensor(MASK_VALUE / 0.1, dtype=torch.float16))  # why the island exists


def test_gpo_at_the_paper_sizes_matches_the_reference():
    torch.manual_seed(0)
    gpo = GPO(d_pe=32, d_hidden=32)
    feats, lengths = batch(seed=3, d=6)
    pooled, _ = gpo(feats, lengths)
    torch.testing.assert_close(pooled, reference_pool(gpo, feats, lengths), rtol=1e-5, atol=1e-6)


def test_weights_stay_fp32_under_bf16_autocast_gpo10(gpo):
    feats, lengths = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, theta = gpo(feats.bfloat16(), lengths)
    assert theta.dtype == torch.float32
    torch.testing.assert_close(theta.sum(1)[:, 0], torch.ones(5))


def test_gradients_flow_to_generator_and_features(gpo):
    feats, lengths = batch()
    feats.requires_grad_(True)
    pooled, _ = gpo(feats, lengths)
    pooled.sum().backward()
    assert gpo.scorer.weight.grad is not None and gpo.scorer.weight.grad.abs().sum() > 0
    for b, n in enumerate(lengths.tolist()):  # each valid value gets its rank's θ, and θ sums to 1 per dimension
        torch.testing.assert_close(feats.grad[b, :n].sum(0), torch.ones(feats.size(2)))
        assert torch.equal(feats.grad[b, n:], torch.zeros_like(feats.grad[b, n:]))
