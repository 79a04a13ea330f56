"""Benchmark feature extraction: today's path against the extraction engines, side by side in one run, interleaved.

1. The network alone, per backbone and input side (EfficientNet-Lite0 224 px with its real weights, Lite1 240 px and
   Lite2 260 px likewise; ResNet-50 at 224 and 512 px with random weights from a transformers ResNetConfig, loaded
   through the `resnet` backbone), at a few batch sizes each, on random uint8 images in memory:
   - `today`: today's model step, kept here as the baseline (normalise, channels-last, torch forward, to NumPy);
   - `eager`, `onnx` (and `compile` with --compile): the engines of `vsectl.extract.engines`;
   - `bf16`: bf16 autocast, channels-last, shown with its deviation from fp32 (on a CPU with bf16 units);
   every variant gets the same images, calls are interleaved round-robin, and each call's process CPU time and wall
   time are recorded. Images/s are taken from CPU time (on a shared machine wall time measures the scheduler; with
   one thread the two agree on an idle machine), and set against the fp32 GEMM rate measured the same way in the same
   run: fraction = GFLOP/image × images/s ÷ GEMM GFLOP/s. Deviation = max |variant − today| ÷ max |today|.
2. The whole pipeline on real PNGs (clip art; the prepared openclipart set when present, else the test fixture):
   today's `extract_images` loop (kept here as the baseline: 2 decode workers, eager channels-last) against the new
   `vsectl.extract.extract_images` with the engine `auto` chose, interleaved; wall and CPU time (workers included),
   and the share of the new loop's time the network waited for decoded images.

    python benchmarks/bench_extract.py [--quick] [--threads 1] [--compile] [--json benchmarks/results/extract.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import RESULTS, begin, render_targets, target, write_report

from vsectl.data.images import ImageFiles, normalize
from vsectl.extract.engines import ENGINES, Engine, choose_engine, deviation
from vsectl.models.backbones import Backbone, create_backbone
from vsectl.runtime import Precision, loader_workers

SEED = 0
REPO = Path(__file__).resolve().parent.parent
PNG_FOLDERS = (REPO / "data/openclipart/images", REPO / "tests/fixtures/clipart_mini/images")
MODES = {
    "full": {"models": {("efficientnet-lite0", 224): (1, 8, 32), ("efficientnet-lite1", 240): (8,),
                        ("efficientnet-lite2", 260): (8,), ("resnet-50", 224): (1, 8), ("resnet-50", 512): (1, 4)},
             "reps": 3, "gemm_reps": 5, "pipeline_images": 384, "pipeline_reps": 3},
    "quick": {"models": {("efficientnet-lite0", 224): (8,), ("resnet-50", 224): (8,)},
              "reps": 2, "gemm_reps": 3, "pipeline_images": 128, "pipeline_reps": 2},
}
TARGET_SPEEDUP = 2.5       # new pipeline images/s ÷ today's, EfficientNet-Lite0 224 px
TARGET_RESNET_GEMM = 0.60  # ResNet-50 images/s × GFLOP/image ÷ the fp32 GEMM rate, best engine


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, dict[str, list[float]]]:
    """Each function once untimed, then `reps` rounds round-robin; wall and CPU seconds of every call."""
    for fn in fns.values():
        fn()
    out: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), cpu_s()
            fn()
            out[name]["cpu"].append(cpu_s() - c0)
            out[name]["wall"].append(time.perf_counter() - w0)
    return out


def gemm_gflops(n: int, reps: int) -> dict[str, float]:
    """fp32 square GEMM GFLOP/s (2n³ per product) by CPU time and by wall time, best of `reps`."""
    g = torch.Generator().manual_seed(SEED)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    t = interleaved({"mm": lambda: torch.mm(a, b, out=out)}, reps)["mm"]
    return {"n": n, "cpu_gflops": 2 * n**3 / min(t["cpu"]) / 1e9, "wall_gflops": 2 * n**3 / min(t["wall"]) / 1e9}


def resnet50_random(folder: Path) -> Path:
    """A transformers ResNet-50 (the ResNetConfig defaults) with random weights, saved where `resnet` can load it."""
    from transformers import ResNetConfig, ResNetModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(SEED)
    ResNetModel(ResNetConfig()).save_pretrained(folder)
    return folder


def build(name: str, size: int, resnet_folder: Path) -> Backbone:
    if name.startswith("efficientnet"):
        return create_backbone(name, size=size)  # built per side: its 'same' padding is fixed
    return create_backbone("resnet", weights=resnet_folder, size=size)


def flops_per_image(backbone: Backbone, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        backbone(x)
    return float(counter.get_total_flops())


def today_model_step(backbone: Backbone, images: torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """Today's model part of extract_images (the baseline): normalise, channels-last, forward, features to NumPy."""
    prec = Precision(precision, torch.device("cpu"))
    with torch.inference_mode():
        x = normalize(images, backbone.mean, backbone.std).contiguous(memory_format=torch.channels_last)
        with prec.autocast():
            out = backbone(x)                                                     # (B, N, C)
        return out.float().cpu().numpy()


