"""Benchmark the protocol objects' scoring against the bare single-positive ranking it wraps.

One split of random L2-normalised embeddings (5 captions per image, each its image plus `--noise` times a standard
normal vector before normalising; at 1,024-d, 0.8 is close to chance (R@1 ≈ 1 %) and 0.3 looks like a trained model
(image → text R@1 ≈ 70 %, text → image ≈ 37 %)), scored four ways in interleaved rounds:
- baseline: `rank_counts` + `tie_ranked_metrics` + `tie_counts`, what scoring a protocol ran before protocols were
  objects;
- protocol: `evaluate_protocol(..., "f30k")` on the caption → image index (builds the `GroundTruth`, then the same
  ranking);
- several: the same relation given as pairs, which takes the several-positives path (`positives.rank_ground_truth`:
  one pass of top lists, the queries they do not settle counted again against every candidate);
- several-old: the same through the earlier two-pass several-positives ranking (`baseline_positives.py`), the
  baseline of `several`.

Times are CPU seconds of this process (the machine may be shared) beside wall seconds.

    PYTHONPATH=. python benchmarks/bench_protocols.py [--images 5000] [--dim 1024] [--noise 0.8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from baseline_positives import old_evaluate
from common import LoadMeter, describe, machine

from vsectl.scoring.metrics import tie_counts, tie_ranked_metrics
from vsectl.scoring.positives import GroundTruth
from vsectl.scoring.protocols import evaluate_protocol
from vsectl.scoring.ranking import rank_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/protocols.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    img = F.normalize(torch.randn(args.images, args.dim), dim=-1)
    cap2img = torch.arange(args.images).repeat_interleave(5)
    cap = F.normalize(img[cap2img] + args.noise * torch.randn(cap2img.numel(), args.dim), dim=-1)
    pairs = GroundTruth.from_pairs(args.images, cap2img.numel(), [(int(i), c) for c, i in enumerate(cap2img)],
                                   [(c, int(i)) for c, i in enumerate(cap2img)])

    def baseline() -> dict:
        counts = rank_counts([(img, cap)], cap2img)
        return {"metrics": tie_ranked_metrics(counts, "optimistic"), "ties": tie_counts(counts)}

    runs = {"baseline": baseline,
            "protocol": lambda: evaluate_protocol([img], [cap], cap2img, "f30k", tie_rule="optimistic"),
            "several": lambda: evaluate_protocol([img], [cap], pairs, "f30k", tie_rule="optimistic"),
            "several-old": lambda: old_evaluate([img], [cap], pairs, 1024, "optimistic")}
    results = {name: fn()["metrics"] for name, fn in runs.items()}
    same = all(results[name][k] == results["baseline"][k] for name in runs for k in results["baseline"])
    same_as_old = all(abs(results["several"][k] - v) <= 1e-9 for k, v in results["several-old"].items())
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    meter = LoadMeter()
    for _ in range(args.reps):
        for name, fn in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    load = meter.read()
    report = {"machine": machine(), "images": args.images, "captions": cap2img.numel(), "dim": args.dim,
              "noise": args.noise, "reps": args.reps, "same_metrics": same, "several_equals_several_old": same_as_old,
              "load": load,
              "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
              "wall_s": {n: statistics.median(v) for n, v in wall.items()}}
    report["cpu_ratio_to_baseline"] = {n: report["cpu_s"][n] / report["cpu_s"]["baseline"] for n in runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(describe(report["machine"]))
    print(f"{args.images} images × {cap2img.numel()} captions, {args.dim}-d, noise {args.noise}; same R@K, medr, meanr "
          f"on every path: {same}; several's R-Precision and mAP@R too equal several-old's: {same_as_old}; other "
          f"processes used {load['others_cores']:.2f} cores")
    for name in runs:
        print(f"{name:11s} cpu {report['cpu_s'][name]:.3f} s ({report['cpu_ratio_to_baseline'][name]:.2f}× baseline)"
              f"  wall {report['wall_s'][name]:.3f} s")


if __name__ == "__main__":
    main()
