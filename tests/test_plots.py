"""plot-weights: θ(N) curves of a trained run as JSON, PNG and a terminal preview; clear errors otherwise."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.cli.science import sparkline
from vsectl.config import load_recipe
from vsectl.plots import MissingExtraError, new_figure, spread, weight_curves
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()



def tiny_run(root: Path, out: Path, name: str, *extra: str) -> Path:
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={root}", f"name={name}", "train.epochs=1",
                                                       "train.max_steps_per_epoch=2", *extra])
    return train(cfg, out, device="cpu")


@pytest.fixture(scope="module")
def gpo_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(toy_root, tmp_path_factory.mktemp("runs"), "gpo")


def test_plot_weights_writes_a_png_and_curves_that_sum_to_one(gpo_run, tmp_path):
    from PIL import Image

    out = tmp_path / "plots"
    result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", "3,12,20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    png = Path(result.stdout.strip())
    assert png == out / "weights.png"
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    curves = json.loads((out / "weights.json").read_text())
    assert sorted(curves) == ["image", "text"]
    for per_n in curves.values():
        assert sorted(per_n, key=int) == ["3", "12", "20"]
        for n, theta in per_n.items():
            assert len(theta) == int(n)
            assert sum(theta) == pytest.approx(1.0, abs=1e-5)
    assert "Σθ" in result.stderr and "image · gpo" in result.stderr  # the rich preview


def test_bad_sizes_are_one_line_errors(gpo_run):
    for sizes in ("0,3", "a,3"):
        result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", sizes])
        assert result.exit_code == 2 and result.stderr.startswith("error:")


def test_default_sizes_come_from_the_training_data(gpo_run):
    curves = weight_curves(gpo_run)
    assert sorted(curves.curves["image"]) == [6, 12, 18]  # the toy set has 12 regions: 12/2, 12, 1.5 × 12
    text_sizes = sorted(curves.curves["text"])
    assert len(text_sizes) >= 3 and min(text_sizes) >= 1


def test_spread_brackets_the_observed_sizes():
    assert spread(np.array([36] * 5)) == [18, 36, 54]
    assert spread(np.array([4, 8, 10, 12, 20])) == [2, 4, 8, 10, 12, 20, 30]


def test_a_run_without_gpo_gets_one_clear_line(toy_root, tmp_path):
    run = tiny_run(toy_root, tmp_path, "mean", "model.image.pool.name=mean", "model.text.pool.name=mean")
    result = runner.invoke(app, ["plot-weights", str(run)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.output
    assert "has no GPO pooler" in " ".join(result.stderr.split())  # one logical line (rich wraps at the width)


def test_missing_matplotlib_is_named_with_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(MissingExtraError, match=r"pip install 'vsectl\[plot\]'"):
        new_figure()


def test_sparkline_scales_to_the_peak_and_caps_the_width():
    assert sparkline([1.0, 0.0, 0.5]) == "█▁▅"
    assert len(sparkline([1.0] * 100, width=40)) == 40
