"""bf16 against fp32 training on the tiny recipe and a generated toy set: best dev rsum per seed, to see whether bf16
lands within fp32's seed spread (the demo data is not needed; a proxy for the demo check).

    nice python benchmarks/bench_rsum_precision.py [--seeds 0,1,2] [--epochs 4] [--json results/rsum_precision.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, machine, write_report

from vsectl.config import load_recipe
from vsectl.data.toy import make_toy_dataset
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS / "rsum_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, dict[int, float]] = {"fp32": {}, "bf16": {}}
    with tempfile.TemporaryDirectory(prefix="bench_rsum_") as tmp:
        root = make_toy_dataset(Path(tmp) / "toy", n_train=400, n_dev=100, n_test=100, seed=0)
        for seed in seeds:
            for p in out:
                cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [
                    f"data.root={root}", f"seed={seed}", f"train.precision={p}", f"name={p}_s{seed}",
                    f"train.epochs={args.epochs}"])
                t0 = time.perf_counter()
                run = train(cfg, Path(tmp) / "runs", device="cpu")
                vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                out[p][seed] = max(v["rsum"] for v in vals if v["kind"] == "val")
                print(f"{p} seed {seed}: best dev rsum {out[p][seed]:.2f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    summary = {p: {"mean": statistics.mean(v.values()), "min": min(v.values()), "max": max(v.values())}
               for p, v in out.items()}
    inside = summary["fp32"]["min"] <= summary["bf16"]["mean"] <= summary["fp32"]["max"]
    print(f"fp32 {summary['fp32']}, bf16 {summary['bf16']}; bf16 mean inside fp32's seed range: {inside}")
    write_report(args.json, {"machine": machine(), "rsum": out, "summary": summary, "bf16_inside_fp32_range": inside})


if __name__ == "__main__":
    main()
