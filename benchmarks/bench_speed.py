"""Training speed against the code as it was before the CPU speed work, side by side in one run, interleaved.

Extends bench_training.py (its Trainer, batches and pool swaps) at the paper's shapes: 36 × 2048 regions with the
p = 0.2 drop, BiGRU text (vocabulary 8,500, 8–20 tokens), GPO both sides, E = 1024, batch 128, hardest negatives.

- baseline: today's code before this work: packed BiGRU text, packed GPO generator, torch.sort for GPO's
  per-dimension sort, for-loop AdamW, the region encoder's fc and MLP over every padded row;
- new: the text BiGRU on the path `rnn_path_for(device)` picks (stepped on a CPU: vsectl.models.gru_cpu), the native
  GPO sort (vsectl.native.sortsets), the GPO generator's forward direction once, fused AdamW, the region products
  over the valid rows only; at fp32 and at bf16; and the same with today's GPO sort and weighted sum, and with
  the text BiGRU packed, to show what each choice is worth;
- new with both GPOs replaced by a zero-cost pool (the GPO share of the new fp32 step, by ablation);
- MiniLM-shaped (and optionally BERT-base-shaped) text step: baseline fp32 vs new fp32 vs new bf16;
- the AdamW step alone, for-loop vs fused, over the BiGRU model's parameters.

Every trainer steps through the real `train_one_epoch`; steps are taken round-robin so load bursts hit all alike.

    nice python benchmarks/bench_speed.py --threads 1 [--reps 3] [--bert] [--json benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_training import (
    BERT_TOKENS,
    BERT_VOCAB,
    CAPTION_TOKENS,
    FIRST_WORD_ID,
    SEED,
    TRANSFORMER_SHAPES,
    VOCAB,
    WARM_BATCH,
    Trainer,
    bert_body,
    bigru_config,
    build_bigru,
    make_batches,
)
from common import RESULTS, LoadMeter, describe, gemm_report, machine, render_targets, summary, target, write_report

from vsectl.config import load_recipe
from vsectl.models.image_encoders import RegionEncoder
from vsectl.models.pooling.base import torch_sort_features
from vsectl.models.pooling.gpo import GPO
from vsectl.models.rnn import packed_bigru, set_rnn_path
from vsectl.models.vse import VSEModel, create_model, param_groups
from vsectl.optim import create_adamw
from vsectl.runtime import Precision, fp32_island

TARGET_FP32 = 0.85        # new fp32 BiGRU step ÷ today's fp32 step
TARGET_BF16 = 0.35        # new bf16 BiGRU step ÷ today's fp32 step (a CPU with bf16 units)
TARGET_BERT_BF16 = 0.40   # new bf16 BERT-base step ÷ today's fp32 step (a CPU with bf16 units)
TARGET_GPO_SHARE = 0.06   # GPO ≤ 6 % of the new fp32 step


def torch_weighted_sum(ranked: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Today's shared-θ weighted sum (before this work): ranked^T·θ, in fp32."""
    with fp32_island(ranked.device.type):
        return torch.bmm(ranked.transpose(1, 2).float(), theta.float()).squeeze(-1)


class TorchSortGPO(GPO):
    """GPO with today's sort and weighted sum (torch.sort of a transposed copy, ranked^T·θ); the rest new."""

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ranked, _ = torch_sort_features(feats, lengths)  # today's sort, kept in the library as the fallback
        theta = self.weights(ranked, lengths)
        return torch_weighted_sum(ranked, theta), theta


