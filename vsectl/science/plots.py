"""Pooling-weight curves θ(N) of a trained run (GPO-13: θ depends only on the set size, so no data is needed).

matplotlib is the optional `plot` extra: it is imported inside the functions that draw, never at module import.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.errors import CheckpointError, ConfigError, DataError, VsectlError
from vsectl.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

BRANCHES = ("image", "text")
FALLBACK_SIZES = (10, 36, 49, 100)  # when the training data cannot be read: typical region/grid/caption sizes
CAPTION_SAMPLE = 2000               # captions tokenised to estimate the text set sizes
SIZE_PERCENTILES = (5, 25, 50, 75, 95)  # default N per branch: the bulk of the observed sizes, not the odd extremes
X_AXES = ("relative", "index")
Y_SCALES = ("log", "linear")
LOG_FLOOR = 0.01                    # log axis: at most two decades below the smallest mean-pooling weight 1/N shown
SHORT_LOG_DECADES = 2.5             # a log axis shorter than this also labels 2 and 5 × 10^k
LOG_MARGIN = 1.5                    # log axis: room above the largest and below the smallest weight drawn
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".gif", ".webp", ".bmp")


class MissingExtraError(VsectlError):
    """An optional dependency is not installed."""


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure drawn with the Agg canvas (no pyplot state, no display needed).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("plots need matplotlib: pip install 'vsectl[plot]'") from None
    return Figure(**kwargs)


PAPER_RC = {  # a 3.3 in column or a 7 in page width: 8 pt text, thin lines, no clipped labels
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "lines.linewidth": 1.2, "axes.linewidth": 0.6, "grid.linewidth": 0.4,
    "legend.frameon": False, "pdf.fonttype": 42, "svg.fonttype": "none", "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02}
FIGURE_FORMATS = ("pdf", "svg", "png")
PNG_DPI = 300


@contextlib.contextmanager
def paper_style() -> Iterator[None]:
    """matplotlib settings for figures that go into a paper (fonts embedded as text, 8 pt).

    Raises:
        MissingExtraError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError("plots need matplotlib: pip install 'vsectl[plot]'") from None
    with matplotlib.rc_context(PAPER_RC):
        yield


def figure_format(path: str | Path) -> str:
    """The format named by a file's suffix (pdf, svg or png); anything else is a user error."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise ConfigError(f"cannot tell the figure format of '{path}': end the file name with "
                          f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    return suffix


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure atomically in the format of its suffix (PNG at PNG_DPI)."""
    path = Path(path)
    fmt = figure_format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=PNG_DPI if fmt == "png" else None)
    return path


@dataclass
class WeightCurves:
    """θ(N) per branch of one run.

    Attributes:
        curves: branch → N → [θ_0, …, θ_{N−1}] over 0-based sorted ranks (largest first); each curve sums to 1.
        pools: branch → pooler name, for every branch (with or without a curve).
        notes: branch → why a branch has no curve, or how its curve was reduced (gpo_perdim).
        trained: branch → [smallest, largest] set size in the training data (where it could be read); a curve at an N
            outside it shows θ at a size the model never trained on, and is drawn dashed and labelled so.
    """

    run: str
    checkpoint: str
    curves: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    pools: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    trained: dict[str, list[int]] = field(default_factory=dict)

    def untrained(self, branch: str, n: int) -> bool:
        """True when N lies outside the branch's training set sizes (False when those are unknown)."""
        lo, hi = self.trained.get(branch, (n, n))
        return not lo <= n <= hi

    def to_json(self) -> str:
        """The curves as `{branch: {N: [θ_0..θ_{N−1}]}}`, and `{"trained_sizes": {branch: [smallest, largest]}}`."""
        curves = {b: {str(n): c for n, c in per.items()} for b, per in self.curves.items()}
        return json.dumps({**curves, "trained_sizes": self.trained} if self.trained else curves, indent=1)


def spread(lengths: np.ndarray) -> list[int]:
    """Set sizes to plot, within the observed ones: the distinct 5th, 25th, 50th, 75th and 95th percentiles.

    A branch whose sets all have one size (a 7×7 grid: 49) gets that size alone; other sizes are for `--sizes`.
    """
    lengths = np.asarray(lengths)
    return sorted({max(1, int(round(float(q)))) for q in np.percentile(lengths, SIZE_PERCENTILES)})


