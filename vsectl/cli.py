"""The `vsectl` command line: thin typer shells over the library. Human output on stderr, results on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from vsectl import __version__

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  help="Image-text retrieval with visual semantic embeddings and learned pooling (VSE∞).")
data_app = typer.Typer(no_args_is_help=True, help="Prepare and check datasets.")
app.add_typer(data_app, name="data")
err = Console(stderr=True)
STATE = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/tiny.yaml")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe value: a.b=c (repeatable)")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]


class RichProgress:
    """rich progress bars for the library's `Progress` protocol (stderr)."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.fields: dict[str, Any] = {}
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err,
                            disable=not enabled, transient=True)
        self.task = None

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        with self.bar:
            self.task = self.bar.add_task(description, total=total, info="")
            for item in iterable:
                yield item
                self.bar.advance(self.task)
            self.bar.remove_task(self.task)
            self.task = None

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self.task is not None:
            info = "  ".join(f"{k.replace('_per_s', '/s')} {v:.4g}" for k, v in self.fields.items())
            self.bar.update(self.task, info=info)


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def run_guarded(fn, *args, **kwargs):  # noqa: ANN001, ANN201 - a thin wrapper
    """Call a library function; a user's mistake becomes one red line and exit code 2 (traceback with --debug)."""
    from vsectl.errors import VsectlError

    try:
        return fn(*args, **kwargs)
    except (VsectlError, FileNotFoundError, PermissionError) as e:
        if STATE["debug"]:
            raise
        msg = str(e) if isinstance(e, VsectlError) else f"{e.strerror}: {e.filename}"
        if isinstance(e, OSError) and e.errno == 28:
            msg = f"no space left on the device while writing {e.filename}"
        fail(msg)
    except OSError as e:
        if STATE["debug"] or e.errno not in (28, 30):  # disk full, read-only file system
            raise
        fail(f"{e.strerror}: {e.filename}; free space or choose another output folder")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vsectl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only results on stdout.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True)] = False,
) -> None:
    from vsectl.runtime import setup_logging

    STATE["debug"] = debug
    STATE["quiet"] = quiet
    setup_logging(verbose=verbose, quiet=quiet)


@app.command("train")
def train_cli(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    out: Annotated[Path, typer.Option(help="Output root; the run goes to OUT/<name>")] = Path("runs"),
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a model from RECIPE; prints the run directory."""
    from vsectl.config import load_recipe
    from vsectl.training import train

    cfg = run_guarded(load_recipe, recipe, overrides or [])
    run_dir = run_guarded(train, cfg, out_root=out, device=device, resume=resume,
                          progress=RichProgress(enabled=not STATE.get("quiet")))
    typer.echo(str(run_dir))


def metrics_table(title: str, metrics: dict[str, float]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("direction", "R@1", "R@5", "R@10", "medr", "meanr"):
        table.add_column(col, justify="right")
    for d, label in (("i2t", "image→text"), ("t2i", "text→image")):
        table.add_row(label, *(f"{metrics[f'{d}_{k}']:.1f}" for k in ("r1", "r5", "r10", "medr", "meanr")))
    table.caption = f"rsum {metrics['rsum']:.1f}"
    return table


@app.command("eval")
def eval_cli(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run directories or checkpoint folders")] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", help="More runs: an ensemble (repeatable)")] = None,
    protocol: Annotated[str, typer.Option(help="f30k | coco1k | coco5k | dev1k | all")] = "f30k",
    split: Annotated[str | None, typer.Option(help="Split to encode (default: the protocol's)")] = None,
    data_root: Annotated[str | None, typer.Option(help="Override the run's data.root")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout")] = False,
) -> None:
    """Evaluate a run (or an ensemble of runs) under a published protocol; writes RUN/eval/<protocol>.json."""
    from vsectl.evaluation import evaluate_runs
    from vsectl.runtime import resolve_device

    members = list(runs or []) + list(run or [])
    if not members:
        fail("give a run directory, e.g. vsectl eval runs/tiny")
    dev = run_guarded(resolve_device, device)
    results = run_guarded(evaluate_runs, members, protocol=protocol, split=split, data_root=data_root, device=dev,
                          which=checkpoint, progress=RichProgress(enabled=not STATE.get("quiet")))
    for name, result in results.items():
        title = f"{name} · {result['split']} · {result['n_images']} images × {result['n_captions']} captions"
        err.print(metrics_table(title, result["metrics"]))
        if "path" in result:
            err.print(f"wrote {result['path']}", highlight=False)
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@app.command("env")
def env_cli(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Versions, devices and threads."""
    from vsectl.runtime import env_info, resolve_device

    info = env_info(resolve_device("auto"))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(show_header=False)
    for k, v in info.items():
        table.add_row(k, str(v))
    Console().print(table)


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


def entry() -> None:  # pragma: no cover - console script
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
