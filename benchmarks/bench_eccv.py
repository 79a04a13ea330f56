"""Benchmark ECCV Caption + CxC against vsectl's plain COCO 5K evaluation of the same model (target: ≤ 1.5×).

One COCO-5K-shaped split of random L2-normalised embeddings (5,000 images × 25,000 captions, each caption its image
plus `--noise` times a standard normal vector before normalising: at 1,024-d the default 0.8 is close to chance, 0.3
looks like a trained model), scored in interleaved rounds:
- coco5k: `evaluate_protocol(..., "coco5k")`, today's single-positive evaluation (the baseline);
- eccv+cxc: both annotated protocols, each building its ground truth from the eccv-caption package and scoring
  (one similarity pass serves both: the top lists are made once per round, the second protocol reuses them);
- seams-path: ECCV's and CxC's relations given as a generic `GroundTruth` (what a protocol defined through the
  protocol seam gets: `positives.rank_ground_truth`, the same top-list engine); it cannot restrict the queries to the
  annotated ones, so it ranks every image and caption with the union of the COCO and the annotated positives (not the
  published metric);
- seams-old: the same ground truth through the earlier two-pass ranking (`baseline_positives.py`, kept as the
  baseline of the unified path); its metrics must equal seams-path's (these embeddings have no exact ties).

Times are CPU seconds of this process (the cores may be shared: the script records how busy other processes kept
them) beside wall seconds; the ratio is of medians over rounds.

    PYTHONPATH=. python benchmarks/bench_eccv.py [--dim 1024] [--noise 0.8] [--reps 3] [--no-seams-path]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from baseline_positives import old_evaluate
from common import LoadMeter, describe, machine, timed_interleaved_cpu, write_report

from vsectl.scoring import coco_protocols
from vsectl.scoring.protocols import PROTOCOLS, evaluate_protocol, expand
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE

TARGET = 1.5


@dataclass
class Split:
    cap2img: np.ndarray
    image_ids: list[str]

    @property
    def n_images(self) -> int:
        return len(self.image_ids)


def seams_truth(split: Split) -> object:
    """ECCV ∪ CxC ∪ COCO positives of every query as the generic `GroundTruth` (pairs in both directions)."""
    from vsectl.scoring.positives import GroundTruth

    gt = PROTOCOLS.get("eccv").ground_truth(split, Path("."))
    i2t, t2i = set(), set()
    for name in ("eccv", "coco5k"):
        for d, out in ((0, i2t), (1, t2i)):
            s = gt.sets[name][d]
            owners = s.queries[s.owners()]
            out.update(zip(owners.tolist(), s.targets.tolist(), strict=True))
    cxc = PROTOCOLS.get("cxc").ground_truth(split, Path(".")).sets["cxc"]
    for d, out in ((0, i2t), (1, t2i)):
        out.update(zip(cxc[d].queries[cxc[d].owners()].tolist(), cxc[d].targets.tolist(), strict=True))
    return GroundTruth.from_pairs(split.n_images, split.cap2img.size, sorted(i2t), sorted(t2i))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=0.8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-seams-path", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/eccv.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cap2img = np.arange(25_000) // 5
    img = F.normalize(torch.randn(5000, args.dim), dim=-1)
    cap = F.normalize(img[torch.from_numpy(cap2img)] + args.noise * torch.randn(25_000, args.dim), dim=-1)
    split = Split(cap2img, [str(i) for i in range(5000)])

    def coco5k() -> dict:
        return evaluate_protocol([img], [cap], PROTOCOLS.get("coco5k").ground_truth(split, Path(".")), "coco5k")

    def extended() -> dict:
        coco_protocols._LAST_PASS.clear()  # every round pays for its own similarity pass
        return {p.name: evaluate_protocol([img], [cap], p.ground_truth(split, Path(".")), p) for p in
                expand("extended")}

    runs = {"coco5k": coco5k, "eccv+cxc": extended}
    if not args.no_seams_path:
        union = seams_truth(split)
        runs["seams-path"] = lambda: evaluate_protocol([img], [cap], union, "coco5k")
        runs["seams-old"] = lambda: old_evaluate([img], [cap], union, 1024, DEFAULT_TIE_RULE)
    first = {name: fn() for name, fn in runs.items()}
    same_r1 = first["eccv+cxc"]["eccv"]["metrics"]["i2t_coco5k_r1"] == first["coco5k"]["metrics"]["i2t_r1"]
    seams_same = None if args.no_seams_path else (
        first["seams-path"]["ties"] == first["seams-old"]["ties"]
        and all(abs(first["seams-path"]["metrics"][k] - v) <= 1e-9 for k, v in first["seams-old"]["metrics"].items()))
    meter = LoadMeter()
    cpu, wall = timed_interleaved_cpu(runs, args.reps)
    load = meter.read()
    report = {"machine": machine(), "images": 5000, "captions": 25_000, "dim": args.dim, "noise": args.noise,
              "reps": args.reps, "load": load, "coco5k_r1_beside_equals_coco5k": same_r1,
              "seams_path_equals_seams_old": seams_same, "target_ratio": TARGET,
              "cpu_s": {n: statistics.median(v) for n, v in cpu.items()}, "cpu_runs_s": cpu,
              "wall_s": {n: statistics.median(v) for n, v in wall.items()}}
    report["cpu_ratio_to_coco5k"] = {n: report["cpu_s"][n] / report["cpu_s"]["coco5k"] for n in runs}
    report["met"] = report["cpu_ratio_to_coco5k"]["eccv+cxc"] <= TARGET
    write_report(args.json, report)
    print(describe(report["machine"]))
    print(f"5000 images × 25000 captions, {args.dim}-d, noise {args.noise}, {args.reps} interleaved rounds; other "
          f"processes used {load['others_cores']:.2f} of the cores; COCO 5K R@1 beside ECCV equals coco5k's: "
          f"{same_r1}; seams-path metrics equal seams-old's: {seams_same}")
    for name in runs:
        print(f"{name:11s} cpu {report['cpu_s'][name]:.3f} s ({report['cpu_ratio_to_coco5k'][name]:.2f}× coco5k)"
              f"  wall {report['wall_s'][name]:.3f} s")
    print(f"target eccv+cxc ≤ {TARGET}× coco5k: {'met' if report['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
