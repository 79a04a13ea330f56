"""Multi-seed reports: runs that differ only by their seed form a group; per protocol and metric, the mean, the
standard deviation and n of each group, and each group's paired difference from a baseline group with its 95 % CI.

A run is read from its `config.yaml` and its `eval/*.json` results on its own data (ensemble results are left out).
Runs evaluated on different data (their results carry the data's fingerprint) are never mixed in one report.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vsectl.errors import ConfigError
from vsectl.scoring.tie_rules import LEGACY_TIE_RULE

log = logging.getLogger(__name__)

SEED_KEYS = ("seed", "name")  # config keys in which the runs of one group may differ
CONFIDENCE = 0.95
HIDDEN_METRICS = ("medr", "meanr")  # left out of the tables by default (they stay in the CSV and JSON)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + str(k): v})
    return out


@dataclass
class RunResults:
    """One run: where it is, its flattened config, its seed, and its results keyed by (protocol, split, tie rule).

    Attributes:
        results: (protocol, split, tie_rule) → {"metrics": {name: value}, "fingerprint": data fingerprint, "path"}.
    """

    path: Path
    config: dict[str, Any]
    results: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def find_runs(patterns: Sequence[str]) -> list[Path]:
    """Run directories (holding config.yaml) named by paths or glob patterns, in order, each once.

    Raises:
        ConfigError: a pattern names no run directory.
    """
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(pattern))) or ([str(pattern)] if Path(pattern).exists() else [])
        runs = [Path(m) for m in matches if (Path(m) / "config.yaml").is_file()]
        if not runs:
            raise ConfigError(f"'{pattern}' names no run directory (a folder with config.yaml); give runs or a quoted "
                              "glob such as 'runs/noise/demo-*'")
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def read_run(run_dir: Path) -> RunResults:
    """A run's config and its own-data, single-model results (the newest per protocol, split and tie rule)."""
    try:
        config = _flatten(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except yaml.YAMLError as e:
        raise ConfigError(f"{run_dir}/config.yaml is not valid YAML: {str(e).splitlines()[0]}") from None
    run = RunResults(run_dir, config)
    for path in sorted((run_dir / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime):
        if path.name.startswith("ensemble_"):
            continue
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; left out", path)
            continue
        if not isinstance(result, dict) or "metrics" not in result or "protocol" not in result:
            continue
        if not _own_data(path, result):
            continue
        key = (result["protocol"], result.get("split", "?"), result.get("tie_rule", LEGACY_TIE_RULE))
        run.results[key] = {"metrics": result["metrics"], "fingerprint": result.get("data_fingerprint"),
                            "path": str(path)}
    return run


def _own_data(path: Path, result: dict[str, Any]) -> bool:
    """A result on the run's own data has no fingerprint suffix in its name (`<protocol>-<split>[-<rule>].json`)."""
    stem = f"{result['protocol']}-{result.get('split', '')}"
    rule = result.get("tie_rule", LEGACY_TIE_RULE)
    return path.stem in (stem, f"{stem}-{rule}")


@dataclass
class Group:
    """Runs whose configs differ only in SEED_KEYS."""

    label: str
    runs: list[RunResults]
    settings: dict[str, Any]  # the keys that tell this group from the others, with their values

    def values(self, key: tuple[str, str, str], metric: str) -> dict[Any, float]:
        """seed → value of one metric, for the runs that have it."""
        return {r.seed: float(r.results[key]["metrics"][metric]) for r in self.runs
                if key in r.results and metric in r.results[key]["metrics"]}


def group_runs(runs: Sequence[RunResults]) -> list[Group]:
    """Group runs that differ only by seed; label each group by the settings that tell it from the others.

    Raises:
        ConfigError: two runs of one group share a seed (a paired comparison needs one run per seed).
    """
    keyed: dict[str, list[RunResults]] = {}
    for run in runs:
        rest = {k: v for k, v in run.config.items() if k not in SEED_KEYS}
        keyed.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
    configs = [{k: v for k, v in members[0].config.items() if k not in SEED_KEYS} for members in keyed.values()]
    differing = sorted({k for c in configs for k in c if any(c.get(k) != o.get(k) for o in configs)})
    groups = []
    for members, config in zip(keyed.values(), configs, strict=True):
        seeds = [r.seed for r in members]
        dup = next((s for s in seeds if seeds.count(s) > 1), None)
        if dup is not None:
            twins = [str(r.path) for r in members if r.seed == dup]
            raise ConfigError(f"{twins[0]} and {twins[1]} have the same config and seed {dup}; a report counts each "
                              "setting once per seed (leave one out)")
        settings = {k: config.get(k) for k in differing}
        label = ", ".join(f"{k}={v}" for k, v in settings.items()) or _common_name(members)
        groups.append(Group(label, sorted(members, key=lambda r: str(r.seed)), settings))
    return groups


def _common_name(runs: Sequence[RunResults]) -> str:
    names = [r.name for r in runs]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("-_.") or names[0]


def check_same_data(runs: Sequence[RunResults]) -> None:
    """Refuse runs whose results of one protocol, split and tie rule come from different data."""
    seen: dict[tuple[str, str, str], tuple[str, Path]] = {}
    for run in runs:
        for key, res in run.results.items():
            fp = res.get("fingerprint")
            if fp is None:
                continue
            if key in seen and seen[key][0] != fp:
                other = seen[key][1]
                raise ConfigError(f"{other} and {run.path} were evaluated on different data for {key[0]} on "
                                  f"'{key[1]}' (fingerprints {seen[key][0][:12]} and {fp[:12]}); evaluate them on "
                                  "the same data, or report them separately")
            seen.setdefault(key, (fp, run.path))


def find_baseline(groups: Sequence[Group], name: str) -> Group:
    """The group a baseline name means: its label, or the name or path of one of its runs."""
    for g in groups:
        if name == g.label or any(name in (r.name, str(r.path)) or Path(name).resolve() == r.path.resolve()
                                  for r in g.runs):
            return g
    raise ConfigError(f"--baseline '{name}' is neither a group ({'; '.join(g.label for g in groups)}) nor one of "
                      "their runs")


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"mean", "std" (sample, n − 1; None for one value), "n"}."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def paired_difference(values: dict[Any, float], base: dict[Any, float],
                      confidence: float = CONFIDENCE) -> dict[str, Any] | None:
    """Mean of the per-seed differences `values − base` over the seeds both have, with its t confidence interval.

    Returns:
        {"mean", "std", "n", "ci" ([low, high], None for fewer than 2 pairs), "seeds"}, or None without a shared seed.
    """
    seeds = [s for s in values if s in base]
    if not seeds:
        return None
    diffs = [values[s] - base[s] for s in seeds]
    out: dict[str, Any] = {**mean_std(diffs), "ci": None, "seeds": seeds}
    if len(diffs) > 1:
        from scipy.stats import t

        half = float(t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * out["std"] / math.sqrt(len(diffs))
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def build_report(patterns: Sequence[str], baseline: str | None = None, protocols: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """Read, group and summarise runs.

    Args:
        patterns: run directories or glob patterns.
        baseline: a group label or one of its runs; every other group is compared with it seed by seed.
        protocols: keep these protocols only (default: every one found).
        metrics: the metrics the tables show (default: all but medr/meanr); the long rows hold every metric.

    Returns:
        {"runs": [...], "groups": [{"label", "settings", "runs", "seeds"}], "baseline": label or None, "tables":
        [{"protocol", "split", "tie_rule", "metrics": [...], "rows": [{"group", metric: {mean, std, n}}],
        "differences": [{"group", metric: paired difference}]}], "long": [one row per run × protocol × metric]}.

    Raises:
        ConfigError: no run, no result, runs evaluated on different data, an unknown baseline.
    """
    runs = [read_run(p) for p in find_runs(patterns)]
    if protocols:
        for r in runs:
            r.results = {k: v for k, v in r.results.items() if k[0] in protocols}
    if not any(r.results for r in runs):
        which = f" for protocol {', '.join(protocols)}" if protocols else ""
        raise ConfigError(f"none of the {len(runs)} runs has an evaluation result{which}; run vsectl eval on them "
                          "first")
    check_same_data(runs)
    groups = group_runs(runs)
    base = find_baseline(groups, baseline) if baseline else None
    keys = sorted({k for r in runs for k in r.results})
    tables = [_table(key, groups, base, metrics) for key in keys]
    long = [{"run": str(r.path), "group": g.label, "seed": r.seed, "protocol": k[0], "split": k[1], "tie_rule": k[2],
             "metric": m, "value": float(v), "data_fingerprint": r.results[k]["fingerprint"]}
            for g in groups for r in g.runs for k in keys if k in r.results
            for m, v in r.results[k]["metrics"].items() if isinstance(v, int | float)]
    return {"runs": [str(r.path) for r in runs], "baseline": base.label if base else None, "confidence": CONFIDENCE,
            "groups": [{"label": g.label, "settings": g.settings, "runs": [str(r.path) for r in g.runs],
                        "seeds": [r.seed for r in g.runs]} for g in groups],
            "tables": tables, "long": long}


def _table(key: tuple[str, str, str], groups: Sequence[Group], base: Group | None,
           metrics: Sequence[str] | None) -> dict[str, Any]:
    present = [m for g in groups for r in g.runs if key in r.results for m in r.results[key]["metrics"]
               if isinstance(r.results[key]["metrics"][m], int | float)]
    names = list(dict.fromkeys(present))
    shown = [m for m in metrics if m in names] if metrics else \
        [m for m in names if not m.endswith(HIDDEN_METRICS)]
    if metrics and not shown:
        raise ConfigError(f"none of --metrics {', '.join(metrics)} is a metric of {key[0]} ({', '.join(names)})")
    rows, diffs = [], []
    for g in groups:
        row: dict[str, Any] = {"group": g.label}
        diff: dict[str, Any] = {"group": g.label}
        for m in shown:
            vals = g.values(key, m)
            row[m] = mean_std(list(vals.values())) if vals else None
            if base is not None and g is not base:
                diff[m] = paired_difference(vals, base.values(key, m))
        if any(row[m] for m in shown):
            rows.append(row)
            if base is not None and g is not base:
                diffs.append(diff)
    return {"protocol": key[0], "split": key[1], "tie_rule": key[2], "metrics": shown, "rows": rows,
            "differences": diffs}
