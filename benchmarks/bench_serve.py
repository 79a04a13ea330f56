"""Serving figures: the JSON endpoint's latency under concurrent loopback clients, and ONNX vs torch tower speed.

    python benchmarks/bench_serve.py [--quick] [--json FILE] [--threads N] [--rows N] [--seconds S]

serve: a tiny run trained on the toy set with 512-d embeddings, and an embeddings folder of `--rows` random unit
vectors (1,000,000 × 512 fp32 = 2 GB, memory-mapped) recorded as that run's. `vsectl serve`'s server runs in its own
process; 8 client threads send `/api/search?q=...&k=10` over keep-alive loopback connections for `--seconds` each
(bounded by a request cap too). Measured side by side: the server as shipped (concurrent queries coalesced into one
scan) and with batching off (each request scans alone), plus one client alone, and the bare matrix-vector product
plus top-k of one query in this process for scale.

onnx: the paper-size towers (region features 36 × 2048 → 1024 with GPO; BiGRU text 300 → 1024 with GPO), random
weights, one batch of 128, torch vs onnxruntime on the same thread count.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import LoadMeter, describe, fmt_time, machine, summary, time_reps, timed_interleaved, write_report

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = 8
MAX_REQUESTS = 200_000  # per phase, whatever the duration
QUERIES = ["a red apple", "a dog on the grass", "two people next to a car", "a small bird", "a blue ball",
           "a cat sitting on a chair", "a tree by the water", "a man riding a bike"]


# --- ONNX vs torch ----------------------------------------------------------------------------------------------------


def bench_onnx(reps: int, batch: int = 128) -> dict[str, Any]:
    from vsectl.export import _export_graph, _session, require_onnx
    from vsectl.models.exportable import ImageTower, TextTower
    from vsectl.models.image_encoders import RegionEncoder
    from vsectl.models.pooling.gpo import GPO
    from vsectl.models.text_encoders import BiGRUTextEncoder

    _, ort = require_onnx()
    gen = torch.Generator().manual_seed(0)
    image = RegionEncoder(2048, 1024, GPO(), mlp_hidden=1024).eval()
    text = BiGRUTextEncoder(10_000, 300, 1024, GPO()).eval()
    feats, set_lengths = torch.randn(batch, 36, 2048, generator=gen), torch.full((batch,), 36)
    set_lengths[: batch // 2] = torch.randint(10, 37, (batch // 2,), generator=gen)  # mixed set sizes
    tokens, token_lengths = torch.randint(4, 10_000, (batch, 16), generator=gen), torch.randint(6, 17, (batch,),
                                                                                                 generator=gen)
    token_lengths[0] = 16
    out: dict[str, Any] = {"batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        for name, enc, tower, data, lengths, names in (
            ("image 36×2048 → 1024", image, ImageTower(image), feats, set_lengths, ("features", "lengths")),
            ("text BiGRU 16 tokens → 1024", text, TextTower(text), tokens, token_lengths, ("tokens", "lengths")),
        ):
            path = Path(tmp) / "tower.onnx"
            _export_graph(tower, (data[:2], lengths[:2].clamp(max=data.size(1))), path, names, "width")
            session = _session(ort, path)
            feed = {names[0]: data.numpy(), names[1]: lengths.numpy()}

            def run_torch(enc: Any = enc, data: torch.Tensor = data, lengths: torch.Tensor = lengths) -> None:
                with torch.no_grad():
                    enc(data, lengths)

            times = timed_interleaved({"torch": run_torch, "onnxruntime": lambda s=session, f=feed: s.run(None, f)},
                                      reps=reps, warmup=2)
            with torch.no_grad():
                diff = float(np.abs(session.run(None, feed)[0] - enc(data, lengths)[0].numpy()).max())
            t, o = summary(times["torch"]), summary(times["onnxruntime"])
            out[name] = {"torch": t, "onnxruntime": o, "onnx_speedup": t["median_s"] / o["median_s"],
                         "max_abs_diff": diff}
    return out


# --- serve latency ----------------------------------------------------------------------------------------------------


def write_random_embeddings(run: Path, out: Path, rows: int, seed: int = 0, block: int = 65_536) -> Path:
    """An embeddings folder (the layout `vsectl embed` writes) of `rows` random unit vectors, recorded as `run`'s."""
    from vsectl.retrieval import load
    from vsectl.retrieval.embeddings import EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, JsonLinesWriter, NpyAppender

    model = load(run, device="cpu")
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = NpyAppender(out / "images.npy", (rows, model.embed_dim))
    records = JsonLinesWriter(out / "images.jsonl")
    for a in range(0, rows, block):
        x = rng.standard_normal((min(block, rows - a), model.embed_dim), dtype=np.float32)
        images.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        for i in range(a, a + x.shape[0]):
            records.write({"id": f"img{i:07d}", "path": None, "caption": f"random image {i}"})
    images_sha = images.close()
    records.close()
    captions = NpyAppender(out / "captions.npy", (0, model.embed_dim))
    cap2img = NpyAppender(out / "cap2img.npy", (0,), dtype=np.int64)
    texts = JsonLinesWriter(out / "captions.jsonl")
    captions_sha = captions.close()
    cap2img.close()
    texts.close()
    meta = {"format": EMBEDDINGS_FORMAT, "version": EMBEDDINGS_VERSION, "run": str(model.run_dir),
            "checkpoint": model.checkpoint, "fingerprint": model.fingerprint, "embed_dim": model.embed_dim,
            "source": {"kind": "random", "path": None, "split": None}, "n_images": rows, "n_captions": 0,
            "n_skipped": 0, "skipped": [], "images_sha256": images_sha, "captions_sha256": captions_sha}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def make_collection(work: Path, rows: int, dim: int = 512) -> tuple[Path, Path]:
    """A tiny 512-d run on the toy set and an embeddings folder of `rows` random unit vectors recorded as its own."""
    from vsectl.config import load_recipe
    from vsectl.data.toy import make_toy_dataset
    from vsectl.training import train

    toy = work / "toy"
    make_toy_dataset(toy, n_train=120, n_dev=30, n_test=30, seed=0)
    cfg = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"data.root={toy}", "train.epochs=1", f"model.embed_dim={dim}",
                                                       "name=serve_bench"])
    run = train(cfg, work / "runs", device="cpu")
    emb = write_random_embeddings(run, work / "emb", rows=rows, seed=0)
    return run, emb


