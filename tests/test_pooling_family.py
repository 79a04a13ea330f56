"""The pooler family's contract: state-dict keys fixed for checkpoints, typed options per pooler, one registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from vsectl.config import (
    ImageConfig,
    ModelConfig,
    TextConfig,
    config_from_yaml,
    config_to_yaml,
    load_recipe,
    pool_options,
)
from vsectl.errors import ConfigError
from vsectl.models.pooling import POOLERS, LearnedRankPool, MaxKPool, RankWeightedPool, create_pooler
from vsectl.models.vse import create_model
from vsectl.pool_options import POOL_OPTIONS, GPOOptions, MaxKOptions, options_class

REPO = Path(__file__).resolve().parent.parent
SIZES = dict(d_pe=8, d_hidden=8, in_dim=4, transformer_heads=2, transformer_ffn=16)

# The keys checkpoints and the importer of released checkpoints rely on, as they were before the pooler family.
EXPECTED_KEYS = {'gpo': ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0',
         'gru.weight_ih_l0_reverse', 'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse',
         'gru.bias_hh_l0_reverse', 'scorer.weight'],
 'mean': [],
 'max': [],
 'kmax': [],
 'gem': ['p'],
 'gpo_index_bigru': ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0',
                     'gru.weight_ih_l0_reverse', 'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse',
                     'gru.bias_hh_l0_reverse', 'scorer.weight', 'index.weight'],
 'gpo_interp': ['knots'],
 'gpo_mlp': ['mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight'],
 'gpo_transformer': ['proj.weight', 'proj.bias', 'encoder.layers.0.self_attn.in_proj_weight',
                     'encoder.layers.0.self_attn.in_proj_bias',
                     'encoder.layers.0.self_attn.out_proj.weight',
                     'encoder.layers.0.self_attn.out_proj.bias', 'encoder.layers.0.linear1.weight',
                     'encoder.layers.0.linear1.bias', 'encoder.layers.0.linear2.weight',
                     'encoder.layers.0.linear2.bias', 'encoder.layers.0.norm1.weight',
                     'encoder.layers.0.norm1.bias', 'encoder.layers.0.norm2.weight',
                     'encoder.layers.0.norm2.bias', 'scorer.weight'],
 'gpo_perdim': ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0',
                'gru.weight_ih_l0_reverse', 'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse',
                'gru.bias_hh_l0_reverse', 'scorer.weight'],
 'gpo_featin': ['gru.weight_ih_l0', 'gru.weight_hh_l0', 'gru.bias_ih_l0', 'gru.bias_hh_l0',
                'gru.weight_ih_l0_reverse', 'gru.weight_hh_l0_reverse', 'gru.bias_ih_l0_reverse',
                'gru.bias_hh_l0_reverse', 'scorer.weight', 'feat_proj.weight', 'feat_proj.bias'],
 'model_region': ['image.fc.weight', 'image.fc.bias', 'image.mlp.fc1.weight', 'image.mlp.fc1.bias',
                  'image.mlp.bn.weight', 'image.mlp.bn.bias', 'image.mlp.bn.running_mean',
                  'image.mlp.bn.running_var', 'image.mlp.bn.num_batches_tracked',
                  'image.mlp.fc2.weight', 'image.mlp.fc2.bias', 'image.pool.gru.weight_ih_l0',
                  'image.pool.gru.weight_hh_l0', 'image.pool.gru.bias_ih_l0',
                  'image.pool.gru.bias_hh_l0', 'image.pool.gru.weight_ih_l0_reverse',
                  'image.pool.gru.weight_hh_l0_reverse', 'image.pool.gru.bias_ih_l0_reverse',
                  'image.pool.gru.bias_hh_l0_reverse', 'image.pool.scorer.weight', 'text.embed.weight',
                  'text.rnn.weight_ih_l0', 'text.rnn.weight_hh_l0', 'text.rnn.bias_ih_l0',
                  'text.rnn.bias_hh_l0', 'text.rnn.weight_ih_l0_reverse',
                  'text.rnn.weight_hh_l0_reverse', 'text.rnn.bias_ih_l0_reverse',
                  'text.rnn.bias_hh_l0_reverse', 'text.pool.gru.weight_ih_l0',
                  'text.pool.gru.weight_hh_l0', 'text.pool.gru.bias_ih_l0', 'text.pool.gru.bias_hh_l0',
                  'text.pool.gru.weight_ih_l0_reverse', 'text.pool.gru.weight_hh_l0_reverse',
                  'text.pool.gru.bias_ih_l0_reverse', 'text.pool.gru.bias_hh_l0_reverse',
                  'text.pool.scorer.weight'],
 'model_grid': ['image.fc.weight', 'image.fc.bias', 'image.pool.gru.weight_ih_l0',
                'image.pool.gru.weight_hh_l0', 'image.pool.gru.bias_ih_l0', 'image.pool.gru.bias_hh_l0',
                'image.pool.gru.weight_ih_l0_reverse', 'image.pool.gru.weight_hh_l0_reverse',
                'image.pool.gru.bias_ih_l0_reverse', 'image.pool.gru.bias_hh_l0_reverse',
                'image.pool.scorer.weight', 'text.embed.weight', 'text.rnn.weight_ih_l0',
                'text.rnn.weight_hh_l0', 'text.rnn.bias_ih_l0', 'text.rnn.bias_hh_l0',
                'text.rnn.weight_ih_l0_reverse', 'text.rnn.weight_hh_l0_reverse',
                'text.rnn.bias_ih_l0_reverse', 'text.rnn.bias_hh_l0_reverse',
                'text.pool.gru.weight_ih_l0', 'text.pool.gru.weight_hh_l0', 'text.pool.gru.bias_ih_l0',
                'text.pool.gru.bias_hh_l0', 'text.pool.gru.weight_ih_l0_reverse',
                'text.pool.gru.weight_hh_l0_reverse', 'text.pool.gru.bias_ih_l0_reverse',
                'text.pool.gru.bias_hh_l0_reverse', 'text.pool.scorer.weight']}


def build(name: str) -> torch.nn.Module:
    takes = options_class(name)().keys()
    return create_pooler(pool_options(name, **{k: v for k, v in SIZES.items() if k in takes}))


@pytest.mark.parametrize("name", [k for k in EXPECTED_KEYS if not k.startswith("model_")])
def test_pooler_state_dict_keys_are_unchanged(name):
    assert list(build(name).state_dict()) == EXPECTED_KEYS[name]


@pytest.mark.parametrize("encoder", ["region", "grid"])
def test_model_state_dict_keys_are_unchanged(encoder):
    cfg = ModelConfig(embed_dim=8, image=ImageConfig(encoder=encoder, feat_dim=6, mlp_hidden=4),
                      text=TextConfig(word_dim=5))
    assert list(create_model(cfg, vocab_size=11).state_dict()) == EXPECTED_KEYS[f"model_{encoder}"]


def test_transformer_text_encoder_keys_are_the_body_plus_projection_and_pooler(tiny_bert_dir):
    from vsectl.models.text_encoders import load_pretrained_text

    body, _ = load_pretrained_text(str(tiny_bert_dir))
    cfg = ModelConfig(embed_dim=8, image=ImageConfig(feat_dim=6, mlp_hidden=4),
                      text=TextConfig(encoder="transformers", pretrained=str(tiny_bert_dir)))
    keys = list(create_model(cfg, text_body=body).text.state_dict())
    assert keys == [f"body.{k}" for k in body.state_dict()] + ["proj.weight", "proj.bias"] + \
        [f"pool.{k}" for k in EXPECTED_KEYS["gpo"]]


def test_every_pooler_has_options_and_every_option_is_a_constructor_argument():
    assert set(POOLERS.names()) == set(POOL_OPTIONS.names())
    for name in POOLERS.names():
        build(name)  # the options' kwargs() are exactly what the class takes (an extra one is a TypeError)


def test_the_family_shares_one_base():
    for name in POOLERS.names():
        if name != "gem":  # a power mean has no weight per rank
            assert isinstance(build(name), RankWeightedPool)
    for name in ("gpo", "gpo_index_bigru", "gpo_interp", "gpo_mlp", "gpo_transformer", "gpo_perdim"):
        assert "weights_for_lengths" not in vars(type(build(name)))  # θ(N) comes from the base alone
        assert isinstance(build(name), LearnedRankPool)


def test_an_option_the_pooler_does_not_take_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown key 'model.image.pool.k': pooler 'gpo' takes .*\(kmax, maxk"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["model.image.pool.k=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.text.pool.d_pe': pooler 'mean' takes name"):
        load_recipe(REPO / "recipes" / "tiny.yaml", ["model.text.pool.name=mean", "model.text.pool.d_pe=8"])
    with pytest.raises(ConfigError, match=r"unknown key 'pool.tempreature' \(did you mean 'pool.temperature'"):
        pool_options("gpo", tempreature=0.2)


def test_maxk_is_kmax():
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", ["model.image.pool.name=maxk", "model.image.pool.k=3",
                                                       "model.text.pool.name=kmax", "model.text.pool.k=3"])
    assert cfg.model.image.pool == MaxKOptions(name="maxk", k=3)
    assert cfg.model.text.pool == MaxKOptions(name="kmax", k=3)
    feats, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 4])
    a, b = create_pooler(cfg.model.image.pool), create_pooler(cfg.model.text.pool)
    assert isinstance(a, MaxKPool) and isinstance(b, MaxKPool)
    torch.testing.assert_close(a(feats, lengths), b(feats, lengths))
    with pytest.raises(ConfigError, match="k must be >= 1"):
        pool_options("maxk", k=0)


def test_switching_the_pooler_by_override_drops_the_recipes_options_of_the_old_one():
    recipe = REPO / "recipes" / "coco_butd.yaml"  # pool: {name: gpo, d_pe: 32, d_hidden: 32, temperature: 0.1}
    cfg = load_recipe(recipe, ["model.image.pool.k=4", "model.image.pool.name=maxk"])  # either order
    assert cfg.model.image.pool == MaxKOptions(name="maxk", k=4)
    assert cfg.model.text.pool == GPOOptions(d_pe=32, d_hidden=32, temperature=0.1)


def test_every_recipe_round_trips_through_the_typed_options():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_recipe(path)
        assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_a_run_saved_with_the_flat_pool_section_still_loads():
    """Runs from before typed options list all twelve pool keys in each branch; its own keys are kept."""
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", ["model.text.pool.name=kmax", "model.text.pool.k=3"])
    data = yaml.safe_load(config_to_yaml(cfg))
    flat = dict(name="gpo", d_pe=32, d_hidden=32, temperature=0.1, k=10, p=3.0, in_dim=0, max_index=1000,
                n_knots=21, transformer_layers=1, transformer_heads=4, transformer_ffn=64)
    data["model"]["image"]["pool"] = flat
    data["model"]["text"]["pool"] = flat | {"name": "kmax", "k": 3}
    assert config_from_yaml(yaml.safe_dump(data)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):  # a recipe is read strictly
        load_recipe(None, [f"model.image.pool.{k}={v}" for k, v in flat.items()])


def test_options_are_typed_frozen_dataclasses():
    opts = pool_options("gpo_transformer", transformer_heads=2, d_hidden=8)
    assert dataclasses.is_dataclass(opts) and opts.kwargs()["heads"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.d_pe = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="must divide"):
        pool_options("gpo_transformer", transformer_heads=3, d_hidden=8)
