"""The planted-pooling benchmark's figure: θ RMSE against N (GPO vs the best fixed K) and GPO's θ against the planted θ.

Sized for the page width of a two-column paper (7 in wide, 7-8 pt text); written as PDF and SVG (vector) and PNG.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from vsectl.science.patterns import pattern_weights
from vsectl.science.plots import FIGURE_FORMATS, new_figure, paper_style, save_figure

SIZES_COLORS = ("C0", "C1", "C2")


def plot_bench(result: dict, stem: Path) -> list[Path]:
    """Draw one column per planting and write `<stem>.pdf`, `<stem>.svg` and `<stem>.png`. Returns the paths."""
    cfg = result["config"]
    plantings = result["plantings"]
    with paper_style():
        fig = new_figure(figsize=(7.0, 4.2), layout="constrained")
        axes = fig.subplots(2, len(plantings), squeeze=False)
        for col, summary in enumerate(plantings):
            recs = [r for r in result["records"] if r["planting"] == summary["planting"]]
            gpo = [r for r in recs if r["gpo"]]
            best = next(r for r in recs if r["cell"] == summary["best_fixed_dev"])
            ax = axes[0][col]
            sizes = sorted(int(n) for n in gpo[0]["theta_rmse"])
            per_seed = [[r["theta_rmse"][str(n)] for n in sizes] for r in gpo]
            mean = [statistics.fmean(v) for v in zip(*per_seed, strict=True)]
            lo = [min(v) for v in zip(*per_seed, strict=True)]
            hi = [max(v) for v in zip(*per_seed, strict=True)]
            ax.axvspan(cfg["train_min_size"], cfg["train_max_size"], color="0.9", lw=0, label="training sizes")
            ax.fill_between(sizes, lo, hi, color="C3", alpha=0.25, lw=0)
            seeds = f"{len(gpo)} seeds" if len(gpo) > 1 else "1 seed"
            ax.plot(sizes, mean, color="C3", label=f"GPO (mean and range over {seeds})")
            ax.plot(sizes, [best["theta_rmse"][str(n)] for n in sizes], color="k", ls="--",
                    label="best fixed K (dev)")
            ax.set_title(f"planted {summary['planting']}\nbest fixed (dev): {best['label']}")
            ax.set_xlabel("set size N")
            if col == 0:
                ax.set_ylabel("RMSE(θ, planted θ)")
            ax = axes[1][col]
            for color, n in zip(SIZES_COLORS, sorted(int(n) for n in gpo[0]["theta"]), strict=False):
                x = [k / max(n - 1, 1) for k in range(n)]
                learned = [statistics.fmean(v) for v in zip(*(r["theta"][str(n)] for r in gpo), strict=True)]
                ax.plot(x, learned, color=color, marker="." if n <= 8 else None, ms=4,
                        label=f"GPO, N = {n} (mean of seeds)")
                ax.plot(x, pattern_weights(summary["planting"], n).tolist(), color=color, ls=":", lw=1.2,
                        drawstyle="steps-post")  # rank k holds [k, k + 1) / (N − 1)
            ax.set_xlabel("relative rank k/(N−1)")
            if col == 0:
                ax.set_ylabel("θ_k (dotted: planted)")
        handles = axes[0][0].get_legend_handles_labels()[0] + axes[1][0].get_legend_handles_labels()[0]
        fig.legend(handles=handles, loc="outside lower center", ncol=3)
        paths = [stem.with_suffix(f".{fmt}") for fmt in FIGURE_FORMATS]
        for path in paths:
            save_figure(fig, path)
    return paths
