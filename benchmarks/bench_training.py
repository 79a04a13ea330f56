"""Benchmark training throughput at the paper's shapes (spec §3, §8): image–caption pairs per second, fp32 vs bf16.

Model: precomputed regions 36 × 2048 with the worker's size augmentation (each region dropped with p = 0.2), region
head (fc + MLP) → GPO, BiGRU text (vocabulary 8,500, captions of 8–20 tokens) → GPO, 1024-d joint space, batch 128,
hardest negatives, AdamW, grad clip 2.0. Each step runs through the real `vsectl.training.train_one_epoch` (its
per-step `pairs_per_s` records, `train.log_every=1`) on batches collated in advance by the real `collate_pairs`, so only
the model step is timed; the collate is timed on its own. It also measures:

- the share of the step spent in GPO, two ways: (a) ablation: the same step with both GPOs replaced by a zero-cost pool
  of the same output shape (row 0 of each set), share = (t_gpo − t_zero) / t_gpo; (b) GPO alone: forward + backward of
  both GPOs at the step's exact shapes, ÷ the step time. Both for vsectl's GPO (θ computed once per distinct length)
  and for a per-sample reference written here (the generator run on every sample, as the official code does);
- the machine's raw fp32 and bf16 GEMM TFLOP/s, to see what bf16 can gain at best on this CPU;
- the transformers text path at the MiniLM and BERT-base shapes (random weights from a BertConfig), fp32 vs bf16;
- the demo recipe's dev rsum at bf16 vs fp32, when `recipes/demo.yaml` and its data exist.

    python benchmarks/bench_training.py [--quick] [--json benchmarks/results/training.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    RESULTS,
    LoadMeter,
    describe,
    fmt_rate,
    fmt_time,
    gemm_report,
    machine,
    rate_summary,
    render_targets,
    summary,
    target,
    timed_interleaved,
    write_report,
)
from torch import nn

from vsectl.config import RunConfig, load_recipe
from vsectl.data.datasets import collate_pairs, drop_regions
from vsectl.kinds import REGION_DROP
from vsectl.losses import ContrastiveLoss
from vsectl.models.pooling.base import MASK_VALUE, length_mask
from vsectl.models.pooling.gpo import GPO
from vsectl.models.vse import VSEModel, create_model, param_groups
from vsectl.run_dir import MetricsLog
from vsectl.runtime import NullProgress, Precision
from vsectl.training import train_one_epoch

REGIONS, FEAT_DIM = 36, 2048       # BUTD precomputed regions
VOCAB = 8500                       # F30K's SCAN vocabulary is 8,482 ids with <mask>
CAPTION_TOKENS = (8, 20)           # BiGRU caption lengths, <start>/<end> included
BERT_TOKENS = (10, 22)             # 8–20 word pieces plus [CLS]/[SEP]
BERT_VOCAB = 30522                 # bert-base-uncased and MiniLM share this vocabulary
FIRST_WORD_ID = 1000               # BERT ids below this are specials and unused slots
EPOCH = 1                          # epoch ≥ 1 mines the hardest negative (LOSS-5)
SEED = 0
TARGET_GPO_SHARE = 0.05            # GPO under 5% of the training step
TARGET_BF16_SPEEDUP = 1.8          # bf16 pairs/s ≥ 1.8 × fp32 pairs/s
TRANSFORMER_SHAPES = {             # (layers, hidden, heads, intermediate)
    "minilm": (6, 384, 12, 1536),
    "bert-base": (12, 768, 12, 3072),
}
# bf16 is timed on fewer batches: on a CPU without bf16 matrix units a bf16 step is ~7× slower than fp32 (measured).
MODES = {
    "full": {"batch": 128, "fp32_batches": 3, "bf16_batches": 1, "reps": 3, "gpo_reps": 20, "gemm_n": 2048,
             "gemm_reps": 3, "collate_reps": 10, "bert_batch": 128, "bert_ratio_batch": 16,
             "bert_reps": {"fp32_large": 2, "fp32": 2, "bf16": 2}, "bert_shapes": ("minilm", "bert-base"),
             "bf16_ablation": True},
    "quick": {"batch": 32, "fp32_batches": 1, "bf16_batches": 1, "reps": 2, "gpo_reps": 5, "gemm_n": 1024,
              "gemm_reps": 2, "collate_reps": 3, "bert_batch": 0, "bert_ratio_batch": 8,
              "bert_reps": {"fp32": 1, "bf16": 1}, "bert_shapes": ("minilm",), "bf16_ablation": False},
}
WARM_BATCH = 8  # bf16 trainers warm up (threads, allocator, kernels) on a batch this small: a full one costs minutes


# --- pooling variants compared --------------------------------------------------------------------------------------


class PerSampleGPO(GPO):
    """The straightforward GPO of the official code: the generator (PE → BiGRU → score) runs once per sample.

    vsectl's GPO runs it once per distinct length and gathers; the result is identical (checked in `check_reference`).
    """

    def weights_for_lengths(self, lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
        max_len = int(lengths.max()) if max_len is None else max_len
        with torch.autocast(device_type=lengths.device.type, enabled=False):
            scores = self.scores(lengths, max_len).float()                    # (B, L, 1): one GRU row per sample
            scores = scores.masked_fill(~length_mask(lengths, max_len)[..., None], MASK_VALUE)
            return torch.softmax(scores / self.temperature, dim=1)


class StridedSortGPO(GPO):
    """vsectl's GPO forward before 2026-11-26, kept as the baseline: torch.sort along the middle axis of (B, K', D)
    (B·D strided columns) and the weighted sum as `(ranked * θ).sum(1)`.

    vsectl now sorts a (B, D, K') copy, whose columns are contiguous rows, and takes the sum as one fp32 batched
    matmul. Same θ, same outputs (up to the summation order; checked in `check_strided`).
    """

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        max_len = int(lengths.max())
        mask = length_mask(lengths, max_len)                                              # (B, K')
        filled = feats[:, :max_len].masked_fill(~mask[..., None], MASK_VALUE)
        ranked = filled.sort(dim=1, descending=True).values                               # (B, K', D)
        ranked = ranked.masked_fill(~mask[..., None], 0.0)
        theta = self.weights_for_lengths(lengths, max_len)                                # (B, K', 1) fp32
        return (ranked * theta).sum(dim=1), theta


def check_strided(lengths: torch.Tensor, dim: int = 64) -> float:
    """Max |difference| of pooled outputs and input gradients between vsectl's GPO and `StridedSortGPO`."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(lengths.numel(), int(lengths.max()), dim, generator=g)
    gpo, fast = GPO(), StridedSortGPO()
    fast.load_state_dict(gpo.state_dict())
    diffs = []
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [pool(xi, lengths)[0] for pool, xi in zip((gpo, fast), xs, strict=True)]
    for out in outs:
        (out * torch.arange(dim, dtype=out.dtype)).sum().backward()
    diffs.append(float((outs[0] - outs[1]).detach().abs().max()))
    diffs.append(float((xs[0].grad - xs[1].grad).abs().max()))
    return max(diffs)


class FirstRowPool(nn.Module):
    """Ablation only: row 0 of each set, the same (B, D) output as GPO at nearly zero cost (no sort, no generator)."""

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, None]:
        return feats[:, 0], None


