"""Benchmark retrieval (issue #12): embedding throughput against extraction, exact search over a memory-mapped 1M × 512
collection, and faiss IVF / HNSW recall, build and query time.

1. embed. A raw dataset of synthetic 224 px PNGs is extracted with EfficientNet-Lite0 (`vsectl.extract.extract`,
   2 decode workers), then embedded from the same raw images (`vsectl.retrieval.embed(data=...)`, the recipe replayed)
   and from its store (`embed(features=...)`); the image tower alone is timed on a larger synthetic store of 49 × 1280
   fp16 sets (the demo's shape), with the demo's image tower (grid fc + GPO, E = 512, random weights: speed only).
2. exact. An embeddings folder of N × 512 fp32 unit vectors (clustered: 2,000 random centres plus noise, see
   `clustered`); one query through `vsectl.search` against the bare product and top-k (`torch.mv` over the whole map +
   `torch.topk`); a batch of 1,000 queries against one at a time; the peak resident memory a search adds, in a fresh
   process (VmHWM), against the file size.
3. faiss. `build_index(kind="ivf" | "hnsw")` with the defaults, build time, the query time per query (batch of 1,000
   and one at a time) and recall@10 against the exact top-10 of the same 1,000 queries.

    python benchmarks/bench_retrieval.py [--quick] [--n N] [--faiss-n N] [--json benchmarks/results/retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    RESULTS,
    LoadMeter,
    describe,
    fmt_time,
    gemm_tflops,
    machine,
    summary,
    target,
    time_reps,
    write_report,
)

import vsectl
from vsectl.retrieval.embeddings import EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, JsonLinesWriter, NpyAppender

SEED = 0
DIM = 512
CENTRES = 2000
NOISE = 0.5  # noise norm relative to a unit centre
BLOCK = 65536
MODES = {
    "full": {"n": 1_000_000, "faiss_n": 1_000_000, "raw_images": 256, "tower_images": 8192, "queries": 1000,
             "reps": 5},
    "quick": {"n": 100_000, "faiss_n": 50_000, "raw_images": 64, "tower_images": 2048, "queries": 200, "reps": 3},
}


# ------------------------------------------------------------------------------------------------ data


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """n unit vectors: a random centre each, plus Gaussian noise of norm about NOISE, normalised."""
    x = centres[rng.integers(len(centres), size=n)]
    x = x + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * (NOISE / np.sqrt(centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_embeddings(folder: Path, n: int, centres: np.ndarray, seed: int) -> Path:
    """An embeddings folder in the format `vsectl embed` writes, with synthetic vectors and ids (no captions)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = NpyAppender(folder / "images.npy", (n, DIM))
    records = JsonLinesWriter(folder / "images.jsonl")
    for a in range(0, n, BLOCK):
        images.append(clustered(min(BLOCK, n - a), rng, centres))
        for i in range(a, min(a + BLOCK, n)):
            records.write({"id": str(i), "path": None, "caption": None})
    sha = images.close()
    records.close()
    captions = NpyAppender(folder / "captions.npy", (0, DIM))
    cap_sha = captions.close()
    NpyAppender(folder / "cap2img.npy", (0,), dtype=np.int64).close()
    JsonLinesWriter(folder / "captions.jsonl").close()
    meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run": "benchmark", "checkpoint": "none",
            "fingerprint": "benchmark", "embed_dim": DIM, "n_images": n, "n_captions": 0, "images_sha256": sha,
            "captions_sha256": cap_sha, "source": {"kind": "synthetic"}, "n_skipped": 0, "skipped": []}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def raw_dataset(folder: Path, n: int, rng: np.random.Generator) -> Path:
    """n 224 px PNGs (smooth random colour fields, so PNG decoding is not trivially cheap) without captions."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    entries = []
    for k in range(n):
        small = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
        Image.fromarray(small).resize((224, 224), Image.BILINEAR).save(images / f"{k}.png")
        entries.append({"filename": f"{k}.png", "imgid": k, "split": "train", "sentences": []})
    (folder / "dataset.json").write_text(json.dumps({"dataset": "bench", "images": entries}))
    (folder / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "images"}))
    return folder


def demo_tower(recipe: Any) -> Any:
    """A RetrievalModel with the demo's image tower (random weights) and a one-word BiGRU text side."""
    from vsectl.builders import VocabSide, build_model
    from vsectl.config import load_recipe
    from vsectl.data.vocab import build_vocab
    from vsectl.retrieval.model import RetrievalModel

    cfg = load_recipe(Path("recipes/demo.yaml"), ["model.text.encoder=bigru", "model.text.word_dim=32",
                                                  "model.text.cache_states=false", "model.text.freeze_body=false"])
    text = VocabSide(vocab=build_vocab(["a picture"], min_count=1))
    net = build_model(cfg, text).eval()
    return RetrievalModel(run_dir=Path("benchmark"), checkpoint="random", config=cfg, net=net, text=text,
                          device=torch.device("cpu"), fingerprint="benchmark", recipe=recipe)


