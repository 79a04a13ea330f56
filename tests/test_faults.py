"""Faults survived: SIGKILL at random moments, then --resume, ends with the same weights as an uninterrupted run."""

from __future__ import annotations

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

from vsectl.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def command(root: Path, out: Path, name: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vsectl", "-q", "train", str(TINY), "--out", str(out), "--device", "cpu",
           "--set", f"data.root={root}", "--set", f"name={name}", "--set", "train.epochs=4",
           "--set", "train.deterministic=true", "--set", "loss.hardest_negative_from_epoch=2",
           "--set", "train.lr_decay_epoch=3"]
    return [*cmd, "--resume"] if resume else cmd


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(toy_root, tmp_path):
    tic = time.perf_counter()
    straight = subprocess.run(command(toy_root, tmp_path, "straight", False), env=env(), capture_output=True,
                              text=True, timeout=300, cwd=REPO)
    duration = time.perf_counter() - tic
    assert straight.returncode == 0, straight.stderr[-2000:]

    rng = random.Random(0)
    run = tmp_path / "killed"
    for attempt in range(3):  # three kills at random moments (start-up, mid-epoch, validation, checkpoint write)
        proc = subprocess.Popen(command(toy_root, tmp_path, "killed", attempt > 0), env=env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.3, 0.9) * duration)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        last = run / "checkpoints" / "last"
        if last.exists() or any((run / "checkpoints").glob(".old-last-*")):
            load_checkpoint(last)  # whatever the moment of the kill, the last checkpoint is complete
    final = subprocess.run(command(toy_root, tmp_path, "killed", True), env=env(), capture_output=True, text=True,
                           timeout=300, cwd=REPO)
    assert final.returncode == 0, final.stderr[-2000:]
    a = load_file(str(tmp_path / "straight" / "checkpoints/last/model.safetensors"))
    b = load_file(str(run / "checkpoints/last/model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert load_checkpoint(run / "checkpoints" / "last")["trainer_state"]["epoch"] == 4
    assert not list((run / "checkpoints").glob(".tmp-*"))  # killed writes' leftovers are cleaned on resume


def test_no_leftover_temporary_checkpoint_is_ever_taken_for_a_checkpoint(tmp_path):
    from vsectl.checkpoint import recover, save_checkpoint
    from vsectl.errors import CheckpointError

    tmp = tmp_path / "checkpoints" / ".tmp-last-999"  # a write killed before its rename
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointError):
        recover(tmp_path / "checkpoints" / "last")
    save_checkpoint(tmp_path / "checkpoints" / "last", {"w": torch.zeros(2)}, {"epoch": 1}, {})
    assert recover(tmp_path / "checkpoints" / "last").name == "last"


# ------------------------------------------------------------------------------------------------ extract, gridsearch


def kill_when(cmd: list[str], ready, delay: float, timeout: float = 120) -> bool:  # noqa: ANN001 - a predicate
    """Start `cmd`, wait until `ready()` (or the process ends), wait `delay` s more, SIGKILL; True if it was killed."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and not ready() and time.monotonic() - start < timeout:
        time.sleep(0.02)
    try:
        proc.wait(timeout=delay)
        return False  # it finished before the kill
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_file(tmp_path):
    import h5py
    import numpy as np
    from PIL import Image
    from transformers import ResNetConfig, ResNetModel

    images = tmp_path / "raw" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k in range(160):
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(images / f"{k}.png")
        entries.append({"filename": f"{k}.png", "split": "train", "sentences": [{"raw": f"picture {k}"}]})
    (tmp_path / "raw" / "dataset.json").write_text(__import__("json").dumps({"images": entries}))
    (tmp_path / "raw" / "manifest.json").write_text('{"format": "vsectl-raw", "version": 1, "image_root": "images"}')
    weights = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 12], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(weights)

    def cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "vsectl", "-q", "extract", "--backbone", "resnet", "--weights", str(weights),
                "--data", str(tmp_path / "raw"), "--out", str(tmp_path / out), "--size", "96", "--batch-size", "2",
                "--shard-size", "4", "--workers", "0", "--device", "cpu", "--dtype", "float32"]

    assert subprocess.run(cmd("straight"), env=env(), cwd=REPO, timeout=300).returncode == 0
    rng_kill = random.Random(1)
    shards, final = tmp_path / "killed" / "train.shards", tmp_path / "killed" / "train.h5"
    interrupted = []  # killed before the merged file existed: the kill really cut the extraction short
    for n in (0, 12):  # of 40 shards: early, then in the middle
        killed = kill_when(cmd("killed"), lambda n=n: len(list(shards.glob("shard-*.h5"))) > n,
                           rng_kill.uniform(0, 0.1))
        interrupted.append(killed and not final.exists())
    assert any(interrupted)
    assert subprocess.run(cmd("killed"), env=env(), cwd=REPO, timeout=300).returncode == 0
    with h5py.File(tmp_path / "straight" / "train.h5") as a, h5py.File(tmp_path / "killed" / "train.h5") as b:
        for key in ("features/rows", "features/offsets", "images/ids", "captions/text", "captions/image_index"):
            assert np.array_equal(a[key][()], b[key][()]), key
    assert not shards.exists()  # merged and cleaned up


@pytest.mark.slow
def test_killed_gridsearch_resumes_to_the_same_table(toy_root, tmp_path):
    import json

    def cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "vsectl", "-q", "gridsearch", str(TINY), "--pool", "max,mean", "--branch",
                "image", "--seeds", "0", "--out", str(tmp_path / out), "--device", "cpu", "--set",
                f"data.root={toy_root}", "--set", "train.epochs=3", "--set", "train.deterministic=true"]

    tic = time.perf_counter()
    assert subprocess.run(cmd("straight"), env=env(), cwd=REPO, timeout=600).returncode == 0
    duration = time.perf_counter() - tic
    runs = tmp_path / "killed" / "runs"
    rng = random.Random(2)
    # first kill: somewhere in the second cell (after the first one's evaluation); second: anywhere after start-up
    killed = [kill_when(cmd("killed"), lambda: any(runs.glob("*/eval/f30k-test.json")), rng.uniform(0, 0.3) * duration),
              kill_when(cmd("killed"), lambda: True, rng.uniform(0.2, 0.5) * duration)]
    assert any(killed)
    assert subprocess.run(cmd("killed"), env=env(), cwd=REPO, timeout=600).returncode == 0
    a = {r["cell"]: r["metrics"] for r in json.loads((tmp_path / "straight" / "results.json").read_text())["records"]}
    b = {r["cell"]: r["metrics"] for r in json.loads((tmp_path / "killed" / "results.json").read_text())["records"]}
    assert a == b and len(a) == 3  # max, mean and GPO: the same metrics as the uninterrupted sweep
