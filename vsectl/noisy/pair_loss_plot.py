"""The figure of a noisy run's per-pair training loss: clean and noisy pairs' loss distributions after chosen epochs.

matplotlib (the `plot` extra) is imported inside the drawing function only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vsectl.errors import DataError
from vsectl.noisy.pair_loss import LOG_FILE, read_pair_losses, separation, split_by_kind
from vsectl.science.plots import figure_format, new_figure, paper_style, save_figure

PANELS = 4  # epochs shown by default: the first, the last and evenly spaced ones between
BINS = 30
COLORS = {"clean": "#1f77b4", "noisy": "#d62728"}


def pick_epochs(epochs: Sequence[int], n: int = PANELS) -> list[int]:
    """Up to `n` epochs: the first, the last and evenly spaced ones between."""
    if len(epochs) <= n:
        return list(epochs)
    at = np.linspace(0, len(epochs) - 1, n).round().astype(int)
    return [epochs[i] for i in sorted(set(at.tolist()))]


def draw_pair_losses(records: Sequence[dict[str, Any]], title: str = "") -> Any:
    """Histograms of clean and noisy pairs' loss, one panel per record.

    Each panel has its own bins (to the 99.5th percentile; larger values sit in the last bin): the sum of hinges and
    the hardest negative give losses of very different sizes.
    """
    auc = {s["epoch"]: s["auc"] for s in separation(records)}
    fig = new_figure(figsize=(1.9 * len(records) + 0.4, 2.2), layout="constrained")
    axes = fig.subplots(1, len(records), squeeze=False)[0]
    for ax, rec in zip(axes, records, strict=True):
        values = np.asarray(rec["loss"], dtype=np.float64)
        top = max(float(np.quantile(values, 0.995)) if values.size else 1.0, 1e-6)
        bins = np.linspace(0.0, top, BINS + 1)
        for kind, part in zip(("clean", "noisy"), split_by_kind(rec), strict=True):
            ax.hist(np.clip(part, 0, top), bins=bins, color=COLORS[kind], alpha=0.55, label=f"{kind} ({part.size})",
                    density=True)
        mode = "hardest neg." if rec.get("hardest") else "sum of hinges"
        score = f", AUC {auc[rec['epoch']]:.2f}" if rec["epoch"] in auc else ""
        ax.set_title(f"epoch {rec['epoch']} ({mode}{score})")
        ax.set_xlabel("pair loss")
        ax.set_yticks([])
    axes[0].set_ylabel("density")
    axes[-1].legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def write_pair_loss_figure(run_dir: str | Path, out: str | Path | None = None, epochs: Sequence[int] | None = None
                           ) -> Path:
    """Draw the run's `pair_losses.jsonl` into `out` (default RUN/plots/pair_losses.png).

    Raises:
        DataError: the run logged no pair losses (it trained without data.noise, or with log_pairs 0).
    """
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / "plots" / "pair_losses.png"
    figure_format(target)
    records = read_pair_losses(run_dir)
    if not records:
        raise DataError(f"{run_dir} has no {LOG_FILE}: per-pair losses are logged by runs trained with data.noise "
                        "(and data.noise.log_pairs > 0)")
    have = [r["epoch"] for r in records]
    wanted = list(epochs) if epochs else pick_epochs(have)
    missing = [e for e in wanted if e not in have]
    if missing:
        raise DataError(f"{run_dir} logged epochs {have[0]}–{have[-1]}; epoch {missing[0]} is not among them")
    chosen = [r for r in records if r["epoch"] in wanted]
    with paper_style():
        fig = draw_pair_losses(chosen, title=f"{run_dir.name}: per-pair training loss")
        return save_figure(fig, target)
