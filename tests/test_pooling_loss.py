"""Poolers and the hinge triplet loss against slow references (spec §2, §7 LOSS-1..7)."""

from __future__ import annotations

import pytest
import torch

from vsectl.config import pool_options
from vsectl.errors import ConfigError
from vsectl.losses import ContrastiveLoss
from vsectl.models.pooling import POOLERS, GeMPool, MaxKPool, MaxPool, MeanPool, create_pooler
from vsectl.models.pooling.gpo import GPO


def sets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 6, 3, generator=g), torch.tensor([6, 2, 1, 4])


def per_dim_topk_mean(valid: torch.Tensor, k: int) -> torch.Tensor:
    cols = []
    for d in range(valid.size(1)):
        values = sorted(valid[:, d].tolist(), reverse=True)[: min(k, len(valid))]
        cols.append(sum(values) / len(values))
    return torch.tensor(cols)


def test_mean_pool_is_the_masked_mean():
    feats, lengths = sets()
    pooled, theta = MeanPool()(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], feats[b, :n].mean(0))
    torch.testing.assert_close(theta.sum(1)[:, 0], torch.ones(4))


def test_max_pool_is_the_masked_max():
    feats, lengths = sets()
    feats[1, 2:] = 100.0  # padding must not win
    pooled, _ = MaxPool()(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], feats[b, :n].max(0).values)


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_kmax_pool_matches_per_dimension_topk_mean_with_k_clipped(k):
    feats, lengths = sets()
    pooled, _ = MaxKPool(k=k)(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], per_dim_topk_mean(feats[b, :n], k))


def test_kmax_with_k1_is_max_and_k_large_is_mean():
    feats, lengths = sets()
    torch.testing.assert_close(MaxKPool(k=1)(feats, lengths)[0], MaxPool()(feats, lengths)[0])
    torch.testing.assert_close(MaxKPool(k=99)(feats, lengths)[0], MeanPool()(feats, lengths)[0])


def test_gem_pool_matches_generalised_mean_and_learns_p():
    feats, lengths = sets()
    feats = feats.abs() + 0.1
    pool = GeMPool(p=3.0)
    pooled, _ = pool(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        expected = (feats[b, :n] ** 3).mean(0) ** (1 / 3)
        torch.testing.assert_close(pooled[b], expected)
    pooled.sum().backward()
    p = torch.tensor(3.0, requires_grad=True)  # the same sum written out, differentiated by autograd
    sum(((feats[b, :n] ** p).mean(0) ** (1 / p)).sum() for b, n in enumerate(lengths.tolist())).backward()
    torch.testing.assert_close(pool.p.grad, p.grad)


def test_registry_builds_each_pooler_and_rejects_unknown_names_with_suggestion():
    assert set(POOLERS.names()) >= {"gpo", "mean", "max", "kmax", "gem"}
    assert isinstance(create_pooler(pool_options(name="gpo", d_pe=8, d_hidden=4)), GPO)
    assert create_pooler(pool_options(name="kmax", k=5)).k == 5
    with pytest.raises(ConfigError, match="did you mean 'gpo'"):
        create_pooler(pool_options(name="gp0"))


def loss_reference(img: torch.Tensor, cap: torch.Tensor, margin: float, hardest: bool) -> float:
    """Double loop over the B×B similarity matrix."""
    b = img.size(0)
    s = [[float(img[i] @ cap[j]) for j in range(b)] for i in range(b)]
    if not hardest:
        total = 0.0
        for i in range(b):
            for j in range(b):
                if i != j:
                    total += max(0.0, margin + s[i][j] - s[i][i])  # caption j as a negative for image i
                    total += max(0.0, margin + s[i][j] - s[j][j])  # image i as a negative for caption j
        return total
    total = 0.0
    for i in range(b):
        total += max(max(0.0, margin + s[i][j] - s[i][i]) for j in range(b) if j != i)
    for j in range(b):
        total += max(max(0.0, margin + s[i][j] - s[j][j]) for i in range(b) if i != j)
    return total


@pytest.mark.parametrize("hardest", [False, True])
def test_loss_matches_double_loop_loss2_loss3_loss4(hardest):
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(img + 0.8 * torch.randn(4, 5, generator=g), dim=-1)
    loss = ContrastiveLoss(margin=0.2)(img, cap, hardest_negative=hardest)
    assert loss.item() == pytest.approx(loss_reference(img, cap, 0.2, hardest), rel=1e-5, abs=1e-6)


def test_loss_is_a_sum_not_a_mean_loss4():
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    two = torch.cat([img, img])
    base = ContrastiveLoss()(img, img.flip(0), hardest_negative=False)
    assert base.item() > 0
    assert ContrastiveLoss()(two, two.roll(1, 0), hardest_negative=False).item() > base.item()


def test_duplicate_captions_count_as_negatives_loss7():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    loss = ContrastiveLoss(margin=0.2)(img, img, hardest_negative=True)
    assert loss.item() == pytest.approx(4 * 0.2)  # identical pairs are not de-duplicated
