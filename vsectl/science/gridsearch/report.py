"""Reports of a sweep: results.json, results.csv, results.md and the rsum figure (`figures.py`)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from vsectl.io import atomic_write_json, atomic_write_text
from vsectl.science.gridsearch.figures import FIGURE_STEM, figure_title, write_grid_figures
from vsectl.science.gridsearch.stats import _fmt, summarise, verdict
from vsectl.scoring.tie_rules import LEGACY_TIE_RULE

log = logging.getLogger(__name__)


SMOKE_NOTE = ("**Smoke run** (`--quick`: 2 short epochs per cell, one seed): these numbers check that the sweep "
              "runs; they are not results.")


def _pair(value: list | None) -> str:
    return _fmt(*value) if value else "—"


def comparison_markdown(judged: dict, split: str) -> list[str]:
    """GPO against the dev-selected best fixed cell: dev and test rsum, the paired difference, its CI, p, power."""
    if judged.get("best_fixed") is None:
        return []
    n = judged["n"]
    diff = f"{judged['diff_mean']:+.1f}" + (f" ± {judged['diff_std']:.1f}" if judged["diff_std"] is not None else "")
    lines = [f"GPO against the best fixed cell (chosen on {judged['selected_on']}), paired by seed over {n} seed(s):",
             "", f"| | cell | dev rsum | {split} rsum |", "|---|---|---:|---:|",
             f"| best fixed | {judged['best_fixed']} | {_pair(judged['best_fixed_dev_rsum'])} | "
             f"{_pair(judged['best_fixed_rsum'])} |",
             f"| GPO | — | {_pair(judged['gpo_dev_rsum'])} | {_pair(judged['gpo_rsum'])} |", ""]
    if judged["p_value"] is None:
        return lines + [f"- GPO − best: {diff} (a paired test needs 3 or more seeds)", ""]
    power = judged["power"]
    ci = f"[{judged['ci'][0]:+.1f}, {judged['ci'][1]:+.1f}]"
    return lines + [
        f"- GPO − best ({split} rsum): {diff} (mean ± std over seeds), {100 * (1 - power['alpha']):g} % CI {ci}, "
        f"paired t-test p = {judged['p_value']:.3g}",
        f"- power: smallest difference detected with power {power['target_power']:g} at α = {power['alpha']}: "
        f"{power['detectable_difference']:.1f} rsum; power at a difference of {power['delta']:g}: "
        f"{power['power_at_delta']:.2f} ({'enough' if power['powered'] else 'not enough'} to tell "
        f"{power['delta']:g} rsum)", ""]


def results_markdown(rows: Sequence[dict], judged: dict, branch: str, meta: dict) -> str:
    """The sweep as Markdown: a visual × text rsum matrix (branch "both"), every cell's means, GPO against the
    dev-selected best fixed cell, the verdict."""
    split = meta.get("split")
    rule, dev_rule = meta.get("tie_rule") or LEGACY_TIE_RULE, meta.get("select_tie_rule") or "the recipe's"
    smoke = SMOKE_NOTE if meta.get("quick") else ""
    lines = [f"# Pooling grid search{' (smoke run)' if smoke else ''}: {meta.get('recipe', '')}", "",
             *([smoke, ""] if smoke else []),
             f"{str(split).capitalize()} metrics ({meta.get('protocol')}, split {split}, {rule} tie rule), mean ± std "
             f"over seeds {', '.join(map(str, meta.get('seeds', [])))}; dev rsum is each run's best-checkpoint "
             f"validation rsum (the checkpoint evaluated; {dev_rule} tie rule).", ""]
    if branch == "both" and any(not r["gpo"] for r in rows):  # a GPO-only grid has no matrix
        images = list(dict.fromkeys(r["image"] for r in rows if not r["gpo"]))
        texts = list(dict.fromkeys(r["text"] for r in rows if not r["gpo"]))
        cell = {(r["image"], r["text"]): _fmt(r["rsum_mean"], r["rsum_std"]) for r in rows if not r["gpo"]}
        lines += [f"{split} rsum ({rule} tie rule), visual pooling (rows) × text pooling (columns):", "",
                  "| visual \\ text | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
        lines += [f"| {i} | " + " | ".join(cell.get((i, t), "") for t in texts) + " |" for i in images]
        gpo = next((r for r in rows if r["gpo"]), None)
        if gpo is not None:
            rsum = _fmt(gpo["rsum_mean"], gpo["rsum_std"])
            lines += ["", f"GPO (visual {gpo['image']}, text {gpo['text']}): rsum {rsum}"]
        lines.append("")
    lines += [f"| cell | visual | text | seeds | dev rsum ({dev_rule}) | rsum ({rule}) | i2t R@1 | t2i R@1 |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{r['cell']}** (GPO)" if r["gpo"] else r["cell"]
        if r["cell"] == judged.get("best_fixed"):
            name += " (best fixed)"
        dev = _fmt(r["dev_rsum_mean"], r["dev_rsum_std"]) if r["dev_rsum_mean"] is not None else "—"
        lines.append(f"| {name} | {r['image']} | {r['text']} | {len(r['seeds'])} | {dev} | "
                     f"{_fmt(r['rsum_mean'], r['rsum_std'])} | {_fmt(r['i2t_r1_mean'], r['i2t_r1_std'])} | "
                     f"{_fmt(r['t2i_r1_mean'], r['t2i_r1_std'])} |")
    lines += ["", *comparison_markdown(judged, f"{split} ({rule})")]
    return "\n".join(lines + [f"**Verdict:** {judged['text']}", ""])


def results_csv(records: Sequence[dict]) -> str:
    keys = sorted({k for r in records for k in r["metrics"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["cell", "seed", "image", "text", "gpo", *keys, "dev_best_rsum", "run"])
    for r in records:
        writer.writerow([r["cell"], r["seed"], r["image"], r["text"], r["gpo"], *(r["metrics"].get(k) for k in keys),
                         r["dev_best_rsum"], r["run"]])
    return buf.getvalue()


def write_results(out_dir: str | Path, records: Sequence[dict], branch: str, meta: dict) -> dict:
    """Write results.json, results.csv, results.md and rsum.pdf/.svg/.png (skipped with a warning without matplotlib).

    Returns:
        {"rows", "verdict", "paths"}.
    """
    from vsectl.errors import VsectlError

    out = Path(out_dir)
    rows = summarise(records)
    judged = verdict(records)
    if meta.get("quick"):  # a smoke run's verdict must not read as a finding wherever it is quoted
        judged = {**judged, "text": f"smoke run (--quick), not a result: {judged['text']}"}
    atomic_write_json(out / "results.json", {"meta": meta, "records": list(records), "summary": rows,
                                             "verdict": judged})
    atomic_write_text(out / "results.csv", results_csv(records))
    atomic_write_text(out / "results.md", results_markdown(rows, judged, branch, meta))
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    try:
        paths += write_grid_figures(rows, branch, out, records=records, best=judged.get("best_fixed"),
                                    title=figure_title(meta))
    except VsectlError as e:  # the tables are the result; the picture is a convenience
        log.warning("%s; skipped the figure %s.pdf/.svg/.png", e, FIGURE_STEM)
    return {"rows": rows, "verdict": judged, "paths": [str(p) for p in paths]}