def set_pools(model: VSEModel, kind: str) -> VSEModel:
    """Swap both poolers: 'gpo' (vsectl), 'per_sample' (reference), 'strided' (previous), 'zero' (ablation)."""
    variants = {"per_sample": PerSampleGPO, "strided": StridedSortGPO}
    for enc in (model.image, model.text):
        if kind in variants:
            ref = variants[kind](enc.pool.d_pe, enc.pool.d_hidden, enc.pool.temperature)
            ref.load_state_dict(enc.pool.state_dict())  # same weights as vsectl's GPO
            enc.pool = ref
        elif kind == "zero":
            enc.pool = FirstRowPool()
    return model


def check_reference(lengths: torch.Tensor) -> float:
    """Max |θ_vsectl − θ_per_sample| on `lengths`: the reference must compute the same weights."""
    gpo = GPO()
    ref = PerSampleGPO()
    ref.load_state_dict(gpo.state_dict())
    with torch.no_grad():
        return float((gpo.weights_for_lengths(lengths) - ref.weights_for_lengths(lengths)).abs().max())


# --- synthetic batches ------------------------------------------------------------------------------------------------


def make_items(batch: int, rng: np.random.Generator, tokens: tuple[int, int], vocab: tuple[int, int],
               specials: tuple[int, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """`batch` PairDataset-style items: (regions after the p = 0.2 drop (n, 2048), token ids (T,), index)."""
    items = []
    for i in range(batch):
        feats = drop_regions(rng.standard_normal((REGIONS, FEAT_DIM), dtype=np.float32), REGION_DROP, rng)
        ids = rng.integers(vocab[0], vocab[1], size=int(rng.integers(tokens[0], tokens[1] + 1)))
        if specials is not None:
            ids[0], ids[-1] = specials
        items.append((torch.from_numpy(feats), torch.from_numpy(ids.astype(np.int64)), i))
    return items


def make_batches(n: int, batch: int, seed: int, **kw: Any) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [collate_pairs(make_items(batch, rng, **kw), pad_id=0) for _ in range(n)]


class BatchList:
    """A ready list of batches posing as the DataLoader `train_one_epoch` iterates (it reads len and .dataset)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.batch_size = batches[0]["images"].size(0)
        self.dataset = range(len(batches) * self.batch_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)


class StepRecords(MetricsLog):
    """Keeps train_one_epoch's per-step records in memory instead of appending them to metrics.jsonl."""

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), enabled=True)
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)