# ------------------------------------------------------------------------------------------------ 1. embed


def bench_embed(tmp: Path, mode: dict[str, Any]) -> dict[str, Any]:
    from vsectl.data.store import write_store
    from vsectl.extract import extract
    from vsectl.models.backbones import create_backbone
    from vsectl.retrieval.recipe import store_recipe

    rng = np.random.default_rng(SEED)
    raw = raw_dataset(tmp / "raw", mode["raw_images"], rng)
    backbone = create_backbone("efficientnet-lite0")
    t0 = time.perf_counter()
    [store] = extract(backbone, raw, tmp / "feats", "train", workers=2, device="cpu")
    extract_s = time.perf_counter() - t0
    model = demo_tower(store_recipe(store))
    model.backbone  # noqa: B018 - built (and its weights hashed) before the clock starts, as extract's was
    t0 = time.perf_counter()
    vsectl.embed(model, tmp / "emb_raw", data=raw, workers=2)
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vsectl.embed(model, tmp / "emb_feats_small", features=store)
    small_s = time.perf_counter() - t0

    n = mode["tower_images"]
    sets = ((str(i), rng.standard_normal((49, 1280), dtype=np.float32).clip(0, 6)) for i in range(n))  # ReLU6 range
    big = write_store(tmp / "tower.h5", sets, [], [], feat_dim=1280, dtype="float16")
    t0 = time.perf_counter()
    vsectl.embed(model, tmp / "emb_tower", features=big)
    tower_s = time.perf_counter() - t0
    m = mode["raw_images"]
    out = {"raw_images": m, "extract_images_per_s": m / extract_s, "embed_raw_images_per_s": m / raw_s,
           "embed_raw_over_extract_time": raw_s / extract_s, "embed_features_small_images_per_s": m / small_s,
           "tower_images": n, "embed_features_images_per_s": n / tower_s}
    out["tower_over_extract"] = out["embed_features_images_per_s"] / out["extract_images_per_s"]
    return out


# ------------------------------------------------------------------------------------------------ 2. exact


MEMORY_SCRIPT = """
import json, resource, sys, numpy as np, vsectl
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
queries = np.load(sys.argv[2])
vsectl.search(vsectl.open_embeddings(sys.argv[1]), queries[:2], k=10)  # imports and thread pools before the baseline
base = rss('VmRSS:')
emb = vsectl.open_embeddings(sys.argv[1])
vsectl.search(emb, queries[:1], k=10)
one = rss('VmHWM:') - base
vsectl.search(emb, queries, k=10)
print(json.dumps({'baseline_rss': base, 'peak_added_one_query': one, 'peak_added_batch': rss('VmHWM:') - base}))
"""


