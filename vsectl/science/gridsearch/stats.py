"""Statistics of a sweep: per-cell means over seeds, and GPO against the dev-selected best fixed pooling by a paired
test, with its confidence interval and its power (the smallest difference it can tell from the seeds' spread)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05  # significance level of the paired test
POWER = 0.8  # the power a comparison must reach to count as able to tell a difference
DELTA = 5.0  # the rsum difference the verdict asks about: can the seeds tell GPO and the best fixed cell apart by it?
METRICS = ("rsum", "i2t_r1", "t2i_r1")


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(records: Sequence[dict]) -> list[dict]:
    """Per cell: mean and sample std over seeds of rsum and R@1 both ways, in first-seen order.

    Also the mean and std of the runs' best-checkpoint dev rsum ("dev_best_rsum"; None when a seed lacks it).
    """
    by_cell: dict[str, list[dict]] = {}
    for rec in records:
        by_cell.setdefault(rec["cell"], []).append(rec)
    rows = []
    for key, recs in by_cell.items():
        row = {"cell": key, "image": recs[0]["image"], "text": recs[0]["text"], "gpo": recs[0]["gpo"],
               "fixed": recs[0]["fixed"], "seeds": [r["seed"] for r in recs]}
        for metric in METRICS:
            row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["metrics"][metric] for r in recs])
        dev = [r.get("dev_best_rsum") for r in recs]
        row["dev_rsum_mean"], row["dev_rsum_std"] = _mean_std(dev) if None not in dev else (None, None)
        rows.append(row)
    return rows


def paired_test(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> dict:
    """Two-sided paired t-test of a − b across seeds (scipy.stats.ttest_rel); needs at least 3 pairs.

    Returns:
        {"n", "diff_mean", "diff_std", "ci" ([low, high], the 1 − alpha confidence interval of the mean difference),
        "p_value", "within_noise", "test"}; "ci", "p_value" and "within_noise" are None with fewer than 3 pairs.
    """
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    out: dict[str, Any] = {"n": len(diffs), "diff_mean": statistics.fmean(diffs) if diffs else math.nan,
                           "diff_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                           "ci": None, "test": "ttest_rel", "p_value": None, "within_noise": None}
    if len(diffs) < 3:
        out["test"] = None
        return out
    half = _t_quantile(1 - alpha / 2, out["n"] - 1) * out["diff_std"] / math.sqrt(out["n"])
    out["ci"] = [out["diff_mean"] - half, out["diff_mean"] + half]
    if out["diff_std"] == 0:  # identical differences: t is 0/0 or ±inf, so decide directly
        out["p_value"] = 1.0 if out["diff_mean"] == 0 else 0.0
    else:
        from scipy.stats import ttest_rel

        out["p_value"] = float(ttest_rel(a, b).pvalue)
    out["within_noise"] = out["p_value"] >= alpha
    return out


def _t_quantile(q: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def paired_power(delta: float, n: int, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test at level `alpha` to detect a true mean difference `delta`.

    With n pairs whose differences have standard deviation `sd`, the statistic follows a noncentral t with n − 1
    degrees of freedom and noncentrality λ = delta·√n / sd; the power is P(|T| > t_{1 − alpha/2, n − 1}).
    """
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    if sd <= 0:
        return 1.0 if delta != 0 else alpha
    from scipy.stats import nct

    crit = _t_quantile(1 - alpha / 2, n - 1)
    lam = abs(delta) * math.sqrt(n) / sd
    return float(nct.sf(crit, n - 1, lam) + nct.cdf(-crit, n - 1, lam))


