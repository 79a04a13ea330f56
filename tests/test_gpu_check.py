"""benchmarks/gpu_check.py runs on a CPU machine: CUDA parts reported as skipped, and every check body runs on the CPU
at smoke shapes (the figures themselves come from a lent GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_cuda_every_check_is_reported_skipped(tmp_path: Path) -> None:
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the checks would run, not skip")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["checks"]) == ["official", "step", "eval", "extract", "embed", "toy"]
    assert {r["status"] for r in report["checks"].values()} == {"skipped"}
    assert all("no CUDA device" in r["reason"] for r in report["checks"].values())


def test_every_check_body_runs_on_the_cpu_at_smoke_shapes(tmp_path: Path) -> None:
    report = gpu_check.run_checks("cpu", smoke=True, out=tmp_path, only=list(gpu_check.CHECKS))
    checks = report["checks"]
    assert {name: r["status"] for name, r in checks.items()} == dict.fromkeys(gpu_check.CHECKS, "ok"), checks
    assert checks["official"]["bigru"]["ok"] and checks["official"]["bert"]["ok"]
    assert checks["step"]["fp32_eager_pairs_per_s"] > 0 and checks["step"]["bf16_eager_pairs_per_s"] > 0
    assert checks["eval"]["rsum"] >= 0 and checks["embed"]["sets_per_s"] > 0
    assert checks["extract"]["cpu_fp32_deviation_from_cpu"] == 0.0
    assert checks["toy"]["same_keys"] and checks["toy"]["resumed_max_abs_weight_diff"] == 0.0  # exact on a CPU


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> dict:
        raise RuntimeError("device fell over")

    monkeypatch.setitem(gpu_check.CHECKS, "eval", broken)
    report = gpu_check.run_checks("cpu", smoke=True, out=tmp_path, only=["eval", "official"])
    assert report["checks"]["eval"]["status"] == "failed" and "device fell over" in report["checks"]["eval"]["error"]
    assert report["checks"]["official"]["status"] == "ok"
