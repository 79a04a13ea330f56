"""train, eval and env: the core commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from vsectl.cli.common import (
    STATE,
    DeviceOpt,
    RecipeArg,
    RichProgress,
    SetOpt,
    app,
    err,
    fail,
    interrupted,
    json_output,
    run_guarded,
)
from vsectl.scoring.protocols import GROUPS, PROTOCOLS, choices
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, TIE_RULE_HELP


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

    cfg = run_guarded(load_recipe, recipe, overrides or [])  # a bad recipe fails before torch is imported
    from vsectl.training import train

    try:
        run_dir = run_guarded(train, cfg, out_root=out, device=device, resume=resume,
                              progress=RichProgress(enabled=not STATE.get("quiet")))
    except KeyboardInterrupt:
        interrupted(interrupted_train_line(out / cfg.name, recipe, overrides or [], out, device))
    if not STATE.get("rank"):  # under torchrun the run directory is printed once, by rank 0
        typer.echo(str(run_dir))


def interrupted_train_line(run_dir: Path, recipe: Path, overrides: list[str], out: Path, device: str) -> str:
    """What a Ctrl-C kept of a training run, and the command that resumes it."""
    from shlex import quote

    from vsectl.run_dir import completed_epochs

    command = " ".join(["vsectl train", quote(str(recipe)), *(f"--set {quote(o)}" for o in overrides),
                        *([f"--out {quote(str(out))}"] if out != Path("runs") else []),
                        *([f"--device {device}"] if device != "auto" else []), "--resume"])
    epochs = completed_epochs(run_dir)
    kept = f"{run_dir} keeps its checkpoint after epoch {epochs}" if epochs else \
        f"no epoch of {run_dir} had finished, so there is no checkpoint yet"
    return f"{kept}; resume with: {command}"


def protocol_help() -> str:
    """`--protocol`'s help, from the registered protocols."""
    listed = "; ".join(f"{p.name}: {p.help}" for _, p in PROTOCOLS.items())
    return f"{choices()} ({listed}; " + "; ".join(f"{g} = {' + '.join(n)}" for g, n in GROUPS.items()) + ")"


COLUMN_TITLES = {"r1": "R@1", "r5": "R@5", "r10": "R@10", "medr": "medr", "meanr": "meanr", "r_precision": "R-P",
                 "map_at_r": "mAP@R", "coco5k_r1": "COCO R@1", "coco5k_r5": "COCO R@5", "coco5k_r10": "COCO R@10",
                 "pcm_r_precision": "PCM R-P"}


def metrics_table(title: str, metrics: dict[str, float], modality: str = "image", ties: str = "",
                  columns: tuple[str, ...] = ("r1", "r5", "r10", "medr", "meanr")) -> Table:
    """One row per direction with the protocol's `columns` (metric keys `<direction>_<column>`)."""
    # the title sets the width: a rich title longer than its table would be wrapped (the tie rule split off)
    table = Table(title=title, title_justify="left", min_width=len(title))
    for col in ("direction", *(COLUMN_TITLES.get(c, c) for c in columns)):
        table.add_column(col, justify="right")
    for d, label in (("i2t", f"{modality}→text"), ("t2i", f"text→{modality}")):
        table.add_row(label, *(f"{metrics[f'{d}_{k}']:.1f}" for k in columns))
    sums = [f"{k.replace('_', ' ')} {metrics[k]:.1f}" for k in ("rsum", "coco5k_rsum") if k in metrics]
    table.caption = " · ".join(sums + ([ties] if ties else []))
    return table


def ties_caption(result: dict) -> str:
    """The tie rule and how many queries had a competitor scoring exactly their ground truth."""
    if "tie_rule" not in result:
        return ""
    ties = result.get("ties", {})
    return (f"ties: {result['tie_rule']} ({ties.get('i2t_queries_with_ties', 0)} i2t / "
            f"{ties.get('t2i_queries_with_ties', 0)} t2i)")


@app.command("eval")
def eval_cli(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run directories or checkpoint folders")] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", help="More runs: an ensemble (repeatable)")] = None,
    protocol: Annotated[str, typer.Option(help=protocol_help())] = "f30k",
    split: Annotated[str | None, typer.Option(help="Split to encode (default: the protocol's); val = dev")] = None,
    data_root: Annotated[str | None, typer.Option(help="Override the run's data.root")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    ties: Annotated[str, typer.Option(help=TIE_RULE_HELP)] = DEFAULT_TIE_RULE,
    device: DeviceOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout")] = False,
    caption_ids: Annotated[Path | None, typer.Option(help="eccv/cxc: the split's COCO caption ids, one per line in "
                                                          "its caption order (default: its order is known)")] = None,
    image_ids: Annotated[Path | None, typer.Option(help="eccv/cxc: the split's COCO image ids, one per line")] = None,
    pcm: Annotated[Path | None, typer.Option(help="eccv/cxc: a folder with pm_image_to_caption.json and "
                                                  "pm_caption_to_image.json (adds plausible-match R-Precision)")]
    = None,
) -> None:
    """Evaluate a run (or an ensemble of runs) under a published protocol; writes RUN/eval/<protocol>-<split>.json
    (<protocol>-<split>-last.json for --checkpoint last)."""
    from vsectl.evaluation import evaluate_runs
    from vsectl.runtime import resolve_device

    json_output(as_json)
    members = list(runs or []) + list(run or [])
    if not members:
        fail("give a run directory, e.g. vsectl eval runs/tiny")
    dev = run_guarded(resolve_device, device)
    files = {k: v for k, v in (("caption_ids", caption_ids), ("image_ids", image_ids), ("pm_dir", pcm)) if v}
    results = run_guarded(evaluate_runs, members, protocol=protocol, split=split, data_root=data_root, device=dev,
                          which=checkpoint, progress=RichProgress(enabled=not STATE.get("quiet")), tie_rule=ties,
                          annotations=files)
    for name, result in results.items() if not STATE.get("quiet") else ():  # -q and --json: only the results
        modality = result.get("modality", "image")
        title = (f"{name} · {result['split']} · {result['n_images']} {modality}s × {result['n_captions']} captions · "
                 f"{result.get('tie_rule', ties)} tie rule")
        columns = tuple(c for c in (*PROTOCOLS.get(name).columns, "pcm_r_precision") if f"i2t_{c}" in result["metrics"])
        err.print(metrics_table(title, result["metrics"], modality, ties_caption(result), columns))
        if "path" in result:
            err.print(f"wrote {result['path']}", highlight=False)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    elif STATE.get("quiet") and not STATE.get("rank"):  # -q: the results, one plain line per protocol on stdout
        for name, result in results.items():
            typer.echo(metrics_line(name, result))


def metrics_line(name: str, result: dict) -> str:
    """One tab-separated line: protocol, split, tie rule, rsum and the ten other metrics as key=value."""
    metrics = result["metrics"]
    others = "\t".join(f"{k}={v:.2f}" for k, v in metrics.items() if k != "rsum")
    return f"{name}\t{result['split']}\t{result.get('tie_rule', '')}\trsum={metrics['rsum']:.2f}\t{others}"


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