def variants(name: str, size: int, resnet_folder: Path, compile_too: bool) -> dict[str, Callable]:
    """Each variant on its own copy of the backbone (the engines set the module's memory layout)."""
    cpu = torch.device("cpu")
    today = build(name, size, resnet_folder).to(memory_format=torch.channels_last)
    engines: dict[str, Engine] = {n: ENGINES.get(n)(build(name, size, resnet_folder), cpu, "fp32", n != "onnx")
                                  for n in ("eager", "onnx", *(("compile",) if compile_too else ()))}
    bf16 = build(name, size, resnet_folder).to(memory_format=torch.channels_last)
    fns: dict[str, Callable] = {"today": lambda x: today_model_step(today, x)}
    fns.update({n: e.run for n, e in engines.items()})
    fns["bf16"] = lambda x: today_model_step(bf16, x, "bf16")
    return fns


def bench_model(name: str, size: int, batches: tuple[int, ...], mode: dict[str, Any], resnet_folder: Path,
                gemm: dict[str, float], compile_too: bool) -> dict[str, Any]:
    flops = flops_per_image(build(name, size, resnet_folder), size)
    fns = variants(name, size, resnet_folder, compile_too)
    out: dict[str, Any] = {"gflops_per_image": flops / 1e9}
    g = torch.Generator().manual_seed(SEED)
    for batch in batches:
        print(f"  {name} {size} px, batch {batch} ...", file=sys.stderr, flush=True)
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        ref = fns["today"](images)
        dev = {k: deviation(fn(images), ref) for k, fn in fns.items()}
        times = interleaved({k: (lambda fn=fn, x=images: fn(x)) for k, fn in fns.items()}, mode["reps"])
        cell = {}
        for k, t in times.items():
            rate = batch / statistics.median(t["cpu"])
            cell[k] = {"images_per_cpu_s": rate, "images_per_wall_s": batch / statistics.median(t["wall"]),
                       "cpu_s": t["cpu"], "wall_s": t["wall"], "deviation": dev[k],
                       "fraction_of_fp32_gemm": flops * rate / 1e9 / gemm["cpu_gflops"]}
        out[f"batch_{batch}"] = cell
    return out


# ------------------------------------------------------------------------------------------------ the pipeline


