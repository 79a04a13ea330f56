"""Recipes → strict typed config: unknown keys, coercion, overrides, round trip, every shipped recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vsectl.config import RunConfig, config_from_yaml, config_to_yaml, load_recipe
from vsectl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_unknown_key_fails_with_did_you_mean_on_the_dotted_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  image:\n    pool:\n      d_pee: 16\n")
    expected = r"unknown key 'model.image.pool.d_pee' \(did you mean 'model.image.pool.d_pe'"
    with pytest.raises(ConfigError, match=expected):
        load_recipe(recipe)


def test_values_are_coerced_by_field_type(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1e-4\n  epochs: 3.0\n  deterministic: 'true'\n")  # YAML 1.1 reads 1e-4 as a str
    cfg = load_recipe(recipe)
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.train.deterministic is True


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_recipe(None, ["train.epochs=many"])


def test_overrides_apply_in_order_and_parse_yaml_scalars():
    cfg = load_recipe(None, ["train.lr=2e-4", "model.image.pool.name=kmax", "model.image.pool.k=20",
                             "train.lr=3.0e-4", "name=x"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.image.pool.name == "kmax" and cfg.model.image.pool.k == 20
    assert cfg.name == "x"


@pytest.mark.parametrize("bad", ["train.lrr=1", "nosuch=1", "train=1", "=3", "noequals"])
def test_bad_overrides_fail_clearly(bad):
    with pytest.raises(ConfigError):
        load_recipe(None, [bad])


def test_choices_are_validated():
    with pytest.raises(ConfigError, match="model.image.encoder"):
        load_recipe(None, ["model.image.encoder=regions"])
    with pytest.raises(ConfigError, match="d_pe must be even"):
        load_recipe(None, ["model.text.pool.d_pe=31"])


def test_round_trip_yaml_gives_an_equal_config():
    cfg = load_recipe(None, ["train.lr=1e-3", "model.text.encoder=transformers", "seed=7"])
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_missing_recipe_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = load_recipe(recipe)
    assert cfg.name == recipe.stem  # a run is named for its recipe file


def test_official_recipes_hold_the_published_hyperparameters():
    for name in ("f30k_butd", "coco_butd", "f30k_butd_bert", "coco_butd_bert"):
        cfg = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert (cfg.train.lr, cfg.train.epochs, cfg.train.lr_decay_epoch, cfg.train.grad_clip) == (5e-4, 25, 15, 2.0)
        assert (cfg.data.batch_size, cfg.model.embed_dim, cfg.loss.margin) == (128, 1024, 0.2)
        assert cfg.model.image.pool.name == cfg.model.text.pool.name == "gpo"
        assert cfg.loss.hardest_negative_from_epoch == 1
