"""The planted-pooling benchmark: does GPO find a pooling that is known by construction? (ours; the paper has none)

For every planted pooling (a `science.patterns` pattern) a feature store is generated (`science.planted_data`), the
ordinary pooling grid search runs on it (visual max, K-max for several K, mean, and GPO; `science.gridsearch`, hence
`train()`), and the runs are then scored on three questions: does the grid peak at the planted K, does GPO reach the
best fixed cell, and how close is GPO's θ(N) to the planted θ, at the training set sizes and at sizes never seen. Every
choice is explained in docs/planted.md.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vsectl.errors import ConfigError, VsectlError
from vsectl.io import atomic_write_json, atomic_write_text
from vsectl.runtime import NullProgress, Progress
from vsectl.science.experiment import load_experiment, recipe_dir
from vsectl.science.patterns import pattern_weights
from vsectl.science.planted_data import MANIFEST, PlantedSplit, make_planted_data
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE
from vsectl.strict import to_dict

log = logging.getLogger(__name__)

RECIPES = recipe_dir() / "planted"  # the shipped recipes: package data of a wheel, recipes/ of a checkout
UNSEEN = ("smaller", "larger")   # the test splits with set sizes outside the training range
UNSEEN_FILE = "planted_unseen.json"  # per run: metrics on the unseen-size splits (cached for reruns)
BUCKETS = ("seen", *UNSEEN)
SMOKE = "smoke run, not a result: "  # before each verdict line of a smoke run


@dataclass(frozen=True)
class BenchConfig:
    name: str = "default"
    seed: int = 0                   # generator seed: projection, sets, caption noise (the same for every planting)
    plantings: str = "M-4,T-25%,M-1,A"  # comma-separated vsectl patterns: M-1 = max, M-<K>, A = mean, T-<P>%
    k: str = "2,4,8,16"             # K-max cells of the grid, beside max (K = 1) and mean (K = N)
    seeds: str = "0,1,2,3,4"        # training seeds of every cell
    model_recipe: str = "model.yaml"  # the run recipe of every cell; relative paths are under recipes/planted/
    run_overrides: str = ""         # comma-separated a.b=c applied to every cell (after the recipe)
    feat_dim: int = 16              # D of every set element
    caption_dims: int = 8           # d: projected dimensions a caption describes, one word each
    bins: int = 8                   # quantisation levels per dimension
    noise: float = 0.3              # caption noise std, a fraction of the target std (training split)
    train_sets: int = 2000
    dev_sets: int = 500             # model selection and the choice of the best fixed K (training sizes)
    test_sets: int = 500            # each test split: seen sizes, unseen smaller, unseen larger
    train_min_size: int = 8         # training, dev and seen-test set sizes, uniform and inclusive
    train_max_size: int = 32
    smaller_min_size: int = 3       # the unseen-smaller test split
    smaller_max_size: int = 7
    larger_min_size: int = 48       # the unseen-larger test split
    larger_max_size: int = 64
    jobs: int = 2                   # cells trained in parallel processes (1 torch thread each on 2 cores)
    smoke: bool = False             # a smoke run (--quick): its title, tables and verdict say its numbers are no result

    def __post_init__(self) -> None:
        for p in self.planting_list:
            pattern_weights(p, 1)
        if not self.planting_list or not self.seed_list:
            raise ConfigError("bench-pooling: give at least one planting and one seed")
        ranges = [(self.smaller_min_size, self.smaller_max_size), (self.train_min_size, self.train_max_size),
                  (self.larger_min_size, self.larger_max_size)]
        if any(lo < 1 or lo > hi for lo, hi in ranges):
            raise ConfigError("bench-pooling: every size range needs 1 <= min <= max")
        if not (self.smaller_max_size < self.train_min_size and self.train_max_size < self.larger_min_size):
            raise ConfigError("bench-pooling: the unseen size ranges must lie outside the training range "
                              f"{self.train_min_size}-{self.train_max_size}")
        self.k_list  # noqa: B018 - validates

    @property
    def planting_list(self) -> list[str]:
        return [p.strip() for p in self.plantings.split(",") if p.strip()]

    @property
    def seed_list(self) -> list[int]:
        return _ints(self.seeds, "seeds")

    @property
    def k_list(self) -> list[int]:
        return _ints(self.k, "k")

    @property
    def override_list(self) -> list[str]:
        return [o.strip() for o in self.run_overrides.split(",") if o.strip()]

    def splits(self) -> list[PlantedSplit]:
        """Training split first: the generator measures its noise scale and word levels there."""
        seen = (self.train_min_size, self.train_max_size)
        return [PlantedSplit("train", self.train_sets, *seen), PlantedSplit("dev", self.dev_sets, *seen),
                PlantedSplit("test", self.test_sets, *seen),
                PlantedSplit("smaller", self.test_sets, self.smaller_min_size, self.smaller_max_size),
                PlantedSplit("larger", self.test_sets, self.larger_min_size, self.larger_max_size)]

    def size_range(self, bucket: str) -> tuple[int, int]:
        return {"seen": (self.train_min_size, self.train_max_size),
                "smaller": (self.smaller_min_size, self.smaller_max_size),
                "larger": (self.larger_min_size, self.larger_max_size)}[bucket]


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"bench-pooling: {what} must be comma-separated integers, got '{text}'") from None


def load_bench_config(path: str | Path | None = None, overrides: list[str] | None = None) -> BenchConfig:
    """Read a benchmark recipe (default `recipes/planted/default.yaml`), apply dotted overrides, validate."""
    return load_experiment(BenchConfig, path if path is not None else RECIPES / "default.yaml", overrides,
                           "bench-pooling recipe")


# ----------------------------------------------------------------------------------------------------------------------
# θ of the grid's cells and the RMSE against the planted θ


def cell_pattern(cell: str) -> str | None:
    """The fixed θ a grid cell computes, as a pattern name ('img-kmax4' → 'M-4'); None for learned poolers."""
    m = re.search(r"img-(max|mean|kmax(\d+)|maxk(\d+))$", cell)
    if m is None:
        return None
    if m.group(1) == "max":
        return "M-1"
    if m.group(1) == "mean":
        return "A"
    return f"M-{m.group(2) or m.group(3)}"


def rmse(theta: list[float], target: list[float]) -> float:
    """sqrt(mean over the N ranks of (θ_k − θ*_k)²), the measure of `vsectl patterns`."""
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(theta, target, strict=True)) / len(target))


def planted_theta(pattern: str, n: int) -> list[float]:
    return pattern_weights(pattern, n).tolist()


def gpo_theta_rmse(curves: dict[int, list[float]], pattern: str, seen: tuple[int, int]) -> dict[str, Any]:
    """RMSE per N of a learned θ(N) against the planted one, in the orientation the model chose.

    (W, θ) and (−W, θ reversed) give the same retrieval (the pooled vector is negated, and the text side can negate its
    own), so GPO may learn the planted weights over the *smallest* values. The orientation is decided once per run,
    by the mean RMSE over the training sizes, and reported.
    """
    sizes = sorted(curves)
    per = {o: {n: rmse(curves[n] if o == "top" else curves[n][::-1], planted_theta(pattern, n)) for n in sizes}
           for o in ("top", "bottom")}
    seen_sizes = [n for n in sizes if seen[0] <= n <= seen[1]]
    orient = min(per, key=lambda o: statistics.fmean(per[o][n] for n in seen_sizes))
    return {"orientation": orient, "per_size": {str(n): per[orient][n] for n in sizes}}


# ----------------------------------------------------------------------------------------------------------------------
# running one planting


def shown_sizes(cfg: BenchConfig) -> list[int]:
    """The set sizes whose learned θ is kept and drawn: the smallest unseen, the middle seen, the largest unseen."""
    return [cfg.smaller_min_size, (cfg.train_min_size + cfg.train_max_size) // 2, cfg.larger_max_size]


def slug(pattern: str) -> str:
    return pattern.replace("%", "pct")


def ensure_data(cfg: BenchConfig, pattern: str, root: Path) -> None:
    """Generate the planting's store once; refuse to reuse one made with other settings (its runs would be stale)."""
    want = {"pattern": pattern, "feat_dim": cfg.feat_dim, "caption_dims": cfg.caption_dims, "bins": cfg.bins,
            "noise": cfg.noise, "seed": cfg.seed, "splits": [vars(s) for s in cfg.splits()]}
    manifest = root / MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} != want:
            raise ConfigError(f"{root} was generated with other settings; use another --out, or delete that folder")
        return
    make_planted_data(root, pattern, cfg.splits(), feat_dim=cfg.feat_dim, caption_dims=cfg.caption_dims,
                      bins=cfg.bins, noise=cfg.noise, seed=cfg.seed)