class PackedGPO(TorchSortGPO):
    """Today's GPO: torch.sort, and the generator's BiGRU over one packed sequence per distinct length."""

    def scores(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        out = packed_bigru(self.gru, self.generator_input(lengths, max_len), lengths)
        return self.scorer((out[..., : self.d_hidden] + out[..., self.d_hidden :]) / 2)


class PlainRegionEncoder(RegionEncoder):
    """Today's region encoder: fc and the MLP over every padded row."""

    def project(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.fc(feats) + self.mlp(feats)


def with_pools(model: VSEModel, cls: type[GPO]) -> VSEModel:
    """Swap both GPOs for `cls` (a GPO subclass), same weights."""
    for enc in (model.image, model.text):
        if type(enc.pool) is GPO:
            ref = cls(enc.pool.d_pe, enc.pool.d_hidden, enc.pool.temperature)
            ref.load_state_dict(enc.pool.state_dict())
            enc.pool = ref
    return model


def as_baseline(model: VSEModel) -> VSEModel:
    """Put `model` on today's paths: packed text BiGRU (when it has one), torch.sort and packed GPO generators,
    every region row."""
    set_rnn_path(model, "packed")
    if type(model.image) is RegionEncoder:
        model.image.__class__ = PlainRegionEncoder  # same modules and weights, today's forward
    return with_pools(model, PackedGPO)


def with_optimizer(trainer: Trainer, fused: bool) -> Trainer:
    cfg = trainer.cfg
    groups = [{"params": g["params"], "name": g["name"], "lr_mult": g["lr_mult"], "lr": cfg.train.lr * g["lr_mult"]}
              for g in param_groups(trainer.model, cfg.train.lr_mult)]
    trainer.optimizer = create_adamw(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused)
    return trainer


def run_timed(trainers: dict[str, Trainer], reps: int) -> dict[str, Any]:
    """`run_trainers` (wall time from train_one_epoch's records) plus this process's CPU time per step.

    On a shared machine the wall time of a step mostly measures the scheduler; with one torch thread the process CPU
    time of a step is its compute alone (other tenants still cost it caches and memory bandwidth).
    """
    for t in trainers.values():
        t.run(record=False)
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for _ in range(reps):
        for name, t in trainers.items():
            c0 = time.process_time()
            t.run()
            cpu[name].append((time.process_time() - c0) / len(t.loader))
    out = {}
    for name, t in trainers.items():
        out[name] = {"step": summary(t.step_times), "cpu_step": summary(cpu[name]), "batch": t.loader.batch_size}
    return out


def gpo_alone_cpu(batch: dict[str, torch.Tensor], reps: int) -> dict[str, float]:
    """CPU seconds of the image + the text GPO forward + backward at the step's shapes (E = 1024), new vs today's."""
    g = torch.Generator().manual_seed(SEED)
    sets = [(torch.randn(lengths.numel(), int(lengths.max()), 1024, generator=g), lengths)
            for lengths in (batch["image_lengths"], batch["token_lengths"])]
    new = GPO()
    old = PackedGPO()
    old.load_state_dict(new.state_dict())
    times: dict[str, list[float]] = {"new": [], "baseline": []}
    for rep in range(reps + 1):
        for name, pool in (("new", new), ("baseline", old)):
            c0 = time.process_time()
            for x, lengths in sets:
                xi = x.clone().requires_grad_()
                pool(xi, lengths)[0].sum().backward()
            if rep:
                times[name].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in times.items()}


def bigru_steps(batch: int, reps: int, device: torch.device) -> dict[str, Any]:
    cfg = bigru_config(batch)
    batches = make_batches(1, batch, SEED, tokens=CAPTION_TOKENS, vocab=(4, VOCAB))
    warm = make_batches(1, WARM_BATCH, SEED + 3, tokens=CAPTION_TOKENS, vocab=(4, VOCAB))
    fp32_path, bf16_path = Precision("fp32", device).rnn_path, Precision("bf16", device).rnn_path
    variants = {  # name: (precision, pool, baseline paths, fused AdamW, text BiGRU path)
        "baseline_fp32": ("fp32", "gpo", True, False, "packed"),
        "new_fp32": ("fp32", "gpo", False, True, fp32_path),
        "new_fp32_torch_sort": ("fp32", "torch_sort", False, True, fp32_path),
        "new_fp32_packed": ("fp32", "gpo", False, True, "packed"),
        "new_bf16": ("bf16", "gpo", False, True, bf16_path),
        "new_bf16_torch_sort": ("bf16", "torch_sort", False, True, bf16_path),
        "new_fp32_zero_pool": ("fp32", "zero", False, True, fp32_path),
    }
    trainers = {}
    for name, (precision, pool, baseline, fused, path) in variants.items():
        model = build_bigru(cfg, "gpo" if pool == "torch_sort" else pool)
        set_rnn_path(model, path)
        if pool == "torch_sort":
            with_pools(model, TorchSortGPO)
        if baseline:
            as_baseline(model)
        trainers[name] = with_optimizer(Trainer(cfg, model, batches, precision, device,
                                                warm=warm if precision == "bf16" else None), fused)
    print(f"BiGRU steps, batch {batch}, {reps} rounds of {list(trainers)} ...", file=sys.stderr, flush=True)
    steps = run_timed(trainers, reps)
    med = {k: v["cpu_step"]["median_s"] for k, v in steps.items()}  # ratios from CPU time (see run_timed)
    base = med["baseline_fp32"]
    alone = gpo_alone_cpu(batches[0], 7)
    low = {k: v["cpu_step"]["min_s"] for k, v in steps.items()}  # neighbours only ever add CPU time to a step
    return {"steps": steps, "ratios_to_baseline_fp32": {k: v / base for k, v in med.items()},
            "ratios_of_fastest_steps": {k: v / low["baseline_fp32"] for k, v in low.items()},
            "gpo_share_new_fp32": (med["new_fp32"] - med["new_fp32_zero_pool"]) / med["new_fp32"],
            "gpo_alone_cpu_s": alone, "gpo_alone_share_new_fp32": alone["new"] / med["new_fp32"],
            "gpo_alone_share_baseline_fp32": alone["baseline"] / med["baseline_fp32"],
            "bf16_over_fp32_new_step": med["new_bf16"] / med["new_fp32"]}


def transformer_steps(name: str, batch: int, reps: int, device: torch.device) -> dict[str, Any]:
    kw = {"tokens": BERT_TOKENS, "vocab": (FIRST_WORD_ID, BERT_VOCAB), "specials": (101, 102)}
    batches = make_batches(1, batch, SEED + 2, **kw)
    warm = make_batches(1, WARM_BATCH, SEED + 4, **kw)
    cfg = load_recipe(None, [f"data.batch_size={batch}", "train.log_every=1", "model.text.encoder=transformers"])
    trainers = {}
    for key, precision, baseline in (("baseline_fp32", "fp32", True), ("new_fp32", "fp32", False),
                                     ("new_bf16", "bf16", False)):
        torch.manual_seed(SEED)
        model = create_model(cfg.model, text_body=bert_body(TRANSFORMER_SHAPES[name]))
        if baseline:
            as_baseline(model)
        trainers[key] = with_optimizer(Trainer(cfg, model, batches, precision, device,
                                               warm=warm if precision == "bf16" else None), fused=not baseline)
    print(f"{name} steps, batch {batch}, {reps} rounds ...", file=sys.stderr, flush=True)
    steps = run_timed(trainers, reps)
    med = {k: v["cpu_step"]["median_s"] for k, v in steps.items()}
    return {"steps": steps, "ratios_to_baseline_fp32": {k: v / med["baseline_fp32"] for k, v in med.items()}}


def optimizer_alone(reps: int) -> dict[str, Any]:
    """AdamW.step over the BiGRU model's parameters with random gradients: for-loop vs fused, interleaved."""
    cfg = bigru_config(128)
    opts = {}
    for fused in (False, True):
        model = build_bigru(cfg, "gpo")
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        groups = [{"params": g["params"], "lr_mult": g["lr_mult"], "lr": cfg.train.lr}
                  for g in param_groups(model, cfg.train.lr_mult)]
        opts["fused" if fused else "for_loop"] = create_adamw(groups, lr=cfg.train.lr, weight_decay=1e-4, fused=fused)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps + 1):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"median_s": med, "fused_over_for_loop": med["fused"] / med["for_loop"],
            "n_params": sum(p.numel() for p in model.parameters())}


