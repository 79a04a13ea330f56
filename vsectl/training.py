"""Train a VSE∞ model from a RunConfig into a resumable run directory.

    runs/<name>/config.yaml  env.json  vocab.json | text_model/  metrics.jsonl  checkpoints/{last,best}/  eval/

`setup_run`, `restore_run` and `fit` share one `TrainingRun` and one fixed order of RNG use (what makes `--resume`
bit-exact); the resume helpers live in `run_dir.py`, the token-state caches in `text_cache.py`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import vsectl
from vsectl.builders import TextSide, build_model, load_text, prepare_text
from vsectl.checkpoint import (
    FROZEN_KEY,
    frozen_path,
    save_checkpoint,
    save_frozen,
    split_frozen,
)
from vsectl.config import RunConfig, config_from_yaml, config_to_yaml, save_config
from vsectl.data.datasets import EpochBatchSampler
from vsectl.data.door import open_checked, pair_dataset, subset
from vsectl.data.sources import Split
from vsectl.errors import DataError, VsectlError
from vsectl.evaluation import validate
from vsectl.io import atomic_write_json
from vsectl.kinds import IMAGE_KINDS, ImageInput, TextInput, text_input_for
from vsectl.locks import folder_lock
from vsectl.models.rnn import rnn_path_for, set_rnn_path
from vsectl.models.vse import VSEModel
from vsectl.noisy.noise import NoisyPairs, apply_noise, noisy_pairs
from vsectl.noisy.pair_loss import pair_loss_tracker
from vsectl.optim import create_run_optimizer
from vsectl.run_dir import MetricsLog, last_checkpoint, open_run_dir, restore_checkpoint
from vsectl.runtime import (
    Distributed,
    NullProgress,
    Precision,
    Progress,
    distributed_from_env,
    env_info,
    gather_with_grad,
    init_distributed,
    loader_workers,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from vsectl.schedules import (
    RunLength,
    announce_length,
    backbone_fixed_blocks,
    loss_scale,
    run_length,
    set_learning_rates,
    steps_in_epoch,
    use_hardest_negative,
)
from vsectl.scoring.tie_rules import LEGACY_TIE_RULE
from vsectl.text_cache import CachedTextStates, state_caches
from vsectl.train_logs import check_train_logs, open_tensorboard

log = logging.getLogger(__name__)

FROZEN_PREFIXES = ("text.body.",)  # state-dict keys of a frozen text body


class TrainingError(VsectlError):
    """Training cannot go on (for example the loss became NaN)."""


# ----------------------------------------------------------------------------------------------------------------------
# data


def load_data(cfg: RunConfig) -> tuple[Split, Split]:
    """The training split and the dev split (model selection uses its first `data.val_images` images)."""
    reads = IMAGE_KINDS.get(cfg.model.image.encoder).reads  # feature sets, or image files decoded in the workers
    train_split, dev_split = (open_checked(cfg.data.root, name, reads, cfg.model.image.feat_dim)
                              for name in (cfg.data.train_split, cfg.data.dev_split))
    if train_split.n_captions < cfg.data.batch_size and cfg.data.drop_last:
        raise DataError(f"the training split has {train_split.n_captions} captions, fewer than one batch of "
                        f"{cfg.data.batch_size}; lower data.batch_size")
    return train_split, dev_split


def make_loader(cfg: RunConfig, split: Split, text: TextSide, epoch: int, start_batch: int,
                state_cache: Path | None = None, dist: Distributed | None = None,
                image_size: int | None = None) -> DataLoader:
    """This rank's share of every global batch of `epoch` (`data.batch_size` is the global batch).

    With `state_cache` the captions are the cached token states in it (TextInput.STATES), else token ids.
    Pixel-reading runs (`image_size`: the encoder's input side) decode and augment each image in the workers.
    """
    dist = dist or Distributed()
    text_input = TextInput.STATES if state_cache is not None else TextInput.IDS
    drop = IMAGE_KINDS.get(cfg.model.image.encoder).drop(cfg.model.image.size_augment)  # the kind's worker-side drop
    augment = cfg.model.text.size_augment
    source = CachedTextStates(state_cache, augment) if state_cache is not None else text.processor(augment=augment)
    dataset, collate = pair_dataset(split, source, cfg.seed, text_input, drop, image_size)
    dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(split.n_captions, cfg.data.batch_size, cfg.data.drop_last, cfg.seed, epoch=epoch,
                                start_batch=start_batch, rank=dist.rank, world_size=dist.world_size)
    workers = loader_workers(cfg.data.num_workers)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if workers and image_size else None,
                      collate_fn=functools.partial(collate, pad_id=text.pad_id, text_input=text_input))


# ----------------------------------------------------------------------------------------------------------------------
# loop


def train_one_epoch(
    model: VSEModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    criterion: torch.nn.Module,
    cfg: RunConfig,
    epoch: int,
    global_step: int,
    device: torch.device,
    precision: Precision,
    metrics: MetricsLog,
    progress: Progress,
    dist: Distributed | None = None,
    text_input: TextInput = TextInput.IDS,
) -> int:
    """One pass over `loader`; returns the new global step. `text_input` says what the batches' tokens are.

    Under DDP the loss is computed on the whole global batch on every rank: embeddings are all-gathered with their
    gradients (LOSS-6), so the hardest negatives are mined over all ranks and the objective equals one process's.
    """
    dist = dist or Distributed()
    model.train()
    hardest = use_hardest_negative(cfg, epoch, criterion)
    scaler = precision.grad_scaler()
    total = min(steps_in_epoch(cfg, len(loader.dataset)), len(loader))
    rate_name = IMAGE_KINDS.get(cfg.model.image.encoder).reads.rate_name
    window_loss, window_pairs, window_steps, window_data, tic = 0.0, 0, 0, 0.0, time.perf_counter()
    data_tic = time.perf_counter()
    step_in_epoch = 0
    for step_in_epoch, batch in enumerate(progress.track(loader, total=total, description=f"epoch {epoch}"), 1):
        window_data += time.perf_counter() - data_tic
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with precision.autocast():
            img, cap = model(batch, text_input=text_input)
        img, cap = gather_with_grad(img, dist), gather_with_grad(cap, dist)
        raw_loss = criterion(img, cap, hardest_negative=hardest)
        loss = raw_loss * loss_scale(cfg, epoch, step_in_epoch - 1, total)  # OPT-1 ramp; 1 outside it
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at epoch {epoch}, step {step_in_epoch}; lower "
                                "train.lr or check the features for NaN/inf")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        criterion.after_step()  # a learned temperature is kept in its range
        global_step += 1
        window_loss += raw_loss.item()  # the logged loss is the unscaled objective
        window_pairs += img.size(0)
        window_steps += 1
        progress.update(loss=raw_loss.item())
        if global_step % cfg.train.log_every == 0 or step_in_epoch == total:
            elapsed = time.perf_counter() - tic
            steps = window_steps
            record = {"kind": "train", "epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                      "loss": window_loss / steps, "lr": optimizer.param_groups[0]["lr"], "hardest": hardest,
                      "pairs_per_s": window_pairs / max(elapsed, 1e-9), "data_time": window_data / steps,
                      **{f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)},
                      **criterion.log_values()}
            metrics.write(record)
            progress.update(**{rate_name: record["pairs_per_s"]})
            log.debug("epoch %d step %d/%d loss %.4f lr %.2e %.0f pairs/s", epoch, step_in_epoch, total,
                      record["loss"], record["lr"], record["pairs_per_s"])
            window_loss, window_pairs, window_steps, window_data, tic = 0.0, 0, 0, 0.0, time.perf_counter()
        if step_in_epoch >= total:
            break
        data_tic = time.perf_counter()
    return global_step


def _wrap_ddp(model: torch.nn.Module, old: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """A new DDP wrapper over the current trainable set; the old one is destroyed first (its gradient hooks with it)."""
    if old is not model:
        del old
        gc.collect()  # DDP's reducer removes its autograd hooks only when it is freed
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


@dataclass
class TrainingRun:
    """What one training run holds between its setup, its restore and its fit (built by `setup_run`)."""

    cfg: RunConfig
    run_dir: Path
    dist: Distributed
    device: torch.device
    precision: Precision
    train_split: Split
    val_split: Split
    text: TextSide
    model: VSEModel
    optimizer: torch.optim.Optimizer
    criterion: torch.nn.Module  # the model's own loss (`model.loss`), not wrapped by DDP
    metrics: MetricsLog
    progress: Progress
    last: Path | None  # the checkpoint a resume starts from
    text_input: TextInput = TextInput.IDS  # what the training batches' tokens are, decided once here
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "global_step": 0, "best_rsum": -math.inf,
                                                          "best_epoch": -1})
    caches: dict[str, Path] = field(default_factory=dict)
    text_cache_dir: Path | None = None  # a folder of state caches shared by several runs (a sweep)
    length: RunLength | None = None  # train.epochs / train.steps resolved against the training split
    tensorboard: Any = None  # a train_logs.TensorBoardLog when the recipe asks for it (main rank only)
    noise: NoisyPairs | None = None  # data.noise: the training pairs' noisy pairing (train_split already has it)


def setup_run(cfg: RunConfig, out_root: str | Path, device: str, resume: bool, progress: Progress,
              text_cache_dir: str | Path | None = None) -> TrainingRun:
    """Open (or check) the run directory, seed, load the data and build the text side, model and optimizer."""
    run_dir = Path(out_root) / cfg.name
    check_train_logs(cfg.train.log)  # a missing extra fails before the run folder is touched
    dist, dev = init_distributed(resolve_device(device))
    precision = resolve_precision(cfg.train.precision, dev)  # logs its choice once
    train_split, dev_split = load_data(cfg)  # data that cannot be trained on (a bad noise index too) leave no run
    pairs = noisy_pairs(cfg.data.noise, train_split)
    cfg = open_run_dir(cfg, run_dir, resume, write=dist.is_main)
    dist.barrier()
    seed_everything(cfg.seed, cfg.train.deterministic)
    train_split, noise = apply_noise(pairs, train_split, run_dir, resume, write=dist.is_main)
    length = run_length(cfg, steps_in_epoch(cfg, train_split.n_captions))  # the config itself stays as written
    if dist.is_main:
        announce_length(cfg, length)
    n_val = min(cfg.data.val_images, dev_split.n_images)
    val_split = subset(dev_split, n_val)
    last = last_checkpoint(run_dir) if resume else None  # (every rank reads; a leftover .tmp is never used)
    if last is not None:
        text = load_text(cfg, run_dir)  # the checkpoint holds every weight, a transformers body's too
    else:
        text = prepare_text(cfg, run_dir, train_split.captions + dev_split.captions, write=dist.is_main)
    model = build_model(cfg, text, init_words=last is None).to(dev)
    set_rnn_path(model, rnn_path_for(dev))
    optimizer = create_run_optimizer(model, cfg.train)  # fused where torch has the kernel for the device
    return TrainingRun(cfg=cfg, run_dir=run_dir, dist=dist, device=dev, precision=precision, train_split=train_split,
                       val_split=val_split, text=text, model=model, optimizer=optimizer,
                       criterion=model.loss,
                       metrics=MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main), progress=progress,
                       last=last, text_input=text_input_for(cfg.model.text.cache_states),
                       text_cache_dir=Path(text_cache_dir) if text_cache_dir is not None else None, length=length,
                       noise=noise)


def restore_run(run: TrainingRun, resume: bool) -> None:
    """Continue from the last checkpoint (model, optimizer, RNG, metrics) and build the token-state caches."""
    cfg, run_dir, dist = run.cfg, run.run_dir, run.dist
    if run.last is not None:
        run.state = restore_checkpoint(run.last, run.model, run.optimizer, run.device, run.metrics)
        if is_complete(run):
            log.info("%s is already complete: %d of %d epochs, best dev rsum %.2f (epoch %d); nothing to resume "
                     "(raise train.epochs or train.steps to train longer)", run_dir, run.state["epoch"],
                     _epochs(run), run.state["best_rsum"], run.state["best_epoch"])
            return
        old_rule = run.state.get("select_tie_rule", LEGACY_TIE_RULE)  # checkpoints before the option used optimistic
        if old_rule != cfg.train.select_tie_rule:
            log.warning("the best checkpoint so far was chosen by the %s tie rule; later epochs are compared with "
                        "its dev rsum %.2f under the %s rule", old_rule, run.state["best_rsum"],
                        cfg.train.select_tie_rule)
        log.info("resumed at epoch %d (step %d, best rsum %.2f)", run.state["epoch"], run.state["global_step"],
                 run.state["best_rsum"])
    elif resume:
        log.warning("no complete checkpoint in %s: starting from epoch 0", run_dir)
    if resume and dist.is_main and config_from_yaml((run_dir / "config.yaml").read_text()) != cfg:
        save_config(cfg, run_dir / "config.yaml")  # only after the checkpoint loaded: a failed resume changes nothing
    if dist.is_main:
        env = {**env_info(run.device), "seed": cfg.seed, **run.precision.describe(), "world_size": dist.world_size,
               "run_length": run.length.as_dict(), "select_tie_rule": cfg.train.select_tie_rule}
        atomic_write_json(run_dir / "env.json", env)
    run.metrics.truncate_after(run.state["global_step"])
    if dist.is_main and "tensorboard" in cfg.train.log:
        after = run.state["global_step"] + 1 if run.last else None  # what the checkpoint's step logged stays
        run.tensorboard = open_tensorboard(run_dir, after, run.train_split, run.text)
        run.metrics.sinks.append(run.tensorboard)
    if run.text_input is TextInput.STATES:
        run.caches = state_caches(run.model.text, run.text, cfg.model.text.pretrained, cfg.data.batch_size,
                                  {"train": run.train_split, "dev": run.val_split}, run_dir, run.device, dist,
                                  run.progress, shared=run.text_cache_dir)


def _epochs(run: TrainingRun) -> int:
    return run.length.epochs if run.length is not None else run.cfg.train.epochs


def is_complete(run: TrainingRun) -> bool:
    """True when the restored checkpoint already holds every epoch of the recipe (of its step budget, resolved)."""
    return run.state["epoch"] >= _epochs(run)


def fit(run: TrainingRun) -> Path:
    """The epochs left: train, validate, keep the best and the last checkpoint; returns the run directory."""
    cfg, dist, model, run_dir = run.cfg, run.dist, run.model, run.run_dir
    val_states = CachedTextStates(run.caches["dev"], augment=False) if run.text_input is TextInput.STATES else None
    kind = IMAGE_KINDS.get(cfg.model.image.encoder)
    image_size = model.image.input_size if kind.reads is ImageInput.PIXELS else None
    net, fixed = model, None
    meta = {"config": config_to_yaml(cfg), "vsectl_version": vsectl.__version__, "format": "vsectl-checkpoint-1"}
    frozen = FROZEN_PREFIXES if cfg.model.text.freeze_body else ()
    if frozen and dist.is_main:  # stored once per run (per sweep); every checkpoint names it with its sha256
        _, frozen_state = split_frozen(model.state_dict(), frozen)
        meta[FROZEN_KEY] = save_frozen(frozen_path(run_dir, run.text_cache_dir, frozen_state), frozen_state, frozen,
                                       run_dir / "checkpoints")
    state = run.state
    global_step, best_rsum, best_epoch = state["global_step"], state["best_rsum"], state["best_epoch"]
    pairs = None if run.noise is None or not dist.is_main else pair_loss_tracker(
        run_dir, run.train_split, run.noise.noisy, cfg.data.noise.log_pairs, cfg.data.noise.seed, run.caches.get(
            "train"), run.text, run.criterion, cfg.data.batch_size, image_size, state["global_step"])
    for epoch in range(state["epoch"], _epochs(run)):
        set_learning_rates(run.optimizer, cfg, epoch, run.length)
        if kind.trains_backbone and backbone_fixed_blocks(cfg, epoch) != fixed:
            fixed = backbone_fixed_blocks(cfg, epoch)
            model.image.set_fixed_blocks(fixed)  # IMG-11; DDP is rebuilt below for the new trainable set
            log.info("epoch %d: backbone blocks fixed: %s", epoch, "all" if fixed == 4 else fixed)
        if dist.enabled and (net is model or kind.trains_backbone and net.fixed != fixed):
            net = _wrap_ddp(model, net, run.device)
            net.fixed = fixed
        cache = run.caches["train"] if run.text_input is TextInput.STATES else None
        loader = make_loader(cfg, run.train_split, run.text, epoch, 0, state_cache=cache, dist=dist,
                             image_size=image_size)
        global_step = train_one_epoch(net, loader, run.optimizer, run.criterion, cfg, epoch, global_step, run.device,
                                      run.precision, run.metrics, run.progress, dist, text_input=run.text_input)
        val = validate(model, run.val_split, run.text, run.device, run.precision, cfg.data.batch_size, val_states,
                       dist, tie_rule=cfg.train.select_tie_rule)
        is_best = val["rsum"] > best_rsum
        if is_best:
            best_rsum, best_epoch = val["rsum"], epoch
        run.metrics.write({"kind": "val", "epoch": epoch, "global_step": global_step, "best": is_best, **val})
        if pairs is not None:
            hardest = use_hardest_negative(cfg, epoch, run.criterion)
            pairs.record(model, epoch, global_step, hardest, run.device, run.precision)
        log.info("epoch %d: dev rsum %.2f (R@1 i2t %.1f, t2i %.1f; %s tie rule)%s", epoch, val["rsum"],
                 val["i2t_r1"], val["t2i_r1"], cfg.train.select_tie_rule, " best" if is_best else "")
        if run.tensorboard is not None:
            run.tensorboard.pooling(model, {b: getattr(cfg.model, b).pool.name for b in ("image", "text")},
                                    global_step)
        state = {"epoch": epoch + 1, "global_step": global_step, "best_rsum": best_rsum, "best_epoch": best_epoch,
                 "val": val, "vsectl_version": vsectl.__version__, "select_tie_rule": cfg.train.select_tie_rule}
        if dist.is_main:
            model_state, _ = split_frozen(model.state_dict(), frozen)
            if is_best:  # best first: a crash between the two leaves last behind, which resume handles
                save_checkpoint(run_dir / "checkpoints" / "best", model_state, state, meta, rng=False)
            save_checkpoint(run_dir / "checkpoints" / "last", model_state, state, meta,
                            optimizer_state=run.optimizer.state_dict())
        dist.barrier()
    return run_dir


def train(
    cfg: RunConfig,
    out_root: str | Path = "runs",
    device: str = "auto",
    resume: bool = False,
    progress: Progress | None = None,
    text_cache_dir: str | Path | None = None,
) -> Path:
    """Train `cfg` into `out_root/cfg.name`; with `resume`, continue from its last complete checkpoint.

    Under torchrun every rank runs this function: DDP, the global batch split across ranks, only rank 0 writes.
    `text_cache_dir` is a folder shared by several runs (a sweep) for the frozen-body state caches.

    Returns:
        the run directory.
    """
    # one writer per run folder: a second train (or --resume) of it is refused, naming this one (main rank only)
    with folder_lock(Path(out_root) / cfg.name) if distributed_from_env().is_main else contextlib.nullcontext():
        run = setup_run(cfg, out_root, device, resume, progress or NullProgress(), text_cache_dir)
        try:
            restore_run(run, resume)
            return run.run_dir if is_complete(run) else fit(run)
        finally:
            if run.tensorboard is not None:
                run.tensorboard.close()
            if run.dist.enabled and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
