"""gridsearch, plot-weights and patterns: the pooling-science commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vsectl.cli.common import STATE, DeviceOpt, RichProgress, SetOpt, app, err, json_output, run_guarded
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE

SPARKS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40


@app.command("gridsearch")
def gridsearch_cli(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe (default recipes/tiny.yaml, toy data)")] = None,
    pool: Annotated[str | None, typer.Option(help="Poolers, comma-separated (default max,mean,kmax)")] = None,
    k: Annotated[str | None, typer.Option("--k", help="K values for kmax (default 1,2,5,10,20); K=1 is max")] = None,
    branch: Annotated[str | None, typer.Option(help="image | text | both = visual × text (default both)")] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds, comma-separated (default 0,1,2)")] = None,
    gpo: Annotated[bool | None, typer.Option("--gpo/--no-gpo", help="Add the GPO cell (default yes)")] = None,
    grid: Annotated[Path | None, typer.Option(help="Grid YAML: pool, k, branch, seeds, gpo (options win)")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default results/gridsearch/<recipe>)")] = None,
    jobs: Annotated[int, typer.Option(help="Cells run in parallel processes")] = 1,
    quick: Annotated[bool, typer.Option(help="A smoke sweep in minutes: max, mean, K=2 and GPO on the image "
                                              "branch, seed 0, 2 epochs of 20 steps (grid options still win)")] = False,
    overrides: SetOpt = None,
    protocol: Annotated[str, typer.Option(help="Evaluation protocol for every cell")] = "f30k",
    split: Annotated[str, typer.Option(help="Split evaluated")] = "test",
    ties: Annotated[str, typer.Option(help="How exact ties count in each cell's evaluation, as vsectl eval --ties: "
                                           "expected (the default) | optimistic | pessimistic")] = DEFAULT_TIE_RULE,
    device: DeviceOpt = "auto",
) -> None:
    """Sweep pooling choices (Fig. 6 of the paper) with GPO alongside; prints the output folder."""
    from vsectl.science.gridsearch import gridsearch, resolve_grid

    spec = run_guarded(resolve_grid, grid, pool=pool, k=k, branch=branch, seeds=seeds, gpo=gpo, quick=quick)
    result = run_guarded(gridsearch, recipe, spec, out_dir=out, overrides=overrides or [], quick=quick,
                         protocol=protocol, split=split, device=device, jobs=jobs, tie_rule=ties,
                         progress=RichProgress(enabled=not STATE.get("quiet")))
    if not STATE.get("quiet"):
        err.print(Path(result["out_dir"], "results.md").read_text(), highlight=False, markup=False)
    typer.echo(result["out_dir"])


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """Resample to at most `width` columns (max over each bin) and draw with block characters."""
    bins = min(width, len(values))
    cols = [max(values[i * len(values) // bins: max((i + 1) * len(values) // bins, i * len(values) // bins + 1)])
            for i in range(bins)]
    top = max(cols) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in cols)


def curves_table(branch: str, pool: str, per_n: dict[int, list[float]], trained: list[int] | None = None) -> Table:
    """θ(N) per N; an N outside the training sizes `trained` ([smallest, largest]) is marked untrained."""
    span = "" if trained is None else f" · trained on N = {trained[0]}" + (
        f"–{trained[1]}" if trained[1] != trained[0] else "")
    table = Table(title=f"{branch} · {pool}{span}", title_justify="left")
    for col in ("N", "Σθ", "top weights (k: θ_k)", "θ_k, k = 0 → N−1"):
        table.add_column(col, justify="right" if col in ("N", "Σθ") else "left")
    for n, theta in sorted(per_n.items()):
        top = sorted(range(n), key=lambda i: -theta[i])[:3]
        untrained = trained is not None and not trained[0] <= n <= trained[1]
        table.add_row(f"{n} (untrained)" if untrained else str(n), f"{sum(theta):.3f}",
                      "  ".join(f"{i}: {theta[i]:.3f}" for i in top), sparkline(theta))
    return table


@app.command("plot-weights")
def plot_weights_cli(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder")],
    sizes: Annotated[str | None, typer.Option(help="Set sizes N, e.g. 10,36,49,100 (default: from the data)")] = None,
    out: Annotated[Path | None, typer.Option(help="A .pdf, .svg or .png file, or a folder (default RUN/plots: "
                                                  "weights.png, .pdf and .svg, and weights.json)")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    x_axis: Annotated[str, typer.Option(help="relative = rank k/(N−1) | index = raw rank k")] = "relative",
    y_scale: Annotated[str, typer.Option(help="log | linear")] = "log",
) -> None:
    """Plot each GPO's weights θ_k against the rank k for several set sizes N; prints the figure path."""
    from vsectl.science.gridsearch import parse_list
    from vsectl.science.plots import write_weight_plots

    ns = list(run_guarded(parse_list, sizes, "sizes", int)) if sizes is not None else None
    curves, paths = run_guarded(write_weight_plots, run, ns, out=out, which=checkpoint, x_axis=x_axis,
                                y_scale=y_scale)
    if not STATE.get("quiet"):  # -q: only the figure's path on stdout
        for branch, per_n in curves.curves.items():
            err.print(curves_table(branch, curves.pools[branch], per_n, curves.trained.get(branch)))
        for branch, note in curves.notes.items():
            err.print(f"{branch}: {note}", highlight=False)
        err.print(f"wrote {', '.join(str(p) for p in [*paths['figures'], paths['json']])}", highlight=False)
    typer.echo(str(paths["figures"][0]))