# --- one training configuration ---------------------------------------------------------------------------------------


class Trainer:
    """A model, its AdamW and a precision, stepped through the real `train_one_epoch` over in-memory batches.

    Args:
        batches: the timed batches (one `run` is one pass over them).
        warm: batches of the untimed warm-up pass (default: the timed ones).
    """

    def __init__(self, cfg: RunConfig, model: VSEModel, batches: list[dict[str, torch.Tensor]], precision: str,
                 device: torch.device, warm: list[dict[str, torch.Tensor]] | None = None) -> None:
        self.cfg, self.model, self.device = cfg, model.to(device), device
        self.loader, self.warm_loader = BatchList(batches), BatchList(warm or batches)
        groups = param_groups(model, cfg.train.lr_mult)
        self.optimizer = torch.optim.AdamW(
            [{"params": g["params"], "name": g["name"], "lr_mult": g["lr_mult"], "lr": cfg.train.lr * g["lr_mult"]}
             for g in groups], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        self.criterion = ContrastiveLoss(margin=cfg.loss.margin)
        self.precision = Precision(precision, device)
        self.step_times: list[float] = []  # seconds per step, as train_one_epoch measured them

    def run(self, record: bool = True) -> None:
        """One pass over the timed batches (or the warm-up ones), as one `train_one_epoch` call."""
        metrics = StepRecords()
        loader = self.loader if record else self.warm_loader
        train_one_epoch(self.model, loader, self.optimizer, self.criterion, self.cfg, EPOCH, 0, self.device,
                        self.precision, metrics, NullProgress())
        if record:  # train_one_epoch's pairs/s: the step time including its loss.item() sync
            self.step_times += [loader.batch_size / r["pairs_per_s"] for r in metrics.records]


def bigru_config(batch: int) -> RunConfig:
    # The defaults are the paper's region + BiGRU recipe (GPO both sides, E = 1024, AdamW 5e-4, clip 2.0, margin 0.2).
    return load_recipe(None, [f"data.batch_size={batch}", "train.log_every=1"])


def build_bigru(cfg: RunConfig, pool: str) -> VSEModel:
    torch.manual_seed(SEED)
    return set_pools(create_model(cfg.model, vocab_size=VOCAB), pool)


def run_trainers(trainers: dict[str, Trainer], reps: int | dict[str, int]) -> dict[str, dict[str, Any]]:
    """Warm each trainer up with one pass, then `reps` passes (per trainer if a dict) round-robin.

    Returns:
        per trainer: step time and pairs/s, each with median and [min–max] over every timed step.
    """
    reps = reps if isinstance(reps, dict) else dict.fromkeys(trainers, reps)
    for t in trainers.values():
        t.run(record=False)
    for rep in range(max(reps.values())):
        for name, t in trainers.items():
            if rep < reps[name]:
                t.run()
    out = {}
    for name, t in trainers.items():
        batch = t.loader.batch_size
        out[name] = {"step": summary(t.step_times), "pairs_per_s": rate_summary(batch, t.step_times),
                     "steps_timed": len(t.step_times), "batch": batch}
    return out


# --- GPO on its own ---------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpo_alone(batches: list[dict[str, torch.Tensor]], reps: int, device: torch.device) -> dict[str, Any]:
    """Forward + backward of the image and the text GPO at the step's shapes (E = 1024), vsectl vs per-sample."""
    b0 = batches[0]
    g = torch.Generator().manual_seed(SEED)
    img_len, txt_len = b0["image_lengths"].to(device), b0["token_lengths"].to(device)
    img = torch.randn(img_len.numel(), int(img_len.max()), 1024, generator=g).to(device).requires_grad_()
    txt = torch.randn(txt_len.numel(), int(txt_len.max()), 1024, generator=g).to(device).requires_grad_()
    pools = {"gpo": GPO().to(device), "per_sample": PerSampleGPO().to(device),
             "strided": StridedSortGPO().to(device)}
    for name in ("per_sample", "strided"):
        pools[name].load_state_dict(pools["gpo"].state_dict())

    def fwd_bwd(pool: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> None:
        pooled, _ = pool(x, lengths)
        pooled.sum().backward()
        sync(device)

    def theta_only(pool: GPO, lengths: torch.Tensor) -> None:
        pool.weights_for_lengths(lengths).sum().backward()
        sync(device)

    fns = {}
    for name, pool in pools.items():
        fns[f"{name}_image"] = lambda p=pool: fwd_bwd(p, img, img_len)
        fns[f"{name}_text"] = lambda p=pool: fwd_bwd(p, txt, txt_len)
        if name != "strided":  # it shares vsectl's θ generator
            fns[f"{name}_theta_image"] = lambda p=pool: theta_only(p, img_len)
            fns[f"{name}_theta_text"] = lambda p=pool: theta_only(p, txt_len)
    times = timed_interleaved(fns, reps, warmup=2)
    out: dict[str, Any] = {k: summary(v) for k, v in times.items()}
    for name in pools:
        out[f"{name}_both_s"] = statistics.median(times[f"{name}_image"]) + statistics.median(times[f"{name}_text"])
    out["distinct_lengths"] = {"image": int(img_len.unique().numel()), "text": int(txt_len.unique().numel()),
                               "batch": int(img_len.numel())}
    return out


# --- the transformers text path ---------------------------------------------------------------------------------------


def bert_body(shape: tuple[int, int, int, int]) -> nn.Module:
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    layers, hidden, heads, inter = shape
    hf_logging.set_verbosity_error()
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=inter, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False)


def transformer_path(mode: dict[str, Any], batches_seed: int, device: torch.device) -> dict[str, Any]:
    """Region image + BERT-shaped text (random weights): fp32 pairs/s at batch `bert_batch`, and the bf16 ÷ fp32
    ratio at the smaller `bert_ratio_batch` (a BERT-base bf16 step at batch 128 takes many minutes without bf16 units).
    """
    bert_kw = {"tokens": BERT_TOKENS, "vocab": (FIRST_WORD_ID, BERT_VOCAB), "specials": (101, 102)}
    sizes = {"fp32_large": mode["bert_batch"], "fp32": mode["bert_ratio_batch"], "bf16": mode["bert_ratio_batch"]}
    sizes = {k: v for k, v in sizes.items() if v}
    data = {b: make_batches(1, b, batches_seed, **bert_kw) for b in set(sizes.values())}
    warm = make_batches(1, WARM_BATCH, batches_seed + 1, **bert_kw)
    out: dict[str, Any] = {"batch": mode["bert_batch"], "ratio_batch": mode["bert_ratio_batch"]}
    for name in mode["bert_shapes"]:
        shape = TRANSFORMER_SHAPES[name]
        print(f"  transformers text, {name} shape {shape}, batches {sizes} ...", file=sys.stderr, flush=True)
        trainers = {}
        for key, b in sizes.items():
            cfg = load_recipe(None, [f"data.batch_size={b}", "train.log_every=1", "model.text.encoder=transformers"])
            torch.manual_seed(SEED)
            model = create_model(cfg.model, text_body=bert_body(shape))
            trainers[key] = Trainer(cfg, model, data[b], "bf16" if key == "bf16" else "fp32", device,
                                    warm=warm if key == "bf16" else None)
        res: dict[str, Any] = run_trainers(trainers, {k: mode["bert_reps"][k] for k in trainers})
        res["bf16_over_fp32"] = res["bf16"]["pairs_per_s"]["median"] / res["fp32"]["pairs_per_s"]["median"]
        res["shape"] = dict(zip(("layers", "hidden", "heads", "intermediate"), shape, strict=True))
        out[name] = res
        del trainers
    return out


# --- profile ----------------------------------------------------------------------------------------------------------


def profile_step(trainer: Trainer, top: int = 12) -> list[dict[str, Any]]:
    """The ops taking most self CPU time over one timed-size step (what limits the step)."""
    from torch.profiler import ProfilerActivity, profile

    one = BatchList(trainer.loader.batches[:1])
    trainer.warm_loader, saved = one, trainer.warm_loader
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.run(record=False)
    trainer.warm_loader = saved
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_cpu_share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:top]]