def detectable_difference(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the paired t-test detects with probability `power` (solves paired_power)."""
    if sd <= 0:
        return 0.0
    from scipy.optimize import brentq

    hi = sd
    while paired_power(hi, n, sd, alpha) < power:  # power grows with delta towards 1: bracket the root
        hi *= 2
    return float(brentq(lambda d: paired_power(d, n, sd, alpha) - power, 0.0, hi, xtol=1e-9 * sd))


def power_statement(n: int, sd: float | None, alpha: float = ALPHA, delta: float = DELTA,
                    power: float = POWER) -> dict:
    """Can n paired seeds with this spread of differences tell `delta` apart? Uses the measured sd as the true one.

    Returns:
        {"delta", "alpha", "target_power", "power_at_delta", "detectable_difference", "powered", "text"};
        the numbers are None with fewer than 3 pairs.
    """
    out: dict[str, Any] = {"delta": delta, "alpha": alpha, "target_power": power, "power_at_delta": None,
                           "detectable_difference": None, "powered": None}
    if n < 3 or sd is None:
        return {**out, "text": f"power: not computable with {n} seed(s) (need 3 or more)"}
    out["power_at_delta"] = paired_power(delta, n, sd, alpha)
    out["detectable_difference"] = detectable_difference(n, sd, alpha, power)
    out["powered"] = out["detectable_difference"] <= delta
    head = (f"with {n} seeds and a seed-to-seed std of the difference of {sd:.1f}, the paired test (α = {alpha}) "
            f"detects {out['detectable_difference']:.1f} rsum with power {power:g}, and a difference of {delta:g} with "
            f"power {out['power_at_delta']:.2f}")
    return {**out, "text": head + (f": it can tell a difference of {delta:g} rsum" if out["powered"] else
                                   f": too few seeds to tell a difference of {delta:g} rsum")}


def _fmt(mean: float, std: float | None, digits: int = 1) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _mean_of(row: dict, key: str) -> float | None:
    return row[f"{key}_mean"]


def dev_pair(row: dict) -> list[float | None] | None:
    return [row["dev_rsum_mean"], row["dev_rsum_std"]] if row["dev_rsum_mean"] is not None else None


def verdict(records: Sequence[dict], alpha: float = ALPHA, delta: float = DELTA, power: float = POWER) -> dict:
    """GPO against the best fixed pooling, chosen on dev and compared on the evaluated split, paired by seed.

    The best fixed cell is the one with the highest mean best-checkpoint dev rsum over seeds ("dev_best_rsum" of the
    records), so the test numbers it is compared on played no part in choosing it. When some fixed cell lacks a dev
    rsum, it is chosen on the test numbers instead, and the verdict says so. The cell that is best on test is
    reported beside it ("best_fixed_on_test").

    Records need "cell", "seed", "gpo", "fixed", "image", "text", "metrics"["rsum"] and (for dev selection)
    "dev_best_rsum".

    Returns:
        {"best_fixed", "selected_on" ("dev" or "test"), "best_fixed_dev_rsum", "best_fixed_rsum", "gpo_dev_rsum",
        "gpo_rsum" ([mean, std] each), "best_fixed_on_test", "n", "diff_mean", "diff_std", "ci", "p_value",
        "within_noise", "test", "power" (see power_statement), "text"}; fields are None when a side is missing.
    """
    rows = summarise(records)
    fixed = [r for r in rows if r["fixed"]]
    gpo = next((r for r in rows if r["gpo"]), None)
    if not fixed or gpo is None:
        missing = "no GPO cell" if gpo is None else "no fixed-pooling cell"
        return {"best_fixed": None, "text": f"no verdict: the grid has {missing}"}
    on_dev = all(r["dev_rsum_mean"] is not None for r in fixed)
    selected_on = "dev" if on_dev else split_word(records)  # the split it was chosen on
    best = max(fixed, key=lambda r: _mean_of(r, "dev_rsum" if on_dev else "rsum"))
    best_test = max(fixed, key=lambda r: r["rsum_mean"])
    rsum = {(r["cell"], r["seed"]): r["metrics"]["rsum"] for r in records}
    seeds = [s for s in best["seeds"] if s in gpo["seeds"]]
    test = paired_test([rsum[gpo["cell"], s] for s in seeds], [rsum[best["cell"], s] for s in seeds], alpha)
    powered = power_statement(test["n"], test["diff_std"], alpha, delta, power)
    name, where = best["cell"], split_word(records)
    chosen = (f"chosen on dev (dev rsum {_fmt(best['dev_rsum_mean'], best['dev_rsum_std'])})" if on_dev else
              f"chosen on the {where} numbers it is compared on (a fixed cell has no dev rsum), which flatters it")
    spread = f" ± {test['diff_std']:.1f}" if test["diff_std"] is not None else ""
    text = (f"best fixed pooling {name}, {chosen}: {where} rsum {_fmt(best['rsum_mean'], best['rsum_std'])}; "
            f"GPO: {_fmt(gpo['rsum_mean'], gpo['rsum_std'])}; GPO − best = {test['diff_mean']:+.1f}{spread} "
            f"over {test['n']} seed(s)")
    if test["p_value"] is None:
        text += f"; a paired test is not possible with {test['n']} seed(s) (need 3 or more)"
    else:
        better = "GPO" if test["diff_mean"] > 0 else "the best fixed pooling"
        text += (f", {100 * (1 - alpha):g} % CI [{test['ci'][0]:+.1f}, {test['ci'][1]:+.1f}]; paired t-test "
                 f"p = {test['p_value']:.3g}: "
                 + ("within noise" if test["within_noise"] else f"{better} is better beyond noise (α = {alpha})")
                 + f"; {powered['text']}")
    if best_test["cell"] != name:
        text += (f". (The best fixed cell on {where} would be {best_test['cell']}, "
                 f"{_fmt(best_test['rsum_mean'], best_test['rsum_std'])}.)")
    return {"best_fixed": name, "selected_on": selected_on, "best_fixed_dev_rsum": dev_pair(best),
            "best_fixed_rsum": [best["rsum_mean"], best["rsum_std"]], "gpo_dev_rsum": dev_pair(gpo),
            "gpo_rsum": [gpo["rsum_mean"], gpo["rsum_std"]], "best_fixed_on_test": best_test["cell"], **test,
            "power": powered, "text": text}


def split_word(records: Sequence[dict]) -> str:
    """The evaluated split the records share ("test" unless they say otherwise)."""
    splits = {r.get("split") or "test" for r in records}
    return splits.pop() if len(splits) == 1 else "eval"