def patterns_table(result: dict) -> Table:
    label = {"seen": "seen", "smaller": "unseen smaller", "larger": "unseen larger"}
    table = Table(title="pattern generation: RMSE(θ learned, θ*) (lower is better)", title_justify="left")
    table.add_column("pattern")
    table.add_column("design")
    for key, (lo, hi) in result["buckets"].items():
        table.add_column(f"{label[key]} {lo}–{hi}", justify="right")
    for pattern, per_design in result["rmse"].items():
        for design, values in per_design.items():
            table.add_row(pattern, result["designs"][design], *(f"{values[b]:.4f}" for b in result["buckets"]))
    load = result["load_average"]
    table.caption = (f"wall {result['wall_s']:.0f} s · {result['config']['jobs']} process(es) × "
                     f"{result['torch_threads']} thread(s) · load average {load['start']} → {load['end']}")
    return table


@app.command("patterns")
def patterns_cli(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("results/patterns"),
    quick: Annotated[bool, typer.Option(help="recipes/patterns/quick.yaml: seconds, for smoke tests")] = False,
    recipe: Annotated[Path | None, typer.Option(help="Patterns recipe (default recipes/patterns/default.yaml)")] = None,
    designs: Annotated[str | None, typer.Option(help="e.g. gpo,gpo_index_bigru,gpo_mlp,gpo_interp")] = None,
    patterns: Annotated[str | None, typer.Option(help="e.g. A,M-1,M-10,T-50%,L")] = None,
    seed: Annotated[int | None, typer.Option(help="Base seed (default the recipe's)")] = None,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json on stdout instead of the folder")] = False,
) -> None:
    """The synthetic pattern-generation experiment of the paper's supplement: can a generator learn known poolings?"""
    from vsectl.science.patterns import RECIPES, load_patterns_config, run_patterns

    extra = [f"{key}={value}" for key, value in (("designs", designs), ("patterns", patterns), ("seed", seed))
             if value is not None]
    path = recipe or RECIPES / ("quick.yaml" if quick else "default.yaml")
    json_output(as_json)
    cfg = run_guarded(load_patterns_config, path, [*(overrides or []), *extra])
    result = run_guarded(run_patterns, cfg, out, progress=RichProgress(enabled=not STATE.get("quiet")))
    if not STATE.get("quiet"):
        err.print(patterns_table(result))
    typer.echo(json.dumps(result, indent=1) if as_json else str(out))
