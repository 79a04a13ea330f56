"""The synthetic pattern-generation experiment (spec §12; paper supplement §2.3).

Random feature sets are pooled by a fixed ground-truth pattern over the per-dimension sorted features; a weight
generator is trained on (set, pooled output) pairs, and its θ(N) is compared with the pattern's by RMSE on seen sizes
and on unseen smaller and larger ones. Every detail the paper leaves open is pinned in `PatternsConfig` and
`recipes/patterns/*.yaml`, and explained in `docs/patterns.md`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from vsectl.config import pool_options
from vsectl.errors import ConfigError
from vsectl.io import atomic_write_json, atomic_write_text
from vsectl.models.pooling import create_pooler
from vsectl.models.pooling.base import sort_features
from vsectl.pool_options import options_class
from vsectl.runtime import NullProgress, Progress
from vsectl.science.experiment import load_experiment, recipe_dir
from vsectl.strict import from_dict, to_dict

log = logging.getLogger(__name__)

RECIPES = recipe_dir() / "patterns"

DESIGNS = {  # registry key → the paper's name; designs whose θ depends on the set size only
    "gpo": "Cos/Sin + BiGRU",
    "gpo_index_bigru": "Index + BiGRU",
    "gpo_mlp": "Cos/Sin + MLP",
    "gpo_interp": "Interp.",
    "gpo_transformer": "Cos/Sin + Transformer",
}


@dataclass(frozen=True)
class PatternsConfig:
    name: str = "default"
    seed: int = 0                   # every (pattern, design) run derives its own seed from this one
    patterns: str = "A,M-1,M-10,T-50%,L"                  # comma-separated: A | M-<K> | T-<P>% | L
    designs: str = "gpo,gpo_index_bigru,gpo_mlp,gpo_interp"  # comma-separated keys of DESIGNS
    dim: int = 32                   # feature dimension D of every set element, x ~ N(0, 1)
    train_min_size: int = 20        # training set sizes are drawn uniformly from [train_min_size, train_max_size]
    train_max_size: int = 100
    test_min_size: int = 10         # θ is scored at every N in [test_min_size, test_max_size]
    test_max_size: int = 120
    steps: int = 600                # Adam steps; every step draws fresh sets (no fixed training set)
    batch_size: int = 64            # sets per step
    sizes_per_batch: int = 8        # distinct set sizes per step (the generator's cost grows with them)
    lr: float = 3.0e-3              # Adam learning rate, cosine-decayed to 0 over `steps`
    d_pe: int = 32                  # generator sizes, as in the paper
    d_hidden: int = 32
    temperature: float = 0.1
    threads: int = 1                # torch threads per process (0 = torch's default); the ops are tiny
    jobs: int = 2                   # (pattern, design) pairs trained in parallel spawned processes

    def __post_init__(self) -> None:
        if not 1 <= self.train_min_size <= self.train_max_size:
            raise ConfigError("patterns: need 1 <= train_min_size <= train_max_size")
        if not 1 <= self.test_min_size <= self.test_max_size:
            raise ConfigError("patterns: need 1 <= test_min_size <= test_max_size")
        if self.batch_size % self.sizes_per_batch:
            raise ConfigError(f"patterns: sizes_per_batch ({self.sizes_per_batch}) must divide batch_size "
                              f"({self.batch_size})")
        for p in self.pattern_list:
            pattern_weights(p, 1)  # validates the name
        for d in self.design_list:
            if d not in DESIGNS:
                raise ConfigError(f"patterns: unknown design '{d}'; known: {', '.join(DESIGNS)}")

    @property
    def pattern_list(self) -> list[str]:
        return [p.strip() for p in self.patterns.split(",") if p.strip()]

    @property
    def design_list(self) -> list[str]:
        return [d.strip() for d in self.designs.split(",") if d.strip()]


def load_patterns_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PatternsConfig:
    """Read a patterns recipe (default: `recipes/patterns/default.yaml`), apply dotted overrides, validate strictly."""
    return load_experiment(PatternsConfig, path if path is not None else RECIPES / "default.yaml", overrides,
                           "patterns recipe")


# ----------------------------------------------------------------------------------------------------------------------
# ground-truth patterns


def pattern_weights(pattern: str, n: int) -> torch.Tensor:
    """θ* of a ground-truth pattern for a set of `n`, over 0-based sorted ranks (largest value first).

    A: 1/n everywhere. M-<K>: 1/min(K, n) on the first min(K, n) ranks. T-<P>%: the mean of the top ⌈P·n/100⌉.
    L: θ_k ∝ n − 1 − k, decreasing linearly to exactly 0 at the last rank, normalised to sum 1 (n = 1 gives [1]).

    Returns:
        (n,) fp32, summing to 1.
    """
    if n < 1:
        raise ValueError(f"set size must be >= 1, got {n}")
    top = None
    if pattern == "A":
        top = n
    elif m := re.fullmatch(r"M-(\d+)", pattern):
        top = min(int(m.group(1)), n)
    elif m := re.fullmatch(r"T-(\d+)%", pattern):
        top = max(1, math.ceil(int(m.group(1)) * n / 100))
    elif pattern == "L":
        if n == 1:
            return torch.ones(1)
        ramp = torch.arange(n - 1, -1, -1, dtype=torch.float32)
        return ramp / ramp.sum()
    if top is None or top < 1:
        raise ConfigError(f"unknown pattern '{pattern}'; use A, M-<K> (e.g. M-10), T-<P>% (e.g. T-50%) or L")
    theta = torch.zeros(n)
    theta[:top] = 1.0 / top
    return theta


def pattern_theta(pattern: str, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len, 1) ground-truth θ*, zero past each length."""
    out = torch.zeros(lengths.numel(), max_len, 1, device=lengths.device)
    for n in lengths.unique().tolist():
        out[lengths == n, :n, 0] = pattern_weights(pattern, n).to(lengths.device)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# one (pattern, design) run