def unseen_metrics(run: Path) -> dict[str, dict[str, float]]:
    """f30k metrics of a run's best checkpoint on the unseen-size splits, cached in the run directory."""
    from vsectl.evaluation import evaluate_runs

    cache = run / UNSEEN_FILE
    if cache.is_file():
        return json.loads(cache.read_text())
    out = {split: evaluate_runs([run], protocol="f30k", split=split, write=False)["f30k"]["metrics"]
           for split in UNSEEN}
    atomic_write_json(cache, out)
    return out


def run_planting(cfg: BenchConfig, pattern: str, out: Path, progress: Progress) -> list[dict]:
    """Generate, grid-search and score one planting. Returns one record per (cell, seed)."""
    from vsectl.science.gridsearch import GridSpec, gridsearch
    from vsectl.science.plots import weight_curves

    root = out / "data" / slug(pattern)
    ensure_data(cfg, pattern, root)
    recipe = Path(cfg.model_recipe) if Path(cfg.model_recipe).is_absolute() else RECIPES / cfg.model_recipe
    grid = GridSpec(pool=("max", "kmax", "mean"), k=tuple(cfg.k_list), branch="image", seeds=tuple(cfg.seed_list),
                    gpo=True)
    result = gridsearch(recipe, grid, out_dir=out / "grid" / slug(pattern),
                        overrides=[f"data.root={root}", *cfg.override_list], protocol="f30k", split="test",
                        device="cpu", jobs=cfg.jobs, progress=progress)
    all_sizes = list(range(cfg.smaller_min_size, cfg.larger_max_size + 1))
    records = []
    for rec in result["records"]:
        run = Path(rec["run"])
        fixed = cell_pattern(rec["cell"])
        row = {"planting": pattern, "cell": rec["cell"], "label": rec["image"], "seed": rec["seed"],
               "gpo": rec["gpo"], "fixed": fixed, "run": str(run), "dev_rsum": rec["dev_best_rsum"],
               "rsum": {"seen": rec["metrics"]["rsum"]}}
        row["rsum"].update({k: v["rsum"] for k, v in unseen_metrics(run).items()})
        if fixed is not None:
            row["theta_rmse"] = {str(n): rmse(planted_theta(fixed, n), planted_theta(pattern, n)) for n in all_sizes}
        elif rec["gpo"]:
            curves = weight_curves(run, all_sizes).curves["image"]
            scored = gpo_theta_rmse(curves, pattern, cfg.size_range("seen"))
            row["theta_rmse"], row["orientation"] = scored["per_size"], scored["orientation"]
            row["theta"] = {str(n): curves[n] if scored["orientation"] == "top" else curves[n][::-1]
                            for n in shown_sizes(cfg)}
        records.append(row)
    return records


