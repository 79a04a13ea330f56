"""The CUDA checks, one short prepared script: what CI (CPU only) cannot exercise, in one run on a lent GPU.

1. official: the fixtures made by the official code (both branches: BiGRU and BERT text) import, load on the device
   and give the official embeddings (max |Δ|, limit 1e-4 on CUDA's TF32-free fp32);
2. step: the paper-shape training step (36 × 2048 regions with the p = 0.2 drop, BiGRU over 8–20 tokens, vocabulary
   8,500, GPO both sides, E = 1024, batch 128, hardest negatives, fused AdamW), pairs/s at fp32 and bf16, each eager
   and under torch.compile;
3. eval: COCO 5K ranking and R@K (5,000 × 25,000 random unit 1024-d embeddings already on the device), seconds;
4. extract: `extract_images` with EfficientNet-Lite0 at 224 px on the clip-art fixture PNGs, fp32 and bf16,
   images/s, and the features' deviation from the CPU's;
5. embed: `vsectl embed --features` with the demo's image tower (random weights) over synthetic 49 × 1280 fp16 sets,
   sets/s;
6. toy: `vsectl train` on the toy set for 2 epochs, and the same run stopped after 1 epoch and resumed: the two
   final checkpoints agree (max |Δ| of the weights).

Without a CUDA device every check is reported as skipped (exit 0), so the script runs anywhere; `--device cpu`
runs every check body on the CPU instead, and `--smoke` shrinks every shape so that takes seconds (the test suite
runs both on a CPU machine: tests/test_gpu_check.py).

    python benchmarks/gpu_check.py --out DIR [--device auto|cuda|cpu] [--smoke] [--only step eval ...]

Writes DIR/gpu_check.json and prints one line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIX = REPO / "tests" / "fixtures" / "official_vse_infty"
CLIPART = REPO / "tests" / "fixtures" / "clipart_mini"
OFFICIAL_LIMIT = 1e-4
SHAPES = {  # full (a GPU) vs smoke (seconds on a CPU)
    "full": {"batch": 128, "regions": 36, "feat": 2048, "embed": 1024, "vocab": 8500, "steps": 20, "warmup": 5,
             "coco": (5000, 25000), "extract_images": 256, "embed_sets": 8192, "compile": True, "workers": 2},
    "smoke": {"batch": 8, "regions": 6, "feat": 32, "embed": 16, "vocab": 50, "steps": 2, "warmup": 1,
              "coco": (20, 100), "extract_images": 4, "embed_sets": 64, "compile": False, "workers": 0},
}


class Skipped(Exception):
    """A check that cannot run here; its message says why."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ 1. official


def check_official(device: torch.device, shapes: dict[str, Any], out: Path) -> dict[str, Any]:
    from vsectl.builders import load_run
    from vsectl.importers.official import import_official

    res = {}
    for kind, folder, kw in (("bigru", "bigru", {"vocab": FIX / "bigru/vocab/f30k_precomp_vocab.json"}),
                             ("bert", "master", {"text_model": str(FIX / "master/bert")})):
        run = import_official(FIX / folder / "model_best.pth", out / f"official_{kind}", **kw)["run"]
        io = dict(np.load(FIX / folder / "io.npz"))
        _, model, _ = load_run(run, device=device)
        with torch.no_grad():
            img, _ = model.encode_image(torch.from_numpy(io["images"]).to(device),
                                        torch.from_numpy(io["image_lengths"]).to(device))
            cap, _ = model.encode_text(torch.from_numpy(io["captions"]).to(device),
                                       torch.from_numpy(io["caption_lengths"]).to(device))
        res[kind] = {"img_max_abs_diff": float((img.cpu() - torch.from_numpy(io["img_emb"])).abs().max()),
                     "cap_max_abs_diff": float((cap.cpu() - torch.from_numpy(io["cap_emb"])).abs().max())}
        res[kind]["ok"] = max(res[kind].values()) <= OFFICIAL_LIMIT
    return res


# ------------------------------------------------------------------------------------------------ 2. step