def run_seed(cfg: PatternsConfig, pattern: str, design: str) -> int:
    """A seed that depends on the pair and the base seed only, so a subset of the table reproduces the full one."""
    return (cfg.seed * 1_000_003 + zlib.crc32(f"{pattern}/{design}".encode())) % 2**31


def build_design(cfg: PatternsConfig, design: str) -> nn.Module:
    values = {"d_pe": cfg.d_pe, "d_hidden": cfg.d_hidden, "temperature": cfg.temperature,
              "max_index": max(cfg.test_max_size, 1000)}
    takes = options_class(design)().keys()
    return create_pooler(pool_options(design, **{k: v for k, v in values.items() if k in takes}))


def fit_design(
    cfg: PatternsConfig, pattern: str, design: str, progress: Progress | None = None
) -> tuple[nn.Module, float]:
    """Train `design` to reproduce `pattern` on fresh random sets.

    Returns:
        the trained generator and the mean training loss over the last 10% of the steps.
    """
    progress = progress or NullProgress()
    seed = run_seed(cfg, pattern, design)
    torch.manual_seed(seed)
    model = build_design(cfg, design)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    per_size = cfg.batch_size // cfg.sizes_per_batch
    tail, tail_start = [], int(cfg.steps * 0.9)
    for step in progress.track(range(cfg.steps), total=cfg.steps, description=f"{pattern} · {design}"):
        sizes = torch.randint(cfg.train_min_size, cfg.train_max_size + 1, (cfg.sizes_per_batch,), generator=gen)
        lengths = sizes.repeat_interleave(per_size)                                     # (B,)
        x = torch.randn(lengths.numel(), int(lengths.max()), cfg.dim, generator=gen)   # (B, K, D)
        ranked, _ = sort_features(x, lengths)
        target = (ranked * pattern_theta(pattern, lengths, ranked.size(1))).sum(1)     # (B, D)
        pooled, _ = model(x, lengths)
        loss = nn.functional.mse_loss(pooled, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= tail_start:
            tail.append(loss.item())
    return model, sum(tail) / max(len(tail), 1)


@torch.no_grad()
def coefficient_rmse(model: nn.Module, pattern: str, sizes: list[int]) -> list[float]:
    """RMSE between the learned θ(N) and θ*(N) over the N valid ranks, for every N in `sizes`."""
    lengths = torch.tensor(sizes)
    width = max(sizes)
    err = (model.weights_for_lengths(lengths, width) - pattern_theta(pattern, lengths, width)) ** 2  # (U, L, 1)
    return (err.sum(dim=(1, 2)) / lengths.float()).sqrt().tolist()


def buckets(cfg: PatternsConfig) -> dict[str, tuple[int, int]]:
    """Size buckets, inclusive: seen, unseen smaller, unseen larger (empty buckets are left out)."""
    out = {"seen": (max(cfg.train_min_size, cfg.test_min_size), min(cfg.train_max_size, cfg.test_max_size)),
           "smaller": (cfg.test_min_size, cfg.train_min_size - 1),
           "larger": (cfg.train_max_size + 1, cfg.test_max_size)}
    return {k: v for k, v in out.items() if v[0] <= v[1]}


# ----------------------------------------------------------------------------------------------------------------------
# the table


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_pair(cfg: PatternsConfig, pattern: str, design: str, progress: Progress | None = None) -> dict:
    """Train one (pattern, design) pair and score it: {"pattern", "design", "per_size", "final_loss", "seconds"}."""
    tic = time.perf_counter()
    model, loss = fit_design(cfg, pattern, design, progress)
    per_size = coefficient_rmse(model, pattern, list(range(cfg.test_min_size, cfg.test_max_size + 1)))
    return {"pattern": pattern, "design": design, "per_size": per_size, "final_loss": loss,
            "seconds": time.perf_counter() - tic}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _pair_job(args: tuple[dict, str, str]) -> dict:
    cfg_dict, pattern, design = args
    return run_pair(from_dict(PatternsConfig, cfg_dict), pattern, design)


def run_patterns(cfg: PatternsConfig, out_dir: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Train every (pattern, design) pair, score θ by RMSE per size bucket, write results.json and results.md.

    With `cfg.jobs` > 1 the pairs run in that many spawned processes; each pair seeds itself (`run_seed`), so the
    numbers do not depend on `jobs` or on the order.

    Returns:
        {"config", "buckets", "rmse": {pattern: {design: {bucket: mean RMSE}}}, "per_size": {pattern: {design:
        [RMSE at each test size]}}, "final_loss", "seconds", "wall_s", "load_average": {"start", "end"},
        "torch_threads", "cpu_count", "paths"}.
    """
    progress = progress or NullProgress()
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    result: dict[str, Any] = {"config": to_dict(cfg), "designs": {d: DESIGNS[d] for d in cfg.design_list},
                              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                              "load_average": {"start": _load_average()}}
    pairs = [(p, d) for p in cfg.pattern_list for d in cfg.design_list]
    tic = time.perf_counter()
    try:
        if cfg.jobs > 1 and len(pairs) > 1:
            args = [(to_dict(cfg), p, d) for p, d in pairs]
            with mp.get_context("spawn").Pool(min(cfg.jobs, len(pairs)), _init_worker, (cfg.threads or 1,)) as pool:
                runs = list(progress.track(pool.imap_unordered(_pair_job, args), total=len(pairs),
                                           description="patterns"))
        else:
            runs = [run_pair(cfg, p, d, progress) for p, d in pairs]
    finally:
        torch.set_num_threads(threads)  # the setting is process-wide: give the caller its own back
    result["wall_s"] = time.perf_counter() - tic
    result["load_average"]["end"] = _load_average()
    result.update(tabulate(cfg, runs))
    if out_dir is not None:
        out = Path(out_dir)
        atomic_write_json(out / "results.json", result)
        atomic_write_text(out / "results.md", results_markdown(result))
        result["paths"] = [str(out / "results.json"), str(out / "results.md")]
    return result


def tabulate(cfg: PatternsConfig, runs: list[dict]) -> dict:
    """Per-pair results → bucket means, in the config's pattern and design order."""
    sizes = list(range(cfg.test_min_size, cfg.test_max_size + 1))
    spans = buckets(cfg)
    done = {(r["pattern"], r["design"]): r for r in runs}
    out: dict[str, Any] = {"buckets": {k: list(v) for k, v in spans.items()}, "sizes": sizes, "rmse": {},
                           "per_size": {}, "final_loss": {}, "seconds": {}}
    for pattern in cfg.pattern_list:
        for design in cfg.design_list:
            run = done[pattern, design]
            per_size = run["per_size"]
            out["rmse"].setdefault(pattern, {})[design] = {  # uniform over the sizes of each bucket
                k: sum(per_size[lo - sizes[0]: hi - sizes[0] + 1]) / (hi - lo + 1) for k, (lo, hi) in spans.items()}
            for key in ("per_size", "final_loss", "seconds"):
                out[key].setdefault(pattern, {})[design] = run[key]
            log.info("%s · %s: %s (%.1f s)", pattern, design,
                     ", ".join(f"{k} {v:.4f}" for k, v in out["rmse"][pattern][design].items()), run["seconds"])
    return out


def results_markdown(result: dict) -> str:
    """The pattern × design × size-bucket RMSE table as Markdown, with the settings that produced it."""
    spans = result["buckets"]
    label = {"seen": "seen", "smaller": "unseen smaller", "larger": "unseen larger"}
    heads = [f"{label[k]} {lo}–{hi}" for k, (lo, hi) in spans.items()]
    lines = ["# Pattern generation: RMSE between learned θ(N) and the ground truth (lower is better)", "",
             "| pattern | design | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for pattern, per_design in result["rmse"].items():
        for design, values in per_design.items():
            cells = " | ".join(f"{values[k]:.4f}" for k in spans)
            lines.append(f"| {pattern} | {result['designs'][design]} (`{design}`) | {cells} |")
    cfg = result["config"]
    load = result["load_average"]
    lines += ["", f"RMSE at each N over its N ranks, averaged uniformly over the sizes of each bucket. Wall time "
              f"{result['wall_s']:.0f} s with {cfg['jobs']} process(es) × {result['torch_threads']} torch thread(s) on "
              f"{result['cpu_count']} CPUs, "
              f"load average {load['start']} → {load['end']}.", "", "Settings:", "",
              "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