# ----------------------------------------------------------------------------------------------------------------------
# the verdicts


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def bucket_rmse(cfg: BenchConfig, per_size: dict[str, float], bucket: str) -> float:
    lo, hi = cfg.size_range(bucket)
    return statistics.fmean(per_size[str(n)] for n in range(lo, hi + 1))


def summarise_planting(cfg: BenchConfig, pattern: str, records: list[dict]) -> dict:
    """Per cell means over seeds, the grid's peak, and GPO against the dev-chosen best fixed cell."""
    cells: dict[str, list[dict]] = {}
    for r in records:
        cells.setdefault(r["cell"], []).append(r)
    rows = []
    for cell, recs in cells.items():
        row = {"cell": cell, "label": recs[0]["label"], "gpo": recs[0]["gpo"], "fixed": recs[0]["fixed"],
               "seeds": [r["seed"] for r in recs], "dev_rsum": _stats([r["dev_rsum"] for r in recs]),
               "rsum": {b: _stats([r["rsum"][b] for r in recs]) for b in BUCKETS}}
        if "theta_rmse" in recs[0]:
            row["theta_rmse"] = {b: _stats([bucket_rmse(cfg, r["theta_rmse"], b) for r in recs]) for b in BUCKETS}
            sizes = list(recs[0]["theta_rmse"])
            row["theta_rmse_per_size"] = {n: statistics.fmean(r["theta_rmse"][n] for r in recs) for n in sizes}
        if recs[0]["gpo"]:
            row["orientations"] = [r.get("orientation") for r in recs]
        rows.append(row)
    fixed = [r for r in rows if r["fixed"] is not None]
    gpo = next(r for r in rows if r["gpo"])
    peak = max(fixed, key=lambda r: r["rsum"]["seen"]["mean"])
    best = max(fixed, key=lambda r: r["dev_rsum"]["mean"])   # chosen on the training sizes (dev), reported on test
    planted_cell = next((r["cell"] for r in fixed if r["fixed"] == pattern), None)
    by_seed = {(r["cell"], r["seed"]): r for r in records}
    seeds = [s for s in gpo["seeds"] if (best["cell"], s) in by_seed]
    compare = {}
    for b in BUCKETS:
        diffs = [by_seed[gpo["cell"], s]["rsum"][b] - by_seed[best["cell"], s]["rsum"][b] for s in seeds]
        ref = best["rsum"][b]
        floor = ref["mean"] - (ref["std"] or 0.0)
        compare[b] = {"gpo": gpo["rsum"][b], "best_fixed": ref, "diff": _stats(diffs),
                      "gpo_seeds_within_one_std": sum(by_seed[gpo["cell"], s]["rsum"][b] >= floor for s in seeds),
                      "within_one_std": ref["std"] is not None
                      and gpo["rsum"][b]["mean"] >= ref["mean"] - ref["std"],
                      "gpo_better": gpo["rsum"][b]["mean"] > ref["mean"],
                      "gpo_theta_rmse": gpo["theta_rmse"][b], "best_fixed_theta_rmse": best["theta_rmse"][b]["mean"]}
    return {"planting": pattern, "planted_cell": planted_cell, "rows": rows, "peak_test": peak["cell"],
            "peak_is_planted": planted_cell is not None and peak["cell"] == planted_cell,
            "best_fixed_dev": best["cell"], "compare": compare}


