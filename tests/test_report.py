"""vsectl report: grouping by seed, mean ± std, paired differences with their CI, the files, and the refusals, on
hand-made runs whose numbers are worked out by hand below."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.errors import ConfigError
from vsectl.report import build_report

runner = CliRunner()
T_975_2 = 4.302652729749464  # Student's t quantile 0.975 with 2 degrees of freedom (tables: 4.303)


def make_run(root: Path, name: str, seed: int, margin: float, rsum: float, r1: float, fingerprint: str = "f" * 64,
             protocol: str = "f30k", split: str = "test") -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    config = {"name": name, "seed": seed, "data": {"root": "data/x"}, "loss": {"margin": margin}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = {"protocol": protocol, "split": split, "tie_rule": "optimistic", "data_fingerprint": fingerprint,
              "metrics": {"i2t_r1": r1, "rsum": rsum, "i2t_medr": 3.0}}
    (run / "eval" / f"{protocol}-{split}.json").write_text(json.dumps(result))
    return run


@pytest.fixture
def six_runs(tmp_path: Path) -> Path:
    for seed, (a, b) in enumerate([(100.0, 104.0), (110.0, 111.0), (120.0, 127.0)]):
        make_run(tmp_path, f"base-s{seed}", seed, 0.2, a, 10.0 + seed)
        make_run(tmp_path, f"wide-s{seed}", seed, 0.3, b, 12.0)
    return tmp_path


def test_groups_means_stds_and_paired_differences_match_the_hand_computation(six_runs):
    report = build_report([str(six_runs / "*")], baseline="base-s1")
    assert [g["label"] for g in report["groups"]] == ["loss.margin=0.2", "loss.margin=0.3"]
    assert report["baseline"] == "loss.margin=0.2"
    table = report["tables"][0]
    assert (table["protocol"], table["split"]) == ("f30k", "test")
    assert table["metrics"] == ["i2t_r1", "rsum"]  # medr is left out of the tables
    base, wide = table["rows"]
    assert base["rsum"] == {"mean": 110.0, "std": 10.0, "n": 3}  # 100, 110, 120
    assert wide["rsum"]["mean"] == 114.0  # 104, 111, 127
    assert wide["rsum"]["std"] == pytest.approx((139.0) ** 0.5)  # deviations -10, -3, 13: (100 + 9 + 169) / 2
    diff = table["differences"][0]["rsum"]  # 104-100, 111-110, 127-120 = 4, 1, 7
    assert diff["mean"] == pytest.approx(4.0) and diff["std"] == pytest.approx(3.0) and diff["n"] == 3
    half = T_975_2 * 3.0 / 3 ** 0.5
    assert diff["ci"] == pytest.approx([4.0 - half, 4.0 + half])
    r1 = table["differences"][0]["i2t_r1"]  # 12 - (10, 11, 12) = 2, 1, 0
    assert r1["mean"] == pytest.approx(1.0) and r1["std"] == pytest.approx(1.0)


def test_the_cli_writes_markdown_long_csv_json_latex_and_a_figure(six_runs, tmp_path):
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(six_runs / "base-*"), str(six_runs / "wide-*"), "--baseline",
                                 "loss.margin=0.2", "--out", str(out), "--plot", "rsum", "--x", "loss.margin"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    md = (out / "report.md").read_text()
    assert "| loss.margin=0.2 | 11.0 ± 1.0 (n=3) | 110.0 ± 10.0 (n=3) |" in md  # i2t_r1 10, 11, 12
    assert "+4.0 [-3.5, +11.5] (n=3)" in md
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == 6 * 3  # one row per run × protocol × metric (medr included)
    assert {r["metric"] for r in rows} == {"i2t_r1", "rsum", "i2t_medr"}
    assert json.loads((out / "report.json").read_text())["tables"][0]["rows"][0]["rsum"]["mean"] == 110.0
    assert r"$110.0 \pm 10.0$" in (out / "report.tex").read_text()
    assert (out / "rsum.png").stat().st_size > 1000


def test_runs_evaluated_on_different_data_are_refused_in_one_line(six_runs):
    make_run(six_runs, "other-s0", 0, 0.5, 90.0, 9.0, fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="evaluated on different data for f30k"):
        build_report([str(six_runs / "*")])
    assert "evaluated on different data" in one_error_line(runner.invoke(app, ["report", str(six_runs / "*")]))


def test_two_runs_of_one_setting_and_seed_are_refused(six_runs):
    make_run(six_runs, "base-again", 0, 0.2, 99.0, 9.0)
    with pytest.raises(ConfigError, match="have the same config and seed 0"):
        build_report([str(six_runs / "*")])


@pytest.mark.parametrize(("args", "match"), [
    (["nothing-here-*"], "names no run directory"),
    (["{runs}/*", "--baseline", "nope"], "is neither a group"),
    (["{runs}/*", "--plot", "rsum"], "--plot and --x go together"),
])
def test_report_mistakes_get_one_line(six_runs, args, match):
    result = runner.invoke(app, ["report", *(a.format(runs=six_runs) for a in args)])
    assert match in one_error_line(result)
