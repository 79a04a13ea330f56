"""The AdamW of a run: one fused kernel per parameter group where torch has it for the device, the same update.

The for-loop AdamW launches several small ops per parameter tensor; the fused one updates every tensor of a group in
one kernel (CPU and CUDA in torch ≥ 2.4). Both compute the same update (tests/test_speed.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from vsectl.models.vse import param_groups

log = logging.getLogger(__name__)

BETAS = (0.9, 0.999)
EPS = 1e-8


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused AdamW for every tensor: floating point, on a device with the kernel."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # torch moved the helper: CPU and CUDA have had the kernel since 2.4
        devices = {"cpu", "cuda"}
    params = list(params)
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def create_adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float, fused: bool | None = None
                 ) -> torch.optim.AdamW:
    """AdamW over parameter groups (each a dict with 'params' and any extra keys, e.g. 'lr_mult').

    Args:
        groups: torch parameter groups.
        lr: base learning rate.
        weight_decay: decoupled weight decay.
        fused: None picks the fused kernel where it is supported; False forces the for-loop implementation.
    """
    params = [p for g in groups for p in g["params"]]
    use_fused = fused_supported(params) if fused is None else fused
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=BETAS, eps=EPS,
                                  fused=True if use_fused else None)
    log.debug("AdamW: %s", "fused" if use_fused else "for-loop")
    return optimizer


def create_run_optimizer(model: torch.nn.Module, train_cfg: Any) -> torch.optim.AdamW:
    """The optimizer a training run uses: AdamW over the model's parameter groups at `train_cfg.lr`.

    Training and the checkpoint importer both build it here, so an imported run's `last` checkpoint resumes with the
    same groups.
    """
    groups = param_groups(model, train_cfg.lr_mult)
    return create_adamw(
        [{"params": g["params"], "name": g["name"], "lr_mult": g["lr_mult"], "lr": train_cfg.lr,
          **({"weight_decay": g["weight_decay"]} if "weight_decay" in g else {})} for g in groups],
        lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's implementation (fused or not).

    `load_state_dict` copies every group setting from the file, `fused` and `foreach` included, so a checkpoint from
    before the fused default would otherwise resume on the slow path (and a fused one on a device without the kernel
    would fail).
    """
    kept = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    if len(kept) != len(state["param_groups"]):
        raise ValueError(f"the saved optimizer has {len(state['param_groups'])} parameter groups, this one "
                         f"{len(kept)}")
    groups = [{**saved, **flags} for saved, flags in zip(state["param_groups"], kept, strict=True)]
    optimizer.load_state_dict({**state, "param_groups": groups})  # our flags also steer where 'step' is placed
