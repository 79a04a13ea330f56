"""Tar shards in: embed and extract from webdataset shards against extract from the same JPEG files, and the reader.

    python benchmarks/bench_shards.py --run runs/demo [--images 128] [--rounds 2] [--json FILE]

The same `--images` JPEGs (256 px smooth colour fields, one caption each) are written as a raw dataset folder and as
tar shards of 32. Measured in interleaved rounds, each into a fresh folder: `extract` from the folder (the baseline),
`extract --shards`, `embed --shards` with the run (its backbone replayed, then its towers) and `embed --data` from
the folder; images/s of each, and embed-from-shards over extract. The reader alone: samples/s of
`vsectl.data.tar_shards.read_shard` against the `webdataset` package's pipeline over the same shards (no decoding),
when that package is installed.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import LoadMeter, describe, machine, render_targets, target, write_report

ROOT = Path(__file__).resolve().parent.parent
PER_SHARD = 32


def make_inputs(folder: Path, n: int) -> tuple[Path, Path]:
    from PIL import Image

    from vsectl.data.tar_shards import write_tar_shards

    rng = np.random.default_rng(0)
    raw, images, samples, entries = folder / "raw", folder / "raw" / "images", [], []
    images.mkdir(parents=True)
    for k in range(n):
        small = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((256, 256), Image.BILINEAR).save(buf, format="JPEG", quality=90)
        (images / f"{k:05d}.jpg").write_bytes(buf.getvalue())
        caption = f"picture number {k}"
        entries.append({"filename": f"{k:05d}.jpg", "imgid": k, "split": "train", "sentences": [{"raw": caption}]})
        samples.append((f"{k:05d}", {"jpg": buf.getvalue(), "txt": caption.encode()}))
    (raw / "dataset.json").write_text(json.dumps({"dataset": "bench", "images": entries}))
    (raw / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "images"}))
    write_tar_shards(samples, folder / "shards", per_shard=PER_SHARD)
    return raw, folder / "shards"


def one_round(run: Path, raw: Path, shards: Path, work: Path, workers: int) -> dict[str, float]:
    import vsectl
    from vsectl.extract import extract

    model = vsectl.load(run, device="cpu")
    model.backbone  # noqa: B018 - built before the clocks start, as extract builds its own first
    recipe = model.recipe
    jobs = {
        "extract (files)": lambda out: extract(recipe.backbone, raw, out, "train", workers=workers, device="cpu",
                                               size=recipe.input_size),
        "extract --shards": lambda out: extract(recipe.backbone, None, out, "train", shards=shards, workers=workers,
                                                device="cpu", size=recipe.input_size),
        "embed --shards": lambda out: vsectl.embed(model, out, shards=shards, workers=workers),
        "embed --data": lambda out: vsectl.embed(model, out, data=raw, workers=workers),
    }
    seconds = {}
    for name, job in jobs.items():
        out = work / name.replace(" ", "_").replace("-", "")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        job(out)
        seconds[name] = time.perf_counter() - start
    return seconds


def reader_rates(shards: Path, rounds: int) -> dict[str, Any]:
    from vsectl.data.tar_shards import read_shard, resolve_shards

    files = resolve_shards(shards)
    readers = {"vsectl read_shard": lambda: sum(1 for f in files for _ in read_shard(f))}
    try:
        import webdataset

        urls = [str(f) for f in files]
        readers["webdataset 1.0.2"] = lambda: sum(1 for _ in webdataset.WebDataset(urls, shardshuffle=False,
                                                                                  empty_check=False))
    except ImportError:
        pass
    times: dict[str, list[float]] = {k: [] for k in readers}
    counts = {}
    for _ in range(rounds * 5):
        for name, fn in readers.items():
            start = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: {"samples": counts[name], "samples_per_s": counts[name] / statistics.median(t)}
            for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "shards.json")
    args = p.parse_args()
    report: dict[str, Any] = {"machine": machine(), "images": args.images}
    print(describe(report["machine"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="vsectl-bench-shards-") as tmp:
        raw, shards = make_inputs(Path(tmp), args.images)
        meter = LoadMeter()
        rounds = [one_round(args.run, raw, shards, Path(tmp), args.workers) for _ in range(args.rounds)]
        report["load"] = meter.read()
        report["seconds"] = {k: [r[k] for r in rounds] for k in rounds[0]}
        report["images_per_s"] = {k: args.images / statistics.median(v) for k, v in report["seconds"].items()}
        report["reader"] = reader_rates(shards, args.rounds)
    rate = report["images_per_s"]
    report["embed_shards_over_extract"] = rate["embed --shards"] / rate["extract (files)"]
    report["targets"] = [target("embed --shards images/s over extract's", report["embed_shards_over_extract"], ">=",
                                0.9)]
    for name, r in rate.items():
        print(f"{name:18} {r:7.2f} images/s  (rounds: {', '.join(f'{s:.1f} s' for s in report['seconds'][name])})")
    for name, r in report["reader"].items():
        print(f"reader {name:18} {r['samples_per_s']:9.0f} samples/s ({r['samples']} samples)")
    print(f"load: other processes used {report['load']['others_cores']:.2f} of the cores")
    print(render_targets(report["targets"]))
    write_report(args.json, report)


if __name__ == "__main__":
    main()
