"""vsectl data ...: build, import and check datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vsectl.cli.common import data_app, fail, run_guarded


@data_app.command("toy")
def data_toy_cli(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("data/toy"),
    fmt: Annotated[str, typer.Option("--format", help="precomp | store")] = "precomp",
    seed: int = 0,
) -> None:
    """Generate the synthetic toy dataset (not real data: for smoke runs and tests)."""
    from vsectl.data.toy import make_toy_dataset

    if fmt not in ("precomp", "store"):
        fail(f"--format must be precomp or store, got '{fmt}'")
    typer.echo(str(run_guarded(make_toy_dataset, out, seed=seed, fmt=fmt)))
