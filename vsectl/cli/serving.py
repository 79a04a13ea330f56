"""export and serve: a trained run as ONNX files, and a collection behind a local web page."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vsectl.cli.common import STATE, DeviceOpt, app, err, json_output, run_guarded


@app.command("export")
def export_cli(
    run: Annotated[Path, typer.Argument(help="Run directory or checkpoint folder")],
    out: Annotated[Path, typer.Option(help="Output folder (new, empty, or an earlier export)")],
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    checkpoint: Annotated[str, typer.Option(help="best | last")] = "best",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON on stdout")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder holding other files: replace only the "
                                                        "export's own files, keep the others")] = False,
) -> None:
    """Export the image and text towers as ONNX files (dynamic batch, set size and length), checked with onnxruntime."""
    from vsectl.export import export_onnx

    json_output(as_json)
    manifest = run_guarded(export_onnx, run, out, fmt=fmt, which=checkpoint, force=force)
    if not STATE.get("quiet"):  # -q and --json: only the result on stdout
        _export_table(manifest)
    typer.echo(json.dumps(manifest, indent=2) if as_json else manifest["out"])


def _export_table(manifest: dict) -> None:
    table = Table(title=f"ONNX export of {manifest['run']}", title_justify="left")
    for col in ("tower", "file", "inputs", "max |onnx − torch|"):
        table.add_column(col)
    for tower in ("image", "image_pixels", "text"):
        info = manifest.get(tower)
        if not info:
            continue
        inputs = ", ".join(f"{k} {v}" for k, v in info["inputs"].items())
        table.add_row(tower, info["file"], inputs, f"{manifest['parity']['max_abs_diff'][tower]:.1e}")
    client = manifest["parity"].get("client_text")
    if client:
        table.caption = (f"{manifest['client']}: its text embeddings differ from vsectl's by at most "
                         f"{client['max_abs_diff']:.1e} ({client['queries']} queries of {min(client['tokens'])}–"
                         f"{max(client['tokens'])} tokens)")
    err.print(table)
    for tower, note in manifest.get("notes", {}).items():
        err.print(f"no {tower} tower: {note}", highlight=False)


@app.command("serve")
def serve_cli(
    target: Annotated[Path, typer.Argument(help="Embeddings folder (vsectl embed) or index folder (vsectl index)")],
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default)")] = "127.0.0.1",
    run: Annotated[Path | None, typer.Option(help="Run that encodes the queries [default: the embeddings' run]")]
    = None,
    checkpoint: Annotated[str | None, typer.Option(help="best | last [default: the embeddings' checkpoint]")] = None,
    device: DeviceOpt = "auto",
    allow_host: Annotated[list[str] | None, typer.Option("--allow-host", help="Also answer requests for this host "
                                                          "name, e.g. a reverse proxy's (repeatable)")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Hash the embeddings against meta.json and check every "
                                                          "row first")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even when the folder holds an index")] = False,
    threads: Annotated[int | None, typer.Option(help="Threads of each stage (text encoding, search) [default: all "
                                                     "CPUs for an exact scan, half each with an index]")] = None,
) -> None:
    """Serve a search page and a JSON API (/api/search?q=...&k=10) over a collection; prints the URL. An embeddings
    folder is searched through its best index per side when it has one (`vsectl index`), exactly otherwise."""
    from vsectl.serving import open_server

    server = run_guarded(open_server, target, run=run, checkpoint=checkpoint, host=host, port=port, device=device,
                         allow_hosts=allow_host or [], verify=verify, exact=exact, threads=threads)
    typer.echo(server.url)
    sys.stdout.flush()
    err.print(f"serving {server.engine.emb.n_images} images at {server.url} (Ctrl-C stops)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.close()
