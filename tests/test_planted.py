"""The planted-pooling benchmark: the generator against a naive reference, its store, the scoring, and a quick run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data.sources import load_split
from vsectl.errors import ConfigError
from vsectl.science.planted import BenchConfig, cell_pattern, gpo_theta_rmse, load_bench_config, summarise_planting
from vsectl.science.planted_data import PlantedSplit, caption_words, make_planted_data, planted_target, projection

runner = CliRunner()


def naive_target(z: np.ndarray, pattern: str) -> np.ndarray:
    """Per dimension: sort the column by hand, then average the top K (M-K), all (A) or the top ⌈P·N⌉ (T-P%)."""
    n = z.shape[0]
    out = []
    for j in range(z.shape[1]):
        col = sorted(z[:, j].tolist(), reverse=True)
        if pattern == "A":
            k = n
        elif pattern.startswith("M-"):
            k = min(int(pattern[2:]), n)
        else:
            k = max(1, -(-int(pattern[2:-1]) * n // 100))
        out.append(sum(col[:k]) / k)
    return np.array(out)


@pytest.mark.parametrize("pattern", ["M-1", "M-3", "A", "T-25%"])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_planted_target_matches_the_naive_reference(pattern, n):
    z = np.random.default_rng(n).normal(size=(n, 5))
    np.testing.assert_allclose(planted_target(z, pattern), naive_target(z, pattern), rtol=1e-6, atol=1e-7)


def test_projection_has_orthonormal_rows():
    p = projection(6, 4, np.random.default_rng(0))
    np.testing.assert_allclose(p @ p.T, np.eye(4), atol=1e-12)
    with pytest.raises(ConfigError, match="caption_dims"):
        projection(3, 4, np.random.default_rng(0))


def test_caption_words_name_each_dimension_and_its_level():
    edges = np.array([[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]])
    assert caption_words(np.array([-2.0, 0.5]), edges) == "d0q0 d1q2"
    assert caption_words(np.array([3.0, -0.5]), edges) == "d0q3 d1q1"


SPLITS = [PlantedSplit("train", 120, 4, 9), PlantedSplit("dev", 20, 4, 9), PlantedSplit("larger", 10, 20, 24)]


def test_the_store_is_an_ordinary_split_with_the_planted_captions(tmp_path):
    root = make_planted_data(tmp_path, "M-2", SPLITS, feat_dim=6, caption_dims=3, bins=4, noise=0.0, seed=1)
    manifest = json.loads((root / "planted.json").read_text())
    train = load_split(root, "train")
    assert train.n_images == 120 and train.n_captions == 120 and train.features.feat_dim == 6
    lengths = train.features.lengths()
    assert lengths.min() >= 4 and lengths.max() <= 9
    assert load_split(root, "larger").features.lengths().min() >= 20
    proj, edges = np.array(manifest["projection"]), np.array(manifest["edges"])
    for i in (0, 57):  # without noise, the caption is exactly the quantised planted pooling of the set
        assert train.captions[i] == caption_words(planted_target(train.features.get(i) @ proj.T, "M-2"), edges)
    levels = np.array([[int(w.split("q")[1]) for w in c.split()] for c in train.captions])  # (120, 3)
    for j in range(3):  # equally filled levels on the training split
        assert np.bincount(levels[:, j], minlength=4).tolist() == [30, 30, 30, 30]


def test_generation_is_deterministic_and_splits_do_not_depend_on_each_other(tmp_path):
    a = make_planted_data(tmp_path / "a", "A", SPLITS, feat_dim=6, caption_dims=3, bins=4, seed=2)
    b = make_planted_data(tmp_path / "b", "A", SPLITS[:1] + SPLITS[2:], feat_dim=6, caption_dims=3, bins=4, seed=2)
    for split in ("train", "larger"):
        sa, sb = load_split(a, split), load_split(b, split)
        assert sa.captions == sb.captions
        np.testing.assert_array_equal(sa.features.get(3), sb.features.get(3))


def test_cell_names_map_to_their_fixed_theta():
    assert [cell_pattern(c) for c in ("img-max", "img-mean", "img-kmax4", "img-maxk8", "img-gpo")] == [
        "M-1", "A", "M-4", "M-8", None]


def test_gpo_orientation_is_found_and_scored_once_per_run():
    top = {n: [0.5, 0.5] + [0.0] * (n - 2) for n in range(4, 9)}
    assert gpo_theta_rmse(top, "M-2", (4, 8))["orientation"] == "top"
    mirrored = {n: c[::-1] for n, c in top.items()}
    scored = gpo_theta_rmse(mirrored, "M-2", (4, 8))
    assert scored["orientation"] == "bottom"
    assert max(scored["per_size"].values()) == pytest.approx(0.0)
    off = gpo_theta_rmse({4: [1.0, 0.0, 0.0, 0.0]}, "M-2", (4, 4))["per_size"]["4"]
    assert off == pytest.approx(np.sqrt((0.25 + 0.25) / 4))  # √(mean of (0.5², 0.5², 0, 0))


def _records(rsums: dict[str, list[float]], dev: dict[str, float]) -> list[dict]:
    cfg = BenchConfig(train_min_size=4, train_max_size=6, smaller_min_size=2, smaller_max_size=3,
                      larger_min_size=7, larger_max_size=8)
    out = []
    for cell, values in rsums.items():
        for seed, v in enumerate(values):
            rmse = {str(n): 0.1 for n in range(2, 9)}
            out.append({"planting": "M-2", "cell": cell, "label": cell, "seed": seed, "gpo": cell == "img-gpo",
                        "fixed": cell_pattern(cell), "run": "", "dev_rsum": dev[cell] + seed,
                        "rsum": {"seen": v, "smaller": v - 10, "larger": v - 20}, "theta_rmse": rmse,
                        "orientation": "top"})
    return cfg, out


def test_summary_finds_the_peak_and_judges_gpo_within_one_std():
    cfg, recs = _records({"img-max": [100, 102, 104], "img-kmax2": [200, 210, 220], "img-gpo": [195, 200, 205]},
                         {"img-max": 90, "img-kmax2": 190, "img-gpo": 180})
    s = summarise_planting(cfg, "M-2", recs)
    assert s["planted_cell"] == "img-kmax2" and s["peak_is_planted"] and s["best_fixed_dev"] == "img-kmax2"
    assert s["compare"]["seen"]["within_one_std"]  # 200 >= 210 − 10
    assert s["compare"]["seen"]["gpo_seeds_within_one_std"] == 2  # 200 and 205
    assert not s["compare"]["seen"]["gpo_better"]
    assert s["compare"]["seen"]["diff"]["mean"] == pytest.approx(-10.0)
    cfg, recs = _records({"img-max": [300, 300, 300], "img-kmax2": [200, 210, 220], "img-gpo": [150, 160, 170]},
                         {"img-max": 90, "img-kmax2": 190, "img-gpo": 180})
    s = summarise_planting(cfg, "M-2", recs)
    assert s["peak_test"] == "img-max" and not s["peak_is_planted"]
    assert s["best_fixed_dev"] == "img-kmax2"  # chosen on dev, not on the test numbers
    assert not s["compare"]["seen"]["within_one_std"]


def test_bad_benchmark_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="outside the training range"):
        BenchConfig(smaller_max_size=10)
    with pytest.raises(ConfigError, match="unknown pattern"):
        BenchConfig(plantings="M-x")
    result = runner.invoke(app, ["bench-pooling", "--quick", "--out", str(tmp_path), "--seeds", "a"])
    assert result.exit_code == 2 and result.stderr.startswith("error:")


def test_quick_benchmark_writes_its_results_and_resumes(tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench-pooling", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == out
    data = json.loads((out / "results.json").read_text())
    (summary,) = data["plantings"]
    assert summary["planting"] == "M-4" and summary["planted_cell"] == "img-kmax4"
    cells = {r["cell"] for r in data["records"]}
    assert cells == {"img-max", "img-kmax4", "img-mean", "img-gpo"}
    gpo = next(r for r in data["records"] if r["gpo"])
    assert set(gpo["rsum"]) == {"seen", "smaller", "larger"} and len(gpo["theta_rmse"]) == 64 - 3 + 1
    markdown = (out / "results.md").read_text()
    assert "| M-4 | GPO |" in markdown and markdown.startswith("# Planted-pooling benchmark (smoke run")
    assert all(line.startswith("smoke run, not a result: ") for line in data["verdict"]) and "expected tie rule" in \
        markdown
    assert (out / "planted.pdf").read_bytes().startswith(b"%PDF") and (out / "planted.png").is_file()
    assert (out / "planted.svg").read_bytes().startswith(b"<?xml")
    mtime = (out / "grid" / "M-4" / "runs" / "img-gpo-s0" / "metrics.jsonl").stat().st_mtime
    again = runner.invoke(app, ["bench-pooling", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert (out / "grid" / "M-4" / "runs" / "img-gpo-s0" / "metrics.jsonl").stat().st_mtime == mtime
    changed = runner.invoke(app, ["bench-pooling", "--quick", "--out", str(out), "--set", "noise=0.5"])
    assert changed.exit_code == 2 and "other settings" in changed.stderr


def test_recipes_load():
    assert load_bench_config().seed_list == [0, 1, 2, 3, 4]
    assert load_bench_config(Path(__file__).parent.parent / "recipes" / "planted" / "quick.yaml").jobs == 1
