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
