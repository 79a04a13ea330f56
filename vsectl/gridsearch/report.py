"""Reports of a sweep: results.json, results.csv, results.md and the rsum figure (`figures.py`)."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

from vsectl.gridsearch.figures import FIGURE_STEM, figure_title, write_grid_figures
from vsectl.gridsearch.stats import _fmt, summarise, verdict
from vsectl.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def results_markdown(rows: Sequence[dict], verdict_text: str, branch: str, meta: dict) -> str:
    """The sweep as Markdown: a visual × text rsum matrix (branch "both"), every cell's means, the verdict."""
    lines = [f"# Pooling grid search: {meta.get('recipe', '')}", "",
             f"Test metrics ({meta.get('protocol')}, split {meta.get('split')}), mean ± std over seeds "
             f"{', '.join(map(str, meta.get('seeds', [])))}.", ""]
    if branch == "both":
        images = list(dict.fromkeys(r["image"] for r in rows if not r["gpo"]))
        texts = list(dict.fromkeys(r["text"] for r in rows if not r["gpo"]))
        cell = {(r["image"], r["text"]): _fmt(r["rsum_mean"], r["rsum_std"]) for r in rows if not r["gpo"]}
        lines += ["rsum, visual pooling (rows) × text pooling (columns):", "",
                  "| visual \\ text | " + " | ".join(texts) + " |", "|---|" + "---:|" * len(texts)]
        lines += [f"| {i} | " + " | ".join(cell.get((i, t), "") for t in texts) + " |" for i in images]
        gpo = next((r for r in rows if r["gpo"]), None)
        if gpo is not None:
            rsum = _fmt(gpo["rsum_mean"], gpo["rsum_std"])
            lines += ["", f"GPO (visual {gpo['image']}, text {gpo['text']}): rsum {rsum}"]
        lines.append("")
    lines += ["| cell | visual | text | seeds | rsum | i2t R@1 | t2i R@1 |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        name = f"**{r['cell']}** (GPO)" if r["gpo"] else r["cell"]
        lines.append(f"| {name} | {r['image']} | {r['text']} | {len(r['seeds'])} | "
                     f"{_fmt(r['rsum_mean'], r['rsum_std'])} | {_fmt(r['i2t_r1_mean'], r['i2t_r1_std'])} | "
                     f"{_fmt(r['t2i_r1_mean'], r['t2i_r1_std'])} |")
    return "\n".join(lines + ["", f"**Verdict:** {verdict_text}", ""])


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
    atomic_write_json(out / "results.json", {"meta": meta, "records": list(records), "summary": rows,
                                             "verdict": judged})
    atomic_write_text(out / "results.csv", results_csv(records))
    atomic_write_text(out / "results.md", results_markdown(rows, judged["text"], branch, meta))
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    try:
        paths += write_grid_figures(rows, branch, out, records=records, best=judged.get("best_fixed"),
                                    title=figure_title(meta))
    except VsectlError as e:  # the tables are the result; the picture is a convenience
        log.warning("%s; skipped the figure %s.pdf/.svg/.png", e, FIGURE_STEM)
    return {"rows": rows, "verdict": judged, "paths": [str(p) for p in paths]}
