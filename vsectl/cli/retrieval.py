"""embed, index and search: a trained run as a retrieval engine over a collection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vsectl.cli.common import STATE, DeviceOpt, RichProgress, app, err, run_guarded
from vsectl.io import json_text

CheckpointOpt = Annotated[str, typer.Option(help="best | last")]


# Defaults repeat vsectl.retrieval's constants as literals: importing it here would load torch for `vsectl --help`.
@app.command("embed")
def embed_cli(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder")],
    out: Annotated[Path, typer.Option(help="Embeddings folder to write")],
    images: Annotated[Path | None, typer.Option(help="A plain folder of images (no captions)")] = None,
    data: Annotated[Path | None, typer.Option(help="A prepared raw dataset: images and captions")] = None,
    features: Annotated[Path | None, typer.Option(help="An extracted feature store, e.g. data/demo_feats/test.h5")]
    = None,
    split: Annotated[str, typer.Option(help="--data: all | train | dev | test")] = "all",
    videos: Annotated[Path | None, typer.Option(help="A plain folder of video files (runs trained on "
                                                      "extract --videos features)")] = None,
    checkpoint: CheckpointOpt = "best",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Sets / captions per forward pass")] = 128,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes")] = 2,
    shard_size: Annotated[int, typer.Option(help="Items per resumable shard")] = 4096,
) -> None:
    """Embed a collection with a trained run; prints the embeddings folder. Resumes a killed run."""
    from vsectl.retrieval import embed, open_embeddings

    path = run_guarded(embed, run, out, images=images, data=data, features=features, split=split,
                       checkpoint=checkpoint, device=device, batch_size=batch_size, workers=workers,
                       shard_size=shard_size, progress=RichProgress(enabled=not STATE.get("quiet")), videos=videos)
    meta = open_embeddings(path).meta
    if STATE.get("quiet"):
        typer.echo(str(path))
        return
    skipped = f" ({meta['n_skipped']} unreadable skipped)" if meta["n_skipped"] else ""
    err.print(f"embedded {meta['n_images']} images{skipped} and {meta['n_captions']} captions, "
              f"{meta['embed_dim']}-d, with {meta['run']} (fingerprint {meta['fingerprint']})", highlight=False)
    typer.echo(str(path))


@app.command("index")
def index_cli(
    embeddings: Annotated[Path, typer.Argument(help="Embeddings folder (from vsectl embed)")],
    kind: Annotated[str, typer.Option(help="flat (exact) | ivf | hnsw (faiss, the 'faiss' extra)")] = "flat",
    side: Annotated[str, typer.Option(help="images | captions")] = "images",
    nlist: Annotated[int | None, typer.Option(help="ivf: lists [default 4·sqrt(N)]")] = None,
    nprobe: Annotated[int | None, typer.Option(help="ivf: lists probed per query [default nlist/16, ≥ 8]")] = None,
    m: Annotated[int, typer.Option("--m", help="hnsw: graph degree")] = 32,
    ef_construction: Annotated[int, typer.Option(help="hnsw: build beam width")] = 80,
    ef_search: Annotated[int, typer.Option(help="hnsw: query beam width")] = 128,
) -> None:
    """Build an index beside the embeddings (EMB/index-<kind>-<side>); prints its folder."""
    from vsectl.retrieval import build_index

    path = run_guarded(build_index, embeddings, kind, side, nlist=nlist, nprobe=nprobe, m=m,
                       ef_construction=ef_construction, ef_search=ef_search,
                       progress=RichProgress(enabled=not STATE.get("quiet")))
    typer.echo(str(path))


def _short(path: str | None) -> str:
    """A path relative to the working directory when it lies below it."""
    if not path:
        return "-"
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def results_table(result) -> Table:  # noqa: ANN001 - a SearchResult
    table = Table(title=f"“{result.query}” → {result.side}", title_justify="left")
    for col, justify in (("rank", "right"), ("score", "right"), ("id", "left"), ("path", "left"),
                         ("caption", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for h in result.hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id, _short(h.path), h.caption or "")
    return table


@app.command("search")
def search_cli(
    target: Annotated[Path, typer.Argument(help="Embeddings folder or index folder")],
    queries: Annotated[list[str] | None, typer.Argument(help="Text queries")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Hits per query")] = 10,
    captions: Annotated[bool, typer.Option("--captions", help="Search the caption side (→ text)")] = False,
    image: Annotated[list[Path] | None, typer.Option("--image", help="An image query file (repeatable)")] = None,
    from_file: Annotated[Path | None, typer.Option("--queries", help="A text file, one query per line")] = None,
    run: Annotated[Path | None, typer.Option(help="Run to encode queries [default: the one that embedded]")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="best | last [default: the embeddings' own]")] = None,
    device: DeviceOpt = "auto",
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the hits")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Hash the embeddings against meta.json and check every "
                                                          "row first")] = False,
) -> None:
    """Search a collection with text or image queries: a table (stderr), --json and --sheet (stdout)."""
    from vsectl.retrieval.query import search_collection

    side = "captions" if captions else "images"
    results = run_guarded(search_collection, target, list(queries or []), k=k, side=side, images=list(image or []),
                          queries_file=from_file, run=run, checkpoint=checkpoint, device=device, sheet=sheet,
                          verify=verify)
    for result in results:
        err.print(results_table(result))
    if sheet is not None:
        err.print(f"wrote {sheet}", highlight=False)
    if as_json:
        typer.echo(json_text([r.to_dict() for r in results], indent=1, ensure_ascii=False))
    elif sheet is not None:
        typer.echo(str(sheet))
