"""A small gridsearch with a frozen MiniLM text body: wall time, text-state caches built, and run-folder sizes, for
today's code (a source tree given with --baseline, e.g. `git archive <commit> | tar -x -C /tmp/base`) and this tree.

Both sweeps run the same command on the same toy data, one after the other (each is minutes long), at fp32 so only
the sweep machinery differs. The cache count is the number of text-state cache files the sweep wrote; the sizes are
what `du` reports per run folder and for the checkpoints.

    nice python benchmarks/bench_sweep.py --baseline /tmp/speed_base [--json benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, LoadMeter, describe, machine, write_report

HERE = Path(__file__).resolve().parent.parent
GRID = ["--pool", "max,mean", "--branch", "image", "--seeds", "0,1", "--no-gpo"]
SETS = ["train.epochs=2", "train.max_steps_per_epoch=3", "train.precision=fp32", "model.text.encoder=transformers",
        "model.text.pretrained=minilm", "model.text.freeze_body=true", "model.text.cache_states=true"]


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sweep(tree: Path, work: Path, threads: int) -> dict[str, Any]:
    """Run the sweep with `tree`'s vsectl in `work`; return wall time, caches and sizes."""
    out = work / "sweep"
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    sets = [a for s in SETS for a in ("--set", s)]
    cmd = [sys.executable, "-m", "vsectl", "--quiet", "gridsearch", *GRID, "--out", str(out), *sets]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sweep with {tree} failed:\n{proc.stderr[-3000:]}")
    runs = sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    caches = sorted(str(p.relative_to(out)) for p in out.rglob("*.h5") if "text_cache" in p.parts)
    return {"tree": str(tree), "wall_s": wall, "cells": len(runs), "text_caches_written": len(caches),
            "cache_files": caches, "run_dir_bytes": {p.name: tree_size(p) for p in runs},
            "checkpoint_bytes": {p.name: tree_size(p / "checkpoints") for p in runs},
            "sweep_bytes": tree_size(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="source tree of today's code")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=RESULTS / "sweep.json")
    args = parser.parse_args()
    m, meter, load0 = machine(), LoadMeter(), os.getloadavg()
    print(describe(m), file=sys.stderr)
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        for name, tree in (("baseline", args.baseline), ("new", HERE)):
            work = Path(tmp) / name
            work.mkdir()
            print(f"sweep with {name} ({tree}) ...", file=sys.stderr, flush=True)
            res[name] = sweep(tree, work, args.threads)
    b, n = res["baseline"], res["new"]
    mean = {k: sum(r["run_dir_bytes"].values()) / len(r["run_dir_bytes"]) for k, r in res.items()}
    report = {"machine": m, "load_average_before": load0, "load_average_after": os.getloadavg(),
              "cpu_during_run": meter.read(), "grid": GRID, "sets": SETS, "results": res,
              "wall_new_over_baseline": n["wall_s"] / b["wall_s"],
              "run_dir_mean_bytes": mean, "run_dir_new_over_baseline": mean["new"] / mean["baseline"]}
    for k, r in res.items():
        print(f"{k:9} {r['cells']} cells: wall {r['wall_s']:.0f} s, {r['text_caches_written']} text caches written, "
              f"run folder {mean[k] / 2**20:.1f} MiB mean, checkpoints "
              f"{sum(r['checkpoint_bytes'].values()) / len(r['checkpoint_bytes']) / 2**20:.1f} MiB mean, sweep "
              f"{r['sweep_bytes'] / 2**20:.1f} MiB")
    print(f"new ÷ baseline: wall {report['wall_new_over_baseline']:.2f}×, run folder "
          f"{report['run_dir_new_over_baseline']:.3f}×; load average {load0[0]:.1f} → {os.getloadavg()[0]:.1f}, other "
          f"processes {report['cpu_during_run']['others_cores']:.2f} of {os.cpu_count()} cores")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
