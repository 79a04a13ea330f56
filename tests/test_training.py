"""End to end: train → eval through the CLI on the toy set; exact resume; schedules; user errors get one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.schedules import group_lr, use_hardest_negative
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
runner = CliRunner()


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "train.deterministic=true", *extra]


def test_schedules_are_pure_functions_of_the_epoch_loss5():
    cfg = load_recipe(None, ["train.lr=1e-3", "train.lr_decay_epoch=15", "loss.hardest_negative_from_epoch=1"])
    assert [use_hardest_negative(cfg, e) for e in (0, 1, 20)] == [False, True, True]
    assert group_lr(cfg, 14, 0.1) == pytest.approx(1e-4)
    assert group_lr(cfg, 15, 1.0) == pytest.approx(1e-4)  # a resumed run after epoch 15 keeps the decay
    assert group_lr(cfg, 24, 1.0) == pytest.approx(1e-4)


def test_train_then_eval_through_the_cli_writes_the_run_files(toy_root, tmp_path):
    out = tmp_path / "runs"
    args = ["train", str(TINY), "--out", str(out), "--device", "cpu"]
    for o in tiny_overrides(toy_root):
        args += ["--set", o]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = out / "tiny"
    assert result.stdout.strip().endswith(str(run))
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == sorted([
        "config.yaml", "env.json", "metrics.jsonl", "vocab.json",
        "checkpoints/last/model.safetensors", "checkpoints/last/optimizer.safetensors",
        "checkpoints/last/rng.safetensors", "checkpoints/last/trainer_state.json",
        "checkpoints/best/model.safetensors", "checkpoints/best/trainer_state.json",
    ])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    assert [v["epoch"] for v in vals] == [0, 1]
    assert all(r["hardest"] is False for r in records if r["kind"] == "train")

    result = runner.invoke(app, ["eval", str(run), "--protocol", "f30k", "--split", "test", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["f30k"]["metrics"]
    saved = json.loads((run / "eval" / "f30k-test.json").read_text())
    assert saved["metrics"] == metrics
    assert saved["n_images"] == 30 and saved["n_captions"] == 150


def test_training_fits_the_training_split_far_above_chance(toy_root, tmp_path):
    """The loop really optimises the pairing: after a few epochs the training captions retrieve their images."""
    run = train(load_recipe(TINY, tiny_overrides(toy_root, "name=fit", "train.epochs=6")), tmp_path, device="cpu")
    from vsectl.evaluation import evaluate_runs

    result = evaluate_runs([run], protocol="f30k", split="train", device="cpu", write=False)["f30k"]
    chance = 2 * 100 * (1 + 5 + 10) / 120  # 120 images: R@K by chance is K/120 per direction
    assert result["metrics"]["rsum"] > 5 * chance, result["metrics"]


def test_resume_equals_an_uninterrupted_run(toy_root, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the second: identical weights and metrics on CPU.

    The hardest-negative switch and the LR step both fall on epoch 1, right after the resume point.
    """
    sched = ("loss.hardest_negative_from_epoch=1", "train.lr_decay_epoch=1")
    straight = train(load_recipe(TINY, tiny_overrides(toy_root, "name=a", *sched)), tmp_path, device="cpu")
    first = train(load_recipe(TINY, tiny_overrides(toy_root, "name=b", "train.epochs=1", *sched)), tmp_path,
                  device="cpu")
    resumed = train(load_recipe(TINY, tiny_overrides(toy_root, "name=b", *sched)), tmp_path, device="cpu",
                    resume=True)
    assert first == resumed
    a = load_file(str(straight / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed / "checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    val_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["hardest"] for r in val_a if r["kind"] == "train"][-1] is True
    val_b = [json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    strip = ("pairs_per_s", "data_time")
    assert [{k: v for k, v in r.items() if k not in strip} for r in val_a] == [
        {k: v for k, v in r.items() if k not in strip} for r in val_b]


def test_resume_with_a_changed_model_is_refused(toy_root, tmp_path):
    from vsectl.errors import ConfigError

    train(load_recipe(TINY, tiny_overrides(toy_root, "name=c", "train.epochs=1")), tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="model.embed_dim"):
        train(load_recipe(TINY, tiny_overrides(toy_root, "name=c", "model.embed_dim=32")), tmp_path, device="cpu",
              resume=True)


def test_a_second_train_into_the_same_run_is_refused(toy_root, tmp_path):
    from vsectl.errors import ConfigError

    train(load_recipe(TINY, tiny_overrides(toy_root, "name=d", "train.epochs=1", "train.max_steps_per_epoch=2")),
          tmp_path, device="cpu")
    with pytest.raises(ConfigError, match="--resume"):
        train(load_recipe(TINY, tiny_overrides(toy_root, "name=d")), tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "recipes/nope.yaml"], "recipe not found"),
        (["train", str(TINY), "--set", "train.lrr=1"], "did you mean 'train.lr'"),
        (["train", str(TINY), "--set", "data.root=/no/such/folder"], "/no/such/folder"),
        (["eval", "/no/such/run"], "no such run directory"),
        (["train", str(TINY), "--device", "cuda:7"], "cuda"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_code_2(args, message, tmp_path):
    result = runner.invoke(app, [*args, "--out", str(tmp_path)] if args[0] == "train" else args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_wrong_feature_dimension_is_a_user_error(toy_root, tmp_path):
    args = ["train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={toy_root}", "--set",
            "model.image.feat_dim=48"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "model.image.feat_dim" in result.output


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["env"], ["data"], ["data", "toy"], ["bench-pooling"],
                                     ["plot-weights"]])
def test_help_works_for_every_command(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_version_flag():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("vsectl ")


def test_frozen_transformer_text_with_cached_states_trains_and_evaluates(toy_root, tiny_bert_dir, tmp_path):
    overrides = tiny_overrides(toy_root, "name=cached", "train.epochs=1", "model.text.encoder=transformers",
                               f"model.text.pretrained={tiny_bert_dir}", "model.text.freeze_body=true",
                               "model.text.cache_states=true")
    run = train(load_recipe(TINY, overrides), tmp_path, device="cpu")
    assert (run / "text_cache" / "train.h5").is_file() and (run / "text_cache" / "dev.h5").is_file()
    assert (run / "text_model" / "config.json").is_file()  # eval rebuilds the body without the hub
    from vsectl.evaluation import evaluate_runs

    result = evaluate_runs([run], protocol="f30k", split="test", device="cpu")["f30k"]
    m = result["metrics"]
    assert result["n_images"] == 30 and m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i")
                                                                       for k in (1, 5, 10)))
    hits = m["i2t_r1"] * 30 / 100  # R@1 is a share of the 30 test images
    assert m["rsum"] > 0 and hits == pytest.approx(round(hits))
    assert load_recipe(run / "config.yaml").model.text == load_recipe(TINY, overrides).model.text


def test_glove_start_reaches_the_trained_run(toy_root, tmp_path):
    words = ["dog", "cat", "a", "and"]
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} " + " ".join(["0.25"] * 32) + "\n" for w in words))
    cfg = load_recipe(TINY, tiny_overrides(toy_root, "name=glove", "train.epochs=1", "train.max_steps_per_epoch=1",
                                           "train.lr=1e-9", f"model.text.glove={path}"))
    run = train(cfg, tmp_path, device="cpu")
    vocab = json.loads((run / "vocab.json").read_text())["word2idx"]
    table = load_file(str(run / "checkpoints/last/model.safetensors"))["text.embed.weight"]
    torch.testing.assert_close(table[vocab["dog"]], torch.full((32,), 0.25), atol=1e-6, rtol=0)