def split_sizes(split: Any, text: Any) -> dict[str, np.ndarray]:
    """The set sizes of a (training) split per branch: every image's set size, and the token counts of an even sample
    of CAPTION_SAMPLE captions (all of them in a smaller split)."""
    step = max(1, split.n_captions // CAPTION_SAMPLE)
    encode = text.processor(augment=False).encode
    return {"image": np.asarray(split.features.lengths()),
            "text": np.array([len(encode(c)) for c in split.captions[::step]])}


def seen_sizes(cfg: Any, text: Any) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Default sizes per branch from the training split (`spread`), and each branch's [smallest, largest] size.

    Falls back to FALLBACK_SIZES and no known range, with a warning, when the data cannot be read.
    """
    from vsectl.data.sources import load_split

    try:
        sizes = split_sizes(load_split(cfg.data.root, cfg.data.train_split), text)
    except (DataError, OSError) as e:
        log.warning("cannot read the training data (%s); plotting N = %s", e, list(FALLBACK_SIZES))
        return {b: list(FALLBACK_SIZES) for b in BRANCHES}, {}
    return ({b: spread(v) for b, v in sizes.items()},
            {b: [int(v.min()), int(v.max())] for b, v in sizes.items() if v.size})


def branch_curves(pool: torch.nn.Module, sizes: list[int]) -> dict[int, list[float]]:
    """θ(N) of one pooler for every N in `sizes`; per-dimension θ (gpo_perdim) is averaged over the D dimensions.

    Raises:
        ConfigError: the pooler has no θ that depends on N alone.
    """
    if not hasattr(pool, "weights_for_lengths"):
        raise ConfigError(f"{type(pool).__name__} has no learned θ(N)")
    lengths = torch.tensor(sizes, dtype=torch.int64, device=next(pool.parameters()).device)
    with torch.no_grad():
        theta = pool.weights_for_lengths(lengths, max(sizes)).float().mean(dim=-1)  # (U, L)
    return {n: theta[i, :n].cpu().tolist() for i, n in enumerate(sizes)}


def weight_curves(run: str | Path, sizes: list[int] | None = None, which: str = "best",
                  device: str = "cpu") -> WeightCurves:
    """Load a run and evaluate each learned pooler's θ(N).

    Args:
        run: run directory or checkpoint folder.
        sizes: set sizes N for both branches; None reads a spread around the training data's sizes.
        which: checkpoint, best or last.

    Raises:
        CheckpointError: neither branch has a pooler with a θ(N) curve (e.g. mean pooling on both).
    """
    from vsectl.builders import load_run

    if sizes is not None and (not sizes or min(sizes) < 1):
        raise ConfigError(f"set sizes must be positive integers, got {sizes}")
    cfg, model, text = load_run(Path(run), which=which, device=device)
    out = WeightCurves(run=str(run), checkpoint=which)
    per_branch = {b: sorted(set(sizes)) for b in BRANCHES} if sizes is not None else None
    learned = [b for b in BRANCHES if hasattr(getattr(model, b).pool, "weights_for_lengths")]
    if learned:  # the training sizes mark the curves drawn beyond them (and give the default N)
        default, out.trained = seen_sizes(cfg, text)
        per_branch = per_branch or default
    for branch in BRANCHES:
        pool = getattr(model, branch).pool
        name = getattr(cfg.model, branch).pool.name
        out.pools[branch] = name
        if branch not in learned:
            out.notes[branch] = f"{name} has no learned θ(N)"
            continue
        try:
            out.curves[branch] = branch_curves(pool, per_branch[branch])
        except ConfigError as e:
            out.notes[branch] = str(e)
            continue
        if name == "gpo_perdim":
            out.notes[branch] = "gpo_perdim: the mean of the D per-dimension curves (each sums to 1, so the mean does)"
    if not out.curves:
        detail = "; ".join(f"{b}: {out.notes[b]}" for b in BRANCHES)
        raise CheckpointError(f"run {run} has no GPO pooler with a θ(N) curve ({detail})")
    return out


def check_plot_options(x_axis: str, y_scale: str) -> None:
    if x_axis not in X_AXES:
        raise ConfigError(f"--x-axis must be one of {', '.join(X_AXES)}, got '{x_axis}'")
    if y_scale not in Y_SCALES:
        raise ConfigError(f"--y-scale must be one of {', '.join(Y_SCALES)}, got '{y_scale}'")


def plain_log_ticks(ax: Any) -> None:
    """Log-axis ticks as plain numbers (0.02, not 2 × 10⁻²), with 2 and 5 between decades on a short axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if high / low < 10 ** SHORT_LOG_DECADES:
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def draw_weight_curves(curves: WeightCurves, x_axis: str = "relative", y_scale: str = "log") -> Any:
    """θ_k against the rank, one curve per N and its 1/N mean-pooling line, one panel per branch.

    Args:
        curves: the run's θ(N).
        x_axis: "relative" puts rank k at k/(N−1), so sizes share one axis; "index" uses the raw rank k.
        y_scale: "log" keeps a large-weight curve (a 2-token caption) from flattening the others, spanning the weights
            drawn (never more than two decades below the smallest 1/N); or "linear".

    Returns:
        the matplotlib Figure (3.4 in wide per panel: one column of a two-column paper; the legend below each panel).
    """
    check_plot_options(x_axis, y_scale)
    branches = list(curves.curves)
    with paper_style():
        fig = new_figure(figsize=(3.4 * len(branches), 2.9), layout="constrained")
        from matplotlib.lines import Line2D  # after new_figure, which names the extra when matplotlib is missing
        from matplotlib.ticker import MaxNLocator

        axes = fig.subplots(1, len(branches), squeeze=False)[0]
        for ax, branch in zip(axes, branches, strict=True):
            per_n = sorted(curves.curves[branch].items())
            for i, (n, theta) in enumerate(per_n):
                color = f"C{i % 10}"
                x = [k / max(n - 1, 1) for k in range(n)] if x_axis == "relative" else list(range(n))
                unseen = curves.untrained(branch, n)  # a size the model never trained on: dashed, and said so
                ax.plot(x, theta, color=color, marker="." if n <= 12 else None, ms=4, ls="--" if unseen else "-",
                        label=f"N = {n}" + (" (untrained)" if unseen else ""))
                ax.hlines(1 / n, x[0], x[-1] if n > 1 else 1, color=color, ls=":", lw=0.8)
            if y_scale == "log":
                ax.set_yscale("log")
                top = max(max(theta) for _, theta in per_n)
                shown = [v for _, theta in per_n for v in theta if v > 0] + [1 / n for n, _ in per_n]
                floor = LOG_FLOOR * min(1 / n for n, _ in per_n)  # a near-zero weight is clipped here
                ax.set_ylim(max(floor, min(shown) / LOG_MARGIN), min(1.0, top) * LOG_MARGIN)
                plain_log_ticks(ax)
            trained = curves.trained.get(branch)
            span = "" if trained is None else f"\ntrained on N = {trained[0]}" + (
                f"–{trained[1]}" if trained[1] != trained[0] else "")
            ax.set_title(f"{branch} pooling ({curves.pools[branch]}){span}")
            ax.set_xlabel("relative rank k/(N−1), 0 = largest" if x_axis == "relative" else "rank k, 0 = largest")
            ax.set_ylabel("weight θ_k")
            ax.grid(alpha=0.3)
            handles, _ = ax.get_legend_handles_labels()
            handles.append(Line2D([], [], color="0.4", ls=":", lw=0.8, label="1/N: mean pooling"))
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(3, len(handles)),
                      handlelength=1.5, columnspacing=1.0)  # below the axes: a flat curve leaves no free corner
            if x_axis == "index":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def plot_weight_curves(curves: WeightCurves, path: str | Path, x_axis: str = "relative", y_scale: str = "log") -> Path:
    """Draw the curves (`draw_weight_curves`) and write them to `path`; its suffix (.pdf, .svg, .png) is the format."""
    figure_format(path)
    with paper_style():
        return save_figure(draw_weight_curves(curves, x_axis, y_scale), path)


