"""Runs trained before the package seams were opened load and evaluate to the numbers they had then.

tests/fixtures/old_runs/ holds two tiny runs (region + BiGRU + GPO; grid + a tiny BERT + maxk/mean) trained by the code
of that time, with its evaluation results in expected.json (make_old_runs.py says how they were made).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vsectl.evaluation import evaluate_runs

OLD = Path(__file__).resolve().parent / "fixtures" / "old_runs"
EXPECTED = json.loads((OLD / "expected.json").read_text())


@pytest.fixture(scope="module")
def old_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("old_runs")
    shutil.copytree(OLD / "runs", out / "runs")
    return out / "runs"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_run_evaluates_to_its_old_numbers(old_runs: Path, name: str) -> None:
    torch.set_num_threads(1)
    for key, metrics in EXPECTED[name].items():
        protocol, split, rule = key.split("-")
        result = evaluate_runs([old_runs / name], protocol=protocol, split=split, data_root=str(OLD / "data"),
                               device="cpu", write=False, tie_rule=rule)[protocol]
        assert result["metrics"] == metrics, key