def verdict_lines(summary: dict) -> list[str]:
    """Plain statements of what held and what did not, for one planting."""
    p, c = summary["planting"], summary["compare"]
    out = []
    if summary["planted_cell"] is None:
        out.append(f"{p}: no fixed cell computes the planted pooling; the grid peaks at {summary['peak_test']}.")
    else:
        ok = "peaks at" if summary["peak_is_planted"] else "does NOT peak at"
        out.append(f"{p}: the grid {ok} the planted cell {summary['planted_cell']} (peak: {summary['peak_test']}).")
    seen = c["seen"]
    out.append(f"{p}: GPO {_pm(seen['gpo'])} vs best fixed ({summary['best_fixed_dev']}, chosen on dev) "
               f"{_pm(seen['best_fixed'])} on seen sizes: "
               + ("within one std" if seen["within_one_std"] else "NOT within one std")
               + f" ({seen['gpo_seeds_within_one_std']} of {len(summary['rows'][0]['seeds'])} GPO seeds are).")
    for b in UNSEEN:
        u = c[b]
        word = "better" if u["gpo_better"] else "NOT better"
        out.append(f"{p}: unseen {b} sizes: GPO rsum {_pm(u['gpo'])} vs {_pm(u['best_fixed'])} ({word}); θ RMSE "
                   f"GPO {u['gpo_theta_rmse']['mean']:.4f} vs best fixed {u['best_fixed_theta_rmse']:.4f}.")
    return out


