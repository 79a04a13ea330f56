"""Shared helpers of the benchmark scripts: repeated timing with medians and spread, the machine's description, the
machine's raw matrix-multiply throughput, target checks and JSON reports.

The scripts import this file by name (`from common import ...`): they run as `python benchmarks/<script>.py`, which
puts this folder first on `sys.path`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"  # git-ignored; BENCHMARKS.md carries the figures
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags of bf16 matrix units (AMX tiles, AVX-512 BF16 dot products)
QUIET_LOAD = 0.5  # 1-minute load average under which a machine counts as idle for final figures


# --- timing -----------------------------------------------------------------------------------------------------------


def summary(times: list[float]) -> dict[str, Any]:
    """Median and spread of repeated timings (seconds)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs_s": times}


def rate_summary(amount: float, times: list[float]) -> dict[str, Any]:
    """`amount` units per repetition → median rate and its [min–max] spread (from the slowest and fastest runs)."""
    rates = [amount / t for t in times]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def time_reps(fn: Callable[[], object], reps: int, warmup: int = 1) -> list[float]:
    """Call `fn` `warmup` times untimed (thread pools, allocator, oneDNN kernel caches), then time `reps` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timed_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function `reps` times, round-robin, so a burst of other load hits every variant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def timed_interleaved_cpu(fns: dict[str, Callable[[], object]], reps: int) -> tuple[dict[str, list[float]],
                                                                                   dict[str, list[float]]]:
    """CPU seconds of this process (all its threads) and wall seconds of each function, `reps` round-robin rounds:
    on shared cores the CPU time is the measure that other processes' load does not inflate."""
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return cpu, wall


def fmt_rate(r: dict[str, Any], unit: str = "", digits: int = 1) -> str:
    """'123.4 [120.1–125.0] unit' from a `rate_summary`."""
    return f"{r['median']:.{digits}f} [{r['min']:.{digits}f}–{r['max']:.{digits}f}]{(' ' + unit) if unit else ''}"


def fmt_time(s: dict[str, Any], scale: float = 1e3, unit: str = "ms", digits: int = 1) -> str:
    """'12.3 [11.9–13.0] ms' from a `summary`."""
    return (f"{s['median_s'] * scale:.{digits}f} [{s['min_s'] * scale:.{digits}f}–{s['max_s'] * scale:.{digits}f}] "
            f"{unit}")


