"""Paper figures: the sweep's (PDF, SVG and PNG; GPO as its own labelled cell or row; the seed spread), and no
overlapping text or font under 7 pt in it, in plot-weights' curves or in the planted benchmark's figure."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("matplotlib")

from vsectl.science.gridsearch.figures import (  # noqa: E402
    draw_branch_figure,
    draw_heatmap_figure,
    figure_title,
    write_grid_figures,
)
from vsectl.science.gridsearch.report import write_results  # noqa: E402
from vsectl.science.gridsearch.stats import summarise  # noqa: E402
from vsectl.science.patterns import pattern_weights  # noqa: E402
from vsectl.science.planted_plot import plot_bench  # noqa: E402
from vsectl.science.plots import WeightCurves, draw_weight_curves, paper_style  # noqa: E402

FIXED = ["max (K=1)", "K=2", "K=5", "K=10", "K=20", "mean (K=N)"]
LONG = [*FIXED, "gem", "gpo_transformer", "gpo_index_bigru"]
SEEDS = (0, 1, 2)
GPO_RSUM = (150.0, 152.0, 151.0)
SVG = "{http://www.w3.org/2000/svg}"


def record(cell: str, image: str, text: str, seed: int, rsum: float, gpo: bool = False) -> dict:
    fixed = not gpo and all(p in FIXED or p == "recipe" for p in (image, text))
    return {"cell": cell, "seed": seed, "image": image, "text": text, "gpo": gpo, "fixed": fixed,
            "metrics": {"rsum": rsum, "i2t_r1": rsum / 20, "t2i_r1": rsum / 25}, "dev_best_rsum": rsum, "run": cell}


def both_records(images: list[str], texts: list[str]) -> list[dict]:
    """Every visual × text cell with three seeds (rsum grows along both axes), then GPO × GPO."""
    out = [record(f"img-{a}__txt-{b}", a, b, s, 100.0 + 5 * i + 3 * j + 2 * s)
           for s in SEEDS for i, a in enumerate(images) for j, b in enumerate(texts)]
    gpo = [record("img-gpo__txt-gpo", "gpo", "gpo", s, v, gpo=True) for s, v in zip(SEEDS, GPO_RSUM, strict=True)]
    return out + gpo


def branch_records(labels: list[str]) -> list[dict]:
    out = [record(f"img-{a}", a, "recipe", s, 100.0 + 4 * i + 3 * s) for s in SEEDS for i, a in enumerate(labels)]
    return out + [record("img-gpo", "gpo", "recipe", s, v, gpo=True) for s, v in zip(SEEDS, GPO_RSUM, strict=True)]


def drawn_texts(fig, monkeypatch) -> list:  # noqa: ANN001
    """(text, window extent, font size) of every Text that a full draw really puts on the canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    seen = []
    real = Text.draw

    def recording(self, renderer):  # noqa: ANN001, ANN202
        if self.get_visible() and self.get_text().strip():
            seen.append((self.get_text(), self.get_window_extent(renderer), self.get_fontsize()))
        return real(self, renderer)

    monkeypatch.setattr(Text, "draw", recording)
    FigureCanvasAgg(fig).draw()
    monkeypatch.setattr(Text, "draw", real)
    return seen


def assert_no_overlap(texts: list) -> None:
    for i, (a, box_a, _) in enumerate(texts):
        for b, box_b, _ in texts[i + 1:]:
            apart = box_a.x1 <= box_b.x0 or box_b.x1 <= box_a.x0 or box_a.y1 <= box_b.y0 or box_b.y1 <= box_a.y0
            assert apart, f"{a!r} overlaps {b!r}"


