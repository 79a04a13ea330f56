"""Atomic writes: nothing half-written under the final name, and the umask's mode on every output file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from vsectl.checkpoint import save_checkpoint
from vsectl.config import load_recipe, save_config
from vsectl.data.store import StoreWriter
from vsectl.io import atomic_path, atomic_write_json, atomic_write_text, umask_mode


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_writer_gives_the_umask_mode(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask                                          # 0644 under 022, 0640 under 027
    assert umask_mode() == expected
    save_config(load_recipe(None), tmp_path / "config.yaml")
    atomic_write_json(tmp_path / "eval.json", {"rsum": 1.0})
    atomic_write_text(tmp_path / "results.md", "x\n")
    atomic_write_json(tmp_path / "dataset.json", {"images": []}, indent=None, ensure_ascii=False)
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"epoch": 1}, {"config": ""},
                    optimizer_state={"state": {}, "param_groups": []})
    with StoreWriter(tmp_path / "train.h5", feat_dim=2) as writer:
        writer.add_caption("a cat", writer.add_image("0", np.zeros((1, 2), dtype=np.float32)))
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 8
    assert {p.name: mode(p) for p in written} == {p.name: expected for p in written}


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
