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
from vsectl.science.plots import MissingExtraError, WeightCurves, draw_weight_curves, new_figure, spread, weight_curves
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


def test_plot_weights_writes_png_pdf_svg_and_curves_that_sum_to_one(gpo_run, tmp_path):
    from PIL import Image

    out = tmp_path / "plots"
    result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", "3,12,20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    png = Path(result.stdout.strip())
    assert png == out / "weights.png"
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert (out / "weights.pdf").read_bytes().startswith(b"%PDF")
    assert (out / "weights.svg").read_bytes().startswith(b"<?xml")
    curves = json.loads((out / "weights.json").read_text())
    trained = curves.pop("trained_sizes")
    assert sorted(curves) == ["image", "text"] and sorted(trained) == ["image", "text"]
    for per_n in curves.values():
        assert sorted(per_n, key=int) == ["3", "12", "20"]
        for n, theta in per_n.items():
            assert len(theta) == int(n)
            assert sum(theta) == pytest.approx(1.0, abs=1e-5)
    assert "Σθ" in result.stderr and "image · gpo" in result.stderr  # the rich preview


@pytest.mark.parametrize(("name", "magic"), [("fig.pdf", b"%PDF"), ("fig.svg", b"<?xml"), ("fig.PNG", b"\x89PNG")])
def test_out_suffix_picks_the_format_and_writes_one_file(gpo_run, tmp_path, name, magic):
    out = tmp_path / name
    result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", "3,12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == out
    assert out.is_file() and out.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "fig.json"])


def test_unsupported_figure_suffix_and_axis_are_one_line_errors(gpo_run, tmp_path):
    for args in (["--out", str(tmp_path / "fig.jpg")], ["--x-axis", "log"], ["--y-scale", "sqrt"]):
        result = runner.invoke(app, ["plot-weights", str(gpo_run), *args])
        assert result.exit_code == 2 and result.stderr.startswith("error:"), args
    assert not any(tmp_path.iterdir())


def _curves() -> WeightCurves:
    return WeightCurves("run", "best", curves={"image": {2: [0.7, 0.3], 5: [0.4, 0.3, 0.15, 0.1, 0.05]}},
                        pools={"image": "gpo", "text": "mean"})


def test_relative_rank_axis_by_default_raw_index_on_request():
    def xs(fig):
        return {len(line.get_xdata()): list(line.get_xdata()) for line in fig.axes[0].lines}

    assert xs(draw_weight_curves(_curves()))[5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert xs(draw_weight_curves(_curves()))[2] == [0.0, 1.0]
    assert xs(draw_weight_curves(_curves(), x_axis="index"))[5] == [0, 1, 2, 3, 4]


def test_each_size_gets_its_mean_pooling_line_and_no_path_in_the_title():
    fig = draw_weight_curves(_curves(), y_scale="linear")
    ax = fig.axes[0]
    levels = sorted(float(seg[0][1]) for coll in ax.collections for seg in coll.get_segments())
    assert levels == pytest.approx([1 / 5, 1 / 2])
    titles = [ax.get_title() for ax in fig.axes] + [fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""]
    assert not any("run" in t or "/" in t for t in titles)
    width, height = fig.get_size_inches()
    assert width <= 3.5 and height <= 3.0  # one column of a two-column paper


def test_log_axis_keeps_small_weights_visible_beside_a_two_element_set():
    ax = draw_weight_curves(_curves()).axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < 0.05 and high >= 0.7  # every weight is on the axis
    assert low > 0.05 / 10  # but no decade of empty axis below the smallest one


def test_log_axis_clips_a_near_zero_weight_two_decades_below_the_smallest_mean_weight():
    curves = WeightCurves("run", "best", curves={"image": {4: [0.97, 0.02, 0.01, 1e-9]}}, pools={"image": "gpo"})
    low, _ = draw_weight_curves(curves).axes[0].get_ylim()
    assert low == pytest.approx(0.01 * 0.25)


def test_bad_sizes_are_one_line_errors(gpo_run):
    for sizes in ("0,3", "a,3"):
        result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", sizes])
        assert result.exit_code == 2 and result.stderr.startswith("error:")


def test_default_sizes_come_from_the_training_data(gpo_run):
    curves = weight_curves(gpo_run)
    assert sorted(curves.curves["image"]) == [12]  # every toy image has 12 regions: no invented sizes
    text_sizes = sorted(curves.curves["text"])
    assert len(text_sizes) >= 3 and min(text_sizes) >= 1


def test_spread_keeps_to_the_bulk_of_the_observed_sizes():
    assert spread(np.array([49] * 5)) == [49]
    sizes = np.array([2] + list(range(10, 31)) + [90])  # one 2-token caption and one outlier do not set the range
    expected = sorted({int(round(float(np.percentile(sizes, q)))) for q in (5, 25, 50, 75, 95)})
    assert spread(sizes) == expected and min(expected) >= 10 and max(expected) <= 30


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


def test_sizes_the_model_never_trained_on_are_drawn_dashed_and_labelled():
    """The demo plots N = 70 on 49-cell sets: that curve must not pass for a trained one."""
    from vsectl.cli.science import curves_table

    curves = WeightCurves("run", "best", curves={"image": {49: [1 / 49] * 49, 70: [1 / 70] * 70}},
                          pools={"image": "gpo"}, trained={"image": [49, 49]})
    fig = draw_weight_curves(curves)
    lines = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert lines["N = 49"] == "-" and lines["N = 70 (untrained)"] == "--"
    assert "trained on N = 49" in fig.axes[0].get_title()
    rows = curves_table("image", "gpo", curves.curves["image"], [49, 49]).columns[0]._cells
    assert rows == ["49", "70 (untrained)"]
    assert '"trained_sizes"' in curves.to_json()


def test_plot_weights_reads_the_training_range_of_each_branch(gpo_run, tmp_path):
    result = runner.invoke(app, ["plot-weights", str(gpo_run), "--sizes", "3,500", "--out", str(tmp_path / "w.png")])
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "w.json").read_text())["trained_sizes"]
    assert trained["image"][0] >= 1 and trained["image"][1] < 500 and trained["text"][1] < 500
    assert "500 (untrained)" in result.stderr