@pytest.mark.parametrize("branch", ["both", "image"])
def test_figure_is_written_as_pdf_svg_and_png(tmp_path, branch):
    records = both_records(FIXED[:2], FIXED[-2:]) if branch == "both" else branch_records(FIXED)
    paths = write_grid_figures(summarise(records), branch, tmp_path, records=records, title="demo")
    assert [p.name for p in paths] == ["rsum.pdf", "rsum.svg", "rsum.png"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    assert paths[2].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = ET.parse(paths[1]).getroot()
    texts = ["".join(t.itertext()) for t in svg.iter(f"{SVG}text")]
    assert "GPO" in texts and "demo" in texts  # fonts stay text, so a paper's figure is searchable and editable
    assert len(list(svg.iter(f"{SVG}path"))) > 10
    assert write_grid_figures([], branch, tmp_path / "empty") == []  # no results, no figure


def test_heatmap_puts_gpo_in_its_own_row_and_column_on_the_same_scale():
    records = both_records(FIXED[:3], FIXED[:3])
    with paper_style():
        fig = draw_heatmap_figure(summarise(records))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["max", "K=2", "K=5", "GPO"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["max", "K=2", "K=5", "GPO"]
    (mesh,) = ax.collections
    matrix = mesh.get_array().reshape(4, 4)
    assert matrix[3, 3] == pytest.approx(151.0)  # GPO × GPO in the corner, coloured by the matrix's own norm
    assert matrix.mask[3, :3].all() and matrix.mask[:3, 3].all()  # the cells the sweep never ran stay blank
    assert mesh.norm.vmax == pytest.approx(151.0)
    annotations = {t.get_text() for t in ax.texts}
    assert "151.0\n± 1.0" in annotations  # GPO's mean ± std
    assert "118.0\n± 2.0" in annotations  # K=5 × K=5: 100 + 10 + 6 + the mean of 2·seed


def test_heatmap_outlines_the_best_fixed_cell():
    from matplotlib.patches import Rectangle

    records = both_records(FIXED[:3], FIXED[:3])
    with paper_style():
        fig = draw_heatmap_figure(summarise(records), best="img-K=2__txt-max (K=1)")
    (outline,) = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert outline.get_xy() == pytest.approx((-0.45, 0.55))  # column max, row K=2: the given cell, not the top one


def test_branch_figure_shows_every_seed_and_gpo_in_its_own_row():
    records = branch_records(FIXED)
    with paper_style():
        fig = draw_branch_figure(summarise(records), "image", records=records)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["max", "K=2", "K=5", "K=10", "K=20", "mean", "GPO"]
    gpo_y = ax.get_yticks()[-1]
    assert gpo_y - ax.get_yticks()[-2] > 1  # set apart from the fixed rows
    points = {(tuple(line.get_xdata()), line.get_marker()) for line in ax.lines if len(line.get_xdata())}
    assert (GPO_RSUM, "o") in points  # GPO's three seeds
    assert ((151.0,), "D") in points  # GPO's mean, a marker of its own
    assert ((120.0, 123.0, 126.0), "o") in points  # mean (K=N)'s seeds
    best = [t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
    assert best == ["mean", "GPO"]  # the best fixed row and GPO are marked


@pytest.mark.parametrize("case", ["default grid", "long names", "one branch, long names"])
def test_no_text_overlaps_and_every_font_is_at_least_7pt(case, monkeypatch):
    if case == "default grid":
        records = both_records(FIXED, FIXED)
    elif case == "long names":
        records = both_records(FIXED[:4], LONG)
    else:
        records = branch_records(LONG + ["gpo_interp", "K=50"])
    rows = summarise(records)
    title = figure_title({"recipe": "/some/where/recipes/demo.yaml", "split": "test", "seeds": list(SEEDS)})
    with paper_style():
        fig = (draw_branch_figure(rows, "image", records=records, title=title) if case.startswith("one")
               else draw_heatmap_figure(rows, title=title))
        texts = drawn_texts(fig, monkeypatch)
        width = fig.get_tightbbox().width
    assert len(texts) > len(rows)
    assert_no_overlap(texts)
    assert min(size for _, _, size in texts) >= 7
    if case == "default grid":
        assert width <= 3.4  # the 6 × 6 grid with GPO fits one column of a two-column paper
    assert title == "demo, test split: rsum, mean ± std over 3 seeds"


def test_write_results_lists_the_figures_and_skips_them_in_one_line_without_matplotlib(tmp_path, monkeypatch,
                                                                                         caplog):
    records = branch_records(FIXED[:2])
    meta = {"recipe": "recipes/tiny.yaml", "split": "test", "seeds": list(SEEDS), "protocol": "f30k"}
    written = write_results(tmp_path / "with", records, "image", meta)
    names = [p.rsplit("/", 1)[-1] for p in written["paths"]]
    assert names == ["results.json", "results.csv", "results.md", "rsum.pdf", "rsum.svg", "rsum.png"]

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    written = write_results(tmp_path / "without", records, "image", meta)
    assert [p.rsplit("/", 1)[-1] for p in written["paths"]] == names[:3]
    assert not list((tmp_path / "without").glob("rsum.*"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "vsectl[plot]" in warning and "\n" not in warning


def test_weight_curves_have_no_overlapping_text(monkeypatch):
    sizes = (2, 5, 9, 17, 30)
    curves = {n: [(n - k) / (n * (n + 1) / 2) for k in range(n)] for n in sizes}  # linear, sums to 1
    with paper_style():
        fig = draw_weight_curves(WeightCurves("run", "best", curves={"image": {49: [1 / 49] * 49}, "text": curves},
                                              pools={"image": "gpo", "text": "gpo"}))
        texts = drawn_texts(fig, monkeypatch)
    assert_no_overlap(texts)
    assert min(size for _, _, size in texts) >= 7
    assert "1/N: mean pooling" in {t for t, _, _ in texts}


def planted_result(plantings: tuple[str, ...]) -> dict:
    """The fields plot_bench reads, for 5 GPO seeds and one best fixed cell per planting."""
    sizes = range(3, 65)
    records, summaries = [], []
    for p in plantings:
        records.append({"planting": p, "cell": "img-mean", "label": "mean (K=N)", "gpo": False,
                        "theta_rmse": {str(n): 0.05 + 0.02 * math.sin(n / 9) for n in sizes}})
        for seed in range(5):
            records.append({"planting": p, "cell": "img-gpo", "label": "gpo", "gpo": True,
                            "theta_rmse": {str(n): 0.03 + 0.2 / n + 0.002 * seed for n in sizes},
                            "theta": {str(n): pattern_weights(p, n).tolist() for n in (4, 20, 64)}})
        summaries.append({"planting": p, "best_fixed_dev": "img-mean"})
    return {"config": {"train_min_size": 8, "train_max_size": 32}, "plantings": summaries, "records": records}


def test_planted_figure_is_vector_and_png_without_overlapping_text(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (figures.append(self), real_savefig(self, *a, **kw)))
    paths = plot_bench(planted_result(("M-4", "T-25%", "M-1", "A")), tmp_path / "planted")
    assert [p.name for p in paths] == ["planted.pdf", "planted.svg", "planted.png"]
    assert paths[0].read_bytes().startswith(b"%PDF")
    ET.parse(paths[1])
    monkeypatch.setattr(Figure, "savefig", real_savefig)
    with paper_style():
        texts = drawn_texts(figures[0], monkeypatch)
    assert_no_overlap(texts)
    assert min(size for _, _, size in texts) >= 7
