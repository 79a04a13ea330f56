"""gridsearch: grid expansion, a resumable sweep read back from the runs' own files, and the paired verdict."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from scipy.stats import ttest_rel
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.errors import ConfigError
from vsectl.science import gridsearch as gs

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
runner = CliRunner()



def keys(cells: list[gs.Cell]) -> list[str]:
    return [c.key for c in cells]


# ----------------------------------------------------------------------------------------------------------------------
# grid expansion


def test_image_branch_sweeps_k_with_max_and_mean_at_the_ends_and_adds_gpo():
    cells = gs.expand_grid(["max", "mean", "kmax"], [1, 2, 5], branch="image", seeds=[0])
    assert keys(cells) == ["img-max", "img-kmax2", "img-kmax5", "img-mean", "img-gpo"]  # K = 1 is max, N = mean
    assert [c.image.label for c in cells] == ["max (K=1)", "K=2", "K=5", "mean (K=N)", "gpo"]
    assert all(c.text is None for c in cells)
    assert cells[1].overrides() == ["model.image.pool.name=kmax", "model.image.pool.k=2", "seed=0",
                                    "name=img-kmax2-s0"]
    assert [c.gpo for c in cells] == [False] * 4 + [True]
    assert [c.fixed for c in cells] == [True] * 4 + [False]


def test_text_branch_leaves_the_image_pooler_to_the_recipe():
    cells = gs.expand_grid(["mean", "max"], branch="text", seeds=[3])
    assert keys(cells) == ["txt-max", "txt-mean", "txt-gpo"]
    assert cells[0].overrides() == ["model.text.pool.name=max", "seed=3", "name=txt-max-s3"]


def test_both_branches_form_the_visual_by_text_product_seed_major():
    cells = gs.expand_grid(["max", "mean", "kmax"], [5], branch="both", seeds=[0, 1])
    per_seed = 3 * 3 + 1
    assert len(cells) == 2 * per_seed
    assert [c.seed for c in cells] == [0] * per_seed + [1] * per_seed
    assert cells[1].key == "img-max__txt-kmax5"
    assert cells[per_seed - 1].key == "img-gpo__txt-gpo" and cells[per_seed - 1].gpo
    assert len({c.name for c in cells}) == len(cells)


def test_gpo_in_the_grid_is_not_added_twice_and_can_be_left_out():
    assert keys(gs.expand_grid(["gpo", "max"], branch="image")) == ["img-max", "img-gpo"]
    assert keys(gs.expand_grid(["max"], branch="image", gpo=False)) == ["img-max"]


def test_unknown_pooler_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown pooler 'maxx'.*known: .*gpo.*kmax.*mean"):
        gs.expand_grid(["maxx"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"pools": ["kmax"], "ks": []}, "needs K values"),
    ({"pools": ["kmax"], "ks": [0]}, "k must be >= 1"),
    ({"pools": ["max"], "branch": "video"}, "branch must be one of"),
])
def test_bad_grids_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        gs.expand_grid(**kwargs)


def test_cell_config_applies_the_overrides_strictly():
    cell = gs.expand_grid(["kmax"], [5], branch="both", seeds=[2])[0]
    cfg = gs.cell_config(load_recipe(TINY), cell)
    assert (cfg.model.image.pool.name, cfg.model.image.pool.k, cfg.model.text.pool.k) == ("kmax", 5, 5)
    assert (cfg.seed, cfg.name) == (2, "img-kmax5__txt-kmax5-s2")


def test_a_pooler_that_cannot_be_built_fails_before_any_cell_runs(tmp_path, count_train):
    cells = gs.expand_grid(["gpo_perdim"], branch="image", gpo=False)
    with pytest.raises(ConfigError, match="in_dim"):
        gs.run_sweep(load_recipe(TINY), cells, tmp_path)
    assert count_train == [] and not (tmp_path / "runs").exists()


def test_grid_file_and_options(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("pool: [max, kmax]\nk: 2,10\nbranch: text\nseeds: [0, 1]\n")
    spec = gs.load_grid(path)
    assert spec == gs.GridSpec(pool=("max", "kmax"), k=(2, 10), branch="text", seeds=(0, 1), gpo=True)
    assert gs.resolve_grid(path, seeds="4", gpo=False) == gs.GridSpec(("max", "kmax"), (2, 10), "text", (4,), False)
    path.write_text("pools: [max]\n")
    with pytest.raises(ConfigError, match="did you mean 'pool'"):
        gs.load_grid(path)
    with pytest.raises(ConfigError, match="'x' is not a valid int"):
        gs.resolve_grid(k="1,x")


# ----------------------------------------------------------------------------------------------------------------------
# the verdict


def record(cell: str, seed: int, rsum: float, gpo: bool = False) -> dict:
    return {"cell": cell, "seed": seed, "gpo": gpo, "fixed": not gpo, "image": cell, "text": "recipe",
            "metrics": {"rsum": rsum, "i2t_r1": rsum / 6, "t2i_r1": rsum / 6}}


def test_verdict_pairs_gpo_with_the_best_fixed_cell_by_seed():
    gpo = [300.0, 306.0, 301.0]
    best = [299.0, 300.5, 298.0]
    recs = [record("img-gpo", s, v, gpo=True) for s, v in enumerate(gpo)]
    recs += [record("img-kmax5", s, v) for s, v in enumerate(best)]
    recs += [record("img-mean", s, v - 20) for s, v in enumerate(best)]
    out = gs.verdict(recs)
    assert out["best_fixed"] == "img-kmax5" and out["n"] == 3
    assert out["diff_mean"] == pytest.approx((1.0 + 5.5 + 3.0) / 3)
    assert out["p_value"] == pytest.approx(ttest_rel(gpo, best).pvalue)
    assert out["within_noise"] is (out["p_value"] >= 0.05)
    assert "paired t-test p = " in out["text"] and "img-kmax5" in out["text"]


def test_a_smoke_run_says_so_in_its_title_tables_verdict_and_figure(tmp_path):
    recs = [{**record("img-gpo", 0, 300.0, gpo=True), "dev_best_rsum": 310.0, "run": "runs/a"},
            {**record("img-max", 0, 290.0), "dev_best_rsum": 300.0, "run": "runs/b"}]
    meta = {"recipe": "recipes/demo.yaml", "quick": True, "protocol": "f30k", "split": "test", "seeds": [0],
            "tie_rule": "expected", "select_tie_rule": "expected"}
    written = gs.write_results(tmp_path, recs, "image", meta)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("# Pooling grid search (smoke run)") and "they are not results" in markdown
    assert written["verdict"]["text"].startswith("smoke run (--quick), not a result: ")
    assert json.loads((tmp_path / "results.json").read_text())["verdict"]["text"].startswith("smoke run")
    from vsectl.science.gridsearch.figures import figure_title

    assert figure_title(meta).startswith("smoke run, not a result: demo, test split: rsum (expected ties)")
    full = gs.write_results(tmp_path / "full", recs, "image", {**meta, "quick": False})
    assert "smoke" not in (tmp_path / "full" / "results.md").read_text() and "smoke" not in full["verdict"]["text"]


def test_paired_test_edge_cases():
    assert gs.paired_test([1.0, 2.0], [0.0, 0.0])["p_value"] is None  # fewer than 3 seeds
    assert gs.paired_test([3.0, 4.0, 5.0], [1.0, 2.0, 3.0])["p_value"] == 0.0  # a constant, non-zero difference
    assert gs.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["within_noise"] is True
    two = gs.verdict([record("g", 0, 10.0, True), record("g", 1, 11.0, True), record("f", 0, 9.0),
                      record("f", 1, 9.5)])
    assert "not possible with 2 seed(s)" in two["text"]
    assert gs.verdict([record("f", 0, 9.0)])["text"] == "no verdict: the grid has no GPO cell"


# ----------------------------------------------------------------------------------------------------------------------
# a real sweep on the toy set


@pytest.fixture
def count_train(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    import vsectl.training

    calls: list[tuple[str, bool]] = []
    real = vsectl.training.train

    def counting(cfg, out_root="runs", device="auto", resume=False, progress=None, **kw):  # noqa: ANN001, ANN202
        calls.append((cfg.name, resume))
        return real(cfg, out_root, device=device, resume=resume, progress=progress, **kw)

    monkeypatch.setattr(vsectl.training, "train", counting)
    return calls


def sweep_args(toy_root: Path, out: Path) -> list[str]:
    return ["gridsearch", str(TINY), "--pool", "max", "--branch", "image", "--seeds", "0", "--out", str(out),
            "--device", "cpu", "--set", f"data.root={toy_root}", "--set", "train.epochs=1",
            "--set", "train.max_steps_per_epoch=2"]


def test_sweep_writes_tables_from_the_runs_own_files_and_resumes(toy_root, tmp_path, count_train):
    from PIL import Image

    out = tmp_path / "sweep"
    result = runner.invoke(app, sweep_args(toy_root, out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert count_train == [("img-max-s0", False), ("img-gpo-s0", False)]
    for name in ("results.json", "results.csv", "results.md", "rsum.pdf", "rsum.svg", "rsum.png"):
        assert (out / name).is_file(), name
    with Image.open(out / "rsum.png") as image:
        assert image.size[0] > 200

    results = json.loads((out / "results.json").read_text())
    by_cell = {r["cell"]: r for r in results["records"]}
    own = json.loads((out / "runs" / "img-max-s0" / "eval" / "f30k-test.json").read_text())
    assert by_cell["img-max"]["metrics"] == own["metrics"]
    assert by_cell["img-max"]["split"] == "test" and by_cell["img-max"]["n_images"] == 30
    assert by_cell["img-max"]["text"] == "gpo (recipe)"  # the branch the grid leaves alone, by its pooler
    run = out / "runs" / "img-max-s0"  # the dev rsum read back is the evaluated (best) checkpoint's
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    state = json.loads((run / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert by_cell["img-max"]["dev_best_rsum"] == state["best_rsum"] == max(v["rsum"] for v in vals
                                                                            if v.get("kind") == "val")
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert float(rows[0]["rsum"]) == pytest.approx(own["metrics"]["rsum"])
    table = (out / "results.md").read_text()
    assert f"{own['metrics']['rsum']:.1f}" in table and "**Verdict:**" in table and "not possible" in table

    # kill simulation: one cell lost everything, the other was trained but not evaluated
    finished = out / "runs" / "img-gpo-s0" / "checkpoints" / "best" / "model.safetensors"
    mtime = finished.stat().st_mtime_ns
    import shutil

    shutil.rmtree(out / "runs" / "img-max-s0")
    (out / "runs" / "img-gpo-s0" / "eval" / "f30k-test.json").unlink()
    count_train.clear()
    result = runner.invoke(app, sweep_args(toy_root, out))
    assert result.exit_code == 0, result.output
    assert sorted(count_train) == [("img-gpo-s0", True), ("img-max-s0", False)]
    assert finished.stat().st_mtime_ns == mtime  # resumed at its end: no epoch was retrained
    assert len(json.loads((out / "results.json").read_text())["records"]) == 2

    count_train.clear()
    assert runner.invoke(app, sweep_args(toy_root, out)).exit_code == 0
    assert count_train == []  # everything finished: nothing runs

    result = runner.invoke(app, [*sweep_args(toy_root, out), "--set", "train.lr=1e-3"])
    assert result.exit_code == 2 and "another configuration" in result.stderr  # no mixing of old and new runs
    assert count_train == []

    # another tie rule: every finished cell is evaluated again under it, nothing is trained again
    result = runner.invoke(app, [*sweep_args(toy_root, out), "--ties", "optimistic"])
    assert result.exit_code == 0, result.output
    assert sorted(name for name, _ in count_train) == ["img-gpo-s0", "img-max-s0"]  # resumed: already complete
    assert finished.stat().st_mtime_ns == mtime
    other = json.loads((out / "runs" / "img-max-s0" / "eval" / "f30k-test-optimistic.json").read_text())
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert results["meta"]["tie_rule"] == "optimistic" and "optimistic tie rule" in markdown
    assert "rsum (optimistic)" in markdown and "dev rsum (expected)" in markdown  # each table names its rules
    assert {r["cell"]: r["metrics"] for r in results["records"]}["img-max"] == other["metrics"]
    result = runner.invoke(app, [*sweep_args(toy_root, out), "--ties", "random"])
    assert result.exit_code == 2 and "unknown tie rule 'random'" in result.stderr


def test_default_recipe_and_toy_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gs.default_recipe().name in ("demo.yaml", "tiny.yaml")
    made = []
    monkeypatch.setattr("vsectl.data.toy.make_toy_dataset", lambda root, **kw: made.append((Path(root), kw)))
    gs.ensure_toy_data(load_recipe(TINY))
    assert made == [(Path("data/toy"), {"feat_dim": 32})]
    gs.ensure_toy_data(load_recipe(TINY, ["data.root=data/f30k"]))  # only a *toy* folder is generated
    assert len(made) == 1


def test_quick_is_a_small_grid_on_the_shipped_toy_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the copy shipped with vsectl is used
    assert gs.default_recipe().name == "tiny.yaml"  # docs/gridsearch.md: the default is the toy data
    spec = gs.resolve_grid(None, quick=True)
    cells = gs.expand_grid(spec.pool, spec.k, spec.branch, spec.seeds, spec.gpo)
    assert keys(cells) == ["img-max", "img-kmax2", "img-mean", "img-gpo"]
    assert gs.resolve_grid(None, quick=True, seeds="0,1").seeds == (0, 1)  # options still win
    assert len(gs.expand_grid(*vars(gs.resolve_grid(None)).values())) == 111  # the full default grid, for contrast


def test_a_sweep_whose_start_fails_leaves_no_cell_folder(tmp_path, count_train):
    cells = gs.expand_grid(["max"], branch="image", gpo=False)
    base = load_recipe(TINY, [f"data.root={tmp_path / 'no_features'}", "train.epochs=1"])
    with pytest.raises(Exception, match="does not exist"):
        gs.run_sweep(base, cells, tmp_path / "sweep", device="cpu")
    assert count_train == [("img-max-s0", False)]
    assert not (tmp_path / "sweep" / "runs").exists()


def test_maxk_is_swept_as_kmax():
    assert keys(gs.expand_grid(["maxk"], [1, 3], branch="image", gpo=False)) == ["img-max", "img-kmax3"]