def today_extract_images(backbone: Backbone, paths: list[Path], batch_size: int = 32, workers: int = 2):
    """Today's extract_images loop on a CPU (the baseline): decode in workers, eager channels-last forward."""
    batches = [list(range(a, min(a + batch_size, len(paths)))) for a in range(0, len(paths), batch_size)]
    loader = torch.utils.data.DataLoader(ImageFiles(paths, backbone.size), batch_sampler=batches,
                                         num_workers=loader_workers(workers))
    backbone.to(memory_format=torch.channels_last)
    for index, images, ok, _ in loader:
        x = normalize(images[ok], backbone.mean, backbone.std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            feats = backbone(x).float().cpu().numpy()
        yield from zip(index.tolist(), feats, strict=False)


class WaitShare(logging.Handler):
    """Catches the share of time the new loop's network waited for decoded images (its closing log line)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def png_files(n: int) -> tuple[list[Path], str]:
    for folder in PNG_FOLDERS:
        files = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if files:
            source = f"{len(files)} real clip-art PNGs in {folder.relative_to(REPO)}, repeated to {n}"
            return (files * (n // len(files) + 1))[:n], source
    raise SystemExit("no PNGs found: run from a checkout with tests/fixtures")


def bench_pipeline(mode: dict[str, Any]) -> dict[str, Any]:
    from vsectl.extract import extract_images

    files, source = png_files(mode["pipeline_images"])
    old = create_backbone("efficientnet-lite0")
    new = create_backbone("efficientnet-lite0")
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    choice = choose_engine(new, device=cpu, precision="fp32", channels_last=True, n_images=10**6)
    choose_s = time.perf_counter() - t0
    waits = WaitShare()
    logging.getLogger("vsectl.extract.images").addHandler(waits)
    logging.getLogger("vsectl.extract.images").setLevel(logging.INFO)
    out_old: list[np.ndarray] = []
    out_new: list[np.ndarray] = []

    def run_old() -> None:
        out_old[:] = [f for _, f in today_extract_images(old, files)]

    def run_new() -> None:
        out_new[:] = [f for _, f, _ in extract_images(new, files, batch_size=32, workers=2, engine=choice)]

    times = interleaved({"today": run_old, "new": run_new}, mode["pipeline_reps"])
    res: dict[str, Any] = {"source": source, "images": len(files), "engine": choice.describe(),
                           "choose_engine_s": choose_s,
                           "deviation": deviation(np.stack(out_new), np.stack(out_old)),
                           "wait_log": waits.lines[-1] if waits.lines else ""}
    for k, t in times.items():
        res[k] = {"images_per_wall_s": len(files) / statistics.median(t["wall"]),
                  "images_per_cpu_s": len(files) / statistics.median(t["cpu"]), "wall_s": t["wall"], "cpu_s": t["cpu"]}
    res["speedup_wall"] = res["new"]["images_per_wall_s"] / res["today"]["images_per_wall_s"]
    res["speedup_cpu"] = res["new"]["images_per_cpu_s"] / res["today"]["images_per_cpu_s"]
    return res


def render(res: dict[str, Any], mode: dict[str, Any]) -> str:
    g = res["gemm"]
    lines = [f"GEMM {g['n']}² fp32: {g['cpu_gflops']:.1f} GFLOP/s by CPU time, {g['wall_gflops']:.1f} by wall time",
             "images per CPU-second (share of the fp32 GEMM rate) [deviation from today's features]"]
    for key, r in res["models"].items():
        lines.append(f"{key} ({r['gflops_per_image']:.2f} GFLOP/image)")
        for batch in (int(k.split("_")[1]) for k in r if k.startswith("batch_")):
            cell = r[f"batch_{batch}"]
            lines.append(f"  batch {batch:<3}" + "".join(
                f"  {k} {c['images_per_cpu_s']:.1f} ({c['fraction_of_fp32_gemm']:.0%}) [{c['deviation']:.1e}]"
                for k, c in cell.items()))
    p = res["pipeline"]
    lines += ["", f"pipeline, EfficientNet-Lite0 224 px, batch 32, 2 decode workers, {p['source']}:",
              f"  today {p['today']['images_per_wall_s']:.1f} images/s wall, {p['today']['images_per_cpu_s']:.1f} per "
              f"CPU-second; new ({p['engine']['engine']}) {p['new']['images_per_wall_s']:.1f} wall, "
              f"{p['new']['images_per_cpu_s']:.1f} per CPU-second: ×{p['speedup_wall']:.2f} wall, "
              f"×{p['speedup_cpu']:.2f} CPU; features deviate {p['deviation']:.1e}",
              f"  engine choice took {p['choose_engine_s']:.1f} s: {p['engine']['engine_reason']}",
              f"  {p['wait_log']}"]
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    p = res["pipeline"]
    checks = [target("EfficientNet-Lite0 224 px pipeline ≥ 2.5× today's images/s (CPU time)", p["speedup_cpu"],
                     ">=", TARGET_SPEEDUP, "×"),
              target("... the same by wall time", p["speedup_wall"], ">=", TARGET_SPEEDUP, "×")]
    for key, r in res["models"].items():
        if key.startswith("resnet"):
            best = max(c["fraction_of_fp32_gemm"] for b in r.values() if isinstance(b, dict)
                       for k, c in b.items() if k in ("eager", "onnx", "compile"))
            checks.append(target(f"{key} best fp32 engine ≥ 60% of the fp32 GEMM rate", best, ">=",
                                 TARGET_RESNET_GEMM))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two models, one batch size, fewer repetitions")
    parser.add_argument("--json", type=Path, default=RESULTS / "extract.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes to build per shape)")
    parser.add_argument("--skip-models", action="store_true", help="only the pipeline")
    args = parser.parse_args()
    mode = MODES["quick" if args.quick else "full"]
    load_before, meter, m, t0 = begin(args.threads)
    res: dict[str, Any] = {"gemm": gemm_gflops(2048, mode["gemm_reps"]), "models": {}}
    with tempfile.TemporaryDirectory(prefix="vsectl_bench_extract_") as tmp:
        resnet_folder = resnet50_random(Path(tmp) / "resnet50")
        for (name, size), batches in ({} if args.skip_models else mode["models"]).items():
            res["models"][f"{name}@{size}"] = bench_model(name, size, batches, mode, resnet_folder, res["gemm"],
                                                          args.compile)
    print("the pipeline ...", file=sys.stderr, flush=True)
    res["pipeline"] = bench_pipeline(mode)
    res["targets"] = targets(res)
    cpu = meter.read()
    print(render(res, mode))
    print(render_targets(res["targets"]))
    write_report(args.json, {"machine": m, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                             "cpu_during_run": cpu, "quick": args.quick,
                             "mode": {**mode, "models": {f"{n}@{z}": b for (n, z), b in mode["models"].items()}},
                             "wall_s": time.perf_counter() - t0, "results": res})
    print(f"\nload average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