# --- the demo recipe --------------------------------------------------------------------------------------------------


def demo_rsum(recipe: Path, device: str, epochs: int = 0) -> dict[str, Any]:
    """Train the demo recipe at fp32 and at bf16 and compare the best dev rsum (only if its data is prepared).

    `epochs` > 0 shortens both runs alike (a bf16 run without bf16 units takes several times the fp32 one).
    """
    if not recipe.is_file():
        return {"skipped": f"{recipe} does not exist yet"}
    cfg = load_recipe(recipe)
    if not Path(cfg.data.root).is_dir():
        return {"skipped": f"the demo data {cfg.data.root} is not prepared"}
    from vsectl.training import train

    extra = [f"train.epochs={epochs}"] if epochs > 0 else []
    out: dict[str, Any] = {"recipe": str(recipe), "epochs": epochs or cfg.train.epochs}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        for precision in ("fp32", "bf16"):
            run_cfg = load_recipe(recipe, [f"train.precision={precision}", f"name=demo_{precision}", *extra])
            t0 = time.perf_counter()
            run_dir = train(run_cfg, out_root=tmp, device=device)
            wall = time.perf_counter() - t0
            vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rsums = [v["rsum"] for v in vals if v.get("kind") == "val"]
            out[precision] = {"best_dev_rsum": max(rsums), "last_dev_rsum": rsums[-1], "wall_s": wall}
    out["rsum_bf16_minus_fp32"] = out["bf16"]["best_dev_rsum"] - out["fp32"]["best_dev_rsum"]
    return out


