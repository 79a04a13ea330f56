"""A multi-seed report (`vsectl.report.build_report`) as Markdown, long-format CSV, JSON, LaTeX and a figure.

Every file is written atomically; matplotlib (the `plot` extra) is imported by the figure only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError
from vsectl.io import atomic_write_json, atomic_write_text

LONG_COLUMNS = ("run", "group", "seed", "protocol", "split", "tie_rule", "metric", "value", "data_fingerprint")
DIGITS = 1


def fmt_stat(stat: dict[str, Any] | None, digits: int = DIGITS) -> str:
    """'12.3 ± 1.2 (n=3)'; a single run shows its value and n=1."""
    if not stat:
        return "–"
    spread = f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else ""
    return f"{stat['mean']:.{digits}f}{spread} (n={stat['n']})"


def fmt_diff(diff: dict[str, Any] | None, digits: int = DIGITS) -> str:
    """'+1.2 [−0.5, +2.9] (n=3)': the mean paired difference and its confidence interval."""
    if not diff:
        return "–"
    ci = f" [{diff['ci'][0]:+.{digits}f}, {diff['ci'][1]:+.{digits}f}]" if diff.get("ci") else ""
    return f"{diff['mean']:+.{digits}f}{ci} (n={diff['n']})"


def table_title(table: dict[str, Any]) -> str:
    return f"{table['protocol']} · {table['split']} · ties {table['tie_rule']}"


def markdown(report: dict[str, Any]) -> str:
    """One table of means per protocol, and one of paired differences when there is a baseline."""
    conf = f"{100 * report['confidence']:g} %"
    lines = []
    for table in report["tables"]:
        head = ["group", *table["metrics"]]
        lines += [f"### {table_title(table)}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join(["---"] + ["---:"] * len(table["metrics"])) + "|"]
        lines += ["| " + " | ".join([row["group"], *(fmt_stat(row[m]) for m in table["metrics"])]) + " |"
                  for row in table["rows"]]
        lines.append("")
        if table["differences"]:
            lines += [f"Paired difference from the baseline ({report['baseline']}), mean over shared seeds and its "
                      f"{conf} confidence interval:", "", "| " + " | ".join(head) + " |",
                      "|" + "|".join(["---"] + ["---:"] * len(table["metrics"])) + "|"]
            lines += ["| " + " | ".join([d["group"], *(fmt_diff(d.get(m)) for m in table["metrics"])]) + " |"
                      for d in table["differences"]]
            lines.append("")
    return "\n".join(lines)


def long_csv(report: dict[str, Any]) -> str:
    """One row per run × protocol × metric."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LONG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["long"])
    return buf.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("{", r"\{"), ("}", r"\}"), ("$", r"\$")):
        text = text.replace(a, b) if a != "\\" else text.replace(a, "\0")
    return text.replace("\0", r"\textbackslash{}")


def latex(report: dict[str, Any]) -> str:
    """A booktabs table per protocol: mean ± std over seeds (n in the caption)."""
    out = []
    for table in report["tables"]:
        ns = sorted({row[m]["n"] for row in table["rows"] for m in table["metrics"] if row[m]})
        cols = "l" + "r" * len(table["metrics"])
        out += [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                " & ".join(["group", *(_latex_escape(m) for m in table["metrics"])]) + r" \\", r"\midrule"]
        for row in table["rows"]:
            cells = [_latex_escape(row["group"])]
            for m in table["metrics"]:
                s = row[m]
                cells.append("--" if not s else f"${s['mean']:.{DIGITS}f}" + (
                    rf" \pm {s['std']:.{DIGITS}f}$" if s["std"] is not None else "$"))
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{_latex_escape(table_title(table))}: mean $\pm$ std over seeds "
                rf"(n = {', '.join(map(str, ns))}).}}", r"\end{table}", ""]
    return "\n".join(out)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.md, report.csv (long), report.json and report.tex in `out_dir`."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", "json": out_dir / "report.json",
             "latex": out_dir / "report.tex"}
    atomic_write_text(paths["markdown"], markdown(report) + "\n")
    atomic_write_text(paths["csv"], long_csv(report))
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["latex"], latex(report))
    return paths


def draw_metric(report: dict[str, Any], metric: str, x_key: str, protocol: str | None = None) -> Any:
    """Mean ± std of `metric` against the group setting `x_key`, one line per combination of the other settings."""
    from vsectl.science.plots import new_figure

    tables = [t for t in report["tables"] if (protocol is None or t["protocol"] == protocol)]
    if not tables:
        raise ConfigError(f"the report has no results for protocol '{protocol}'")
    table = tables[0]
    if metric not in table["metrics"]:
        raise ConfigError(f"--plot {metric} is not a metric of {table['protocol']} ({', '.join(table['metrics'])})")
    settings = {g["label"]: g["settings"] for g in report["groups"]}
    if not all(x_key in s for s in settings.values()):
        keys = sorted({k for s in settings.values() for k in s})
        raise ConfigError(f"--x {x_key} is not a setting that differs between the groups ({', '.join(keys) or 'none'})")
    series: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in table["rows"]:
        s = settings[row["group"]]
        rest = ", ".join(f"{k}={v}" for k, v in s.items() if k != x_key) or metric
        series.setdefault(rest, []).append((float(s[x_key]), row[metric]))
    fig = new_figure(figsize=(3.6, 2.6), layout="constrained")
    ax = fig.subplots()
    for label, points in series.items():
        points = sorted((x, st) for x, st in points if st)
        ax.errorbar([x for x, _ in points], [st["mean"] for _, st in points],
                    yerr=[st["std"] or 0.0 for _, st in points], marker="o", capsize=3, label=label)
    ns = sorted({st["n"] for pts in series.values() for _, st in pts if st})
    ax.set_xlabel(x_key)
    ax.set_ylabel(f"{metric} ({table['protocol']}, {table['split']})")
    ax.set_title(f"mean ± std over seeds (n = {', '.join(map(str, ns))})")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return fig


def write_metric_figure(report: dict[str, Any], path: str | Path, metric: str, x_key: str,
                        protocol: str | None = None) -> Path:
    from vsectl.science.plots import figure_format, paper_style, save_figure

    figure_format(path)
    with paper_style():
        return save_figure(draw_metric(report, metric, x_key, protocol), path)


def parse_list(value: str | None) -> Sequence[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
