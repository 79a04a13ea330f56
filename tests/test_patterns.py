"""The pattern-generation experiment (spec §12): ground-truth patterns, RMSE, recipes, and a quick run that learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.errors import ConfigError
from vsectl.science.patterns import (
    RECIPES,
    PatternsConfig,
    buckets,
    coefficient_rmse,
    load_patterns_config,
    pattern_theta,
    pattern_weights,
    run_patterns,
)

runner = CliRunner()

REFERENCE = {  # (pattern, N) → θ*, written out by hand from the definitions in docs/patterns.md
    ("A", 1): [1.0],
    ("A", 4): [0.25, 0.25, 0.25, 0.25],
    ("M-1", 1): [1.0],
    ("M-1", 3): [1.0, 0.0, 0.0],
    ("M-10", 4): [0.25, 0.25, 0.25, 0.25],  # fewer than K elements: the mean
    ("M-10", 12): [0.1] * 10 + [0.0, 0.0],
    ("T-50%", 1): [1.0],
    ("T-50%", 4): [0.5, 0.5, 0.0, 0.0],
    ("T-50%", 5): [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0],  # ⌈5/2⌉ = 3
    ("L", 1): [1.0],
    ("L", 2): [1.0, 0.0],
    ("L", 3): [2 / 3, 1 / 3, 0.0],
    ("L", 4): [0.5, 1 / 3, 1 / 6, 0.0],
}


@pytest.mark.parametrize(("pattern", "n"), list(REFERENCE))
def test_pattern_weights_match_the_hand_written_reference(pattern, n):
    torch.testing.assert_close(pattern_weights(pattern, n), torch.tensor(REFERENCE[pattern, n]))


def test_unknown_pattern_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown pattern 'Q'"):
        pattern_weights("Q", 3)
    with pytest.raises(ConfigError, match="unknown pattern"):
        PatternsConfig(patterns="A,M-x")


def test_pattern_theta_pads_with_zeros():
    theta = pattern_theta("T-50%", torch.tensor([5, 2]), 6)
    assert theta.shape == (2, 6, 1)
    torch.testing.assert_close(theta[0, :, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0, 0]))
    torch.testing.assert_close(theta[1, :, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_recipes_load_and_the_default_recipe_equals_the_dataclass_defaults():
    assert load_patterns_config() == PatternsConfig()
    quick = load_patterns_config(RECIPES / "quick.yaml")
    assert quick.design_list == ["gpo"] and quick.pattern_list == ["A", "M-1"]
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_patterns_config(None, ["stepz=3"])
    with pytest.raises(ConfigError, match="unknown design"):
        load_patterns_config(None, ["designs=gpo,gpo_featin"])


def test_buckets_of_the_paper_split():
    assert buckets(PatternsConfig()) == {"seen": (20, 100), "smaller": (10, 19), "larger": (101, 120)}


def test_rmse_is_zero_for_the_true_weights_and_one_over_root_n_for_max_versus_mean():
    class Oracle(torch.nn.Module):
        def weights_for_lengths(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
            return pattern_theta("A", lengths, max_len)

    assert coefficient_rmse(Oracle(), "A", [1, 5, 30]) == pytest.approx([0.0, 0.0, 0.0])
    # uniform θ scored against max: sqrt(((1 − 1/N)² + (N − 1)/N²) / N) = sqrt(N − 1) / N
    assert coefficient_rmse(Oracle(), "M-1", [4, 25]) == pytest.approx([3**0.5 / 4, 24**0.5 / 25])


def test_runs_are_seeded(tmp_path):
    cfg = load_patterns_config(RECIPES / "quick.yaml", ["steps=3", "patterns=L", "test_max_size=30"])
    first = run_patterns(cfg)
    assert run_patterns(cfg)["per_size"] == first["per_size"]
    assert run_patterns(load_patterns_config(RECIPES / "quick.yaml", ["steps=3", "patterns=L", "test_max_size=30",
                                                                      "seed=1"]))["per_size"] != first["per_size"]


def test_quick_patterns_learn_max_and_mean_with_cos_sin_bigru(tmp_path):
    """`patterns --quick` (50 Adam steps): Cos/Sin + BiGRU reproduces M-1 and A.

    Thresholds: seen-size RMSE < 0.03 and every bucket < 0.06. Mistaking one pattern for the other costs
    sqrt(N − 1)/N ≈ 0.3 at N = 10, 0.14 at N = 50 and 0.09 at N = 120, so both bounds are several times below a wrong
    pattern; a run with the pinned seed reaches ≈ 0.012 (A) and ≈ 0.001 (M-1) on seen sizes.
    """
    out = tmp_path / "patterns"
    threads = torch.get_num_threads()
    result = runner.invoke(app, ["patterns", "--quick", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rmse"] == data["rmse"]
    for pattern in ("A", "M-1"):
        rmse = data["rmse"][pattern]["gpo"]
        assert rmse["seen"] < 0.03, rmse
        assert max(rmse.values()) < 0.06, rmse
    table = Path(out / "results.md").read_text()
    assert "| M-1 | Cos/Sin + BiGRU (`gpo`) |" in table and "steps: 50" in table
    assert torch.get_num_threads() == threads  # the run's one-thread setting does not leak into the caller
