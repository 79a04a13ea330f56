"""A run's length in epochs or optimizer steps: the config rules, the conversion to epochs, the warning, resume."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from vsectl.config import config_from_yaml, config_to_yaml, load_recipe
from vsectl.errors import ConfigError
from vsectl.schedules import announce_length, group_lr, run_length
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
DEMO = REPO / "recipes" / "demo.yaml"


def test_a_step_budget_replaces_the_recipes_epochs():
    cfg = load_recipe(TINY, ["train.steps=600"])
    assert (cfg.train.epochs, cfg.train.steps) == (0, 600)
    back = load_recipe(TINY, ["train.steps=600", "train.epochs=3"])  # the last length given wins, the other clears
    assert (back.train.epochs, back.train.steps) == (3, 0)
    assert config_from_yaml(config_to_yaml(cfg)) == cfg


def test_a_recipe_that_gives_only_steps_does_not_get_the_default_epochs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 500\n  lr_decay_step: 400\n")
    cfg = load_recipe(recipe)
    assert (cfg.train.epochs, cfg.train.steps, cfg.train.lr_decay_step) == (0, 500, 400)


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  steps: 500\n  epochs: 8\n", "exclusive"),
    ("train:\n  epochs: 0\n", "exclusive"),
    ("train:\n  epochs: 8\n  lr_decay_step: 40\n", "train.lr_decay_step needs"),
    ("train:\n  steps: -5\n", "train.steps must be ≥ 0"),
])
def test_length_mistakes_name_the_key(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe)


@pytest.mark.parametrize(("steps", "per_epoch", "decay_step"), [(600, 17, 450), (17, 17, 0), (1, 40, 0), (100, 7, 99)])
def test_steps_round_up_to_whole_epochs_and_the_decay_falls_on_the_epoch_holding_its_step(steps, per_epoch,
                                                                                           decay_step):
    overrides = [f"train.steps={steps}"] + ([f"train.lr_decay_step={decay_step}"] if decay_step else [])
    cfg = load_recipe(None, overrides)
    length = run_length(cfg, per_epoch)
    epochs, done = 0, 0
    while done < steps:  # the slow reference: whole epochs until the budget is spent
        epochs, done = epochs + 1, done + per_epoch
    assert (length.epochs, length.steps, length.steps_per_epoch, length.unit) == (epochs, done, per_epoch, "steps")
    if decay_step:
        decayed = [e for e in range(epochs) if group_lr(cfg, e, 1.0, length) < cfg.train.lr]
        first = decayed[0]
        assert first * per_epoch <= decay_step < (first + 1) * per_epoch
    else:
        assert length.lr_decay_epoch == cfg.train.lr_decay_epoch


def test_an_epoch_recipe_resolves_to_itself():
    cfg = load_recipe(DEMO)
    length = run_length(cfg, 17)
    assert (length.epochs, length.steps, length.lr_decay_epoch, length.unit) == (
        cfg.train.epochs, 17 * cfg.train.epochs, cfg.train.lr_decay_epoch, "epochs")
    assert group_lr(cfg, 0, 1.0, length) == group_lr(cfg, 0, 1.0)


@pytest.mark.parametrize(("overrides", "warns"), [
    (["train.epochs=2"], True),
    (["train.steps=300"], False),
    (["train.epochs=2", "train.max_steps_per_epoch=20"], False),  # a smoke run says it is short itself
    (["train.epochs=2", "train.min_steps_warning=0"], False),
])
def test_a_short_run_is_warned_about_once_in_one_line(caplog, overrides, warns):
    cfg = load_recipe(TINY, overrides)
    with caplog.at_level(logging.INFO, logger="vsectl.training"):
        announce_length(cfg, run_length(cfg, 18))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(warns)
    if warns:
        assert "36 optimizer steps" in warnings[0] and "train.steps" in warnings[0] and "\n" not in warnings[0]


def test_a_step_budget_trains_whole_epochs_records_them_and_extends_on_resume(toy_root, tmp_path):
    """120 toy images × 5 captions / batch 32 = 18 steps per epoch: 20 steps are 2 epochs, 40 steps 3."""
    base = [f"data.root={toy_root}", "name=steps", "train.deterministic=true", "train.min_steps_warning=0"]
    cfg = load_recipe(TINY, [*base, "train.steps=20"])
    run = train(cfg, tmp_path, device="cpu")
    per_epoch = 600 // 32
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["epoch"] for v in vals] == [0, 1] and vals[-1]["global_step"] == 2 * per_epoch
    env = json.loads((run / "env.json").read_text())
    assert env["run_length"] == {"epochs": 2, "steps_per_epoch": per_epoch, "steps": 2 * per_epoch,
                                 "lr_decay_epoch": cfg.train.lr_decay_epoch, "unit": "steps"}
    assert config_from_yaml((run / "config.yaml").read_text()) == cfg  # what was written, not the resolved epochs

    longer = load_recipe(TINY, [*base, "train.steps=40"])
    train(longer, tmp_path, device="cpu", resume=True)
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["epoch"] for v in vals] == [0, 1, 2] and vals[-1]["global_step"] == math.ceil(40 / per_epoch) * per_epoch
    assert json.loads((run / "env.json").read_text())["run_length"]["epochs"] == 3
    assert config_from_yaml((run / "config.yaml").read_text()) == longer


def test_a_run_that_builds_its_text_cache_trains_like_one_that_finds_it_ready(toy_root, tiny_bert_dir, tmp_path):
    """Same seed, same numbers, whether the shared token-state cache had to be built first or was already there."""
    overrides = [f"data.root={toy_root}", "train.deterministic=true", "train.precision=fp32", "train.epochs=1",
                 "model.image.encoder=grid",  # its size augmentation draws from the global RNG, on the device
                 "train.max_steps_per_epoch=3", "model.text.encoder=transformers",
                 f"model.text.pretrained={tiny_bert_dir}", "model.text.freeze_body=true",
                 "model.text.cache_states=true"]
    shared = tmp_path / "cache"
    runs = [train(load_recipe(TINY, [*overrides, f"name={name}"]), tmp_path, device="cpu", text_cache_dir=shared)
            for name in ("builds", "reuses")]
    records = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    strip = ("pairs_per_s", "data_time")
    assert [{k: v for k, v in r.items() if k not in strip} for r in records[0]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in records[1]]
