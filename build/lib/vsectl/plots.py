"""Pooling-weight curves θ(N) of a trained run (GPO-13: θ depends only on the set size, so no data is needed).

matplotlib is the optional `plot` extra: it is imported inside the functions that draw, never at module import.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.errors import CheckpointError, ConfigError, DataError, VsectlError
from vsectl.io import atomic_write_text

log = logging.getLogger(__name__)

BRANCHES = ("image", "text")
FALLBACK_SIZES = (10, 36, 49, 100)  # when the training data cannot be read: typical region/grid/caption sizes
CAPTION_SAMPLE = 2000               # captions tokenised to estimate the text set sizes


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


@dataclass
class WeightCurves:
    """θ(N) per branch of one run.

    Attributes:
        curves: branch → N → [θ_0, …, θ_{N−1}] over 0-based sorted ranks (largest first); each curve sums to 1.
        pools: branch → pooler name, for every branch (with or without a curve).
        notes: branch → why a branch has no curve, or how its curve was reduced (gpo_perdim).
    """

    run: str
    checkpoint: str
    curves: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    pools: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The curves as `{branch: {N: [θ_0..θ_{N−1}]}}`."""
        return json.dumps({b: {str(n): c for n, c in per.items()} for b, per in self.curves.items()}, indent=1)


def spread(lengths: np.ndarray) -> list[int]:
    """Set sizes to plot around the observed ones: half the smallest, min, quartiles, median, max, 1.5 × max."""
    lengths = np.asarray(lengths)
    lo, hi = int(lengths.min()), int(lengths.max())
    quartiles = [int(round(float(q))) for q in np.percentile(lengths, [25, 50, 75])]
    return sorted({max(1, lo // 2), lo, *quartiles, hi, math.ceil(1.5 * hi)})


def seen_sizes(cfg: Any, text: Any) -> dict[str, list[int]]:
    """Default sizes per branch from the training split: image set sizes, and caption token counts (a sample).

    Falls back to FALLBACK_SIZES, with a warning, when the data cannot be read.
    """
    from vsectl.data.sources import load_split

    try:
        split = load_split(cfg.data.root, cfg.data.train_split)
    except (DataError, OSError) as e:
        log.warning("cannot read the training data (%s); plotting N = %s", e, list(FALLBACK_SIZES))
        return {b: list(FALLBACK_SIZES) for b in BRANCHES}
    step = max(1, split.n_captions // CAPTION_SAMPLE)
    encode = text.processor(augment=False).encode
    caption_lengths = np.array([len(encode(c)) for c in split.captions[::step]])
    return {"image": spread(split.features.lengths()), "text": spread(caption_lengths)}


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
    for branch in BRANCHES:
        pool = getattr(model, branch).pool
        name = getattr(cfg.model, branch).pool.name
        out.pools[branch] = name
        if not hasattr(pool, "weights_for_lengths"):
            out.notes[branch] = f"{name} has no learned θ(N)"
            continue
        if per_branch is None:
            per_branch = seen_sizes(cfg, text)
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


def plot_weight_curves(curves: WeightCurves, path: str | Path) -> Path:
    """θ_k against the sorted index k, one curve per N, one panel per branch; written as a PNG."""
    branches = list(curves.curves)
    fig = new_figure(figsize=(5.5 * len(branches), 4))
    axes = fig.subplots(1, len(branches), squeeze=False)[0]
    for ax, branch in zip(axes, branches, strict=True):
        per_n = curves.curves[branch]
        colors = [f"C{i % 10}" for i in range(len(per_n))]
        for color, (n, theta) in zip(colors, sorted(per_n.items()), strict=True):
            ax.plot(range(n), theta, color=color, marker="." if n <= 40 else None, label=f"N={n}")
        ax.set_title(f"{branch}: {curves.pools[branch]}")
        ax.set_xlabel("sorted index k (0 = largest value)")
        ax.set_ylabel("θ_k")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"pooling weights θ(N): {curves.run} ({curves.checkpoint})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def write_weight_plots(run: str | Path, sizes: list[int] | None = None, out: str | Path | None = None,
                       which: str = "best", device: str = "cpu") -> tuple[WeightCurves, dict[str, Path]]:
    """Evaluate θ(N) and write `weights.json` and `weights.png` into `out` (default RUN/plots).

    Returns:
        the curves and {"json": path, "png": path}.

    Raises:
        MissingExtraError: matplotlib is missing (the JSON is written first).
    """
    curves = weight_curves(run, sizes, which=which, device=device)
    folder = Path(out) if out is not None else _run_dir(Path(run)) / "plots"
    paths = {"json": folder / "weights.json", "png": folder / "weights.png"}
    atomic_write_text(paths["json"], curves.to_json() + "\n")
    plot_weight_curves(curves, paths["png"])
    return curves, paths


def _run_dir(path: Path) -> Path:
    from vsectl.builders import resolve_checkpoint

    return resolve_checkpoint(path)[0]
