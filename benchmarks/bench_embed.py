"""Benchmark `vsectl embed RUN --features STORE`: sets/s of today's loop against the new one, interleaved in one run.

The model is the demo's image tower (recipes/demo.yaml: grid fc 1280 → 512 and GPO; random weights: speed only),
built as bench_retrieval.py builds it; or a trained run with --run (e.g. runs/demo). The store holds N synthetic
sets of 49 × 1280 (EfficientNet-Lite0 at 224 px) in float16, as `vsectl extract` writes them.

- today: the image loop of `embed` before this work, kept here as the baseline: one HDF5 read and one numpy
  float16 → float32 conversion per set, a padding copy per batch (`RetrievalModel.encode_feature_sets`), the GPO
  sort keeping source rows;
- new: `vsectl.embed` as shipped: one read per batch, torch's conversion, no padding copy for equal sizes, the GPO
  sort's values-only network.
Both write their shards through the same code; the embeddings must be equal bit for bit. Sets/s from process CPU time
(shared machine; with one thread it is the per-core rate) and from wall time.

    python benchmarks/bench_embed.py [--quick] [--threads 2] [--run runs/demo] [--json benchmarks/results/embed.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_extract import interleaved
from common import RESULTS, begin, render_targets, target, write_report

import vsectl
import vsectl.retrieval.collection as collection
from vsectl.data.store import write_store

SEED = 0
MODES = {"full": {"sets": 8192, "reps": 3}, "quick": {"sets": 2048, "reps": 2}}
TARGET_SETS_PER_S = 500  # on 2 cores, the demo's model


def today_feature_shards(model: Any, source: Any, shards: Any, size: int, folder: Path, batch_size: int,
                         progress: Any) -> None:
    """Today's `_feature_shards` (the baseline): a read and a numpy conversion per set, a padding copy per batch."""
    from vsectl.data.features import H5Features
    from vsectl.retrieval import partial

    features = H5Features(source.store)
    n = len(source.items)
    for s in shards:
        a, b = s * size, min((s + 1) * size, n)
        out = []
        for c in range(a, b, batch_size):
            sets = [features.get(i) for i in range(c, min(c + batch_size, b))]
            out.append(today_encode(model, sets))
        partial.write_shard(folder, partial.part_name("images", s), np.concatenate(out),
                            {"ok": list(range(a, b)), "skipped": []})
    features.close()


@torch.no_grad()
def today_encode(model: Any, sets: list[np.ndarray]) -> np.ndarray:
    """Today's encode_feature_sets: a padding copy per batch. Its GPO sort is already the new values-only network
    (the sort's change is timed alone, `sort_alone`), so the ratio of the whole loop understates the change."""
    from vsectl.retrieval.model import _pad_sets

    feats, lengths = _pad_sets(sets)
    emb, _ = model.net.encode_image(feats, lengths)
    return emb.float().numpy()


def sort_alone(reps: int) -> dict[str, Any]:
    """The GPO sort at embed's shapes (128 sets × 49 × 512): the network with source rows (what every call ran
    before; it now also writes them, so this slightly overstates the old cost) against the values-only network."""
    from vsectl.native import sortsets

    g = torch.Generator().manual_seed(SEED)
    feats = torch.randn(128, 49, 512, generator=g)
    lengths = torch.full((128,), 49)
    grad_feats = feats.clone().requires_grad_()

    def indexed() -> None:
        sortsets.sort_sets(grad_feats, lengths)

    def values() -> None:
        with torch.no_grad():
            sortsets.sort_sets(feats, lengths)

    t = interleaved({"with_source_rows": indexed, "values_only": values}, reps)
    out = {k: statistics.median(v["cpu"]) * 1e3 for k, v in t.items()}
    return {"cpu_ms": out, "ratio": out["values_only"] / out["with_source_rows"]}


def demo_model() -> Any:
    from bench_retrieval import demo_tower

    return demo_tower(None)


