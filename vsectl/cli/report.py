"""report: mean ± std over seeds and paired differences from a baseline, as tables and files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vsectl.cli.common import STATE, app, err, fail, json_output, run_guarded


def report_tables(report: dict[str, Any]) -> list[Table]:
    """The report's tables for the terminal (rich)."""
    from vsectl.report_format import fmt_diff, fmt_stat, table_title

    out = []
    for t in report["tables"]:
        table = Table(title=table_title(t), title_justify="left")
        table.add_column("group", overflow="fold", ratio=2)  # labels are long; wrap them rather than cut them
        for m in t["metrics"]:
            table.add_column(m, justify="right", ratio=1)
        for row in t["rows"]:
            table.add_row(row["group"], *(fmt_stat(row[m]) for m in t["metrics"]))
        for d in t["differences"]:
            table.add_row(f"Δ {d['group']}", *(fmt_diff(d.get(m)) for m in t["metrics"]), style="dim")
        if t["differences"]:
            table.caption = (f"Δ: paired difference from {report['baseline']} over shared seeds, "
                             f"{100 * report['confidence']:g} % CI")
        out.append(table)
    return out


@app.command("report")
def report_cli(
    runs: Annotated[list[str], typer.Argument(help="Run directories or quoted globs, e.g. 'runs/noise/demo-*'")],
    baseline: Annotated[str | None, typer.Option(help="The group to compare with: its label or one of its runs")]
    = None,
    protocol: Annotated[str | None, typer.Option(help="Protocols to keep, comma-separated (default: all found)")]
    = None,
    metrics: Annotated[str | None, typer.Option(help="Metrics the tables show, comma-separated (default: all but "
                                                     "medr/meanr)")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for report.md, report.csv (long), report.json, report.tex")]
    = None,
    plot: Annotated[str | None, typer.Option(help="Draw this metric against --x into OUT/<metric>.png")] = None,
    x: Annotated[str | None, typer.Option("--x", help="The setting on the figure's x axis, e.g. data.noise.ratio")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout")] = False,
) -> None:
    """Group runs that differ only by seed: mean ± std, n, and paired differences from a baseline with a 95 % CI."""
    from vsectl.report import build_report
    from vsectl.report_format import parse_list, write_metric_figure, write_report

    json_output(as_json)
    if (plot is None) != (x is None):
        fail("--plot and --x go together: --plot METRIC --x SETTING (e.g. --plot rsum --x data.noise.ratio)")
    if plot is not None and out is None:
        fail("--plot needs --out (the folder the figure goes to)")
    report = run_guarded(build_report, runs, baseline=baseline, protocols=parse_list(protocol),
                         metrics=parse_list(metrics))
    if not STATE.get("quiet"):
        for table in report_tables(report):
            err.print(table)
    if out is not None:
        paths = run_guarded(write_report, report, out)
        if plot is not None:
            first = parse_list(protocol)
            paths["figure"] = run_guarded(write_metric_figure, report, out / f"{plot}.png", plot, x,
                                          first[0] if first else None)
        for path in paths.values() if not STATE.get("quiet") else ():
            err.print(f"wrote {path}", highlight=False)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    elif out is not None:
        typer.echo(str(out))
