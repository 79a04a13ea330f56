"""Figures of a sweep, sized for one column of a two-column paper and written as PDF, SVG and PNG.

One branch: a dot plot, one row per pooling (max, K=2 … mean, learned ones), GPO in its own row below, each row's
mean ± std over seeds with every seed as a point. Both branches: the visual × text matrix of mean rsum, each cell
annotated "mean ± std", GPO × GPO as its own row and column on the same colour scale. The best fixed cell is marked in
both. matplotlib is the optional `plot` extra, imported only when drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.science.gridsearch.stats import _fmt
from vsectl.science.plots import FIGURE_FORMATS, new_figure, paper_style, save_figure

FIGURE_STEM = "rsum"       # <out>/rsum.pdf, rsum.svg, rsum.png
COLUMN_WIDTH = 3.3         # inches: one column of a two-column paper
SEED_OFFSET = 0.25         # rows: the seeds' points sit just below their row's mean ± std bar
ROW_HEIGHT = 0.2           # inches per pooling row of the dot plot (7 pt labels need about 0.12)
MAX_CELL = 0.55            # inches: the largest heatmap cell, so a 2 × 2 grid does not fill a column
CELL_FONT = 7              # points: the annotation inside a heatmap cell
CELL_PAD = 0.08            # inches: the least room beside a cell's widest number
BRANCH_WORDS = {"image": "visual pooling", "text": "text pooling"}
SHORT_LABELS = {"max (K=1)": "max", "mean (K=N)": "mean", "gpo": "GPO"}
GPO_COLOR = "C3"
FIXED_COLOR = "0.25"
BEST_COLOR = "C3"


def figure_title(meta: dict) -> str:
    """A short title from the sweep's meta: recipe name (not its path), split, seeds."""
    recipe = Path(str(meta.get("recipe", ""))).stem or "sweep"
    seeds = len(meta.get("seeds", []))
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    rule = f" ({meta['tie_rule']} ties)" if meta.get("tie_rule") else ""
    smoke = "smoke run, not a result: " if meta.get("quick") else ""
    return f"{smoke}{recipe}, {meta.get('split', 'test')} split: rsum{rule}, {spread}"


def best_fixed_cell(rows: Sequence[dict]) -> str | None:
    """The fixed cell with the highest mean rsum (the verdict's choice when it is not given)."""
    fixed = [r for r in rows if r["fixed"]]
    return max(fixed, key=lambda r: r["rsum_mean"])["cell"] if fixed else None


def seed_values(records: Sequence[dict] | None) -> dict[str, list[float]]:
    """cell → its per-seed rsum values."""
    out: dict[str, list[float]] = {}
    for rec in records or ():
        out.setdefault(rec["cell"], []).append(rec["metrics"]["rsum"])
    return out


def _label(row: dict, branch: str) -> str:
    return SHORT_LABELS.get(row[branch], row[branch])


def matplotlib_rc(key: str) -> Any:
    import matplotlib

    return matplotlib.rcParams[key]