def _pm(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s.get("std") is not None else f"{s['mean']:.{digits}f}"


# ----------------------------------------------------------------------------------------------------------------------
# the whole benchmark


def run_bench(cfg: BenchConfig, out_dir: str | Path, progress: Progress | None = None) -> dict:
    """Run every planting (resumable: finished cells are skipped) and write results.json, results.md and the figure.

    Returns:
        {"config", "plantings": [summary per planting], "records", "verdict": [lines], "wall_s", "paths"}.
    """
    progress = progress or NullProgress()
    out = Path(out_dir)
    tic = time.perf_counter()
    records, summaries = [], []
    for pattern in cfg.planting_list:
        log.info("planting %s", pattern)
        recs = run_planting(cfg, pattern, out, progress)
        records += recs
        summaries.append(summarise_planting(cfg, pattern, recs))
    result = {"config": to_dict(cfg), "plantings": summaries, "records": records,
              "verdict": [SMOKE * cfg.smoke + line for s in summaries for line in verdict_lines(s)],
              "wall_s": time.perf_counter() - tic}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", results_markdown(result))
    result["paths"] = [str(out / "results.json"), str(out / "results.md")]
    try:
        from vsectl.science.planted_plot import plot_bench

        result["paths"] += [str(p) for p in plot_bench(result, out / "planted")]
    except VsectlError as e:  # the tables are the result; the picture is a convenience
        log.warning("%s; skipped the figure", e)
    return result


def results_markdown(result: dict) -> str:
    """The benchmark's table (GPO vs the best fixed K, seen and unseen sizes, θ RMSE) and the verdict, as Markdown."""
    cfg = result["config"]
    n_seeds = len(_ints(cfg["seeds"], "seeds"))
    smoke = " (smoke run: it checks that it runs, not a result)" if cfg.get("smoke") else ""
    lines = [f"# Planted-pooling benchmark{smoke}",
             "", f"rsum (f30k protocol, {DEFAULT_TIE_RULE} tie rule, {cfg['test_sets']} sets per test split), mean ± "
             f"std over {n_seeds} seed(s). "
             f"Training sizes {cfg['train_min_size']}–{cfg['train_max_size']}; unseen smaller "
             f"{cfg['smaller_min_size']}–{cfg['smaller_max_size']}, unseen larger "
             f"{cfg['larger_min_size']}–{cfg['larger_max_size']}. Best fixed = the fixed cell with the best mean dev "
             "rsum (training sizes). θ RMSE against the planted θ, mean over the sizes of the bucket.", "",
             "| planted | model | rsum seen | rsum smaller | rsum larger | θ RMSE seen | θ RMSE smaller | "
             "θ RMSE larger |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in result["plantings"]:
        c = s["compare"]
        for who, key in (("GPO", "gpo"), (f"best fixed: {s['best_fixed_dev']}", "best_fixed")):
            rmse_cells = [_pm(c[b]["gpo_theta_rmse"], 4) if key == "gpo" else f"{c[b]['best_fixed_theta_rmse']:.4f}"
                          for b in BUCKETS]
            lines.append(f"| {s['planting']} | {who} | " + " | ".join(_pm(c[b][key]) for b in BUCKETS) + " | "
                         + " | ".join(rmse_cells) + " |")
    shown = sorted({cfg["smaller_min_size"], cfg["smaller_max_size"], cfg["train_min_size"],
                    (cfg["train_min_size"] + cfg["train_max_size"]) // 2, cfg["train_max_size"], cfg["larger_min_size"],
                    cfg["larger_max_size"]})
    lines += ["", "GPO's θ RMSE against the planted θ at single sizes N (mean over seeds; the best fixed cell's in "
              "brackets):", "", "| planted | " + " | ".join(f"N = {n}" for n in shown) + " |",
              "|---|" + "---:|" * len(shown)]
    for s in result["plantings"]:
        gpo = next(r for r in s["rows"] if r["gpo"])
        best = next(r for r in s["rows"] if r["cell"] == s["best_fixed_dev"])
        lines.append(f"| {s['planting']} | " + " | ".join(
            f"{gpo['theta_rmse_per_size'][str(n)]:.4f} ({best['theta_rmse_per_size'][str(n)]:.4f})" for n in shown)
            + " |")
    lines += ["", "## The grids (every cell)", ""]
    for s in result["plantings"]:
        lines += [f"### planted {s['planting']}", "", "| cell | dev rsum | rsum seen | rsum smaller | rsum larger | "
                  "rsum seen per seed |", "|---|---:|---:|---:|---:|---|"]
        for r in s["rows"]:
            name = f"**{r['label']}**" if r["cell"] in (s["peak_test"], s["planted_cell"]) else r["label"]
            per_seed = ", ".join(f"{x['rsum']['seen']:.0f}" for x in result["records"]
                                 if x["planting"] == s["planting"] and x["cell"] == r["cell"])
            lines.append(f"| {name} | {_pm(r['dev_rsum'])} | " + " | ".join(_pm(r["rsum"][b]) for b in BUCKETS)
                         + f" | {per_seed} |")
        gpo = next(r for r in s["rows"] if r["gpo"])
        lines += ["", f"GPO orientation per seed: {', '.join(map(str, gpo['orientations']))}.", ""]
    lines += ["## Verdict", ""] + [f"- {v}" for v in result["verdict"]]
    lines += ["", f"Wall time {result['wall_s']:.0f} s.", "", "Settings:", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
