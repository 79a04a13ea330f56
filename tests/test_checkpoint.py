"""Checkpoints: safetensors + JSON only, atomic, strict, with optimizer and RNG state."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from vsectl.checkpoint import (
    load_checkpoint,
    load_model_state,
    optimizer_from_tensors,
    optimizer_to_tensors,
    recover,
    save_checkpoint,
)
from vsectl.errors import CheckpointError


def small_model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr_mult": 1.0, "name": "a"},
                             {"params": list(model[1].parameters()) + list(model[2].parameters()), "lr_mult": 0.1,
                              "name": "b"}], lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return model, opt


def test_optimizer_state_round_trips_through_tensors_and_json():
    _, opt = small_model_and_optimizer()
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    json.dumps(meta)  # the remainder is plain JSON
    back = optimizer_from_tensors(tensors, json.loads(json.dumps(meta)))
    _, opt2 = small_model_and_optimizer()
    opt2.load_state_dict(back)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    assert opt2.param_groups[1]["lr_mult"] == 0.1 and opt2.param_groups[1]["betas"] == (0.9, 0.999)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = small_model_and_optimizer()
    path = save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 3, "best_rsum": 1.5}, {"config": "x: 1"},
                           optimizer_state=opt.state_dict())
    expected = (torch.rand(3), np.random.rand(2), random.random())
    torch.rand(100)  # move every generator on
    np.random.rand(100)
    random.random()
    ckpt = load_checkpoint(path)
    from vsectl.checkpoint import restore_rng

    restore_rng(*ckpt["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    assert np.allclose(np.random.rand(2), expected[1]) and random.random() == expected[2]
    assert ckpt["trainer_state"]["epoch"] == 3
    model2, _ = small_model_and_optimizer()
    load_model_state(model2, ckpt["model"])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v)


def strict_json(text: str):  # noqa: ANN201 - what jq and JavaScript accept: no NaN, Infinity or -Infinity
    def refuse(name: str):  # noqa: ANN202
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_trainer_state_is_strict_json_before_any_validation_and_reads_back(tmp_path):
    model, _ = small_model_and_optimizer()
    state = {"epoch": 0, "global_step": 0, "best_rsum": -float("inf"), "best_epoch": -1,
             "val": {"rsum": float("nan"), "meanr": float("inf")}}
    path = save_checkpoint(tmp_path / "last", model.state_dict(), state, {}, rng=False)
    written = strict_json((path / "trainer_state.json").read_text())
    assert written["best_rsum"] is None and written["val"] == {"rsum": None, "meanr": None}
    assert load_checkpoint(path)["trainer_state"]["best_rsum"] == -float("inf")
    (path / "trainer_state.json").write_text('{"epoch": 0, "global_step": 0, "best_rsum": -Infinity, '
                                             '"best_epoch": -1}')  # as versions before this one wrote it
    assert load_checkpoint(path)["trainer_state"]["best_rsum"] == -float("inf")


def test_checkpoint_files_load_without_pickle(tmp_path):
    model, opt = small_model_and_optimizer()
    path = save_checkpoint(tmp_path / "c", model.state_dict(), {"epoch": 1}, {}, optimizer_state=opt.state_dict())
    names = sorted(p.name for p in path.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]


def test_interrupted_swap_keeps_the_previous_checkpoint(tmp_path):
    model, _ = small_model_and_optimizer()
    save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 1}, {})
    (tmp_path / "last").rename(tmp_path / ".old-last-123")  # a crash between the two renames of the swap
    assert load_checkpoint(tmp_path / "last")["trainer_state"]["epoch"] == 1
    assert recover(tmp_path / "last") == tmp_path / "last"


def test_failed_write_leaves_the_existing_checkpoint_intact(tmp_path, monkeypatch):
    model, _ = small_model_and_optimizer()
    save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 1}, {})

    import vsectl.checkpoint as ck

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 2}, {})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last")["trainer_state"]["epoch"] == 1


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model, _ = small_model_and_optimizer()
    path = save_checkpoint(tmp_path / "last", model.state_dict(), {"epoch": 1}, {})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)


def test_strict_load_names_the_mismatch():
    model, _ = small_model_and_optimizer()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="shape mismatch at 0.bias"):
        load_model_state(other, model.state_dict())
    with pytest.raises(CheckpointError, match="unexpected 3 keys"):
        load_model_state(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)),
                         model.state_dict())