def bench(mode: dict[str, Any], run: Path | None, tmp: Path) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    n = mode["sets"]
    sets = ((str(i), rng.standard_normal((49, 1280), dtype=np.float32).clip(0, 6)) for i in range(n))  # ReLU6 range
    store = write_store(tmp / "store.h5", sets, [], [], feat_dim=1280, dtype="float16")
    model = vsectl.load(run, device="cpu") if run else demo_model()
    new_impl = collection._feature_shards
    outs: dict[str, Path] = {}

    def run_embed(name: str, impl: Any) -> None:
        out = tmp / f"emb_{name}"
        shutil.rmtree(out, ignore_errors=True)
        collection._feature_shards = impl
        try:
            vsectl.embed(model, out, features=store)
        finally:
            collection._feature_shards = new_impl
        outs[name] = out

    times = interleaved({"today": lambda: run_embed("today", today_feature_shards),
                         "new": lambda: run_embed("new", new_impl)}, mode["reps"])
    a = vsectl.open_embeddings(outs["today"]).images
    b = vsectl.open_embeddings(outs["new"]).images
    res: dict[str, Any] = {"sets": n, "model": str(run) if run else "demo image tower, random weights",
                           "identical": bool(np.array_equal(a, b)), "max_abs_diff": float(np.abs(a - b).max())}
    for k, t in times.items():
        res[k] = {"sets_per_cpu_s": n / statistics.median(t["cpu"]),
                  "sets_per_wall_s": n / statistics.median(t["wall"]), "cpu_s": t["cpu"], "wall_s": t["wall"]}
    res["speedup_cpu"] = res["new"]["sets_per_cpu_s"] / res["today"]["sets_per_cpu_s"]
    res["speedup_wall"] = res["new"]["sets_per_wall_s"] / res["today"]["sets_per_wall_s"]
    res["sort_alone"] = sort_alone(max(5, mode["reps"] * 3))
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{MODES['quick']['sets']} sets, 2 rounds")
    parser.add_argument("--json", type=Path, default=RESULTS / "embed.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--run", type=Path, default=None, help="a trained run (default: the demo tower, random)")
    args = parser.parse_args()
    mode = MODES["quick" if args.quick else "full"]
    load_before, meter, m, t0 = begin(args.threads)
    with tempfile.TemporaryDirectory(prefix="vsectl_bench_embed_") as tmp:
        res = bench(mode, args.run, Path(tmp))
    cpu = meter.read()
    threads = torch.get_num_threads()
    res["targets"] = [target(f"embed from features ≥ 500 sets/s (wall, {threads} threads)",
                             res["new"]["sets_per_wall_s"], ">=", TARGET_SETS_PER_S),
                      target("... by CPU time: sets per CPU-second (one core's rate with 1 thread; a shared machine)",
                             res["new"]["sets_per_cpu_s"], ">=", TARGET_SETS_PER_S)]
    print(f"embed --features, {res['sets']} sets of 49 × 1280 fp16, {res['model']}, {threads} torch threads:")
    for k in ("today", "new"):
        print(f"  {k:6} {res[k]['sets_per_cpu_s']:8.1f} sets per CPU-second  {res[k]['sets_per_wall_s']:8.1f} sets/s "
              "wall")
    print(f"  new ÷ today: ×{res['speedup_cpu']:.2f} CPU, ×{res['speedup_wall']:.2f} wall; embeddings identical: "
          f"{res['identical']} (max |Δ| {res['max_abs_diff']:.1e})")
    so = res["sort_alone"]["cpu_ms"]
    print(f"  GPO sort alone (128 × 49 × 512): with source rows {so['with_source_rows']:.2f} ms CPU, values only "
          f"{so['values_only']:.2f} ms (×{res['sort_alone']['ratio']:.2f})")
    print(render_targets(res["targets"]))
    write_report(args.json, {"machine": m, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                             "cpu_during_run": cpu, "quick": args.quick, "wall_s": time.perf_counter() - t0,
                             "results": res})
    print(f"load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