def _paper_batches(s: dict[str, Any], device: torch.device, n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lengths = (torch.rand(s["batch"], s["regions"], generator=g) >= 0.2).sum(1).clamp(min=1)
        tlen = torch.randint(8, 21, (s["batch"],), generator=g)
        out.append((torch.randn(s["batch"], s["regions"], s["feat"], generator=g).to(device), lengths.to(device),
                    torch.randint(4, s["vocab"], (s["batch"], 20), generator=g).to(device), tlen.to(device)))
    return out


def step_pairs_per_s(device: torch.device, s: dict[str, Any], precision: str, compiled: bool) -> float:
    from vsectl.config import load_recipe
    from vsectl.losses import ContrastiveLoss
    from vsectl.models.vse import create_model
    from vsectl.runtime import Precision

    cfg = load_recipe(None, [f"model.embed_dim={s['embed']}", f"model.image.feat_dim={s['feat']}",
                             "model.text.word_dim=300"]).model
    torch.manual_seed(0)
    model = create_model(cfg, vocab_size=s["vocab"]).to(device).train()
    encode_image, encode_text = model.encode_image, model.encode_text
    if compiled:
        encode_image, encode_text = torch.compile(encode_image, dynamic=True), torch.compile(encode_text, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=device.type == "cuda")
    loss_fn, prec = ContrastiveLoss(0.2), Precision(precision, device)
    batches = _paper_batches(s, device)
    times = []
    for i in range(s["steps"] + s["warmup"]):
        sync(device)
        t0 = time.perf_counter()
        f, fl, t, tl = batches[i % len(batches)]
        with prec.autocast():
            img, _ = encode_image(f, fl)
            cap, _ = encode_text(t, tl)
        loss = loss_fn(img.float(), cap.float(), hardest_negative=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sync(device)
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t0)
    return s["batch"] / statistics.median(times)


def check_step(device: torch.device, s: dict[str, Any], out: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        res[f"{precision}_eager_pairs_per_s"] = step_pairs_per_s(device, s, precision, compiled=False)
        if s["compile"]:
            try:
                res[f"{precision}_compiled_pairs_per_s"] = step_pairs_per_s(device, s, precision, compiled=True)
            except Exception as e:  # a graph torch.compile cannot take is a finding, not a failed check
                res[f"{precision}_compiled_pairs_per_s"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
        else:
            res[f"{precision}_compiled_pairs_per_s"] = "not run in --smoke (minutes to compile)"
    return res


# ------------------------------------------------------------------------------------------------ 3. eval


def check_eval(device: torch.device, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from vsectl.scoring.metrics import recall_metrics
    from vsectl.scoring.ranking import rank_retrieval

    n, c = s["coco"]
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, s["embed"], generator=g), dim=1).to(device)
    cap = torch.nn.functional.normalize(torch.randn(c, s["embed"], generator=g), dim=1).to(device)
    cap2img = (torch.arange(c) // (c // n)).to(device)
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        i2t, t2i = rank_retrieval([(img, cap)], cap2img)
        metrics = recall_metrics(i2t.cpu(), t2i.cpu())
        times.append(time.perf_counter() - t0)
    return {"images": n, "captions": c, "seconds": min(times), "rsum": metrics["rsum"]}


# ------------------------------------------------------------------------------------------------ 4. extract


def check_extract(device: torch.device, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from vsectl.extract import extract_images
    from vsectl.models.backbones import create_backbone

    paths = sorted((CLIPART / "images").glob("*.png"))[: s["extract_images"]]
    backbone = create_backbone("efficientnet-lite0")
    feats: dict[str, np.ndarray] = {}
    res: dict[str, Any] = {"images": len(paths)}
    for dev, precision in (("cpu", "fp32"), (device.type, "fp32"), (device.type, "bf16")):
        key = f"{dev}_{precision}"
        if key in feats:
            continue
        t0 = time.perf_counter()
        rows = [f for _, f, _ in extract_images(backbone, paths, batch_size=64, workers=s["workers"], device=dev,
                                                precision=precision, engine="eager")]
        seconds = time.perf_counter() - t0
        feats[key] = np.stack(rows)
        res[f"{key}_images_per_s"] = len(paths) / seconds
    ref = feats["cpu_fp32"]
    for key, f in feats.items():
        res[f"{key}_deviation_from_cpu"] = float(np.abs(f - ref).max() / np.abs(ref).max())
    return res


# ------------------------------------------------------------------------------------------------ 5. embed


def check_embed(device: torch.device, s: dict[str, Any], out: Path) -> dict[str, Any]:
    import vsectl
    from vsectl.data.store import write_store

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_retrieval import demo_tower

    cwd = Path.cwd()
    os.chdir(REPO)  # demo_tower reads recipes/demo.yaml from the repository root
    try:
        model = demo_tower(None)
    finally:
        os.chdir(cwd)
    model.net.to(device)
    model.device = device
    rng = np.random.default_rng(0)
    n = s["embed_sets"]
    sets = ((str(i), rng.standard_normal((49, 1280), dtype=np.float32).clip(0, 6)) for i in range(n))
    store = write_store(out / "embed_store.h5", sets, [], [], feat_dim=1280, dtype="float16")
    sync(device)
    t0 = time.perf_counter()
    vsectl.embed(model, out / "embed_out", features=store)
    sync(device)
    return {"sets": n, "sets_per_s": n / (time.perf_counter() - t0)}


# ------------------------------------------------------------------------------------------------ 6. toy run


def check_toy(device: torch.device, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from vsectl.config import load_recipe
    from vsectl.data.toy import make_toy_dataset
    from vsectl.training import train

    root = out / "toy"
    if not root.is_dir():
        make_toy_dataset(root, n_train=120, n_dev=30, n_test=30, seed=0)
    base = [f"data.root={root}", "train.epochs=2", "loss.hardest_negative_from_epoch=1", "train.lr_decay_epoch=1",
            "train.min_steps_warning=0"]
    tiny = REPO / "recipes/tiny.yaml"
    t0 = time.perf_counter()
    straight = train(load_recipe(tiny, [*base, "name=straight"]), out / "runs", device=str(device))
    seconds = time.perf_counter() - t0
    train(load_recipe(tiny, [*base, "name=resumed", "train.epochs=1"]), out / "runs", device=str(device))
    resumed = train(load_recipe(tiny, [*base, "name=resumed"]), out / "runs", device=str(device), resume=True)
    a = load_file(str(straight / "checkpoints/last/model.safetensors"))
    b = load_file(str(resumed / "checkpoints/last/model.safetensors"))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a) if a.keys() == b.keys() else float("inf")
    return {"two_epochs_s": seconds, "resumed_max_abs_weight_diff": diff, "same_keys": a.keys() == b.keys()}


CHECKS: dict[str, Callable[[torch.device, dict[str, Any], Path], dict[str, Any]]] = {
    "official": check_official, "step": check_step, "eval": check_eval, "extract": check_extract,
    "embed": check_embed, "toy": check_toy,
}


def run_checks(device_name: str, smoke: bool, out: Path, only: list[str]) -> dict[str, Any]:
    """Every check in order; each one's result, or skipped with why, or failed with its error."""
    cuda = torch.cuda.is_available()
    if device_name == "auto":
        device_name = "cuda" if cuda else "skip"
    if device_name == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible here")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device_name == "cuda" else device_name,
                              "torch": torch.__version__, "smoke": smoke, "checks": {}}
    shapes = SHAPES["smoke" if smoke else "full"]
    for name in only:
        t0 = time.perf_counter()
        try:
            if device_name == "skip":
                raise Skipped("no CUDA device on this machine")
            result = {"status": "ok", **CHECKS[name](torch.device(device_name), shapes, out)}
        except Skipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # one failing check must not hide the others' figures
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - t0
        report["checks"][name] = result
        print(f"{name:9} {result['status']:8} " + json.dumps({k: v for k, v in result.items()
                                                              if k not in ("status", "traceback")}), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json (default: a temporary one)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when visible, else every check is reported as skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: a quick run of every check body")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="vsectl_gpu_check_") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        report = run_checks(args.device, args.smoke, out, args.only)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'gpu_check.json'}" if args.out else "(no --out: the report was not kept)")
    failed = [n for n, r in report["checks"].items() if r["status"] == "failed"]
    bad_official = any(not r.get("ok", True) for r in report["checks"].get("official", {}).values()
                       if isinstance(r, dict))
    sys.exit(1 if failed or bad_official else 0)


if __name__ == "__main__":
    main()