def bench_exact(folder: Path, queries: np.ndarray, reps: int) -> dict[str, Any]:
    emb = vsectl.open_embeddings(folder)
    matrix = torch.from_numpy(np.load(folder / "images.npy", mmap_mode="r+"))  # the bare baseline's view; no copy
    q1 = queries[:1]
    tq = torch.from_numpy(q1[0].copy())

    def bare() -> None:
        torch.topk(torch.mv(matrix, tq), 10)

    def one() -> None:
        vsectl.search(emb, q1, k=10)

    vsectl.topk(emb.images, queries[:8], 10)  # pages in: every figure is for a warm page cache
    t_bare = time_reps(bare, reps)
    t_one = time_reps(one, reps)
    t_bare2 = time_reps(bare, reps)  # both sides of the pair, so drift in the load hits both
    t_batch = time_reps(lambda: vsectl.search(emb, queries, k=10), max(2, reps // 2))
    sequential = time_reps(lambda: [vsectl.search(emb, queries[i : i + 1], k=10) for i in range(20)], 1, warmup=0)
    per_query_seq = sequential[0] / 20
    per_query_batch = summary(t_batch)["median_s"] / len(queries)
    bare_s = summary(t_bare + t_bare2)
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(folder), str(folder.parent / "queries.npy")],
                          capture_output=True, text=True, check=True)
    mem = json.loads(proc.stdout)
    size = (folder / "images.npy").stat().st_size
    gemm = gemm_tflops(torch.float32, reps=3)["tflops"]["median"]  # the machine's fp32 GEMM rate in this run
    batch_tflops = 2 * emb.n_images * DIM * len(queries) / summary(t_batch)["median_s"] / 1e12
    one_gbs = size / summary(t_one)["median_s"] / 1e9
    return {"n": emb.n_images, "file_bytes": size, "one_query": summary(t_one), "bare_mv_topk": bare_s,
            "one_over_bare": summary(t_one)["median_s"] / bare_s["median_s"], "batch": summary(t_batch),
            "batch_queries": len(queries), "per_query_batch_s": per_query_batch, "per_query_sequential_s":
            per_query_seq, "batch_speedup_per_query": per_query_seq / per_query_batch, "memory": mem,
            "peak_added_over_file": max(mem["peak_added_one_query"], mem["peak_added_batch"]) / size,
            "gemm_fp32_tflops": gemm, "batch_tflops": batch_tflops, "one_query_gb_per_s": one_gbs}


# ------------------------------------------------------------------------------------------------ 3. faiss


def bench_faiss(folder: Path, queries: np.ndarray, kind: str) -> dict[str, Any]:
    emb = vsectl.open_embeddings(folder)
    truth = vsectl.topk(emb.images, queries, 10)[1]
    t0 = time.perf_counter()
    path = vsectl.build_index(emb, kind)
    build_s = time.perf_counter() - t0
    index = vsectl.open_index(path)
    t0 = time.perf_counter()
    _, found = index.search_vectors(queries, 10)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(min(100, len(queries))):
        index.search_vectors(queries[i : i + 1], 10)
    single_s = (time.perf_counter() - t0) / min(100, len(queries))
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist(), strict=True)]))
    return {"kind": kind, "n": emb.n_images, "params": index.params, "build_s": build_s,
            "per_query_batch_s": batch_s / len(queries), "per_query_single_s": single_s, "recall_at_10": recall}


# ------------------------------------------------------------------------------------------------ report


