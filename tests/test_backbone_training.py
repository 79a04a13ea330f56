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
