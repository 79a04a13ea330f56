"""CUDA checks for a lent GPU machine: the paths CI (CPU only) cannot exercise.

Runs, in one short prepared script:
1. CPU vs CUDA agreement of one model forward (fp32) and of GPO's weights under bf16 autocast;
2. `vsectl train` on the toy set on CUDA at fp32, bf16 and fp16 (GradScaler), then `vsectl eval`;
3. training-step throughput at the paper's shapes (36×2048 regions, BiGRU, vocab 8,500, batch 128, GPO both sides),
   fp32 vs bf16, batched-by-length GPO vs a per-sample generator;
4. `vsectl extract` with efficientnet-lite0 on CUDA at fp32 and bf16 (images/s), features close to the CPU's.

Usage: python benchmarks/gpu_check.py --out DIR   (writes DIR/gpu_check.json; prints a summary)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vsectl.config import load_recipe  # noqa: E402
from vsectl.losses import ContrastiveLoss  # noqa: E402
from vsectl.models.pooling.gpo import GPO  # noqa: E402
from vsectl.models.vse import create_model  # noqa: E402


def sh(cmd: list[str], timeout: int = 300) -> tuple[int, float, str]:
    tic = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    return p.returncode, time.perf_counter() - tic, (p.stdout[-1500:] + p.stderr[-3000:])


def agreement() -> dict:
    cfg = load_recipe(None, ["model.embed_dim=256", "model.image.feat_dim=2048", "model.text.word_dim=300"]).model
    torch.manual_seed(0)
    model = create_model(cfg, vocab_size=8500).eval()
    g = torch.Generator().manual_seed(0)
    feats, lengths = torch.randn(16, 36, 2048, generator=g), torch.randint(10, 37, (16,), generator=g)
    tokens, tlen = torch.randint(4, 8500, (16, 20), generator=g), torch.randint(8, 21, (16,), generator=g)
    with torch.no_grad():
        cpu_img, _ = model.encode_image(feats, lengths)
        cpu_cap, _ = model.encode_text(tokens, tlen)
        model.cuda()
        gpu_img, _ = model.encode_image(feats.cuda(), lengths.cuda())
        gpu_cap, _ = model.encode_text(tokens.cuda(), tlen.cuda())
        gpo = GPO().cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, theta = gpo(torch.randn(8, 50, 64, device="cuda"), torch.randint(1, 51, (8,), device="cuda"))
    return {
        "img_max_abs_diff": float((cpu_img - gpu_img.cpu()).abs().max()),
        "cap_max_abs_diff": float((cpu_cap - gpu_cap.cpu()).abs().max()),
        "gpo_theta_dtype_under_bf16": str(theta.dtype),
        "gpo_theta_sum_err": float((theta.sum(1) - 1).abs().max()),
    }


class PerSampleGPO(GPO):
    """The original's way: run the generator for every sample."""

    def weights_for_lengths(self, lengths, max_len=None):  # noqa: ANN001, ANN201
        max_len = int(lengths.max()) if max_len is None else max_len
        return torch.cat([super(PerSampleGPO, self).weights_for_lengths(n[None], max_len) for n in lengths])


def throughput(precision: str, per_sample: bool, steps: int = 30) -> float:
    cfg = load_recipe(None, ["model.text.word_dim=300"]).model
    torch.manual_seed(0)
    model = create_model(cfg, vocab_size=8500)
    if per_sample:
        model.image.pool, model.text.pool = PerSampleGPO(), PerSampleGPO()
    model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    loss_fn = ContrastiveLoss(0.2)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        lengths = (torch.rand(128, 36, generator=g) >= 0.2).sum(1).clamp(min=1)
        tlen = torch.randint(8, 21, (128,), generator=g)
        batches.append((torch.randn(128, 36, 2048, generator=g).cuda(), lengths.cuda(),
                        torch.randint(4, 8500, (128, 20), generator=g).cuda(), tlen.cuda()))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cuda", enabled=False)
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            tic = time.perf_counter()
        f, fl, t, tl = batches[i % 4]
        with ctx:
            img, _ = model.encode_image(f, fl)
            cap, _ = model.encode_text(t, tl)
        loss = loss_fn(img, cap, hardest_negative=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
    torch.cuda.synchronize()
    return 128 * steps / (time.perf_counter() - tic)


def backbone_speed(precision: str, batch: int = 64, steps: int = 20) -> float:
    """efficientnet-lite0 forward images/s at 224 px on CUDA (channels-last), random input."""
    from vsectl.models.backbones import create_backbone

    net = create_backbone("efficientnet-lite0").cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cuda", enabled=False)
    with torch.no_grad(), ctx:
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                tic = time.perf_counter()
            net(x)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    report["agreement"] = agreement()
    print("agreement", report["agreement"], flush=True)

    toy = args.out / "toy"
    py = sys.executable
    code, _, log = sh([py, "-m", "vsectl", "data", "toy", "--out", str(toy)])
    assert code == 0, log
    report["train"] = {}
    for precision in ("fp32", "bf16", "fp16"):
        name = f"toy_{precision}"
        code, secs, log = sh([py, "-m", "vsectl", "-q", "train", "recipes/tiny.yaml", "--out", str(args.out / "runs"),
                              "--device", "cuda", "--set", f"data.root={toy}", "--set", f"name={name}",
                              "--set", f"train.precision={precision}", "--set", "train.epochs=3"])
        entry = {"returncode": code, "seconds": round(secs, 1)}
        if code == 0:
            code, _, out = sh([py, "-m", "vsectl", "-q", "eval", str(args.out / "runs" / name), "--split", "test",
                               "--device", "cuda", "--json"])
            entry["eval_rc"] = code
            if code == 0:
                entry["rsum"] = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["f30k"]["metrics"]["rsum"]
        else:
            entry["log"] = log
        report["train"][precision] = entry
        print("train", precision, entry, flush=True)

    report["throughput_pairs_per_s"] = {
        "fp32_batched_gpo": throughput("fp32", False),
        "bf16_batched_gpo": throughput("bf16", False),
        "fp32_per_sample_gpo": throughput("fp32", True),
    }
    print("throughput", report["throughput_pairs_per_s"], flush=True)

    raw = REPO / "tests" / "fixtures" / "clipart_mini"
    report["extract"] = {}
    feats = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        out = args.out / f"feats_{device}_{precision}"
        code, secs, log = sh([py, "-m", "vsectl", "-q", "extract", "--backbone", "efficientnet-lite0", "--data",
                              str(raw), "--split", "test", "--out", str(out), "--device", device, "--precision",
                              precision, "--batch-size", "64", "--dtype", "float32"])
        entry = {"returncode": code, "seconds": round(secs, 1)}
        if code == 0:
            from vsectl.data.sources import load_split

            split = load_split(out, "test")
            feats[(device, precision)] = torch.stack([torch.from_numpy(split.features.get(i)) for i in range(20)])
            entry["images"] = split.n_images
        else:
            entry["log"] = log
        report["extract"][f"{device}_{precision}"] = entry
        print("extract", device, precision, entry, flush=True)
    report["extract"]["backbone_images_per_s"] = {p: backbone_speed(p) for p in ("fp32", "bf16")}
    if ("cpu", "fp32") in feats and ("cuda", "fp32") in feats:
        ref = feats[("cpu", "fp32")]
        report["extract"]["cuda_fp32_vs_cpu_rel"] = float((feats[("cuda", "fp32")] - ref).norm() / ref.norm())
        if ("cuda", "bf16") in feats:
            report["extract"]["cuda_bf16_vs_cpu_rel"] = float((feats[("cuda", "bf16")] - ref).norm() / ref.norm())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