# --- driver -----------------------------------------------------------------------------------------------------------


def bench(mode: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    batch = mode["batch"]
    cfg = bigru_config(batch)
    res: dict[str, Any] = {"device": str(device)}
    print("GEMM throughput ...", file=sys.stderr, flush=True)
    res["gemm"] = gemm_report(mode["gemm_reps"], n=mode["gemm_n"], device=device.type)

    t0 = time.perf_counter()
    batches = make_batches(mode["fp32_batches"], batch, SEED, tokens=CAPTION_TOKENS, vocab=(4, VOCAB))
    warm = make_batches(1, WARM_BATCH, SEED + 3, tokens=CAPTION_TOKENS, vocab=(4, VOCAB))
    res["batch_generation_s"] = time.perf_counter() - t0
    items = make_items(batch, np.random.default_rng(SEED + 1), CAPTION_TOKENS, (4, VOCAB))
    collate_times = timed_interleaved({"collate": lambda: collate_pairs(items, pad_id=0)}, mode["collate_reps"])
    res["collate"] = {"batch": summary(collate_times["collate"]),
                      "pairs_per_s": rate_summary(batch, collate_times["collate"])}
    lengths = torch.cat([b["image_lengths"] for b in batches] + [b["token_lengths"] for b in batches])
    res["reference_max_abs_diff"] = check_reference(lengths)
    res["strided_max_abs_diff"] = check_strided(batches[0]["image_lengths"])
    res["shapes"] = {"batch": batch, "image_lengths_mean": float(torch.cat([b["image_lengths"] for b in batches])
                                                                 .float().mean()),
                     "token_lengths_mean": float(torch.cat([b["token_lengths"] for b in batches]).float().mean())}

    variants = {"fp32_gpo": ("fp32", "gpo"), "fp32_zero": ("fp32", "zero"), "fp32_per_sample": ("fp32", "per_sample"),
                "fp32_strided": ("fp32", "strided"), "bf16_gpo": ("bf16", "gpo")}
    if mode["bf16_ablation"]:
        variants["bf16_zero"] = ("bf16", "zero")
    print(f"BiGRU step, batch {batch}: {mode['reps']} rounds of {mode['fp32_batches']} fp32 / "
          f"{mode['bf16_batches']} bf16 steps per variant {list(variants)} ...", file=sys.stderr, flush=True)
    trainers = {}
    for name, (precision, pool) in variants.items():
        timed = batches if precision == "fp32" else batches[: mode["bf16_batches"]]
        trainers[name] = Trainer(cfg, build_bigru(cfg, pool), timed, precision, device,
                                 warm=warm if precision == "bf16" else None)
    steps = run_trainers(trainers, mode["reps"])
    res["bigru"] = steps
    med = {k: v["step"]["median_s"] for k, v in steps.items()}
    res["gpo_share"] = {
        "ablation_fp32": (med["fp32_gpo"] - med["fp32_zero"]) / med["fp32_gpo"],
        "ablation_fp32_per_sample": (med["fp32_per_sample"] - med["fp32_zero"]) / med["fp32_per_sample"],
        "ablation_fp32_strided": (med["fp32_strided"] - med["fp32_zero"]) / med["fp32_strided"],
    }
    if "bf16_zero" in med:
        res["gpo_share"]["ablation_bf16"] = (med["bf16_gpo"] - med["bf16_zero"]) / med["bf16_gpo"]
    res["bf16_over_fp32"] = steps["bf16_gpo"]["pairs_per_s"]["median"] / steps["fp32_gpo"]["pairs_per_s"]["median"]
    res["per_sample_over_gpo_step"] = med["fp32_per_sample"] / med["fp32_gpo"]
    res["strided_over_gpo_step"] = med["fp32_strided"] / med["fp32_gpo"]

    print("GPO alone ...", file=sys.stderr, flush=True)
    alone = gpo_alone(batches, mode["gpo_reps"], device)
    res["gpo_alone"] = alone
    res["gpo_share"]["alone_fp32"] = alone["gpo_both_s"] / med["fp32_gpo"]
    res["gpo_share"]["alone_fp32_per_sample"] = alone["per_sample_both_s"] / med["fp32_per_sample"]
    res["gpo_share"]["alone_fp32_strided"] = alone["strided_both_s"] / med["fp32_strided"]
    res["gpo_alone_speedup"] = alone["per_sample_both_s"] / alone["gpo_both_s"]
    res["strided_alone_slowdown"] = alone["strided_both_s"] / alone["gpo_both_s"]

    if not args.no_profile and not args.quick and device.type == "cpu":
        print("profiling one step at fp32 and bf16 ...", file=sys.stderr, flush=True)
        res["profile"] = {p: profile_step(trainers[f"{p}_gpo"]) for p in ("fp32", "bf16")}
    del trainers
    if not args.no_transformers:
        print("transformers text path ...", file=sys.stderr, flush=True)
        res["transformers"] = transformer_path(mode, SEED + 2, device)
    if args.quick or not args.demo:
        res["demo"] = {"skipped": "run with --demo or --demo-only (two demo trainings; bf16 is slow on this CPU)"}
    else:
        res["demo"] = demo_rsum(args.demo_recipe, args.device, args.demo_epochs)
    return res


def render(res: dict[str, Any]) -> str:
    g, s = res["gemm"], res["bigru"]
    lines = [
        f"GEMM {g['fp32']['n']}² fp32: {fmt_rate(g['fp32']['tflops'], 'TFLOP/s', 4)}   "
        f"bf16: {fmt_rate(g['bf16']['tflops'], 'TFLOP/s', 4)}   bf16/fp32 {g['bf16_over_fp32']:.3f}×",
        f"collate_pairs (batch {res['shapes']['batch']}): {fmt_time(res['collate']['batch'])} = "
        f"{fmt_rate(res['collate']['pairs_per_s'], 'pairs/s', 0)}",
        f"mean set size after the drop {res['shapes']['image_lengths_mean']:.1f} regions, mean caption "
        f"{res['shapes']['token_lengths_mean']:.1f} tokens",
        "",
        f"{'BiGRU training step (batch ' + str(res['shapes']['batch']) + ')':36}{'step':>26}{'pairs/s':>30}",
    ]
    for name, r in s.items():
        lines.append(f"  {name:34}{fmt_time(r['step'], 1, 's', 3):>26}{fmt_rate(r['pairs_per_s'], '', 1):>30}")
    sh = res["gpo_share"]
    a = res["gpo_alone"]
    lines += [
        "",
        f"bf16 ÷ fp32 pairs/s: {res['bf16_over_fp32']:.2f}×   per-sample GPO step ÷ vsectl GPO step: "
        f"{res['per_sample_over_gpo_step']:.3f}×",
        f"GPO share of the step (ablation, fp32): vsectl {sh['ablation_fp32']:.1%}, per-sample "
        f"{sh['ablation_fp32_per_sample']:.1%}"
        + (f"; bf16: vsectl {sh['ablation_bf16']:.1%}" if "ablation_bf16" in sh else ""),
        f"GPO share of the step (GPO alone fwd+bwd ÷ step, fp32): vsectl {sh['alone_fp32']:.1%}, per-sample "
        f"{sh['alone_fp32_per_sample']:.1%}",
        f"GPO alone, image + text fwd+bwd: vsectl {a['gpo_both_s'] * 1e3:.1f} ms, per-sample "
        f"{a['per_sample_both_s'] * 1e3:.1f} ms ({res['gpo_alone_speedup']:.1f}×); θ only (image/text): vsectl "
        f"{fmt_time(a['gpo_theta_image'])} / {fmt_time(a['gpo_theta_text'])}, per-sample "
        f"{fmt_time(a['per_sample_theta_image'])} / {fmt_time(a['per_sample_theta_text'])}; distinct lengths "
        f"{a['distinct_lengths']}",
        f"reference check: max |θ − θ_per_sample| = {res['reference_max_abs_diff']:.2e}; previous strided-sort GPO:"
        f" max |Δ| of outputs and input grads {res['strided_max_abs_diff']:.2e}",
        f"previous strided-sort GPO (baseline): alone {a['strided_both_s'] * 1e3:.1f} ms "
        f"({res['strided_alone_slowdown']:.2f}× vsectl's time), share of its step: ablation "
        f"{sh['ablation_fp32_strided']:.1%}, alone {sh['alone_fp32_strided']:.1%}; its step takes "
        f"{res['strided_over_gpo_step']:.3f}× vsectl's",
    ]
    if "transformers" in res:
        tr = res["transformers"]
        lines += ["", "transformers text path, pairs/s:"]
        for name in (k for k in TRANSFORMER_SHAPES if k in tr):
            r = tr[name]
            large = (f"fp32 at batch {tr['batch']}: {fmt_rate(r['fp32_large']['pairs_per_s'], '', 2)};  "
                     if "fp32_large" in r else "")
            lines.append(f"  {name:10} {large}at batch {tr['ratio_batch']}: fp32 "
                         f"{fmt_rate(r['fp32']['pairs_per_s'], '', 2)}, "
                         f"bf16 {fmt_rate(r['bf16']['pairs_per_s'], '', 2)}, bf16/fp32 {r['bf16_over_fp32']:.2f}×")
    if "profile" in res:
        for p, ops in res["profile"].items():
            top = ", ".join(f"{o['op']} {o['self_cpu_share']:.0%}" for o in ops[:6])
            lines.append(f"profile {p}: {top}")
    d = res["demo"]
    if "skipped" in d:
        lines.append(f"demo: skipped ({d['skipped']})")
    else:
        fp32, bf16 = d["fp32"]["best_dev_rsum"], d["bf16"]["best_dev_rsum"]
        lines.append(f"demo ({d['epochs']} epochs): best dev rsum fp32 {fp32:.2f} ({d['fp32']['wall_s']:.0f} s), "
                     f"bf16 {bf16:.2f} ({d['bf16']['wall_s']:.0f} s)")
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    sh = res["gpo_share"]
    checks = [
        target("GPO share of the step, ablation (fp32)", sh["ablation_fp32"], "<=", TARGET_GPO_SHARE),
        target("GPO share of the step, GPO alone ÷ step (fp32)", sh["alone_fp32"], "<=", TARGET_GPO_SHARE),
        target("bf16 ÷ fp32 pairs/s (BiGRU)", res["bf16_over_fp32"], ">=", TARGET_BF16_SPEEDUP, "×"),
    ]
    if "ablation_bf16" in sh:
        checks.insert(2, target("GPO share of the step, ablation (bf16)", sh["ablation_bf16"], "<=", TARGET_GPO_SHARE))
    for name in (k for k in TRANSFORMER_SHAPES if k in res.get("transformers", {})):
        checks.append(target(f"bf16 ÷ fp32 pairs/s ({name})", res["transformers"][name]["bf16_over_fp32"], ">=",
                             TARGET_BF16_SPEEDUP, "×"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, a smaller transformers batch")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default results/training.json, or training_demo.json with --demo-only)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the MiniLM / BERT-base path")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass")
    parser.add_argument("--demo-recipe", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--demo-epochs", type=int, default=0, help="shorten both demo runs (0: the recipe's)")
    parser.add_argument("--demo", action="store_true", help="also train the demo at fp32 and bf16 (full mode; long)")
    parser.add_argument("--demo-only", action="store_true", help="only the demo rsum comparison")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for a side note on a GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mode = MODES["quick" if args.quick else "full"]
    torch.manual_seed(SEED)
    load_before = os.getloadavg()
    meter = LoadMeter()
    m = machine()
    print(describe(m), file=sys.stderr)
    if args.demo_only:
        demo = demo_rsum(args.demo_recipe, args.device, args.demo_epochs)
        print(json.dumps(demo, indent=2))
        write_report(args.json or RESULTS / "training_demo.json",
                     {"machine": m, "load_average_before": load_before, "load_average_after": os.getloadavg(),
                      "results": {"demo": demo}})
        return
    args.json = args.json or RESULTS / "training.json"
    res = bench(mode, args)
    checks = targets(res)
    load_after = os.getloadavg()
    print(render(res))
    print()
    print(render_targets(checks))
    report = {"machine": m, "load_average_before": load_before, "load_average_after": load_after,
              "cpu_during_run": meter.read(), "quick": args.quick, "mode": mode, "results": res, "targets": checks,
              "training_pairs_per_s": {"fp32": res["bigru"]["fp32_gpo"]["pairs_per_s"]["median"],
                                       "bf16": res["bigru"]["bf16_gpo"]["pairs_per_s"]["median"]}}
    write_report(args.json, report)
    cpu = meter.read()
    print(f"\nload average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores on average during the run; wrote {args.json}")


if __name__ == "__main__":
    main()
