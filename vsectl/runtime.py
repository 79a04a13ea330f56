"""Device, precision, seeding, logging and environment facts, decided once at the top of a run."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """Turn 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' into a device; the only place that asks what exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}' does not exist ({torch.cuda.device_count()} GPUs visible)")
    return device


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Autocast settings built once from `train.precision` and the device.

    fp32 uses a null context. bf16 autocasts on CPU and CUDA. fp16 needs CUDA and a gradient scaler.
    """

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ConfigError(f"unknown precision '{self.name}'; use one of {', '.join(PRECISIONS)}")
        if self.name == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 on the CPU")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")


def fp32_island(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for numerically delicate maths (GPO scores and softmax, L2 norms, similarities)."""
    return torch.autocast(device_type=device_type, enabled=False)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Progress(Protocol):
    """How long loops report progress. The CLI passes a rich implementation; the library default is silent."""

    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]: ...

    def update(self, **fields: Any) -> None: ...


class NullProgress:
    def track(self, iterable: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        return iter(iterable)

    def update(self, **fields: Any) -> None:
        pass


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a batch scheduler), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def loader_workers(requested: int) -> int:
    """DataLoader worker processes for `requested`, sized to the CPUs available.

    At most one per available CPU (more only oversubscribe, and torch warns); none with a single CPU, where a worker
    process would compete with the main one for it.
    """
    cpus = available_cpus()
    workers = 0 if cpus == 1 else min(requested, cpus)
    if workers != requested:
        log.debug("using %d DataLoader workers instead of %d: %d CPU(s) available", workers, requested, cpus)
    return max(0, workers)


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions, device and threads, for `env.json` and `vsectl env`."""
    import vsectl

    info: dict[str, Any] = {
        "vsectl": vsectl.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "cuda_available": torch.cuda.is_available(),
        "git_commit": _git_commit(),
    }
    for mod in ("transformers", "h5py", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if device is not None:
        info["device"] = str(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def setup_logging(verbose: bool = False, quiet: bool = False, console: Any = None) -> None:
    """Install one rich handler on stderr. Called once, by the CLI.

    Args:
        console: the rich console that also draws the progress bars; logging through it prints each line above a
            live bar instead of into it. A new stderr console when None.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=console or Console(stderr=True), show_path=False, show_time=False, markup=False)
    root = logging.getLogger("vsectl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


# ----------------------------------------------------------------------------------------------------------------------
# distributed (torchrun / SLURM): DDP only, no home-made launcher

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_NTASKS": "WORLD_SIZE", "SLURM_LOCALID": "LOCAL_RANK"}


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun (or SLURM) job; world_size 1 means a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def distributed_from_env(env: dict[str, str] | None = None) -> Distributed:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun), falling back to SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID."""
    env = dict(os.environ if env is None else env)
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        for slurm, name in SLURM_TO_TORCH.items():
            if slurm in env:
                env[name] = env[slurm]
    try:
        dist = Distributed(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if dist.world_size < 1 or not 0 <= dist.rank < dist.world_size:
        raise ValueError(f"RANK={dist.rank} is outside WORLD_SIZE={dist.world_size}")
    return dist


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); pick this rank's GPU.

    Returns:
        the rank info and the device this process uses.
    """
    dist = distributed_from_env()
    if not dist.enabled:
        return dist, device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        for name, value in (("RANK", dist.rank), ("WORLD_SIZE", dist.world_size), ("LOCAL_RANK", dist.local_rank)):
            os.environ.setdefault(name, str(value))  # SLURM-only jobs: MASTER_ADDR/PORT still come from the script
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
    return dist, device


def gather_with_grad(x: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Concatenate every rank's (b, E) rows in rank order; gradients flow back to each rank's own rows."""
    if not dist.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_rows(x: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Concatenate every rank's rows (no gradient; sizes may differ by rank) in rank order."""
    if not dist.enabled:
        return x
    n = torch.tensor([x.size(0)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.size(0)] = x
    parts = [torch.zeros_like(padded) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)], dim=0)