def start_server(emb: Path, batching: bool, threads: int) -> tuple[subprocess.Popen, str]:
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[3])); from vsectl.serving import open_server; "
            "s = open_server(sys.argv[1], port=0, device='cpu', batching=sys.argv[2] == '1'); "
            "print(s.url, flush=True); s.serve_forever()")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", code, str(emb), "1" if batching else "0",
                             str(threads)], stdout=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, url


def load_phase(url: str, clients: int, seconds: float, k: int = 10) -> dict[str, Any]:
    """`clients` threads, each on one keep-alive connection, sending searches until the time or request cap is hit."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.monotonic() + seconds
    cap = MAX_REQUESTS // clients

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        n = 0
        while time.monotonic() < stop_at and n < cap:
            q = QUERIES[(c + n) % len(QUERIES)].replace(" ", "+")
            t0 = time.perf_counter()
            conn.request("GET", f"/api/search?q={q}&k={k}")
            response = conn.getresponse()
            body = response.read()
            latencies[c].append(time.perf_counter() - t0)
            if response.status != 200 or len(json.loads(body)["hits"]) != k:
                errors[c] += 1
            n += 1
        conn.close()

    meter = LoadMeter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    every = sorted(x for lat in latencies for x in lat)
    return {"clients": clients, "requests": len(every), "errors": sum(errors), "wall_s": wall,
            "requests_per_s": len(every) / wall, "p50_ms": 1e3 * every[len(every) // 2],
            "p99_ms": 1e3 * every[min(len(every) - 1, int(0.99 * len(every)))], "mean_ms": 1e3 * statistics.mean(every),
            "cpu": meter.read()}


def bare_topk(emb_dir: Path, reps: int) -> dict[str, Any]:
    from vsectl.retrieval import open_embeddings, topk

    emb = open_embeddings(emb_dir)
    q = np.random.default_rng(1).standard_normal(emb.dim).astype(np.float32)
    q /= np.linalg.norm(q)
    return summary(time_reps(lambda: topk(emb.images, q, 10), reps, warmup=1))


def bench_serve(rows: int, seconds: float, threads: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vsectl-bench-serve-", dir=os.environ.get("VSECTL_BENCH_TMP")) as tmp:
        t0 = time.perf_counter()
        _, emb = make_collection(Path(tmp), rows)
        out: dict[str, Any] = {"rows": rows, "dim": 512, "k": 10, "seconds_per_phase": seconds,
                               "setup_s": time.perf_counter() - t0, "bare_topk_one_query": bare_topk(emb, reps)}
        for batching in (True, False):
            proc, url = start_server(emb, batching, threads)
            try:
                load_phase(url, 1, 2.0)  # warm the page cache and the encoder
                label = "batched" if batching else "unbatched"
                out[f"{label} {CLIENTS} clients"] = load_phase(url, CLIENTS, seconds)
                if batching:
                    out["batched 1 client"] = load_phase(url, 1, seconds / 2)
            finally:
                proc.terminate()
                proc.wait(10)
    return out


def render(report: dict[str, Any]) -> str:
    lines = [describe(report["machine"])]
    if "onnx" in report:
        lines.append(f"\nONNX vs torch, batch {report['onnx']['batch']} (median [min–max])")
        for name, r in report["onnx"].items():
            if isinstance(r, dict):
                lines.append(f"  {name:30} torch {fmt_time(r['torch'])}   onnxruntime {fmt_time(r['onnxruntime'])}"
                             f"   ×{r['onnx_speedup']:.2f}   max diff {r['max_abs_diff']:.1e}")
    if "serve" in report:
        s = report["serve"]
        lines.append(f"\nserve: {s['rows']:,} × {s['dim']} fp32, k = {s['k']}, "
                     f"{s['seconds_per_phase']:.0f} s per phase")
        lines.append(f"  bare matrix-vector product + top-k, one query: {fmt_time(s['bare_topk_one_query'])}")
        for name, r in s.items():
            if isinstance(r, dict) and "p50_ms" in r:
                lines.append(f"  {name:22} p50 {r['p50_ms']:8.1f} ms   p99 {r['p99_ms']:8.1f} ms   "
                             f"{r['requests_per_s']:7.1f} req/s   {r['requests']} requests, {r['errors']} errors, "
                             f"other processes {r['cpu']['others_cores']:.2f} cores")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 10 s phases, fewer repetitions")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--only", nargs="+", choices=["onnx", "serve"], default=["onnx", "serve"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    report: dict[str, Any] = {"machine": machine(), "load_average_before": os.getloadavg(), "quick": args.quick}
    meter = LoadMeter()
    if "onnx" in args.only:
        report["onnx"] = bench_onnx(reps=3 if args.quick else 10)
    if "serve" in args.only:
        rows = args.rows or (100_000 if args.quick else 1_000_000)
        seconds = args.seconds or (10.0 if args.quick else 30.0)
        report["serve"] = bench_serve(rows, seconds, threads, reps=3 if args.quick else 10)
    report["cpu_during_run"] = meter.read()
    report["load_average_after"] = os.getloadavg()
    print(render(report))
    if args.json:
        write_report(args.json, report)


if __name__ == "__main__":
    main()