# --- the machine ------------------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average says whether other work shared the cores."""
    flags = cpu_flags()
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", *BF16_FLAGS) if f in flags],
        "bf16_matrix_units": [f for f in BF16_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(m: dict[str, Any]) -> str:
    bf16 = ", ".join(m["bf16_matrix_units"]) or "none"
    return (f"{m['cpu_model']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB, SIMD {'/'.join(m['simd'])}, "
            f"bf16 matrix units: {bf16}; torch {m['torch_version']} ({m['torch_num_threads']} threads, "
            f"{m['torch_cpu_capability']})")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat (busy excludes idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    return total - idle, total


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: DataLoader workers, subprocesses
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMeter:
    """How busy the cores were during a run, and how much of that was other processes.

    The load average lags by minutes and counts waiting tasks; this measures CPU time directly: all cores' busy time
    from /proc/stat minus this process tree's own CPU time, as a share of the cores over the wall time.
    """

    def __init__(self) -> None:
        self.busy0, self.total0 = _cpu_jiffies()
        self.own0, self.t0 = _own_cpu_s(), time.monotonic()

    def read(self) -> dict[str, float]:
        busy, total = _cpu_jiffies()
        wall = time.monotonic() - self.t0
        cores = os.cpu_count() or 1
        busy_s = (busy - self.busy0) / max(total - self.total0, 1) * wall * cores
        own_s = _own_cpu_s() - self.own0
        return {"wall_s": wall, "busy_cores": busy_s / max(wall, 1e-9), "own_cores": own_s / max(wall, 1e-9),
                "others_cores": max(busy_s - own_s, 0.0) / max(wall, 1e-9)}


def begin(threads: int) -> tuple[tuple[float, float, float], LoadMeter, dict[str, Any], float]:
    """Start a benchmark run: torch threads (0 keeps torch's default), the machine on stderr.

    Returns:
        the load average before, a LoadMeter started now, the machine's description and the start time.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    load_before, meter, m = os.getloadavg(), LoadMeter(), machine()
    print(describe(m), file=sys.stderr)
    return load_before, meter, m, time.perf_counter()


def others_busy_cores(seconds: float = 10.0) -> float:
    """Cores' worth of CPU that other processes used over the next `seconds`."""
    meter = LoadMeter()
    time.sleep(seconds)
    return meter.read()["others_cores"]


def wait_for_quiet(max_wait_s: float, threshold: float = QUIET_LOAD, poll_s: float = 120.0) -> dict[str, float]:
    """Wait until the machine is idle or `max_wait_s` passed, checking every `poll_s` seconds.

    Idle: a 1-minute load average below `threshold`, or other processes using under `threshold` / 2 cores over 20 s
    (the load average lags by minutes behind a finished job).

    Returns:
        the load average and the other processes' cores when the wait ended, and the seconds waited.
    """
    t0 = time.monotonic()
    while True:
        others = others_busy_cores(20.0)
        quiet = os.getloadavg()[0] < threshold or others < threshold / 2
        if quiet or time.monotonic() - t0 >= max_wait_s:
            return {"load_1min": os.getloadavg()[0], "others_cores": others, "waited_s": time.monotonic() - t0,
                    "quiet": quiet}
        time.sleep(poll_s)


def gemm_tflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, device: str = "cpu") -> dict[str, Any]:
    """Raw square matrix-multiply throughput (2n³ FLOP per product) at `dtype`: the ceiling a model can approach."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)

    def run() -> None:
        torch.mm(a, b, out=out)
        if device != "cpu":
            torch.cuda.synchronize()

    times = time_reps(run, reps, warmup=2)
    r = rate_summary(2 * n**3 / 1e12, times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": r}


def gemm_report(reps: int, n: int = 2048, device: str = "cpu") -> dict[str, Any]:
    """fp32 and bf16 GEMM TFLOP/s measured side by side, and their ratio (what bf16 can gain at best)."""
    fp32 = gemm_tflops(torch.float32, n, reps, device)
    bf16 = gemm_tflops(torch.bfloat16, n, reps, device)
    return {"fp32": fp32, "bf16": bf16, "bf16_over_fp32": bf16["tflops"]["median"] / fp32["tflops"]["median"]}


# --- targets and reports ----------------------------------------------------------------------------------------------


def target(name: str, value: float | None, op: str, limit: float, unit: str = "") -> dict[str, Any]:
    """A target check; `shortfall` says by how much a missed target is off (a ratio of the limit)."""
    met = value is not None and (value >= limit if op == ">=" else value <= limit)
    shortfall = None
    if value is not None and not met and value > 0:
        shortfall = limit / value if op == ">=" else value / limit
    return {"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "met": met,
            "off_by_factor": shortfall}


def render_targets(checks: list[dict[str, Any]]) -> str:
    """One line per target: name, value, limit and met / MISSED (by how much). Accepts bench_ranking's checks too."""
    lines = []
    for c in checks:
        name = f"{c.get('size', '')} {c['target']}".strip()
        value = "n/a" if c["value"] is None else f"{c['value']:.3g}"
        if c.get("info"):  # a baseline figure shown beside the targets, not a target
            lines.append(f"info   {name:58} {value:>9}")
            continue
        off = f" (off by {c['off_by_factor']:.2f}×)" if c.get("off_by_factor") else ""
        verdict = "met" if c["met"] else "MISSED" + off
        lines.append(f"target {name:58} {value:>9} {c['op']} {c['limit']:<6g}{c.get('unit', ''):6} {verdict}")
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
