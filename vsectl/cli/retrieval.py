"""embed, index and search: a trained run as a retrieval engine over a collection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vsectl.cli.common import STATE, DeviceOpt, RichProgress, app, err, json_output, run_guarded
from vsectl.io import json_text

CheckpointOpt = Annotated[str, typer.Option(help="best | last")]


# Defaults repeat vsectl.retrieval's constants as literals: importing it here would load torch for `vsectl --help`.
@app.command("embed")
def embed_cli(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder")],
    out: Annotated[Path, typer.Option(help="Embeddings folder to write")],
    images: Annotated[Path | None, typer.Option(help="A plain folder of images (no captions)")] = None,
    data: Annotated[Path | None, typer.Option(help="A prepared raw dataset: images and captions")] = None,
    features: Annotated[Path | None, typer.Option(help="An extracted feature store (data/demo_feats/test.h5) or a "
                                                       "folder of them (data/demo_feats: every split), or a precomp "
                                                       "<split>_ims.npy")] = None,
    shards: Annotated[str | None, typer.Option(help="Webdataset tar shards: a folder, a glob or "
                                                    "'shards/{00000..00099}.tar'")] = None,
    split: Annotated[str, typer.Option(help="--data: all | train | dev | test")] = "all",
    videos: Annotated[Path | None, typer.Option(help="A plain folder of video files (runs trained on "
                                                      "extract --videos features)")] = None,
    checkpoint: CheckpointOpt = "best",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Sets / captions per forward pass")] = 128,
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes")] = 2,
    shard_size: Annotated[int, typer.Option(help="Items per resumable shard")] = 4096,
) -> None:
    """Embed a collection with a trained run; prints the embeddings folder. Resumes a killed run; under torchrun the
    ranks share the shards and rank 0 merges."""
    from vsectl.retrieval import embed, open_embeddings

    path = run_guarded(embed, run, out, images=images, data=data, features=features, shards=shards, split=split,
                       checkpoint=checkpoint, device=device, batch_size=batch_size, workers=workers,
                       shard_size=shard_size, progress=RichProgress(enabled=not STATE.get("quiet")), videos=videos)
    if path is None:  # a torchrun rank other than 0: rank 0 merges and prints
        return
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
    embeddings: Annotated[Path, typer.Argument(help="Embeddings folder (vsectl embed), or an index folder (--info)")],
    kind: Annotated[str, typer.Option(help="auto | flat (exact) | hnsw | ivf | ivf-sq8 | ivf-pq (all but flat need "
                                           "the 'faiss' extra)")] = "auto",
    max_memory: Annotated[str | None, typer.Option(help="Memory budget of the opened index, e.g. 4GB")] = None,
    max_query_ms: Annotated[float | None, typer.Option(help="Longest single query; tuning respects it")] = None,
    recall: Annotated[float, typer.Option(help="recall@10 the tuning aims for (the smallest nprobe / ef_search "
                                               "reaching it)")] = 0.95,
    side: Annotated[str, typer.Option(help="images | captions")] = "images",
    nlist: Annotated[int | None, typer.Option(help="ivf kinds: lists [default: the power of 2 nearest sqrt(N)]")]
    = None,
    nprobe: Annotated[int | None, typer.Option(help="ivf kinds: lists probed [default: tuned to --recall]")]
    = None,
    pq_bytes: Annotated[int | None, typer.Option(help="ivf-pq: code bytes per vector [default: largest fitting]")]
    = None,
    m: Annotated[int | None, typer.Option("--m", help="hnsw: graph degree [32]")] = None,
    ef_construction: Annotated[int | None, typer.Option(help="hnsw: build beam width [80]")] = None,
    ef_search: Annotated[int | None, typer.Option(help="hnsw: query beam width [default: tuned]")] = None,
    info: Annotated[bool, typer.Option("--info", help="Show the index cards instead of building")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --info: print the cards as JSON")] = False,
) -> None:
    """Build an index beside the embeddings (EMB/index-<kind>-<side>) and its card; prints its folder."""
    if info:
        show_cards(embeddings, as_json)
        return
    from vsectl.retrieval import build_index

    path = run_guarded(build_index, embeddings, kind, side, max_memory=max_memory, max_query_ms=max_query_ms,
                       recall=recall,
                       nlist=nlist, nprobe=nprobe, pq_bytes=pq_bytes, m=m, ef_construction=ef_construction,
                       ef_search=ef_search, progress=RichProgress(enabled=not STATE.get("quiet")))
    if path is None:  # a torchrun rank other than 0: rank 0 merges and prints
        return
    if not STATE.get("quiet"):
        err.print(card_table(path), highlight=False)
    typer.echo(str(path))


def show_cards(target: Path, as_json: bool) -> None:
    """`vsectl index --info`: the card of one index folder, or of every index in an embeddings folder."""
    from vsectl.retrieval.index import list_indexes
    from vsectl.retrieval.index_files import INDEX_META, read_card

    folders = [target] if (target / INDEX_META).is_file() else list_indexes(target)
    if not folders:
        run_guarded(_no_index, target)
    cards = {str(f): read_card(f) for f in folders}
    json_output(as_json)
    for folder in folders if not STATE.get("quiet") else ():
        err.print(card_table(folder), highlight=False)
    if as_json:
        typer.echo(json_text(cards, indent=1))


def _no_index(target: Path) -> None:
    from vsectl.errors import ConfigError

    raise ConfigError(f"{target} holds no index; build one with `vsectl index {target} --max-memory 4GB`")


def _size(n: float | None) -> str:
    """A size in the unit that suits it (3.7 MB, 1.37 GB)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def card_table(folder: Path) -> Table:
    """An index card as a two-column table."""
    from vsectl.retrieval.index_files import read_card

    c = read_card(folder)
    table = Table(title=f"index card: {folder}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    if not c:
        table.add_row("card", "none (built by an older vsectl; rebuild to measure it)")
        return table
    recall = c.get("recall", {})
    q = c.get("query_ms", {})
    rows = [("kind", f"{c['kind']}  {c.get('factory') or ''}  {c.get('params')}"),
            ("vectors", f"{c['vectors']:,} × {c['dim']} ({c['side']})"),
            ("chosen because", c.get("reason", "")),
            ("bytes", f"{_size(c.get('bytes_on_disk'))} on disk, {_size(c.get('ram_bytes_estimate'))} in RAM "
                      "(estimate)"),
            ("build", f"{c['build_seconds']:.1f} s wall, {c['build_cpu_seconds']:.1f} s CPU, "
                      f"{c.get('processes', 1)} process(es), peak RSS {_size(c.get('build_peak_rss_bytes'))}"),
            ("recall vs exact", "  ".join(f"{k} {v:.3f}" for k, v in recall.items())
             + f"  ({c['queries']['count']} held-out {c['queries']['source']})"),
            ("query", f"{q['single']['median']:.2f} ms single (median of {q['single']['count']}"
                      + (f"; {q['single']['cpu_median']:.2f} ms of CPU" if "cpu_median" in q["single"] else "")
                      + f"), {q['batched_per_query']:.3f} ms/query in a batch of {q['batch']}")]
    if c.get("build_rss_by_phase"):
        phases = c["build_rss_by_phase"]
        rows.append(("memory by phase", ", ".join(f"{name} {_size(p['rss'])}" for name, p in phases.items())
                     + f" (of which file pages at most {_size(max(p['file'] for p in phases.values()))})"))
    if c.get("tuning"):
        ladder = ", ".join(f"{r['value']}: {r['recall@10']:.3f}" for r in c["tuning"]["ladder"])
        rows.append(("tuning (recall@10)", f"chose {c['tuning']['chosen']}; "
                                           f"target {c['tuning'].get('target_recall@10', 0.95)}; {ladder}"))
    if c.get("rsum"):
        r = c["rsum"]
        rows.append(("rsum", f"{r['index']:.2f} through the index vs {r['exact']:.2f} exact ({r['captions']} "
                             f"captions, {r['images']} images sampled; exact ties in the order the search returns "
                             "them, no tie rule: the protocol's numbers come from vsectl eval)"))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _short(path: str | None) -> str:
    """A path relative to the working directory when it lies below it."""
    if not path:
        return "-"
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def results_table(result) -> Table:  # noqa: ANN001 - a SearchResult
    how = result.searched_with
    way = "exact" if how["kind"] == "exact" else f"{how['kind']} index, recall@10 {how.get('recall@10')}"
    table = Table(title=f"“{result.query}” → {result.side} ({way})", title_justify="left")
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
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even when the folder holds an index")] = False,
) -> None:
    """Search a collection with text or image queries: a table (stderr), --json and --sheet (stdout). An embeddings
    folder is searched through its best index when it has one (see `vsectl index --info`).

    With -q or --json (unless -v) stderr stays quiet: --json's stdout is the whole answer."""
    from vsectl.retrieval.query import search_collection

    json_output(as_json)
    side = "captions" if captions else "images"
    results = run_guarded(search_collection, target, list(queries or []), k=k, side=side, images=list(image or []),
                          queries_file=from_file, run=run, checkpoint=checkpoint, device=device, sheet=sheet,
                          verify=verify, exact=exact)
    if not STATE.get("quiet"):
        for result in results:
            err.print(results_table(result))
        if sheet is not None:
            err.print(f"wrote {sheet}", highlight=False)
    if as_json:
        typer.echo(json_text([r.to_dict() for r in results], indent=1, ensure_ascii=False))
    elif STATE.get("quiet"):  # -q: the hits as plain tab-separated lines on stdout (query, rank, score, id, path)
        for result in results:
            for h in result.hits:
                typer.echo("\t".join([result.query, str(h.rank), f"{h.score:.4f}", h.id, h.path or ""]))
    if sheet is not None and not as_json:
        typer.echo(str(sheet))
