"""Benchmark retrieval ranking: vsectl.scoring.metrics against the classic float64 argsort loop.

At the COCO 5K (5,000 × 25,000) and Flickr30K 1K (1,000 × 5,000) sizes, with 1024-d L2-normalised random embeddings,
it times the bare similarity product, our ``rank_retrieval`` + ``recall_metrics``, and the loop reference (similarity
and ranking timed separately), measures the peak memory each adds, checks both give identical metrics, and writes JSON.

    PYTHONPATH=. python benchmarks/bench_ranking.py [--quick] [--json benchmarks/results/ranking.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vsectl.scoring.metrics import METRIC_KEYS, recall_metrics
from vsectl.scoring.ranking import rank_retrieval

SIZES = {"coco5k": 5000, "f30k": 1000}  # images; both protocols have 5 captions per image
CAPS_PER_IMAGE = 5
DIM = 1024
SIGNAL = 0.1  # weight of the GT image in each caption: F30K-size rsum ≈ 480, near published models
SEED = 0
TARGET_RANKING_SPEEDUP = 20.0  # our ranking vs the loop's ranking, at least
TARGET_EVAL_OVER_PRODUCT = 1.3  # our whole evaluation ÷ the bare similarity product, at most
TARGET_ADDED_MB = 400.0  # peak memory our evaluation adds, at most
REPS = {"full": {"ours": 7, "loop": 3}, "quick": {"ours": 3, "loop": 1}}  # "ours" also sets the product's


def make_embeddings(n_img: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random unit image embeddings (N, DIM) and captions (5N, DIM) that lean towards their image; cap2img (5N,)."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, DIM, generator=g), dim=-1)
    cap2img = torch.arange(n_img).repeat_interleave(CAPS_PER_IMAGE)
    noise = F.normalize(torch.randn(cap2img.numel(), DIM, generator=g), dim=-1)
    cap = F.normalize(SIGNAL * img[cap2img] + noise, dim=-1)
    return img, cap, cap2img


def bare_product_chunked(img: torch.Tensor, cap: torch.Tensor, chunk_size: int) -> None:
    """img @ capᵀ in fp32, chunked like rank_retrieval, into one reused buffer: the floor our evaluation can reach."""
    buf = torch.empty(min(chunk_size, img.shape[0]), cap.shape[0])
    for r0 in range(0, img.shape[0], chunk_size):
        r1 = min(r0 + chunk_size, img.shape[0])
        torch.mm(img[r0:r1], cap.T, out=buf[: r1 - r0])


def bare_product_whole(img: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    return img @ cap.T


def ours(img: torch.Tensor, cap: torch.Tensor, cap2img: torch.Tensor, chunk_size: int) -> dict:
    i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=chunk_size)
    return {"metrics": recall_metrics(i2t, t2i), "i2t": i2t.numpy(), "t2i": t2i.numpy()}


def loop_similarity(img: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """The research code's similarity: one full float64 (N, C) matrix."""
    return np.dot(img.astype(np.float64), cap.astype(np.float64).T)


def loop_ranking(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The research code's ranking: a full argsort per query and a search for the ground truth, query by query."""
    n_img = sims.shape[0]
    i2t = np.zeros(n_img, dtype=np.int64)
    for i in range(n_img):
        inds = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(inds == j)[0][0] for j in range(CAPS_PER_IMAGE * i, CAPS_PER_IMAGE * (i + 1)))
    t2i = np.zeros(CAPS_PER_IMAGE * n_img, dtype=np.int64)
    for i in range(n_img):
        block = sims[:, CAPS_PER_IMAGE * i : CAPS_PER_IMAGE * (i + 1)].T  # (5, N): this image's captions as queries
        for k in range(CAPS_PER_IMAGE):
            inds = np.argsort(block[k])[::-1]
            t2i[CAPS_PER_IMAGE * i + k] = np.where(inds == i)[0][0]
    return i2t, t2i


