"""train.log: [tensorboard] — event files read back with TensorBoard's own reader equal metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.config import config_from_yaml, config_to_yaml, load_recipe
from vsectl.errors import ConfigError
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
runner = CliRunner()


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", "train.deterministic=true", "train.log=[tensorboard]", "train.log_every=2",
            "loss.name=infonce", *extra]


@pytest.fixture(scope="module")
def tb_run(toy_root, tmp_path_factory) -> Path:
    return train(load_recipe(TINY, overrides(toy_root, "name=tb", "train.epochs=2")), tmp_path_factory.mktemp("r"),
                 device="cpu")


def test_loss_and_learning_rates_equal_the_metrics_log(tb_run):
    acc = read_events(tb_run / "tensorboard")
    train_records = records(tb_run, "train")
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("train/loss")] == \
        [(r["global_step"], r["loss"]) for r in train_records]
    groups = sorted(k[3:] for k in train_records[0] if k.startswith("lr_"))
    assert groups and "loss" in groups  # InfoNCE's temperature has a group of its own
    for group in groups:
        assert [e.value for e in acc.Scalars(f"lr/{group}")] == pytest.approx([r[f"lr_{group}"] for r in train_records])
    assert [e.value for e in acc.Scalars("train/temperature")] == pytest.approx(
        [r["temperature"] for r in train_records])


def test_dev_metrics_per_epoch_and_theta_curves_are_logged(tb_run):
    acc = read_events(tb_run / "tensorboard")
    val = records(tb_run, "val")
    assert len(val) == 2
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("dev/rsum")] == \
        [(r["global_step"], r["rsum"]) for r in val]
    assert [e.value for e in acc.Scalars("dev/i2t_r1")] == pytest.approx([r["i2t_r1"] for r in val])
    assert [e.value for e in acc.Scalars("dev_rsum_by_tie_rule/optimistic")] == pytest.approx(
        [r["rsum_by_rule"]["optimistic"] for r in val])
    images = acc.Images("pooling/theta")
    assert [i.step for i in images] == [r["global_step"] for r in val]
    assert images[0].encoded_image_string.startswith(b"\x89PNG") and images[0].width > 300
    theta0 = [t for t in acc.Tags()["scalars"] if t.startswith("pooling_theta0/")]
    assert any(t.startswith("pooling_theta0/image_N") for t in theta0)
    assert all(0 < e.value <= 1 for t in theta0 for e in acc.Scalars(t))


def test_a_resumed_run_continues_its_curves_without_repeated_steps(toy_root, tmp_path):
    first = train(load_recipe(TINY, overrides(toy_root, "name=r", "train.epochs=1")), tmp_path, device="cpu")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(first / "tensorboard")) as killed:  # steps a killed process logged after its checkpoint
        for step in (20, 22):
            killed.add_scalar("train/loss", 999.0, step)
    run = train(load_recipe(TINY, overrides(toy_root, "name=r", "train.epochs=2")), tmp_path, device="cpu",
                resume=True)
    steps = [e.step for e in read_events(run / "tensorboard").Scalars("train/loss")]
    assert steps == sorted(set(steps)) == [r["global_step"] for r in records(run, "train")]
    assert 999.0 not in [e.value for e in read_events(run / "tensorboard").Scalars("train/loss")]


def test_the_log_list_is_validated_and_round_trips():
    cfg = load_recipe(TINY, ["train.log=tensorboard"])
    assert cfg.train.log == ("tensorboard",) and config_from_yaml(config_to_yaml(cfg)) == cfg
    assert "log:\n  - tensorboard" in config_to_yaml(cfg)
    assert load_recipe(TINY, ["train.log=[]"]).train.log == ()
    with pytest.raises(ConfigError, match="train.log: unknown log 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"):
        load_recipe(TINY, ["train.log=[tensorbord]"])


def test_a_missing_extra_is_one_line_before_the_run_folder_is_made(toy_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    result = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={toy_root}",
                                 "--set", "train.log=[tensorboard]"])
    assert result.exit_code == 2 and "pip install 'vsectl[tensorboard]'" in result.output
    assert "Traceback" not in result.output and not any(tmp_path.iterdir())
