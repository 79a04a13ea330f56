"""Benchmark end-to-end training of the image backbone (the grid path): images/s and peak memory per training step.

One step = uint8 images → `BackboneGridEncoder` (EfficientNet-Lite0 with its real weights, frozen BN statistics) →
fc → GPO, against fixed caption embeddings through the hinge loss (all negatives), backward, grad clip 2.0, AdamW with
the spec's parameter groups. The text side is left out on purpose: it is the same as in the frozen-feature path and is
measured in bench_training.py. Variants, each in its own process so its peak RSS is its own:

- backbone frozen (epoch 0 of the schedule: the backbone runs without a graph) vs trained (from epoch 1);
- fp32 vs bf16 autocast (bf16 has hardware dot products only where the CPU has avx512_bf16 / AMX);
- channels-last memory format; gradient checkpointing of the backbone stages.

    python benchmarks/bench_backbone.py [--quick] [--json benchmarks/results/backbone.json] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, LoadMeter, describe, machine, rate_summary, time_reps, write_report

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "quick": {"sizes": [128], "batch": 32, "reps": 2},
    "full": {"sizes": [128, 224], "batch": 128, "reps": 3},
}
VARIANTS = {  # name → (fixed_blocks, precision, channels_last, grad_checkpointing)
    "frozen fp32": (4, "fp32", False, False),
    "trained fp32": (0, "fp32", False, False),
    "trained bf16": (0, "bf16", False, False),
    "trained fp32 channels-last": (0, "fp32", True, False),
    "trained bf16 channels-last": (0, "bf16", True, False),
    "trained fp32 checkpointed": (0, "fp32", False, True),
}


def one(variant: str, size: int, batch: int, reps: int) -> dict[str, Any]:
    """Time `reps` training steps of one variant in this process; report images/s and this process's peak RSS."""
    sys.path.insert(0, str(REPO))
    from vsectl.config import LRMultConfig, load_recipe
    from vsectl.losses import ContrastiveLoss
    from vsectl.models.backbones import BACKBONES
    from vsectl.models.grid import BackboneGridEncoder
    from vsectl.models.pooling import create_pooler
    from vsectl.runtime import Precision

    fixed, precision, channels_last, ckpt = VARIANTS[variant]
    backbone = BACKBONES.get("efficientnet-lite0")(size=size)
    enc = BackboneGridEncoder(backbone, 512, create_pooler(load_recipe(None).model.image.pool, 512),
                              grad_checkpointing=ckpt, channels_last=channels_last)
    enc.set_fixed_blocks(fixed)
    enc.train()
    lr = LRMultConfig()
    params = [{"params": [p for n, p in enc.named_parameters() if not n.startswith("backbone.")], "lr": 5e-4},
              {"params": list(enc.backbone.parameters()), "lr": 5e-4 * (backbone.lr_mult if lr.backbone < 0 else 1)}]
    opt = torch.optim.AdamW(params, weight_decay=1e-4)
    loss_fn = ContrastiveLoss(margin=0.2)
    prec = Precision(precision, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    caps = torch.nn.functional.normalize(torch.randn(batch, 512, generator=g), dim=-1)

    def step() -> None:
        with prec.autocast():
            img, _ = enc(images)
        loss = loss_fn(img.float(), caps, hardest_negative=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 2.0)
        opt.step()

    times = time_reps(step, reps, warmup=1)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "size": size, "batch": batch, "images_per_s": rate_summary(batch, times),
            "step_s": times, "peak_rss_mib": peak_mib, "threads": torch.get_num_threads()}


def bench(mode: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    rows = []
    for size in mode["sizes"]:
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--one", variant, "--size", str(size), "--batch", str(mode["batch"]),
                   "--reps", str(mode["reps"]), "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"variant": variant, "size": size, "error": out.stderr[-500:]})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{size:4d} px  {variant:28s} {r['images_per_s']['median']:6.1f} images/s "
                  f"[{r['images_per_s']['min']:.1f}-{r['images_per_s']['max']:.1f}]  "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    lines = [f"Backbone training step, EfficientNet-Lite0 + fc + GPO, {describe(m)}", "",
             "| input | batch | variant | images/s (median [min-max]) | vs trained fp32 | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    base = {r["size"]: r["images_per_s"]["median"] for r in rows
            if r.get("variant") == "trained fp32" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | | {r['variant']} | failed: {r['error'][-120:]!r} | | |")
            continue
        ips = r["images_per_s"]
        ratio = ips["median"] / base[r["size"]] if r["size"] in base else float("nan")
        lines.append(f"| {r['size']} | {r['batch']} | {r['variant']} | {ips['median']:.1f} [{ips['min']:.1f}-"
                     f"{ips['max']:.1f}] | {ratio:.2f}× | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 px, batch 32, 2 repetitions")
    parser.add_argument("--json", type=Path, default=RESULTS / "backbone.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", help="input sides (default per mode)")
    parser.add_argument("--batch-size", type=int, help="batch (default per mode)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.size, args.batch, args.reps)))
        return
    mode = dict(MODES["quick" if args.quick else "full"])
    mode.update({k: v for k, v in (("sizes", args.sizes), ("batch", args.batch_size)) if v})
    load_before = os.getloadavg()
    meter = LoadMeter()
    m = machine()
    print(describe(m), file=sys.stderr)
    t0 = time.perf_counter()
    rows = bench(mode, args.threads or torch.get_num_threads())
    print(render(rows, m))
    cpu = meter.read()
    write_report(args.json, {"machine": m, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                             "cpu_during_run": cpu, "quick": args.quick, "mode": mode,
                             "wall_s": time.perf_counter() - t0, "results": rows})
    print(f"\nload average (1 min) before: {load_before[0]:.2f}; other processes used {cpu['others_cores']:.2f} of "
          f"{os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
