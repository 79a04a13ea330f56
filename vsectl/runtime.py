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
from vsectl.native import cpu_flags  # the machine facts the kernels are keyed by; runtime re-exports them
from vsectl.native import describe as native_kernels

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
PRECISION_CHOICES = ("auto", *PRECISIONS)
# CPU flags of bf16 units (AMX tiles; AVX512-BF16 dot products). With either, bf16 autocast pays for training: on an
# AMD EPYC with AVX512-BF16 and no AMX the BiGRU and MiniLM steps took 0.41x and 0.42x the fp32 step; without them
# bf16 is emulated and 15-37x slower (BENCHMARKS.md).
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """Autocast settings built once from `train.precision` and the device.

    fp32 uses a null context. bf16 autocasts on CPU and CUDA. fp16 needs CUDA and a gradient scaler.
    `requested` is what the recipe said ('auto' or a name) and `reason` why auto decided as it did.
    """

    name: str
    device: torch.device
    requested: str = ""
    reason: str = ""

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

    def describe(self) -> dict[str, str]:
        """What env.json records: the precision used, what was asked, and why."""
        return {"precision": self.name, "precision_requested": self.requested or self.name,
                "precision_reason": self.reason}


def cpu_bf16_units(flags: set[str] | None = None) -> list[str]:
    """The bf16 units of this CPU that oneDNN can use: flags among CPU_BF16_FLAGS (empty: bf16 is emulated).

    Without /proc/cpuinfo, torch's own probes answer (AMX tiles, AVX512-BF16).
    """
    flags = cpu_flags() if flags is None else flags
    if flags:
        return [f for f in CPU_BF16_FLAGS if f in flags]
    probes = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    found = []
    for flag, probe in probes.items():
        try:
            if getattr(torch.cpu, probe)():
                found.append(flag)
        except (AttributeError, RuntimeError):  # private probes: absent in other builds
            pass
    return found


def bf16_pays(device: torch.device, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether bf16 autocast speeds training up on `device`, and why (one phrase for the log and env.json)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    if device.type != "cpu":
        return False, f"{device.type} device"
    units = cpu_bf16_units(flags)
    if units:
        return True, f"CPU with bf16 units ({', '.join(units)})"
    return False, "CPU without bf16 units (bf16 would be emulated)"


_warned: set[str] = set()


def resolve_precision(name: str, device: torch.device, flags: set[str] | None = None) -> Precision:
    """Turn `train.precision` into a Precision, once per run: 'auto' picks bf16 where it pays, else fp32.

    The choice is logged in one line. An explicit bf16 on a CPU without bf16 units warns once per process.
    """
    if name not in PRECISION_CHOICES:
        raise ConfigError(f"unknown precision '{name}'; use one of {', '.join(PRECISION_CHOICES)}")
    pays, why = bf16_pays(device, flags)
    if name == "auto":
        precision = Precision("bf16" if pays else "fp32", device, requested="auto", reason=why)
        log.info("precision %s (auto: %s)", precision.name, why)
        return precision
    if name == "bf16" and device.type == "cpu" and not cpu_bf16_units(flags) and "bf16" not in _warned:
        _warned.add("bf16")
        log.warning("this CPU has no bf16 units: bf16 is emulated and many times slower than fp32; "
                    "set train.precision to auto or fp32")
    return Precision(name, device, requested=name, reason=why)


def fp32_island(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for numerically delicate maths (GPO scores and softmax, L2 norms, similarities)."""
    return torch.autocast(device_type=device_type, enabled=False)


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask, e.g. under taskset or a cgroup), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


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


def loader_workers(requested: int) -> int:
    """DataLoader worker processes for `requested`, sized to the CPUs available.

    At most one per available CPU (more only oversubscribe, and torch warns); none with a single CPU, where a worker
    process would compete with the main one for it.
    """
    cpus = usable_cpus()
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
        "usable_cpus": usable_cpus(),
        "cpu_bf16_units": cpu_bf16_units(),
        "native_kernels": native_kernels(build=device is None or device.type == "cpu"),
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
        _joined.append(backend)
    return dist, device


_joined: list[str] = []  # the backends of the process groups this process joined


def joined_process_group() -> bool:
    """Whether this process joined a torchrun process group (its backend's threads may outlive it, see `leave_now`)."""
    return bool(_joined)


def leave_now(code: int | str | None) -> None:
    """Flush logs and standard streams, then end the process at once, without the interpreter's teardown.

    A process that joined a gloo process group can abort at exit: the group's worker threads outlive
    `destroy_process_group` (the group stays referenced until the interpreter's final collection), and one that
    takes the interpreter lock to release a tensor during that teardown is ended by the interpreter, which
    `std::terminate`s it ("terminate called without an active exception", SIGABRT). Measured here: 4 of 82
    two-rank training runs (most under extra load) ended so, after every file was written (torch 2.13, Python
    3.11; a core's backtrace showed a gloo `runLoop` thread in `gil_scoped_acquire` while the main thread was in
    `Py_FinalizeEx`); leaving through here, 30 of 30 under the same load ended cleanly.
    The command line ends such a process through here once its command has returned.
    """
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code is not None and not isinstance(code, int):  # sys.exit("message"): the message, status 1
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{code}\n")
            sys.stderr.flush()
        code = 1
    os._exit(code or 0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-sized (b, E) blocks whose backward hands each rank the sum over ranks of the gradient of
    its own block (a reduce-scatter, written as all-reduce + slice because gloo has no reduce-scatter). It replaces
    torch.distributed.nn.functional.all_gather, which computes the same and is deprecated (a warning on every rank)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, x.size(0)
        parts = [torch.empty_like(x) for _ in range(world_size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)                                             # (world·b, E) summed
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def gather_with_grad(x: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """Concatenate every rank's (b, E) rows in rank order; gradients flow back to each rank's own rows.

    Every rank holds the same number of rows (the global batch is split evenly)."""
    if not dist.enabled:
        return x
    return _GatherWithGrad.apply(x, dist.rank, dist.world_size)


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
