"""Estimate a Flickr30K-size run of recipes/f30k_butd.yaml (29,000 images × 36 × 2048, 145,000 captions, 25 epochs)
from a measured part of an epoch at the right shapes, through the real `vsectl.training.train` and its DataLoader.

A generated precomp store of --images images (36 × 2048 float32 regions, 5 captions each) stands in for Flickr30K:
per-step cost depends on the shapes (batch 128, 36 regions before the drop, 8–20-token captions, vocabulary), not on
the number of images. Each precision trains --steps steps of one epoch; the estimate is the median step time (wall,
from metrics.jsonl) × 1,132 steps × 25 epochs, plus the measured validation time × 25 (with the validation split's
size scaled to 1,000 images). On a shared machine the wall figure mostly measures the other tenants; the process CPU
time per step (one thread, data loading in the process) says what the step costs on an unshared core.

    nice python benchmarks/bench_moonshot.py [--images 1000] [--steps 6] [--threads 1]

With --full-epoch the store has Flickr30K's size (29,000 training images, 145,000 captions, 1,014 dev images; 8.5 GB
on disk, written through a memory map) and one whole epoch is trained and validated; the estimate is then that
measured epoch (its training steps, validation and checkpointing: the run's wall time less its set-up) × 25.

    python benchmarks/bench_moonshot.py --full-epoch --threads 2 --precisions bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, LoadMeter, describe, machine, write_report

from vsectl.config import load_recipe
from vsectl.data.toy import make_toy_dataset
from vsectl.runtime import NullProgress
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = 145_000 // 128  # drop_last: 1,132
EPOCHS = 25
VAL_IMAGES = 1000
F30K_TRAIN, F30K_DEV = 29_000, 1_014


class StepClock(NullProgress):
    """Receives train_one_epoch's per-step `update(loss=...)`: the process CPU time at the end of every step."""

    def __init__(self) -> None:
        self.cpu: list[float] = []
        self.wall: list[float] = []

    def update(self, **fields: Any) -> None:
        if "loss" in fields:
            self.cpu.append(time.process_time())
            self.wall.append(time.perf_counter())


def one_run(root: Path, out: Path, precision: str, steps: int, workers: int) -> dict[str, Any]:
    """Train one epoch (`steps` > 0: only its first `steps` steps) of the recipe on the generated store."""
    cfg = load_recipe(REPO / "recipes" / "f30k_butd.yaml", [
        f"data.root={root}", "train.epochs=1", *([f"train.max_steps_per_epoch={steps}"] if steps > 0 else []),
        "train.log_every=1", f"train.precision={precision}", f"name=moon_{precision}",
        "model.text.vocab_min_count=1", f"data.num_workers={workers}"])
    cpu0, t0, clock = time.process_time(), time.perf_counter(), StepClock()
    run = train(cfg, out_root=out, device="cpu", progress=clock)
    cpu_steps = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)]  # from step 2 on
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps_s = [128 / r["pairs_per_s"] for r in recs if r["kind"] == "train"][1:]  # the first step warms up
    data_s = [r["data_time"] for r in recs if r["kind"] == "train"][1:]
    train_s = sum(128 / r["pairs_per_s"] for r in recs if r["kind"] == "train")
    train_recs = [r for r in recs if r["kind"] == "train"]
    # set-up (vocabulary, model, first batch): from the start to the end of step 1, less that step's own time
    setup_s = clock.wall[0] - t0 - 128 / train_recs[0]["pairs_per_s"]
    return {"step_median_s": statistics.median(steps_s), "cpu_step_median_s": statistics.median(cpu_steps),
            "steps_trained": len(train_recs), "setup_s": setup_s,
            "cpu_steps_s": cpu_steps, "step_min_s": min(steps_s), "steps_s": steps_s,
            "data_wait_median_s": statistics.median(data_s), "run_wall_s": wall, "process_cpu_s": cpu,
            "train_wall_s": train_s, "other_wall_s": wall - train_s,
            "env_precision": json.loads((run / "env.json").read_text()).get("precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="0 counts data loading in the step's CPU time")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--full-epoch", action="store_true",
                        help="a Flickr30K-size store (29,000 / 1,014 images) and one whole epoch, validated")
    parser.add_argument("--tmp", type=Path, default=None, help="where the store goes (8.5 GB with --full-epoch)")
    parser.add_argument("--json", type=Path, default=RESULTS / "moonshot.json")
    args = parser.parse_args()
    if args.full_epoch:
        args.images, args.steps = F30K_TRAIN, 0
    torch.set_num_threads(args.threads)
    m, meter, load0 = machine(), LoadMeter(), os.getloadavg()
    print(describe(m), file=sys.stderr)
    res: dict[str, Any] = {}
    n_dev = F30K_DEV if args.full_epoch else 100
    with tempfile.TemporaryDirectory(prefix="bench_moon_", dir=args.tmp) as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_toy_dataset(root, n_train=args.images, n_dev=n_dev, n_test=10, feat_dim=2048, n_regions=36)
        res["generate_s"] = time.perf_counter() - t0
        for p in args.precisions.split(","):
            what = "one whole epoch" if args.full_epoch else f"{args.steps} steps"
            print(f"{p}: {what} of the f30k_butd recipe ...", file=sys.stderr, flush=True)
            r = one_run(root, Path(tmp) / "runs", p, args.steps, args.workers)
            if args.full_epoch:  # the measured epoch (steps, validation, checkpoints) × 25, set-up once
                r["epoch_wall_s"] = r["run_wall_s"] - r["setup_s"]
                r["estimate_hours"] = (r["epoch_wall_s"] * EPOCHS + r["setup_s"]) / 3600
            else:  # the rest of the run (vocabulary, model, validation on 100 dev images) scaled to 1,000 images
                r["estimate_hours"] = (r["step_median_s"] * STEPS_PER_EPOCH * EPOCHS
                                       + r["other_wall_s"] * VAL_IMAGES / 100 * EPOCHS) / 3600
            # from CPU time: what a step costs when the run has its cores alone (workers 0: data loading included)
            r["estimate_hours_cpu_1core"] = (r["cpu_step_median_s"] * STEPS_PER_EPOCH * EPOCHS) / 3600
            res[p] = r
    cpu = meter.read()
    report = {"machine": m, "threads": args.threads, "load_average_before": load0,
              "load_average_after": os.getloadavg(), "cpu_during_run": cpu, "images": args.images,
              "steps": args.steps, "full_epoch": args.full_epoch, "results": res}
    for p in args.precisions.split(","):
        r = res[p]
        if args.full_epoch:
            print(f"{p}: measured epoch {r['epoch_wall_s'] / 60:.1f} min ({r['steps_trained']} steps, validation on "
                  f"{n_dev} images, checkpoints), set-up {r['setup_s']:.0f} s → 25 epochs "
                  f"≈ {r['estimate_hours']:.2f} h")
        print(f"{p}: step {r['step_median_s']:.2f} s median (min {r['step_min_s']:.2f}), data wait "
              f"{r['data_wait_median_s'] * 1e3:.0f} ms → 25 epochs ≈ {r['estimate_hours']:.1f} h at this load "
              f"; CPU time per step {r['cpu_step_median_s']:.2f} s → ≈ {r['estimate_hours_cpu_1core']:.1f} h on one "
              f"unshared core ({args.threads} thread(s), training steps only)")
    print(f"load average {load0[0]:.1f} → {os.getloadavg()[0]:.1f}; this run used {cpu['own_cores']:.2f} cores, "
          f"others {cpu['others_cores']:.2f} of {os.cpu_count()}")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
