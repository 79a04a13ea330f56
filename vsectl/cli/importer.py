"""vsectl import ...: bring models trained by other code in as ordinary run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vsectl.cli.common import app, err, run_guarded

import_app = typer.Typer(no_args_is_help=True, help="Turn checkpoints of other code into vsectl run directories.")
app.add_typer(import_app, name="import")


@import_app.command("official")
def import_official_cli(
    path: Annotated[Path, typer.Argument(help="The official VSE∞ checkpoint, e.g. model_best.pth")],
    out: Annotated[Path, typer.Option("--out", help="The new run directory, e.g. runs/f30k_bigru_official")],
    vocab: Annotated[Path | None, typer.Option(help="BiGRU text: the official vocab JSON it was trained with")] = None,
    text_model: Annotated[str | None, typer.Option(
        help="BERT text: a folder with its config and tokenizer, or a hub id in the Hugging Face cache")] = None,
    data_root: Annotated[Path | None, typer.Option(help="The dataset folder, recorded as data.root")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the provenance record as JSON on stdout")] = False,
) -> None:
    """Import a released VSE∞ checkpoint (region or grid image side, BiGRU or BERT text); prints the run directory."""
    from vsectl.importers.official import import_official

    record = run_guarded(import_official, path, out, vocab=vocab, text_model=text_model, data_root=data_root)
    official = record["official"]
    err.print(f"imported {record['image_side']} + {record['text_branch']} checkpoint (official epoch "
              f"{official['epoch']}, best rsum {official['best_rsum']}) · sha256 {record['source']['sha256'][:16]}…",
              highlight=False, soft_wrap=True)  # one line each, however narrow the terminal
    where = "" if data_root else " --data-root DATA"
    err.print(f"evaluate it: vsectl eval {record['run']} --protocol {record['protocol']}{where}", highlight=False,
              soft_wrap=True)
    typer.echo(json.dumps(record, indent=2) if as_json else record["run"])