def timed_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> tuple[dict[str, list[float]], dict]:
    """Time each function ``reps`` times, round-robin, so a burst of other load hits every method alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict = {}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return times, results


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


# --- peak memory ------------------------------------------------------------------------------------------------------
# Each method runs once in a fresh subprocess. After the inputs are built and a tiny warm-up call has initialised BLAS
# and the allocators, writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM) to the current
# RSS. The method then runs once and the memory it added is VmHWM minus the RSS at the reset. Unlike tracemalloc this
# sees every allocation (torch's C++ allocator, BLAS workspaces, numpy), and unlike sampling RSS it cannot miss a short
# peak. A fresh process keeps earlier methods' freed-but-cached memory out of the figure, and a fixed glibc mmap
# threshold plus malloc_trim stop freed input-building temporaries from staying resident and being reused unseen.


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(method: str, n_img: int, chunk_size: int) -> None:
    img, cap, cap2img = make_embeddings(n_img)
    small = make_embeddings(16, seed=1)
    img_np, cap_np = img.numpy(), cap.numpy()
    ours(*small, chunk_size=chunk_size)
    loop_ranking(loop_similarity(small[0].numpy(), small[1].numpy()))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base_kb = _status_kb("VmRSS")
    if method == "ours":
        ours(img, cap, cap2img, chunk_size)
    elif method == "product":
        bare_product_chunked(img, cap, chunk_size)
    elif method == "loop":
        loop_ranking(loop_similarity(img_np, cap_np))
    print(json.dumps({"added_mb": (_status_kb("VmHWM") - base_kb) / 1024}))


def peak_added_mb(method: str, n_img: int, chunk_size: int) -> float | None:
    cmd = [sys.executable, __file__, "--_memory-child", method, str(n_img), "--chunk-size", str(chunk_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # large blocks go back to the OS when freed
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)  # keeps PYTHONPATH and the working directory
    if proc.returncode != 0:
        print(f"memory measurement for {method} failed:\n{proc.stderr}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["added_mb"]


# --- driver -----------------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu_model": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": os.getloadavg(),  # other work on the machine inflates every figure; check it was idle
    }


def bench_size(name: str, n_img: int, reps: dict, chunk_size: int) -> dict:
    img, cap, cap2img = make_embeddings(n_img)
    img_np, cap_np = img.numpy(), cap.numpy()
    ours(img[:64], cap[:320], cap2img[:320], chunk_size)  # warm-up: thread pool, BLAS and allocator start-up

    times, results = timed_interleaved(
        {
            "product": lambda: bare_product_chunked(img, cap, chunk_size),
            "whole": lambda: bare_product_whole(img, cap),
            "ours": lambda: ours(img, cap, cap2img, chunk_size),
        },
        reps["ours"],
    )
    t_product, t_whole, t_ours, res = times["product"], times["whole"], times["ours"], results["ours"]
    t_loop_sim, t_loop_rank, loop_ranks = [], [], None
    for _ in range(reps["loop"]):
        t0 = time.perf_counter()
        sims = loop_similarity(img_np, cap_np)
        t1 = time.perf_counter()
        loop_ranks = loop_ranking(sims)
        t_loop_sim.append(t1 - t0)
        t_loop_rank.append(time.perf_counter() - t1)
        del sims
    loop_metrics = recall_metrics(*loop_ranks)

    product = min(statistics.median(t_product), statistics.median(t_whole))  # the faster one: a strict baseline
    ours_med = statistics.median(t_ours)
    ours_rank = ours_med - statistics.median(t_product)  # counting cost on top of the same chunked product
    loop_rank = statistics.median(t_loop_rank)
    mismatch = {k: int((res[k] != r).sum()) for k, r in zip(("i2t", "t2i"), loop_ranks, strict=True)}
    identical = all(res["metrics"][k] == loop_metrics[k] for k in METRIC_KEYS)
    return {
        "n_images": n_img,
        "n_captions": cap.shape[0],
        "dim": DIM,
        "chunk_size": chunk_size,
        "product_chunked": summary(t_product),
        "product_whole": summary(t_whole),
        "ours_eval": summary(t_ours),
        "loop_similarity": summary(t_loop_sim),
        "loop_ranking": summary(t_loop_rank),
        "ours_ranking_only_s": ours_rank,
        "ranking_speedup": loop_rank / ours_rank if ours_rank > 0 else float("inf"),
        "ranking_speedup_vs_whole_eval": loop_rank / ours_med,
        "eval_over_product": ours_med / product,
        "added_mb": {m: peak_added_mb(m, n_img, chunk_size) for m in ("ours", "product", "loop")},
        "metrics_ours": res["metrics"],
        "metrics_loop": loop_metrics,
        "rank_mismatches": mismatch,
        "metrics_identical": identical,
    }


def fmt(s: dict) -> str:
    return f"{s['median_s']:8.3f} s [{s['min_s']:.3f}–{s['max_s']:.3f}]"


def render(results: dict) -> str:
    rows = [
        ("bare product img@capᵀ, chunked (fp32)", lambda r: fmt(r["product_chunked"])),
        ("bare product img@capᵀ, whole (fp32)", lambda r: fmt(r["product_whole"])),
        ("ours: rank_retrieval + recall_metrics", lambda r: fmt(r["ours_eval"])),
        ("  ours ranking only (eval − chunked product)", lambda r: f"{r['ours_ranking_only_s']:8.3f} s"),
        ("loop: float64 similarity", lambda r: fmt(r["loop_similarity"])),
        ("loop: argsort ranking", lambda r: fmt(r["loop_ranking"])),
        ("ranking speed-up (loop ranking ÷ ours ranking)", lambda r: f"{r['ranking_speedup']:8.1f} ×"),
        ("  loop ranking ÷ our whole evaluation", lambda r: f"{r['ranking_speedup_vs_whole_eval']:8.1f} ×"),
        ("our evaluation ÷ bare product (faster one)", lambda r: f"{r['eval_over_product']:8.3f} ×"),
        ("memory added: ours", lambda r: _mb(r["added_mb"]["ours"])),
        ("memory added: bare chunked product", lambda r: _mb(r["added_mb"]["product"])),
        ("memory added: loop", lambda r: _mb(r["added_mb"]["loop"])),
        ("rsum ours / loop", lambda r: f"{r['metrics_ours']['rsum']:.2f} / {r['metrics_loop']['rsum']:.2f}"),
        ("metrics identical (rank mismatches i2t, t2i)", lambda r: _same(r)),
    ]
    names = list(results)
    head = f"{'':48}" + "".join(f"{n + ' ' + _shape(results[n]):>34}" for n in names)
    lines = [head, "-" * len(head)]
    lines += [f"{label:48}" + "".join(f"{cell(results[n]):>34}" for n in names) for label, cell in rows]
    return "\n".join(lines)


def _shape(r: dict) -> str:
    return f"({r['n_images']}×{r['n_captions']})"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:8.1f} MB"


def _same(r: dict) -> str:
    return f"{'yes' if r['metrics_identical'] else 'NO'} ({r['rank_mismatches']['i2t']}, {r['rank_mismatches']['t2i']})"


def targets(results: dict) -> list[dict]:
    out = []
    for name, r in results.items():
        checks = [
            ("ranking speed-up", r["ranking_speedup"], ">=", TARGET_RANKING_SPEEDUP),
            ("evaluation ÷ bare product", r["eval_over_product"], "<=", TARGET_EVAL_OVER_PRODUCT),
            ("memory added (MB)", r["added_mb"]["ours"], "<=", TARGET_ADDED_MB),
        ]
        for label, value, op, limit in checks:
            met = value is not None and (value >= limit if op == ">=" else value <= limit)
            out.append({"size": name, "target": label, "value": value, "op": op, "limit": limit, "met": met})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/ranking.json"))
    parser.add_argument("--chunk-size", type=int, default=1024, help="image rows per chunk (rank_retrieval default)")
    parser.add_argument("--_memory-child", nargs=2, metavar=("METHOD", "N_IMG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        memory_child(args._memory_child[0], int(args._memory_child[1]), args.chunk_size)
        return

    reps = REPS["quick" if args.quick else "full"]
    load_before = os.getloadavg()
    results = {}
    for name, n_img in SIZES.items():
        print(f"benchmarking {name} ({n_img} images, {reps}) ...", file=sys.stderr, flush=True)
        results[name] = bench_size(name, n_img, reps, args.chunk_size)
    checks = targets(results)
    print(render(results))
    print()
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        verdict = "met" if c["met"] else "MISSED"
        print(f"target {c['size']:7} {c['target']:28} {value:>9} {c['op']} {c['limit']:<6} {verdict}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "load_average_before": load_before, "quick": args.quick, "reps": reps}
    report |= {"results": results, "targets": checks}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nload average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; wrote {args.json}")
    if not all(r["metrics_identical"] for r in results.values()):
        raise SystemExit("ours and the loop reference disagree on the metrics")


if __name__ == "__main__":
    main()
