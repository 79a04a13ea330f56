"""Benchmark feature extraction (spec §5.2, §5.3): images/s of EfficientNet-Lite0 and ResNet-50 backbones.

For each backbone (`vsectl.models.backbones.create_backbone`: EfficientNet-Lite0 with its real ImageNet weights;
ResNet-50 with random weights from a transformers ResNetConfig, saved to a temporary folder and loaded through the
`resnet` backbone), input side (224, 512) and batch size (1, 16, 64), it times the model part of
`vsectl.extract.extract_images` on random uint8 images already in memory: normalise, optional channels-last, forward
under inference mode, features to NumPy. Precisions: fp32 eager, fp32 channels-last, bf16 autocast channels-last.
Each cell gets a warm-up call and a time budget (emulated bf16 can be 100× slower than fp32). FLOPs per image come
from torch.utils.flop_counter (conv + matmul, 2 FLOP per MAC), and the achieved fraction is
(FLOP/image × images/s) ÷ the GEMM TFLOP/s measured in the same run at that precision.
Separately it times the decode + resize of real PNGs (`vsectl.data.images.ImageFiles`, one process) and the whole
`extract_images` pipeline (2 decode workers + the model).

    python benchmarks/bench_extract.py [--quick] [--json benchmarks/results/extract.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    RESULTS,
    LoadMeter,
    describe,
    fmt_rate,
    gemm_report,
    machine,
    rate_summary,
    summary,
    timed_interleaved,
    write_report,
)

from vsectl.data.images import ImageFiles, normalize
from vsectl.models.backbones import Backbone, create_backbone
from vsectl.runtime import Precision

SEED = 0
PNG_FOLDER = Path("data/openclipart/images")  # real PNGs (224 × 224 clip art) when the dataset is prepared
PRECISIONS = {"fp32": ("fp32", False), "fp32_cl": ("fp32", True), "bf16_cl": ("bf16", True)}  # (autocast, NHWC)
MODES = {
    "full": {"sizes": (224, 512), "batches": (1, 16, 64), "reps": 3, "precisions": ("fp32", "fp32_cl", "bf16_cl"),
             "gemm_reps": 5, "decode_images": 200, "pipeline_images": 256, "cell_budget_s": 120.0,
             "bf16_batches": (1, 16, 64)},
    "quick": {"sizes": (224,), "batches": (1, 8), "reps": 2, "precisions": ("fp32", "bf16_cl"),
              "gemm_reps": 3, "decode_images": 50, "pipeline_images": 64, "cell_budget_s": 15.0,
              "bf16_batches": (1,)},
}
MIN_TIMED_IMAGES = 8  # batch 1 repeats the call until this many images are timed per repetition (when affordable)
WARMUP_FULL_BATCH_S = 5.0  # warm up on the full batch when one call is projected to take less; else on one image


def resnet50_random(folder: Path) -> Path:
    """A transformers ResNet-50 (the ResNetConfig defaults) with random weights, saved where `resnet` can load it."""
    from transformers import ResNetConfig, ResNetModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    ResNetModel(ResNetConfig()).save_pretrained(folder)
    return folder


def build(name: str, size: int, resnet_folder: Path) -> Backbone:
    if name == "efficientnet-lite0":
        return create_backbone("efficientnet-lite0", size=size)  # built per side: its 'same' padding is fixed
    return create_backbone("resnet", weights=resnet_folder, size=size)


def flops_per_image(backbone: Backbone, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone(x)
    return float(counter.get_total_flops())


def model_step(backbone: Backbone, images: torch.Tensor, precision: str, channels_last: bool) -> np.ndarray:
    """The model part of extract_images: normalise, NHWC if asked, forward under autocast, features to NumPy."""
    prec = Precision(precision, torch.device("cpu"))
    with torch.inference_mode():
        x = normalize(images, backbone.mean, backbone.std)                        # (B, 3, S, S)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            out = backbone(x)                                                     # (B, N, C)
        return out.float().cpu().numpy()


def bench_model(name: str, size: int, mode: dict[str, Any], resnet_folder: Path, gemm: dict[str, Any]) -> dict:
    """Images/s per batch size and precision, ascending batch sizes.

    Emulated bf16 (no bf16 units) is up to 100× slower than fp32 here, so each (batch, precision) cell gets a time
    budget: repetitions are cut to fit it, and a cell whose single call is projected (from the previous batch size's
    per-image time) to exceed it is skipped and reported as skipped with that projection.
    """
    backbone = build(name, size, resnet_folder)
    # Separate NCHW and NHWC copies of the weights: converting a module back and forth costs time inside the loop.
    nhwc = build(name, size, resnet_folder).to(memory_format=torch.channels_last)
    flops = flops_per_image(backbone, size)
    out: dict[str, Any] = {"gflops_per_image": flops / 1e9, "set_shape": list(backbone.grid_shape(size)),
                           "feat_dim": backbone.feat_dim}
    g = torch.Generator().manual_seed(SEED)
    per_image_s: dict[str, float] = {}
    budget = mode["cell_budget_s"]
    for batch in mode["batches"]:
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        res: dict[str, Any] = {}
        for key in mode["precisions"]:
            precision, cl = PRECISIONS[key]
            model = nhwc if cl else backbone
            projected = per_image_s.get(key, 0.0) * batch
            if precision == "bf16" and batch not in mode["bf16_batches"]:
                res[key] = {"skipped": "bf16 is timed at fewer batch sizes in this mode"}
                continue
            if precision == "bf16" and projected > budget:  # fp32 cells always run (at least one call)
                res[key] = {"skipped": f"one batch projected at {projected:.0f} s > the {budget:.0f} s cell budget",
                            "projected_images_per_s": 1 / per_image_s[key]}
                continue
            calls = max(1, MIN_TIMED_IMAGES // batch) if projected * MIN_TIMED_IMAGES < budget / 4 else 1
            print(f"  {name} {size}px batch {batch} {key} ...", file=sys.stderr, flush=True)
            warm_images = images if projected < WARMUP_FULL_BATCH_S else images[:1]
            t0 = time.perf_counter()
            model_step(model, warm_images, precision, cl)  # warm-up: thread pool, oneDNN primitives
            warm_s = time.perf_counter() - t0
            times: list[float] = []
            if len(warm_images) == batch and warm_s > budget / 2:
                times = [warm_s]  # one call costs most of the budget: its setup share is negligible, keep it
                calls = 1
            while len(times) < mode["reps"] and sum(times) < budget:
                t0 = time.perf_counter()
                for _ in range(calls):
                    model_step(model, images, precision, cl)
                times.append(time.perf_counter() - t0)
            per_image_s[key] = min(times) / (batch * calls)
            rate = rate_summary(batch * calls, times)
            achieved = flops * rate["median"] / 1e12
            gemm_key = "bf16" if precision == "bf16" else "fp32"
            res[key] = {"images_per_s": rate, "time": summary(times), "achieved_tflops": achieved,
                        "fraction_of_gemm": achieved / gemm[gemm_key]["tflops"]["median"],
                        "fraction_of_fp32_gemm": achieved / gemm["fp32"]["tflops"]["median"]}
        out[f"batch_{batch}"] = res
    return out


def png_files(n: int, tmp: Path) -> tuple[list[Path], str]:
    """Real PNGs of the prepared clip-art set, or generated 512 × 512 PNGs (gradients + noise) on a fresh clone."""
    files = sorted(PNG_FOLDER.glob("*.png"))[:n] if PNG_FOLDER.is_dir() else []
    if len(files) >= n:
        return files, f"{PNG_FOLDER} ({n} real clip-art PNGs, 224 × 224 RGB)"
    from PIL import Image

    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:512, 0:512]
    files = []
    for i in range(n):
        base = (np.stack([xx, yy, (xx + yy) // 2], -1) * (i % 7 + 1) // 8) % 256
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        files.append(tmp / f"img{i:04d}.png")
        Image.fromarray(img).save(files[-1])
    return files, f"{n} generated 512 × 512 PNGs (no prepared dataset under {PNG_FOLDER})"


def bench_decode(mode: dict[str, Any], tmp: Path, backbone: Backbone) -> dict[str, Any]:
    from vsectl.extract import extract_images

    files, source = png_files(mode["decode_images"], tmp)
    out: dict[str, Any] = {"source": source}
    for size in (224, 512):
        ds = ImageFiles(files, size)

        def decode_all(ds: ImageFiles = ds) -> None:
            for i in range(len(ds)):
                ds[i]

        times = timed_interleaved({"decode": decode_all}, mode["reps"], warmup=1)["decode"]
        out[f"decode_resize_{size}_one_process"] = rate_summary(len(files), times)
    pipeline_files = (files * (mode["pipeline_images"] // len(files) + 1))[: mode["pipeline_images"]]

    def pipeline() -> None:
        for _ in extract_images(backbone, pipeline_files, batch_size=16, workers=2):
            pass

    times = timed_interleaved({"pipeline": pipeline}, mode["reps"], warmup=1)["pipeline"]
    out["extract_images_pipeline"] = {"backbone": backbone.name, "size": backbone.size, "batch": 16, "workers": 2,
                                      "images_per_s": rate_summary(len(pipeline_files), times)}
    return out


def bench(mode: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    print("GEMM throughput ...", file=sys.stderr, flush=True)
    res["gemm"] = gemm_report(mode["gemm_reps"])
    with tempfile.TemporaryDirectory(prefix="vsectl_bench_extract_") as tmp:
        resnet_folder = resnet50_random(Path(tmp) / "resnet50")
        for name in ("efficientnet-lite0", "resnet-50"):
            for size in mode["sizes"]:
                res[f"{name}@{size}"] = bench_model(name, size, mode, resnet_folder, res["gemm"])
        print("decode + resize, and the extract_images pipeline ...", file=sys.stderr, flush=True)
        res["decode"] = bench_decode(mode, Path(tmp), build("efficientnet-lite0", 224, resnet_folder))
    return res


def render(res: dict[str, Any], mode: dict[str, Any]) -> str:
    g = res["gemm"]
    lines = [f"GEMM fp32 {fmt_rate(g['fp32']['tflops'], 'TFLOP/s', 4)}, "
             f"bf16 {fmt_rate(g['bf16']['tflops'], 'TFLOP/s', 4)} (bf16/fp32 {g['bf16_over_fp32']:.2f}×)", "",
             f"{'images/s [min–max] (share of fp32 GEMM)':44}" + "".join(f"{k:>32}" for k in mode["precisions"])]
    for key, r in res.items():
        if "@" not in key:
            continue
        lines.append(f"{key} ({r['gflops_per_image']:.2f} GFLOP/image, set {r['set_shape']}×{r['feat_dim']})")
        for batch in mode["batches"]:
            lines.append(f"  batch {batch:<38}" + "".join(_cell(r[f"batch_{batch}"][k]).rjust(32)
                                                          for k in mode["precisions"]))
    d = res["decode"]
    p = d["extract_images_pipeline"]
    lines += ["", f"decode + resize ({d['source']}), one process: "
              f"224 px {fmt_rate(d['decode_resize_224_one_process'], 'images/s', 0)}, "
              f"512 px {fmt_rate(d['decode_resize_512_one_process'], 'images/s', 0)}",
              f"extract_images pipeline ({p['backbone']} {p['size']} px, batch {p['batch']}, {p['workers']} workers, "
              f"fp32): {fmt_rate(p['images_per_s'], 'images/s', 1)}"]
    return "\n".join(lines)


def _cell(c: dict[str, Any]) -> str:
    if "skipped" in c:
        return f"skipped (~{c['projected_images_per_s']:.2g}/s)" if "projected_images_per_s" in c else "—"
    r = c["images_per_s"]
    return f"{r['median']:.3g} [{r['min']:.3g}–{r['max']:.3g}] ({c['fraction_of_fp32_gemm']:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch sizes 1 and 8, two precisions, fewer repetitions")
    parser.add_argument("--json", type=Path, default=RESULTS / "extract.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    load_before = os.getloadavg()
    meter = LoadMeter()
    m = machine()
    print(describe(m), file=sys.stderr)
    t0 = time.perf_counter()
    res = bench(mode)
    load_after = os.getloadavg()
    print(render(res, mode))
    write_report(args.json, {"machine": m, "load_average_before": load_before, "load_average_after": load_after,
                             "cpu_during_run": meter.read(), "quick": args.quick, "mode": mode,
                             "wall_s": time.perf_counter() - t0, "results": res})
    cpu = meter.read()
    print(f"\nload average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
