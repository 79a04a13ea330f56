"""The GPO research variants (spec §2): GPO's pooling properties (§1.4) hold for every generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vsectl.config import load_recipe, pool_options
from vsectl.errors import ConfigError
from vsectl.models.pooling import POOLERS, create_pooler
from vsectl.models.pooling.gpo_featin import FeatInGPO
from vsectl.models.pooling.gpo_index_bigru import IndexBiGRUGPO
from vsectl.models.pooling.gpo_interp import InterpGPO
from vsectl.models.pooling.gpo_mlp import MLPGPO
from vsectl.models.pooling.gpo_perdim import PerDimGPO
from vsectl.models.pooling.gpo_transformer import TransformerGPO
from vsectl.pool_options import options_class

REPO = Path(__file__).resolve().parent.parent
D = 4
VARIANTS = ["gpo_index_bigru", "gpo_interp", "gpo_mlp", "gpo_transformer", "gpo_perdim", "gpo_featin"]
LENGTH_ONLY = [v for v in VARIANTS if v != "gpo_featin"]  # θ = g(N) alone (GPO-13)



def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    sizes = dict(d_pe=8, d_hidden=8, in_dim=D, transformer_heads=2, transformer_ffn=16)
    takes = options_class(name)().keys()  # each pooler's options take only its own keys
    pool = create_pooler(pool_options(name=name, **{k: v for k, v in sizes.items() if k in takes}))
    if name == "gpo_interp":  # the uniform initial knots would make several properties trivially true
        with torch.no_grad():
            pool.knots.copy_(torch.randn(pool.knots.shape))
    return pool


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 7, D, generator=g), torch.tensor([7, 3, 1, 5, 3])


def reference_pool(feats: torch.Tensor, lengths: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per sample and per dimension: sort the valid values descending, weight by θ (shared or per dimension)."""
    out = torch.zeros(feats.size(0), feats.size(2))
    for b, n in enumerate(lengths.tolist()):
        for d in range(feats.size(2)):
            ranked = feats[b, :n, d].sort(descending=True).values
            out[b, d] = (theta[b, :n, d if theta.size(-1) > 1 else 0] * ranked).sum()
    return out


def test_variants_are_registered():
    assert set(VARIANTS) <= set(POOLERS.names())


@pytest.mark.parametrize("name", VARIANTS)
def test_theta_sums_to_one_and_is_zero_on_padding(name):
    feats, lengths = batch()
    pooled, theta = make(name)(feats, lengths)
    assert pooled.shape == (5, D)
    assert theta.shape == (5, 7, D if name == "gpo_perdim" else 1)
    torch.testing.assert_close(theta.sum(dim=1), torch.ones(5, theta.size(-1)))
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(theta[b, n:] == 0)


