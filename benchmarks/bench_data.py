"""Benchmark the training data path: loader throughput and the peak memory of the whole process tree (spec §3, §4, §9).

It writes a precomputed feature set of about 10 GB (36 × 2048 float32 regions, 5 captions per image) twice, as a SCAN
precomp `.npy` and as the vsectl HDF5 store, in a temporary folder (removed afterwards; written in chunks, never held in
RAM), and iterates one epoch of the real pipeline over each: `load_split` → `vsectl.training.make_loader`
(PairDataset with region drop p = 0.2 and BiGRU caption tokenisation with augmentation, EpochBatchSampler, DataLoader
with 2 workers, collate_pairs), with no model attached, so the figure is what the pipeline can deliver.

Memory: a thread samples every process of the tree (main + workers) every 0.2 s: the sum of VmRSS (what the target
counts), of PSS (shared pages split among their users, so copy-on-write pages of the forked workers count once) and of
the anonymous + shared-memory PSS (what the pipeline really allocates, without file pages of a memory map).

Page cache: a freshly written file sits in the page cache. Before a "cold-ish" epoch the files are fsync'ed and dropped
from the cache with posix_fadvise(DONTNEED) (no root needed; `fincore` confirms the resident fraction); the following
"warm" pass reads from the cache.

    python benchmarks/bench_data.py [--quick] [--size-gb 10] [--json benchmarks/results/data.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, LoadMeter, describe, machine, read_json, render_targets, target, write_report

from vsectl.builders import VocabSide
from vsectl.config import load_recipe
from vsectl.data.features import NpyFeatures
from vsectl.data.sources import load_split
from vsectl.data.store import StoreWriter
from vsectl.data.vocab import SPECIALS, Vocab
from vsectl.runtime import bf16_pays
from vsectl.training import make_loader

REGIONS, FEAT_DIM = 36, 2048
CAPS_PER_IMAGE = 5
IMAGE_BYTES = REGIONS * FEAT_DIM * 4
VOCAB_WORDS = 8495             # + 4 specials + <mask> ≈ the 8,500 of the training benchmark
CAPTION_WORDS = (8, 18)        # + <start>/<end> = 10–20 tokens
WRITE_CHUNK = 256              # images generated and written per block (75 MB)
BATCH = 128
WORKERS = 2
EPOCH = 1
SEED = 0
SAMPLE_S = 0.2                 # memory sampling period
DISK_HEADROOM = 2 * 2**30      # keep this much free beyond the file being written
TARGET_PEAK_MB = 2048.0        # peak resident memory of the process tree
TARGET_OVER_TRAINING = 3.0     # loader pairs/s ≥ 3 × training pairs/s
MODES = {"full": {"size_gb": 10.0, "warm_batches": 400}, "quick": {"size_gb": 0.5, "warm_batches": 30}}


# --- process-tree memory ----------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(c) for c in text]
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += _children(p)
    return pids


def _kb_fields(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        for line in Path(path).read_text().splitlines():
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
ROLLUP_KEYS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")


def tree_memory_mb(pid: int) -> dict[str, float]:
    """Sums over the tree of VmRSS and its parts, VmHWM and PSS (MB), and the process count."""
    totals: dict[str, float] = defaultdict(float)
    pids = process_tree(pid)
    for p in pids:
        for k, v in _kb_fields(f"/proc/{p}/status", STATUS_KEYS).items():
            totals[k] += v / 1024
        for k, v in _kb_fields(f"/proc/{p}/smaps_rollup", ROLLUP_KEYS).items():
            totals[k] += v / 1024
    totals["Pss_private"] = totals["Pss_Anon"] + totals["Pss_Shmem"]
    totals["processes"] = len(pids)
    return dict(totals)


class MemorySampler(threading.Thread):
    """Samples `tree_memory_mb` every `period` seconds and keeps the peak of each field."""

    def __init__(self, pid: int, period: float = SAMPLE_S) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak: dict[str, float] = defaultdict(float)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for k, v in tree_memory_mb(self.pid).items():
                self.peak[k] = max(self.peak[k], v)
            self.samples += 1
            self._stop_event.wait(self.period)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join()
        return dict(self.peak)


# --- page cache -------------------------------------------------------------------------------------------------------


def cached_fraction(path: Path) -> float | None:
    """Fraction of the file resident in the page cache (util-linux `fincore`), None if unavailable."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", str(path)],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
        return int(out[0]) / max(int(out[1]), 1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def drop_cache(path: Path) -> None:
    """Write back and drop the file's pages from the page cache (posix_fadvise DONTNEED; unprivileged)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- data generation --------------------------------------------------------------------------------------------------


def make_words(rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words: set[str] = set()
    while len(words) < VOCAB_WORDS:
        words.add("".join(rng.choice(letters, size=int(rng.integers(3, 9)))))
    return sorted(words)


def make_captions(n: int, words: list[str], rng: np.random.Generator) -> list[str]:
    """Lower-case captions of 8–18 known words and a full stop, like a tokenised COCO caption."""
    vocab = np.array(words)
    return [" ".join(vocab[rng.integers(0, len(words), size=int(rng.integers(*CAPTION_WORDS) + 1))]) + " ."
            for _ in range(n)]


def feature_blocks(n_images: int, seed: int) -> Any:
    """Yield (start, (b, 36, 2048) float32) blocks of random features, WRITE_CHUNK images at a time."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_images, WRITE_CHUNK):
        b = min(WRITE_CHUNK, n_images - start)
        yield start, rng.random((b, REGIONS, FEAT_DIM), dtype=np.float32) - 0.5


def write_npy(root: Path, n_images: int, captions: list[str]) -> Path:
    """SCAN precomp layout: train_ims.npy (N, 36, 2048) written through a memmap, and train_caps.txt (5N lines)."""
    root.mkdir(parents=True)
    path = root / "train_ims.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_images, REGIONS, FEAT_DIM))
    for start, block in feature_blocks(n_images, SEED):
        arr[start : start + len(block)] = block
    arr.flush()
    del arr
    (root / "train_caps.txt").write_text("\n".join(captions) + "\n")
    return path


def write_h5(root: Path, n_images: int, captions: list[str]) -> Path:
    """The vsectl store (features/rows + offsets + captions), written by the real StoreWriter."""
    root.mkdir(parents=True)
    path = root / "train.h5"
    with StoreWriter(path, FEAT_DIM, dtype="float32") as writer:
        for start, block in feature_blocks(n_images, SEED):
            for j, feats in enumerate(block):
                writer.add_image(str(start + j), feats)
        for k, text in enumerate(captions):
            writer.add_caption(text, k // CAPS_PER_IMAGE)
    return path


# --- the pipeline -----------------------------------------------------------------------------------------------------


class MemmapNpyFeatures(NpyFeatures):
    """The previous NpyFeatures.get, kept as the baseline: copy each image out of a memmap of the whole file.

    Every page a worker touches stays mapped into it, so its VmRSS grows toward the file size (clean, reclaimable
    page cache, but counted as resident). The library now reads each image with one os.pread instead.
    """

    def get(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return np.array(self.array[i * self.row_stride], dtype=np.float32)


def run_epoch(root: Path, vocab: Vocab, max_batches: int | None, features_cls: type | None = None) -> dict[str, Any]:
    """Iterate the real training loader over `root` for one epoch (or `max_batches`), sampling the tree's memory."""
    cfg = load_recipe(None, [f"data.root={root}", f"data.batch_size={BATCH}", f"data.num_workers={WORKERS}"])
    split = load_split(root, "train")
    if features_cls is not None:
        split.features = features_cls(split.features.path, split.features.row_stride)
    text = VocabSide(vocab=vocab)
    baseline = tree_memory_mb(os.getpid())
    sampler = MemorySampler(os.getpid())
    sampler.start()
    t0 = time.perf_counter()
    loader = make_loader(cfg, split, text, epoch=EPOCH, start_batch=0)
    first, pairs, batches = None, 0, 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
        pairs += batch["images"].size(0)
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    wall = time.perf_counter() - t0
    del loader  # shuts the workers down
    peak = sampler.stop()
    return {"pairs": pairs, "batches": batches, "wall_s": wall, "first_batch_s": first, "pairs_per_s": pairs / wall,
            "pairs_per_s_after_first": (pairs - BATCH) / max(wall - first, 1e-9) if batches > 1 else None,
            "baseline_mb": baseline, "peak_mb": peak, "samples": sampler.samples}


def bench_format(kind: str, root: Path, n_images: int, captions: list[str], vocab: Vocab,
                 warm_batches: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = write_npy(root, n_images, captions) if kind == "npy" else write_h5(root, n_images, captions)
    out: dict[str, Any] = {"file": path.name, "file_gb": path.stat().st_size / 1e9, "write_s": time.perf_counter() - t0}
    out["cached_after_write"] = cached_fraction(path)
    drop_cache(path)
    out["cached_after_drop"] = cached_fraction(path)
    print(f"  {kind}: {out['file_gb']:.2f} GB written in {out['write_s']:.0f} s; cold-ish epoch "
          f"(cached {out['cached_after_drop']}) ...", file=sys.stderr, flush=True)
    out["cold_epoch"] = run_epoch(root, vocab, None)
    out["cached_after_epoch"] = cached_fraction(path)
    print(f"  {kind}: warm pass of {warm_batches} batches ...", file=sys.stderr, flush=True)
    out["warm"] = run_epoch(root, vocab, warm_batches)
    if kind == "npy":
        print(f"  {kind}: warm pass with the old memmap reader (baseline) ...", file=sys.stderr, flush=True)
        out["warm_memmap"] = run_epoch(root, vocab, warm_batches, MemmapNpyFeatures)
        drop_cache(path)
        out["cold_memmap_batches"] = run_epoch(root, vocab, warm_batches, MemmapNpyFeatures)
        drop_cache(path)
        out["cold_pread_batches"] = run_epoch(root, vocab, warm_batches)
    return out


def training_rate(args: argparse.Namespace) -> tuple[float | None, str]:
    """The faster of bench_training's fp32/bf16 pairs/s (its JSON), else a short inline fp32 measurement."""
    report = read_json(args.training_json)
    if report and "training_pairs_per_s" in report:
        rates = report["training_pairs_per_s"]
        return max(rates.values()), f"{args.training_json} (max of {rates})"
    import bench_training as bt

    cfg = bt.bigru_config(BATCH)
    batches = bt.make_batches(2, BATCH, SEED, tokens=bt.CAPTION_TOKENS, vocab=(4, bt.VOCAB))
    cpu = torch.device("cpu")
    precisions = ["fp32", *(["bf16"] if bf16_pays(cpu)[0] else [])]  # the faster step is what the loader must feed
    trainers = {p: bt.Trainer(cfg, bt.build_bigru(cfg, "gpo"), batches, p, cpu) for p in precisions}
    res = bt.run_trainers(trainers, reps=1)
    rates = {p: r["pairs_per_s"]["median"] for p, r in res.items()}
    return max(rates.values()), f"measured inline ({rates}, 2 steps each after a warm-up pass)"


def plan_size(size_gb: float, tmp: Path) -> tuple[int, str]:
    """Images to write for `size_gb`, scaled down (with a note) when the disk has not enough room."""
    n = max(int(size_gb * 1e9 / IMAGE_BYTES), 2 * BATCH // CAPS_PER_IMAGE + 1)
    free = shutil.disk_usage(tmp).free
    fits = int((free - DISK_HEADROOM) / (IMAGE_BYTES * 1.02))  # one file at a time; HDF5 adds ~1%
    if fits < n:
        return max(fits, 2 * BATCH), f"scaled down from {size_gb} GB: only {free / 1e9:.1f} GB free in {tmp}"
    return n, ""


def bench(mode: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    tmp_parent = Path(args.tmp)
    n_images, note = plan_size(args.size_gb or mode["size_gb"], tmp_parent)
    rng = np.random.default_rng(SEED)
    words = make_words(rng)
    vocab = Vocab([*SPECIALS, *words])
    captions = make_captions(n_images * CAPS_PER_IMAGE, words, rng)
    res: dict[str, Any] = {"n_images": n_images, "n_captions": len(captions),
                           "dataset_gb": n_images * IMAGE_BYTES / 1e9, "size_note": note, "batch": BATCH,
                           "workers": WORKERS, "vocab": len(vocab),
                           "disk_free_gb_before": shutil.disk_usage(tmp_parent).free / 1e9}
    print(f"dataset: {n_images} images × {REGIONS}×{FEAT_DIM} fp32 = {res['dataset_gb']:.2f} GB, "
          f"{len(captions)} captions {note}", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="vsectl_bench_data_", dir=tmp_parent))
    try:
        for kind in ("npy", "h5"):
            res[kind] = bench_format(kind, tmp / kind, n_images, captions, vocab, mode["warm_batches"])
            shutil.rmtree(tmp / kind)  # one 10 GB file on disk at a time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate, source = training_rate(args)
    res["training_pairs_per_s"], res["training_source"] = rate, source
    return res


def render(res: dict[str, Any]) -> str:
    lines = [f"{res['n_images']} images × {REGIONS}×{FEAT_DIM} fp32 ({res['dataset_gb']:.2f} GB), "
             f"{res['n_captions']} captions, batch {res['batch']}, {res['workers']} workers {res['size_note']}",
             f"{'':34}{'pairs/s':>10}{'first batch':>13}{'peak ΣRSS':>11}{'ΣRssFile':>10}{'ΣPSS':>9}"
             f"{'ΣPSS anon+shm':>15}{'batches':>9}"]
    for kind in ("npy", "h5"):
        r = res[kind]
        for name in ("cold_epoch", "warm", "warm_memmap", "cold_pread_batches", "cold_memmap_batches"):
            if name not in r:
                continue
            e, p = r[name], r[name]["peak_mb"]
            lines.append(f"  {kind + ' ' + name:32}{e['pairs_per_s']:10.0f}{e['first_batch_s']:12.2f}s"
                         f"{p['VmRSS']:9.0f}MB{p['RssFile']:8.0f}MB{p['Pss']:7.0f}MB{p['Pss_private']:13.0f}MB"
                         f"{e['batches']:9d}")
        lines.append(f"  {kind}: written in {r['write_s']:.0f} s; page-cache resident fraction after write "
                     f"{_pct(r['cached_after_write'])}, after DONTNEED {_pct(r['cached_after_drop'])}, after the cold "
                     f"epoch {_pct(r['cached_after_epoch'])}")
    lines.append(f"training pairs/s for the ratio: {res['training_pairs_per_s']:.1f} from {res['training_source']}")
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    train = res["training_pairs_per_s"]
    for kind in ("npy", "h5"):
        for name in ("cold_epoch", "warm"):
            e = res[kind][name]
            checks.append(target(f"{kind} {name}: peak ΣVmRSS of the tree (MB)", e["peak_mb"]["VmRSS"], "<=",
                                 TARGET_PEAK_MB))
            checks.append(target(f"{kind} {name}: loader ÷ training pairs/s", e["pairs_per_s"] / train, ">=",
                                 TARGET_OVER_TRAINING, "×"))
    if "warm_memmap" in res["npy"]:  # the baseline, reported for the ratio; not a target of the library
        e = res["npy"]["warm_memmap"]
        checks.append({"target": "npy warm, old memmap reader (baseline): peak ΣVmRSS (MB)",
                       "value": e["peak_mb"]["VmRSS"], "info": True})
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~0.5 GB dataset instead of ~10 GB")
    parser.add_argument("--size-gb", type=float, default=None, help="dataset size (overrides the mode's)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary dataset is written")
    parser.add_argument("--json", type=Path, default=RESULTS / "data.json")
    parser.add_argument("--training-json", type=Path, default=RESULTS / "training.json",
                        help="bench_training's report, for the training pairs/s")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    load_before = os.getloadavg()
    meter = LoadMeter()
    m = machine()
    print(describe(m), file=sys.stderr)
    res = bench(mode, args)
    checks = targets(res)
    load_after = os.getloadavg()
    print(render(res))
    print()
    print(render_targets(checks))
    write_report(args.json, {"machine": m, "load_average_before": load_before, "load_average_after": load_after,
                             "cpu_during_run": meter.read(), "quick": args.quick, "mode": mode, "results": res,
                             "targets": checks})
    cpu = meter.read()
    print(f"\nload average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