def render(report: dict[str, Any]) -> str:
    lines = []
    if "embed" in report:
        e = report["embed"]
        lines += [
            f"embed ({e['raw_images']} PNGs 224 px, EfficientNet-Lite0 fp32, 2 workers): extract "
            f"{e['extract_images_per_s']:.1f} images/s, embed from the raw images {e['embed_raw_images_per_s']:.1f} "
            f"images/s ({e['embed_raw_over_extract_time']:.2f}× extract's time), embed from their store "
            f"{e['embed_features_small_images_per_s']:.0f} images/s",
            f"image tower from a store ({e['tower_images']} sets 49×1280 fp16, demo tower E=512): "
            f"{e['embed_features_images_per_s']:.0f} images/s = {e['tower_over_extract']:.0f}× extract",
        ]
    if "exact" in report:
        x = report["exact"]
        lines += [
            f"exact search, {x['n']:,} × {DIM} fp32 memmap ({x['file_bytes'] / 2**30:.2f} GiB, warm page cache):",
            f"  one query {fmt_time(x['one_query'])} vs bare torch.mv + topk {fmt_time(x['bare_mv_topk'])}: "
            f"{x['one_over_bare']:.2f}×",
            f"  batch of {x['batch_queries']}: {x['per_query_batch_s'] * 1e3:.2f} ms/query vs one at a time "
            f"{x['per_query_sequential_s'] * 1e3:.1f} ms/query: {x['batch_speedup_per_query']:.1f}× faster/query",
            f"  the batch ran at {x['batch_tflops'] * 1e3:.1f} GFLOP/s (a 2048² fp32 torch.mm here: "
            f"{x['gemm_fp32_tflops'] * 1e3:.1f}); one query streamed the map at {x['one_query_gb_per_s']:.1f} GB/s",
            f"  peak memory added: one query {x['memory']['peak_added_one_query'] / 2**20:.0f} MiB, batch "
            f"{x['memory']['peak_added_batch'] / 2**20:.0f} MiB = {x['peak_added_over_file']:.2f}× the file",
        ]
    for f in report["faiss"]:
        lines.append(f"faiss {f['kind']} over {f['n']:,} ({f['params']}): build {f['build_s']:.1f} s, query "
                     f"{f['per_query_batch_s'] * 1e3:.3f} ms/query in a batch, {f['per_query_single_s'] * 1e3:.2f} "
                     f"ms alone, recall@10 {f['recall_at_10']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=None, help="exact-search collection size")
    parser.add_argument("--faiss-n", type=int, default=None, help="faiss collection size (the first N of the same)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["embed", "exact", "faiss"])
    parser.add_argument("--json", type=Path, default=RESULTS / "retrieval.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = dict(MODES["quick" if args.quick else "full"])
    mode["n"] = args.n or mode["n"]
    mode["faiss_n"] = min(args.faiss_n or mode["faiss_n"], mode["n"])
    report: dict[str, Any] = {"machine": machine(), "mode": mode, "load_average_before": os.getloadavg(),
                              "nice": os.nice(0)}
    meter = LoadMeter()
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        tmp = Path(tmp)
        if "embed" not in args.skip:
            report["embed"] = bench_embed(tmp, mode)
        rng = np.random.default_rng(SEED)
        centres = rng.standard_normal((CENTRES, DIM), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        queries = clustered(mode["queries"], np.random.default_rng(SEED + 1), centres)
        np.save(tmp / "queries.npy", queries)
        t0 = time.perf_counter()
        folder = make_embeddings(tmp / "emb", mode["n"], centres, SEED + 2)
        report["make_embeddings_s"] = time.perf_counter() - t0
        if "exact" not in args.skip:
            report["exact"] = bench_exact(folder, queries, mode["reps"])
        report["faiss"] = []
        if "faiss" not in args.skip:
            small = folder
            if mode["faiss_n"] < mode["n"]:
                small = make_embeddings(tmp / "emb_faiss", mode["faiss_n"], centres, SEED + 2)
            for kind in ("ivf", "hnsw"):
                report["faiss"].append(bench_faiss(small, queries, kind))
    report["cpu_during_run"] = meter.read()
    report["load_average_after"] = os.getloadavg()
    targets = []
    if "embed" in report:
        e = report["embed"]
        targets += [target("embed from features ≥ 20× extract images/s", e["tower_over_extract"], ">=", 20, "×"),
                    target("embed from raw images ≤ 1.1× extract's time", e["embed_raw_over_extract_time"], "<=",
                           1.1, "×")]
    if "exact" in report:
        x = report["exact"]
        targets += [target("one query ≤ 1.5× bare matvec + top-k", x["one_over_bare"], "<=", 1.5, "×"),
                    target("batch of 1000 ≥ 20× faster per query", x["batch_speedup_per_query"], ">=", 20, "×"),
                    target("peak memory added ≤ 1.2× the file", x["peak_added_over_file"], "<=", 1.2, "×")]
    targets += [target(f"faiss {f['kind']} recall@10 ≥ 0.95", f["recall_at_10"], ">=", 0.95) for f in report["faiss"]]
    report["targets"] = targets
    write_report(args.json, report)
    print(describe(report["machine"]))
    print(f"nice {report['nice']}, load average before {report['load_average_before'][0]:.2f}, other processes "
          f"{report['cpu_during_run']['others_cores']:.2f} cores during the run")
    print(render(report))
    from common import render_targets

    print(render_targets(targets))


if __name__ == "__main__":
    main()
