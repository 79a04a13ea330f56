"""gridsearch verdict: the best fixed cell chosen on dev, the paired difference's CI, and the power of the paired test
(checked against a Monte Carlo simulation of the t-test written here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp, ttest_rel

from vsectl.science.gridsearch import expand_grid, load_grid, results_markdown, summarise
from vsectl.science.gridsearch.runner import best_dev
from vsectl.science.gridsearch.stats import detectable_difference, paired_power, paired_test, power_statement, verdict

REPO = Path(__file__).resolve().parent.parent


def simulated_power(delta: float, n: int, sd: float, reps: int = 40_000, seed: int = 0) -> float:
    """The fraction of simulated experiments (n normal differences, mean delta) where the t-test rejects at 0.05."""
    diffs = np.random.default_rng(seed).normal(delta, sd, size=(reps, n))
    return float(np.mean(ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05))


@pytest.mark.parametrize(("delta", "n", "sd"), [(5.0, 5, 4.0), (2.0, 3, 1.5), (3.0, 8, 5.0)])
def test_power_matches_a_simulated_t_test(delta, n, sd):
    assert paired_power(delta, n, sd) == pytest.approx(simulated_power(delta, n, sd), abs=0.012)
    assert paired_power(-delta, n, sd) == paired_power(delta, n, sd)  # two-sided


def test_power_at_no_difference_is_alpha_and_grows_with_seeds():
    assert paired_power(0.0, 5, 3.0) == pytest.approx(0.05, abs=1e-9)
    assert paired_power(5.0, 10, 3.0) > paired_power(5.0, 5, 3.0) > paired_power(5.0, 3, 3.0)


def test_detectable_difference_reaches_the_target_power():
    mdd = detectable_difference(5, 3.5)
    assert paired_power(mdd, 5, 3.5) == pytest.approx(0.8, abs=1e-6)
    assert simulated_power(mdd, 5, 3.5) == pytest.approx(0.8, abs=0.012)
    assert detectable_difference(5, 7.0) == pytest.approx(2 * mdd, rel=1e-6)  # it scales with the spread
    assert detectable_difference(10, 3.5) < mdd
    assert detectable_difference(5, 0.0) == 0.0


def test_power_statement_says_whether_five_rsum_can_be_told():
    small = power_statement(5, 1.0)
    assert small["powered"] is True and small["detectable_difference"] < 5 and "can tell" in small["text"]
    big = power_statement(5, 6.0)
    assert big["powered"] is False and big["power_at_delta"] < 0.8 and "too few seeds" in big["text"]
    assert power_statement(2, 1.0)["powered"] is None


def test_paired_ci_is_the_t_interval_and_excludes_zero_exactly_when_p_is_below_alpha():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(0, 3, 5), rng.normal(0.5, 3, 5)
        out = paired_test(list(a), list(b))
        d = a - b
        half = student_t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
        assert out["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
        assert (out["ci"][0] > 0 or out["ci"][1] < 0) is (out["p_value"] < 0.05)
        assert out["p_value"] == pytest.approx(ttest_rel(a, b).pvalue)


def record(cell: str, seed: int, rsum: float, dev: float | None, gpo: bool = False) -> dict:
    return {"cell": cell, "seed": seed, "gpo": gpo, "fixed": not gpo, "image": cell, "text": "recipe", "split": "test",
            "metrics": {"rsum": rsum, "i2t_r1": rsum / 6, "t2i_r1": rsum / 6}, "dev_best_rsum": dev}


def sweep(dev_a: float | None = 200.0) -> list[dict]:
    """Cell a is best on dev, cell b is best on test; GPO sits between them."""
    recs = []
    for s in range(5):
        recs += [record("a", s, 140.0 + s, dev_a), record("b", s, 150.0 + (s % 2), 190.0),
                 record("g", s, 145.0 + 0.5 * s, 195.0, gpo=True)]
    return recs


def test_verdict_chooses_the_best_fixed_cell_on_dev_and_reports_it_on_test():
    out = verdict(sweep())
    assert out["best_fixed"] == "a" and out["selected_on"] == "dev" and out["best_fixed_on_test"] == "b"
    assert out["best_fixed_dev_rsum"] == [200.0, 0.0] and out["gpo_dev_rsum"] == [195.0, 0.0]
    assert out["best_fixed_rsum"][0] == pytest.approx(142.0) and out["gpo_rsum"][0] == pytest.approx(146.0)
    gpo, best = [145.0 + 0.5 * s for s in range(5)], [140.0 + s for s in range(5)]
    assert out["diff_mean"] == pytest.approx(4.0) and out["p_value"] == pytest.approx(ttest_rel(gpo, best).pvalue)
    sd = np.std(np.subtract(gpo, best), ddof=1)
    assert out["power"]["detectable_difference"] == pytest.approx(detectable_difference(5, sd))
    assert out["power"]["powered"] is True
    assert "chosen on dev" in out["text"] and "would be b" in out["text"]
    assert "can tell a difference of 5" in out["text"]


def test_verdict_without_dev_numbers_selects_on_test_and_says_so():
    out = verdict(sweep(dev_a=None))
    assert out["best_fixed"] == "b" and out["selected_on"] == "test" and "flatters it" in out["text"]


def test_results_markdown_carries_the_comparison():
    recs = sweep()
    md = results_markdown(summarise(recs), verdict(recs), "image",
                          {"recipe": "r.yaml", "protocol": "f30k", "split": "test", "seeds": list(range(5))})
    assert "| best fixed | a | 200.0 ± 0.0 | 142.0 ± 1.6 |" in md
    assert "| GPO | — | 195.0 ± 0.0 | 146.0 ± 0.8 |" in md
    assert "95 % CI [" in md and "paired t-test p = " in md and "power at a difference of 5: " in md
    assert "| a (best fixed) |" in md and "**Verdict:**" in md


def test_best_dev_reads_the_best_checkpoint_else_the_last_best_record(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "best").mkdir(parents=True)
    lines = [{"kind": "train", "loss": 1.0}, {"kind": "val", "epoch": 0, "best": True, "rsum": 10.0},
             {"kind": "val", "epoch": 1, "best": True, "rsum": 12.0},
             {"kind": "val", "epoch": 2, "best": False, "rsum": 11.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert best_dev(run) == (12.0, 1)
    (run / "checkpoints" / "best" / "trainer_state.json").write_text(json.dumps({"best_rsum": 12.5, "best_epoch": 3}))
    assert best_dev(run) == (12.5, 3)
    for unset in ("null", "-Infinity"):  # no validation was best yet (an imported run), as written now and before
        (run / "checkpoints" / "best" / "trainer_state.json").write_text(f'{{"best_rsum": {unset}, "best_epoch": -1}}')
        assert best_dev(run) == (None, None)
    assert best_dev(tmp_path / "none") == (None, None)


def test_the_shipped_demo_grid_is_five_seeds_of_max_and_mean_on_both_branches_and_gpo():
    spec = load_grid(REPO / "recipes" / "grids" / "demo.yaml")
    cells = expand_grid(spec.pool, spec.k, spec.branch, spec.seeds, spec.gpo)
    assert spec.seeds == (0, 1, 2, 3, 4) and len(cells) == 25
    assert sorted({c.key for c in cells}) == ["img-gpo__txt-gpo", "img-max__txt-max", "img-max__txt-mean",
                                              "img-mean__txt-max", "img-mean__txt-mean"]


def test_a_gpo_only_grid_has_no_empty_matrix():
    recs = [record("img-gpo__txt-gpo", s, 140.0 + s, 200.0, gpo=True) for s in range(3)]
    md = results_markdown(summarise(recs), verdict(recs), "both",
                          {"recipe": "r.yaml", "protocol": "f30k", "split": "test", "seeds": [0, 1, 2]})
    assert "visual pooling (rows)" not in md and "no fixed-pooling cell" in md
