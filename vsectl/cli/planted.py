"""bench-pooling: the planted-pooling benchmark (does GPO find a pooling known by construction?)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vsectl.cli.common import STATE, RichProgress, SetOpt, app, err, run_guarded


@app.command("bench-pooling")
def bench_pooling_cli(
    out: Annotated[Path, typer.Option(help="Output folder (data, runs, results.json/.md, planted.pdf/.svg/.png)")
                   ] = Path("results/planted"),
    quick: Annotated[bool, typer.Option(help="recipes/planted/quick.yaml: seconds, for smoke tests")] = False,
    recipe: Annotated[Path | None, typer.Option(help="Benchmark recipe (default recipes/planted/default.yaml)")] = None,
    plantings: Annotated[str | None, typer.Option(help="Planted poolings, e.g. M-1,M-4,A,T-25%")] = None,
    seeds: Annotated[str | None, typer.Option(help="Training seeds, e.g. 0,1,2,3,4")] = None,
    jobs: Annotated[int | None, typer.Option(help="Cells trained in parallel processes")] = None,
    overrides: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json on stdout instead of the folder")] = False,
) -> None:
    """Planted-pooling retrieval benchmark: grid over K and GPO on data whose best pooling is known."""
    from vsectl.science.planted import RECIPES, load_bench_config, run_bench

    extra = [f"{key}={value}" for key, value in (("plantings", plantings), ("seeds", seeds), ("jobs", jobs))
             if value is not None]
    path = recipe or RECIPES / ("quick.yaml" if quick else "default.yaml")
    cfg = run_guarded(load_bench_config, path, [*(overrides or []), *extra])
    result = run_guarded(run_bench, cfg, out, progress=RichProgress(enabled=not STATE.get("quiet")))
    err.print(Path(out, "results.md").read_text(), highlight=False, markup=False)
    typer.echo(json.dumps(result, indent=1) if as_json else str(out))