def bigru_targets(b: dict[str, Any]) -> list[dict[str, Any]]:
    r = b["ratios_to_baseline_fp32"]
    return [
        target("BiGRU step fp32, new ÷ today's", r["new_fp32"], "<=", TARGET_FP32, "×"),
        target("BiGRU step bf16 (new) ÷ today's fp32", r["new_bf16"], "<=", TARGET_BF16, "×"),
        target("GPO share of the new fp32 step (ablation)", b["gpo_share_new_fp32"], "<=", TARGET_GPO_SHARE),
        target("GPO share of the new fp32 step (GPO alone ÷ step)", b["gpo_alone_share_new_fp32"], "<=",
               TARGET_GPO_SHARE),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bert", action="store_true", help="also the BERT-base-shaped text step (slow)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--only-bert", action="store_true", help="the BERT-base-shaped text step alone")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    meter, load_before = LoadMeter(), os.getloadavg()
    m = machine()
    print(describe(m), file=sys.stderr)
    res: dict[str, Any] = {"gemm": gemm_report(3, n=1024)}
    if not args.only_bert:
        res["adamw_alone"] = optimizer_alone(5)
        res["bigru"] = bigru_steps(args.batch, args.reps, device)
    if not args.no_transformers:
        shapes = ("bert-base",) if args.only_bert else ("minilm", "bert-base") if args.bert else ("minilm",)
        res["transformers"] = {n: transformer_steps(n, args.batch, max(2, args.reps - 1), device) for n in shapes}
    checks = [] if args.only_bert else bigru_targets(res["bigru"])
    for name, t in res.get("transformers", {}).items():
        tr = t["ratios_to_baseline_fp32"]
        checks.append(target(f"{name} step fp32, new ÷ today's", tr["new_fp32"], "<=", 1.0, "×"))
        checks.append(target(f"{name} step bf16 (new) ÷ today's fp32", tr["new_bf16"], "<=", TARGET_BERT_BF16, "×"))
    cpu = meter.read()
    report = {"machine": m, "threads": args.threads, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "cpu_during_run": cpu, "results": res, "targets": checks}
    for name, t in [*([("bigru", res["bigru"])] if "bigru" in res else []), *res.get("transformers", {}).items()]:
        print(f"{name}: step wall median s " + ", ".join(f"{k} {v['step']['median_s']:.3f}"
                                                       for k, v in t["steps"].items()))
        print(f"{name}: step CPU median s " + ", ".join(f"{k} {v['cpu_step']['median_s']:.3f}"
                                                      for k, v in t["steps"].items()))
        print(f"{name}: CPU time ÷ today's fp32 "
              + ", ".join(f"{k} {v:.3f}" for k, v in t["ratios_to_baseline_fp32"].items()))
        if "ratios_of_fastest_steps" in t:
            print(f"{name}: fastest step's CPU time ÷ today's fastest fp32 "
                  + ", ".join(f"{k} {v:.3f}" for k, v in t["ratios_of_fastest_steps"].items()))
    a = res.get("adamw_alone")
    if a:
        print(f"AdamW step alone ({a['n_params']:,} params): for-loop {a['median_s']['for_loop'] * 1e3:.1f} ms, fused "
              f"{a['median_s']['fused'] * 1e3:.1f} ms ({a['fused_over_for_loop']:.2f}×)")
    g = res["gemm"]
    print(f"GEMM 1024² fp32 {g['fp32']['tflops']['median']:.4f} TFLOP/s, bf16 {g['bf16']['tflops']['median']:.4f} "
          f"({g['bf16_over_fp32']:.2f}×)")
    print(render_targets(checks))
    print(f"load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}; other processes used "
          f"{cpu['others_cores']:.2f} of {os.cpu_count()} cores during the run; CPU flags "
          f"{'/'.join(m['simd'])}, bf16 units {m['bf16_matrix_units'] or 'none'}")
    write_report(args.json or RESULTS / "speed.json", report)


if __name__ == "__main__":
    main()
