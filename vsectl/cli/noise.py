"""plot-pair-loss: the per-pair training loss of a run trained with noisy correspondence."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vsectl.cli.common import STATE, app, err, run_guarded


@app.command("plot-pair-loss")
def plot_pair_loss_cli(
    run: Annotated[Path, typer.Argument(help="Run directory trained with data.noise")],
    out: Annotated[Path | None, typer.Option(help="A .png, .pdf or .svg file (default RUN/plots/pair_losses.png)")]
    = None,
    epochs: Annotated[str | None, typer.Option(help="Epochs to show, e.g. 0,3,7 (default: up to 4, spread)")] = None,
) -> None:
    """Plot the loss distributions of sampled clean and noisy training pairs per epoch; prints the figure path."""
    from vsectl.cli.common import fail
    from vsectl.noisy.pair_loss_plot import write_pair_loss_figure

    try:
        chosen = [int(e) for e in epochs.split(",") if e.strip()] if epochs else None
    except ValueError:
        fail(f"--epochs must be comma-separated integers, got '{epochs}'")
    path = run_guarded(write_pair_loss_figure, run, out, chosen)
    if not STATE.get("quiet"):
        err.print(f"wrote {path}", highlight=False)
    typer.echo(str(path))
