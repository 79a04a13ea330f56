"""Statistics of a sweep: per-cell means over seeds, and GPO against the best fixed pooling by a paired test."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05  # significance level of the paired test
METRICS = ("rsum", "i2t_r1", "t2i_r1")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(records: Sequence[dict]) -> list[dict]:
    """Per cell: mean and sample std over seeds of rsum and R@1 both ways, in first-seen order."""
    by_cell: dict[str, list[dict]] = {}
    for rec in records:
        by_cell.setdefault(rec["cell"], []).append(rec)
    rows = []
    for key, recs in by_cell.items():
        row = {"cell": key, "image": recs[0]["image"], "text": recs[0]["text"], "gpo": recs[0]["gpo"],
               "fixed": recs[0]["fixed"], "seeds": [r["seed"] for r in recs]}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["metrics"][metric] for r in recs])
        rows.append(row)
    return rows


def paired_test(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> dict:
    """Two-sided paired t-test of a − b across seeds (scipy.stats.ttest_rel); needs at least 3 pairs.

    Returns:
        {"n", "diff_mean", "diff_std", "p_value" (None if not possible), "within_noise" (None if not possible),
        "test"}.
    """
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    out: dict[str, Any] = {"n": len(diffs), "diff_mean": statistics.fmean(diffs) if diffs else math.nan,
                           "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                           "test": "ttest_rel", "p_value": None, "within_noise": None}
    if len(diffs) < 3:
        out["test"] = None
        return out
    if out["diff_std"] == 0:  # identical differences: t is 0/0 or ±inf, so decide directly
        out["p_value"] = 1.0 if out["diff_mean"] == 0 else 0.0
    else:
        from scipy.stats import ttest_rel

        out["p_value"] = float(ttest_rel(a, b).pvalue)
    out["within_noise"] = out["p_value"] >= alpha
    return out


def _fmt(mean: float, std: float | None, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def verdict(records: Sequence[dict], alpha: float = ALPHA) -> dict:
    """GPO against the best fixed pooling (highest mean rsum), paired by seed.

    Records need "cell", "seed", "gpo", "fixed", "image", "text" and "metrics"["rsum"]. The best fixed cell is
    picked on the same numbers it is compared on, which flatters it slightly.

    Returns:
        {"best_fixed", "best_fixed_rsum", "gpo_rsum", "n", "diff_mean", "diff_std", "p_value", "within_noise",
        "test", "text"} (fields are None when a side is missing).
    """
    rows = summarise(records)
    fixed = [r for r in rows if r["fixed"]]
    gpo = next((r for r in rows if r["gpo"]), None)
    if not fixed or gpo is None:
        missing = "no GPO cell" if gpo is None else "no fixed-pooling cell"
        return {"best_fixed": None, "text": f"no verdict: the grid has {missing}"}
    best = max(fixed, key=lambda r: r["rsum_mean"])
    rsum = {(r["cell"], r["seed"]): r["metrics"]["rsum"] for r in records}
    seeds = [s for s in best["seeds"] if s in gpo["seeds"]]
    test = paired_test([rsum[gpo["cell"], s] for s in seeds], [rsum[best["cell"], s] for s in seeds], alpha)
    name = best["cell"]
    text = (f"best fixed pooling {name}: rsum {_fmt(best['rsum_mean'], best['rsum_std'])}; GPO: "
            f"{_fmt(gpo['rsum_mean'], gpo['rsum_std'])}; GPO − best = {test['diff_mean']:+.1f}"
            + (f" ± {test['diff_std']:.1f}" if test["diff_std"] is not None else "") + f" over {test['n']} seed(s); ")
    if test["p_value"] is None:
        text += f"a paired test is not possible with {test['n']} seed(s) (need 3 or more)"
    else:
        better = "GPO" if test["diff_mean"] > 0 else "the best fixed pooling"
        text += (f"paired t-test p = {test['p_value']:.3g}: "
                 + ("within noise" if test["within_noise"] else f"{better} is better beyond noise (α = {alpha})"))
    return {"best_fixed": name, "best_fixed_rsum": [best["rsum_mean"], best["rsum_std"]],
            "gpo_rsum": [gpo["rsum_mean"], gpo["rsum_std"]], **test, "text": text}