def figure_targets(out: Path) -> tuple[Path, list[Path]]:
    """Where `--out` sends the curves: (JSON path, figure paths).

    A name ending in .pdf, .svg or .png is that figure, with the JSON beside it under the same stem; anything else is
    a folder that receives weights.json, weights.png, weights.pdf and weights.svg.
    """
    suffix = out.suffix.lower()
    if suffix.lstrip(".") in FIGURE_FORMATS:
        return out.with_suffix(".json"), [out]
    if suffix in OTHER_IMAGE_SUFFIXES:
        raise ConfigError(f"cannot write a {suffix} figure: end --out with .pdf, .svg or .png, or give a folder")
    return out / "weights.json", [out / "weights.png", out / "weights.pdf", out / "weights.svg"]


def write_weight_plots(run: str | Path, sizes: list[int] | None = None, out: str | Path | None = None,
                       which: str = "best", device: str = "cpu", x_axis: str = "relative",
                       y_scale: str = "log") -> tuple[WeightCurves, dict[str, Any]]:
    """Evaluate θ(N) and write the JSON and the figure(s) (see `figure_targets`; default folder RUN/plots).

    Returns:
        the curves and {"json": path, "figures": [paths]}.

    Raises:
        MissingExtraError: matplotlib is missing (the JSON is written first).
    """
    target = Path(out) if out is not None else None
    if target is not None:
        figure_targets(target)  # a bad suffix fails before the run is loaded
    check_plot_options(x_axis, y_scale)
    curves = weight_curves(run, sizes, which=which, device=device)
    json_path, figures = figure_targets(target if target is not None else _run_dir(Path(run)) / "plots")
    atomic_write_text(json_path, curves.to_json() + "\n")
    for path in figures:
        plot_weight_curves(curves, path, x_axis=x_axis, y_scale=y_scale)
    return curves, {"json": json_path, "figures": figures}


def _run_dir(path: Path) -> Path:
    from vsectl.builders import resolve_checkpoint

    return resolve_checkpoint(path)[0]