def text_width(text: str, size: float, bold: bool = False) -> float:
    """Width in inches of one line of text at `size` points in the default font (for sizing before drawing)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    font = FontProperties(size=size, weight="bold" if bold else "normal")
    width, _, _ = TextToPath().get_text_width_height_descent(text, font, ismath=False)
    return width / 72


def draw_rows(ax: Any, ys: Sequence[float], rows: Sequence[dict], seeds: dict[str, list[float]],
              best: str | None) -> None:
    """Per row: the ± std bar, the seeds as small points just below, the mean (GPO: a red diamond; best: filled)."""
    for y, r in zip(ys, rows, strict=True):
        color = GPO_COLOR if r["gpo"] else FIXED_COLOR
        face = color if (r["gpo"] or r["cell"] == best) else "white"
        if r["rsum_std"] is not None:
            ax.errorbar([r["rsum_mean"]], [y], xerr=[r["rsum_std"]], fmt="none", ecolor=color, elinewidth=1.4,
                        capsize=0, zorder=2)
        values = seeds.get(r["cell"], [])
        ax.plot(values, [y + SEED_OFFSET] * len(values), marker="o", ms=2.2, mew=0, color=color, alpha=0.8,
                ls="none", zorder=3)
        ax.plot([r["rsum_mean"]], [y], marker="D" if r["gpo"] else "o", ms=5, mfc=face, mec=color, mew=1.1,
                ls="none", zorder=4)


def branch_legend(fig: Any, several: bool, with_seeds: bool) -> None:
    """The dot plot's key, below it: mean ± std and one seed (or the single run), and the best fixed line."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=FIXED_COLOR, marker="o", mfc="white", ms=4, lw=1.2 if several else 0,
                      label="mean ± std" if several else "rsum (1 seed)")]
    if with_seeds:
        handles.append(Line2D([], [], color=FIXED_COLOR, marker="o", ms=2.2, mew=0, ls="none", label="one seed"))
    handles.append(Line2D([], [], color=BEST_COLOR, ls=":", lw=0.8, marker="o", mfc=FIXED_COLOR, mec=FIXED_COLOR,
                          ms=4, label="best fixed (on dev)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), handlelength=1.6, columnspacing=1.0)


def draw_branch_figure(rows: Sequence[dict], branch: str, records: Sequence[dict] | None = None,
                       best: str | None = None, title: str = "") -> Any:
    """One swept branch: a row per pooling (mean ± std bar, every seed a point), GPO in its own row below.

    Args:
        rows: `summarise` rows in grid order (max, K=2 …, mean, learned poolers, GPO).
        branch: "image" or "text".
        records: the per-seed records, drawn as points (None: means and stds only).
        best: the best fixed cell's name (default `best_fixed_cell`).
    """
    best = best if best is not None else best_fixed_cell(rows)
    seeds = seed_values(records)
    several = any(len(r["seeds"]) > 1 for r in rows)
    if not several:  # one seed: the point is the mean, and there is no spread to draw
        seeds = {}
    shown = [r for r in rows if not r["gpo"]]
    gpo = [r for r in rows if r["gpo"]]
    ys = list(range(len(shown))) + [len(shown) + 0.4 + i for i in range(len(gpo))]  # a gap above the GPO row
    ordered = shown + gpo
    height = 0.95 + ROW_HEIGHT * (ys[-1] + 1 if ys else 1)
    fig = new_figure(figsize=(COLUMN_WIDTH, height), layout="constrained")
    ax = fig.subplots()
    draw_rows(ax, ys, ordered, seeds, best)
    fixed_best = next((r for r in shown if r["cell"] == best), None)
    if fixed_best is not None:
        ax.axvline(fixed_best["rsum_mean"], color=BEST_COLOR, ls=":", lw=0.8, zorder=1)
    if gpo and shown:
        ax.axhline(len(shown) - 0.3, color="0.6", lw=0.5)
    ax.set_yticks(ys, [_label(r, branch) for r in ordered])
    ax.set_ylim(ys[-1] + 0.7, -0.7)  # first row on top
    for tick, r in zip(ax.get_yticklabels(), ordered, strict=True):
        if r["gpo"]:
            tick.set(color=GPO_COLOR, fontweight="bold")
        elif r["cell"] == best:
            tick.set(fontweight="bold")
    values = _spread_values(ordered, seeds)
    pad = max(1.0, 0.08 * (max(values) - min(values)))
    ax.set_xlim(min(values) - pad, max(values) + pad)
    side = ax.secondary_yaxis("right")  # the numbers as a column of text beside the rows
    side.set_yticks(ys, [_fmt(r["rsum_mean"], r["rsum_std"]) for r in ordered])
    side.tick_params(length=0)
    ax.set_ylabel(BRANCH_WORDS.get(branch, branch))
    other = next((b for b in BRANCH_WORDS if b != branch), "")
    ax.set_xlabel(f"rsum ({BRANCH_WORDS.get(other, other)} as in the recipe)")
    ax.grid(axis="x", alpha=0.3, lw=0.4)
    branch_legend(fig, several, with_seeds=bool(seeds))
    if title:
        fig.suptitle(title)
    return fig


def _spread_values(rows: Sequence[dict], seeds: dict[str, list[float]]) -> list[float]:
    values = []
    for r in rows:
        std = r["rsum_std"] or 0.0
        values += [r["rsum_mean"] - std, r["rsum_mean"] + std, *seeds.get(r["cell"], [])]
    return values


def cell_text(row: dict) -> str:
    """A heatmap cell's annotation: the mean over the ± std, on two lines."""
    return _fmt(row["rsum_mean"], row["rsum_std"]).replace(" ± ", "\n± ")


def grid_matrix(rows: Sequence[dict]) -> tuple[list[str], list[str], list[list[dict | None]]]:
    """The visual × text layout: (row labels, column labels, cells); GPO × GPO is its own last row and column.

    Cells a sweep did not run (GPO's row against a fixed text pooling, or a missing cell) are None.
    """
    grid = [r for r in rows if not r["gpo"]]
    gpo = next((r for r in rows if r["gpo"]), None)
    images = list(dict.fromkeys(r["image"] for r in grid))
    texts = list(dict.fromkeys(r["text"] for r in grid))
    at = {(r["image"], r["text"]): r for r in grid}
    cells: list[list[dict | None]] = [[at.get((i, t)) for t in texts] + ([None] if gpo else []) for i in images]
    if gpo is not None:
        images.append(gpo["image"])
        texts.append(gpo["text"])
        cells.append([None] * (len(texts) - 1) + [gpo])
    return images, texts, cells


@dataclass(frozen=True)
class HeatmapLayout:
    """Inches of a heatmap figure, measured from its labels and numbers before anything is drawn."""

    width: float
    height: float
    cell: float
    upright: bool  # column labels fit side by side; else they stand on end


def heatmap_layout(x_labels: Sequence[str], y_labels: Sequence[str], numbers: Sequence[str]) -> HeatmapLayout:
    """Cells as wide as the column allows (at most MAX_CELL) but never narrower than their widest number."""
    tick_size = float(matplotlib_rc("xtick.labelsize"))
    widest = max((text_width(part, CELL_FONT, bold=True) for text in numbers for part in text.split("\n")),
                 default=0.3)
    left = 0.3 + max(text_width(t, tick_size) for t in y_labels)  # axis label + tick labels
    cell = min(MAX_CELL, max(widest + CELL_PAD, (COLUMN_WIDTH - left - 0.05) / len(x_labels)))
    label_width = max(text_width(t, tick_size) for t in x_labels)
    upright = label_width + 0.04 < cell
    bottom = 0.2 + (0.12 if upright else label_width) + 0.65  # tick labels, axis label, colour bar and its label
    return HeatmapLayout(width=left + cell * len(x_labels) + 0.05, height=0.3 + 0.85 * cell * len(y_labels) + bottom,
                         cell=cell, upright=upright)


def annotate_cells(ax: Any, cells: list[list[dict | None]], cmap: Any, norm: Any, best: str | None,
                   blank_last: bool) -> None:
    """"mean ± std" in every cell (ink by the cell's brightness), "n/a" in a grid cell not run, the best outlined."""
    from matplotlib.patches import Rectangle

    for y, line in enumerate(cells):
        for x, c in enumerate(line):
            if c is None:
                if not (blank_last and (y == len(cells) - 1 or x == len(line) - 1)):
                    ax.text(x, y, "n/a", ha="center", va="center", fontsize=CELL_FONT, color="0.5")
                continue
            r, g, b, _ = cmap(norm(c["rsum_mean"]))
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(x, y, cell_text(c), ha="center", va="center", fontsize=CELL_FONT, color=ink, linespacing=1.0,
                    fontweight="bold" if c["gpo"] or c["cell"] == best else "normal")
            if c["cell"] == best:
                ax.add_patch(Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, fill=False, edgecolor=BEST_COLOR,
                                       linewidth=1.5, clip_on=False))


def draw_heatmap_figure(rows: Sequence[dict], best: str | None = None, title: str = "") -> Any:
    """Both branches: visual (rows) × text (columns) mean rsum, "mean ± std" in each cell, GPO × GPO in the corner.

    Args:
        rows: `summarise` rows of a "both" sweep, in grid order.
        best: the best fixed cell's name (default `best_fixed_cell`), outlined.
    """
    best = best if best is not None else best_fixed_cell(rows)
    images, texts, cells = grid_matrix(rows)
    has_gpo = any(r["gpo"] for r in rows)
    fig = new_figure(layout="constrained")  # names the extra when matplotlib is missing; sized below
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    x_labels = [SHORT_LABELS.get(t, t) for t in texts]
    y_labels = [SHORT_LABELS.get(i, i) for i in images]
    layout = heatmap_layout(x_labels, y_labels, [cell_text(c) for line in cells for c in line if c])
    fig.set_size_inches(layout.width, layout.height)
    ax = fig.subplots()
    matrix = np.array([[c["rsum_mean"] if c else math.nan for c in line] for line in cells], dtype=float)
    finite = matrix[np.isfinite(matrix)]
    norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max()) + (0.0 if np.ptp(finite) else 1.0))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    edges_x, edges_y = np.arange(len(texts) + 1) - 0.5, np.arange(len(images) + 1) - 0.5
    mesh = ax.pcolormesh(edges_x, edges_y, np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, linewidth=0,
                         rasterized=False)  # vector cells: a viewer never blurs them as it may an embedded image
    ax.set_xlim(edges_x[0], edges_x[-1])
    ax.set_ylim(edges_y[-1], edges_y[0])  # first row on top
    annotate_cells(ax, cells, cmap, norm, best, blank_last=has_gpo)
    if has_gpo:  # white gaps set GPO's row and column apart from the fixed grid
        ax.axhline(len(images) - 1.5, color="white", lw=3)
        ax.axvline(len(texts) - 1.5, color="white", lw=3)
    if layout.upright:
        ax.set_xticks(range(len(texts)), x_labels)
    else:  # long pooler names stand on end, ending at their column
        ax.set_xticks(range(len(texts)), x_labels, rotation=90, ha="right", va="center", rotation_mode="anchor")
    ax.set_yticks(range(len(images)), y_labels)
    ax.tick_params(length=0)
    for label in (*ax.get_xticklabels()[-1:], *ax.get_yticklabels()[-1:]) if has_gpo else ():
        label.set(color=GPO_COLOR, fontweight="bold")
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("text pooling")
    ax.set_ylabel("visual pooling")
    bar = fig.colorbar(mesh, ax=ax, location="bottom", shrink=0.8, aspect=30, pad=0.02)
    several = any(len(r["seeds"]) > 1 for r in rows)
    bar.set_label(f"rsum{' (mean over seeds)' if several else ''}; outlined: best fixed on dev")
    bar.outline.set_linewidth(0.4)
    if title:
        fig.suptitle(title)
    return fig


def draw_grid_figure(rows: Sequence[dict], branch: str, records: Sequence[dict] | None = None,
                     best: str | None = None, title: str = "") -> Any:
    """The sweep's figure: `draw_heatmap_figure` for branch "both", else `draw_branch_figure`."""
    if branch == "both":
        return draw_heatmap_figure(rows, best=best, title=title)
    return draw_branch_figure(rows, branch, records=records, best=best, title=title)


def write_grid_figures(rows: Sequence[dict], branch: str, out_dir: str | Path, records: Sequence[dict] | None = None,
                       best: str | None = None, title: str = "") -> list[Path]:
    """Draw the sweep's figure once and write `<out_dir>/rsum.pdf`, `rsum.svg` and `rsum.png` (atomically).

    Returns:
        the paths written; none for a sweep without results.

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    if not rows:
        return []
    out = Path(out_dir)
    with paper_style():
        fig = draw_grid_figure(rows, branch, records=records, best=best, title=title)
        return [save_figure(fig, out / f"{FIGURE_STEM}.{fmt}") for fmt in FIGURE_FORMATS]