@pytest.mark.parametrize("name", VARIANTS)
def test_pooled_matches_the_sorted_weighted_sum_reference(name):
    feats, lengths = batch()
    pooled, theta = make(name)(feats, lengths)
    torch.testing.assert_close(pooled, reference_pool(feats, lengths, theta.detach()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_permutation_and_padding_leave_the_output_unchanged(name):
    pool = make(name)
    feats, lengths = batch()
    other = feats.clone()
    g = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths.tolist()):
        other[b, :n] = feats[b, torch.randperm(n, generator=g)]
        other[b, n:] = 1e3 * torch.randn(7 - n, D, generator=g)
    p1, t1 = pool(feats, lengths)
    p2, t2 = pool(other, lengths)
    torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t1, t2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_sample_alone_equals_it_batched_with_longer_ones(name):
    pool = make(name)
    feats, lengths = batch()
    alone, _ = pool(feats[1:2, :3], lengths[1:2])
    torch.testing.assert_close(alone[0], pool(feats, lengths)[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LENGTH_ONLY)
def test_theta_depends_only_on_lengths_and_matches_weights_for_lengths(name):
    pool = make(name)
    feats, lengths = batch(0)
    other, _ = batch(1)
    _, t1 = pool(feats, lengths)
    _, t2 = pool(other, lengths)
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(pool.weights_for_lengths(lengths, 7), t1)


def test_featin_theta_depends_on_the_features_and_has_no_length_curve():
    pool = make("gpo_featin")
    feats, lengths = batch(0)
    other, _ = batch(1)
    assert not torch.allclose(pool(feats, lengths)[1], pool(other, lengths)[1])
    with pytest.raises(ConfigError, match="depends|features"):
        pool.weights_for_lengths(lengths, 7)


@pytest.mark.parametrize("name", VARIANTS)
def test_theta_stays_fp32_under_bf16_autocast(name):
    feats, lengths = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, theta = make(name)(feats.bfloat16(), lengths)
    assert theta.dtype == torch.float32
    torch.testing.assert_close(theta.sum(1), torch.ones(5, theta.size(-1)))


def test_interp_starts_uniform_and_interpolates_the_knots():
    pool = InterpGPO(n_knots=21)
    torch.testing.assert_close(pool.knots.detach(), torch.full((21,), 0.05))
    lengths = torch.tensor([1, 2, 7, 40])
    theta = pool.weights_for_lengths(lengths, 40)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(theta[b, :n, 0], torch.full((n,), 1.0 / n))  # equal knots: exactly uniform
    knots = torch.randn(21)
    with torch.no_grad():
        pool.knots.copy_(knots)
    scores = pool.scores(lengths, 40)
    for b, n in enumerate(lengths.tolist()):
        ratio = np.arange(n) / max(n - 1, 1)  # n = 1 reads ratio 0
        expected = np.interp(ratio, np.linspace(0, 1, 21), knots.numpy())
        torch.testing.assert_close(scores[b, :n, 0], torch.tensor(expected, dtype=torch.float32))


def test_mlp_scores_a_rank_the_same_whatever_the_set_size():
    pool = MLPGPO(d_pe=8, d_hidden=8)
    theta = pool.weights_for_lengths(torch.tensor([3, 6]), 6)[..., 0]
    torch.testing.assert_close(theta[1, :3] / theta[1, :3].sum(), theta[0, :3])  # softmax of the same scores


def test_index_bigru_uses_its_table_and_refuses_longer_sets():
    pool = IndexBiGRUGPO(d_pe=8, d_hidden=8, max_index=5)
    assert pool.state_dict()["index.weight"].shape == (5, 8)
    theta = pool.weights_for_lengths(torch.tensor([2, 5]), 6)  # a width beyond the table is padding only
    torch.testing.assert_close(theta.sum(1)[:, 0], torch.ones(2))
    with pytest.raises(ConfigError, match="max_index"):
        pool.weights_for_lengths(torch.tensor([6]))


def test_perdim_gives_one_theta_per_dimension_and_checks_its_size():
    pool = PerDimGPO(dim=D, d_pe=8, d_hidden=8)
    feats, lengths = batch()
    _, theta = pool(feats, lengths)
    assert theta.shape == (5, 7, D)
    assert not torch.allclose(theta[..., 0], theta[..., 1])
    with pytest.raises(ConfigError, match="in_dim"):
        pool(torch.randn(2, 3, D + 1), torch.tensor([3, 2]))
    with pytest.raises(ConfigError, match="in_dim"):
        create_pooler(pool_options(name="gpo_perdim"))


def test_transformer_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="divide"):
        TransformerGPO(d_pe=8, d_hidden=6, heads=4)
    assert isinstance(make("gpo_featin"), FeatInGPO)


def test_every_variant_trains_through_train_and_reloads(toy_root, tmp_path):
    """Both branches on each variant: two steps through `train()`, then `load_run` rebuilds it strictly."""
    from vsectl.builders import load_run
    from vsectl.training import train

    for name in VARIANTS:
        cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [
            f"data.root={toy_root}", f"name={name}", "train.epochs=1", "train.max_steps_per_epoch=2",
            *(f"model.{b}.pool.name={name}" for b in ("image", "text")),  # in_dim: the encoders pass embed_dim
        ])
        run = train(cfg, tmp_path, device="cpu")
        _, model, _ = load_run(run)
        for branch in (model.image, model.text):
            assert type(branch.pool).__name__ == type(make(name)).__name__
            if name in LENGTH_ONLY:
                theta = branch.pool.weights_for_lengths(torch.tensor([3, 9]), 9)
                torch.testing.assert_close(theta.sum(1), torch.ones(2, theta.size(-1)))
