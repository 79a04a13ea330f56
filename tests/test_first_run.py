"""What a new user hits, round three: one tie rule everywhere, hints that name real options, logs without a terminal,
quiet JSON, Ctrl-C lines, verify's identical captions, and what the repository ignores.

Items with their own module are tested beside it: ONNX export in tests/test_export.py, the InfoNCE loss in
tests/test_losses.py, TensorBoard in tests/test_train_logs.py, untrained set sizes in tests/test_plots.py.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import test_newcomer
from typer.testing import CliRunner

from vsectl.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
runner = CliRunner()
toy, done = test_newcomer.toy, test_newcomer.done  # the same toy data and finished run, as module fixtures


def option_default(command: str, option: str) -> object:
    """The default of a CLI option, read from the command's click parameters."""
    import typer.main

    group = typer.main.get_command(app)
    *path, name = command.split()
    for part in path:
        group = group.commands[part]
    cmd = group.commands[name]
    return next(p.default for p in cmd.params if p.name == option)


# ----------------------------------------------------------------------------------------------------------------------
# 3. one tie rule by default everywhere


def test_every_command_and_function_defaults_to_one_tie_rule():
    from vsectl import evaluation
    from vsectl.config import load_recipe
    from vsectl.science.gridsearch import gridsearch
    from vsectl.scoring import metrics, protocols
    from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE

    assert DEFAULT_TIE_RULE == "expected"
    assert option_default("eval", "ties") == DEFAULT_TIE_RULE
    assert option_default("gridsearch", "ties") == DEFAULT_TIE_RULE
    assert load_recipe(None).train.select_tie_rule == DEFAULT_TIE_RULE  # checkpoint selection
    assert load_recipe(REPO / "recipes" / "demo.yaml").train.select_tie_rule == DEFAULT_TIE_RULE
    for fn, arg in ((evaluation.evaluate_runs, "tie_rule"), (evaluation.validate, "tie_rule"),
                    (protocols.evaluate_protocol, "tie_rule"), (metrics.evaluate_images, "tie_rule"),
                    (metrics.tie_ranked_metrics, "rule")):
        assert inspect.signature(fn).parameters[arg].default == DEFAULT_TIE_RULE, fn.__name__
    assert inspect.signature(gridsearch).parameters["tie_rule"].default in (None, DEFAULT_TIE_RULE)
    assert "--ties" not in (REPO / "Makefile").read_text()  # make demo reports the default too


def test_the_eval_table_names_its_tie_rule(done: Path, tmp_path: Path):
    run = shutil.copytree(done, tmp_path / "run")
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "expected tie rule" in result.stderr and "ties: expected" in result.stderr


def test_a_result_of_the_old_default_is_kept_under_its_own_name(done: Path, tmp_path: Path):
    run = shutil.copytree(done, tmp_path / "run")
    legacy = {"split": "test", "metrics": {"rsum": 1.0}}  # written before results recorded their rule: optimistic
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "f30k-test.json").write_text(json.dumps(legacy))
    result = runner.invoke(app, ["-q", "eval", str(run), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "eval" / "f30k-test.json").read_text())["tie_rule"] == "expected"
    assert json.loads((run / "eval" / "f30k-test-optimistic.json").read_text()) == legacy


# ----------------------------------------------------------------------------------------------------------------------
# 2. progress and whole lines without a terminal


def test_long_stages_print_progress_lines_without_a_terminal(toy: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VSECTL_PROGRESS_EVERY", "0")  # a line after every item (the default is every 30 s)
    result = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={toy}",
                                 "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch 0: ")]
    assert [line.split(",")[0] for line in lines] == ["epoch 0: 1/3 (33%)", "epoch 0: 2/3 (67%)", "epoch 0: done"]
    assert "/s" in lines[0] and "left" in lines[0] and "so far" in lines[0] and "loss" in lines[0]
    assert lines[-1].startswith("epoch 0: done, 3 in ")
    assert all(line == line.rstrip() for line in result.stderr.splitlines())  # nothing padded to a width


def test_quiet_prints_no_progress_lines(toy: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("VSECTL_PROGRESS_EVERY", "0")
    result = runner.invoke(app, ["-q", "train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={toy}",
                                 "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--device", "cpu"])
    assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_log_lines_and_tables_are_not_wrapped_at_80_columns(done: Path, tmp_path: Path):
    run = shutil.copytree(done, tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "run")
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"wrote {run / 'eval' / 'f30k-test.json'}" in result.stderr.splitlines()  # the path whole, on one line
    title = next(line for line in result.stderr.splitlines() if "tie rule" in line)
    assert title.strip() == "f30k · test · 10 images × 50 captions · expected tie rule"  # the title is not cut


def test_help_without_a_terminal_keeps_each_option_on_its_line():
    result = runner.invoke(app, ["embed", "--help"])
    assert result.exit_code == 0
    line = next(line for line in result.stdout.splitlines() if "--features" in line)
    assert "An extracted feature store" in line and "[default" not in line  # help and example path on one line
    assert "data/demo_feats/test.h5" in line or "data/demo_feats" in line


# ----------------------------------------------------------------------------------------------------------------------
# 14, 15. -q and --json mean the same in eval and search: results on stdout, stderr quiet


@pytest.fixture(scope="module")
def clip_emb(clipart_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fr_emb") / "test"
    result = runner.invoke(app, ["-q", "embed", str(clipart_run["run"]), "--features",
                                 str(clipart_run["feats"] / "test.h5"), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_search_json_leaves_stderr_quiet_unless_verbose(clip_emb: Path):
    result = runner.invoke(app, ["search", str(clip_emb), "a red apple", "-k", "3", "--json", "--device", "cpu"])
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    assert [h["rank"] for h in json.loads(result.stdout)[0]["hits"]] == [1, 2, 3]
    verbose = runner.invoke(app, ["-v", "search", str(clip_emb), "a red apple", "-k", "3", "--json", "--device",
                                  "cpu"])
    assert verbose.exit_code == 0 and "rank" in verbose.stderr and json.loads(verbose.stdout)


def test_quiet_search_and_eval_both_print_their_results_on_stdout_only(clip_emb: Path, done: Path, tmp_path: Path):
    search = runner.invoke(app, ["-q", "search", str(clip_emb), "a red apple", "-k", "2", "--device", "cpu"])
    assert search.exit_code == 0 and search.stderr == ""
    rows = [line.split("\t") for line in search.stdout.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("a red apple", "1"), ("a red apple", "2")]
    run = shutil.copytree(done, tmp_path / "run")
    evaluation = runner.invoke(app, ["-q", "eval", str(run), "--device", "cpu"])
    assert evaluation.exit_code == 0 and evaluation.stderr == ""
    [line] = evaluation.stdout.splitlines()
    assert line.startswith("f30k\ttest\texpected\trsum=") and "i2t_r1=" in line
    as_json = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--json"])
    assert as_json.exit_code == 0 and as_json.stderr == "" and json.loads(as_json.stdout)["f30k"]["tie_rule"]


def test_plot_weights_report_and_index_info_follow_q_and_json(clip_emb: Path, done: Path, tmp_path: Path):
    """`-q plot-weights` printed both tables; `report --json` and `index --info --json` printed theirs on stderr."""
    run = shutil.copytree(done, tmp_path / "run")
    plot = runner.invoke(app, ["-q", "plot-weights", str(run), "--out", str(tmp_path / "w.png")])
    assert plot.exit_code == 0 and plot.stderr == "" and plot.stdout.strip() == str(tmp_path / "w.png")
    assert runner.invoke(app, ["-q", "eval", str(run), "--device", "cpu"]).exit_code == 0
    report = runner.invoke(app, ["report", str(run), "--json"])
    assert report.exit_code == 0 and report.stderr == "" and json.loads(report.stdout)
    emb = shutil.copytree(clip_emb, tmp_path / "emb")
    assert runner.invoke(app, ["-q", "index", str(emb), "--kind", "flat"]).exit_code == 0
    info = runner.invoke(app, ["index", str(emb), "--info", "--json"])
    assert info.exit_code == 0 and info.stderr == "" and len(json.loads(info.stdout)) == 1
    table = runner.invoke(app, ["index", str(emb), "--info"])
    assert "index card" in table.stderr and "0 GB" not in table.stderr  # sizes in a unit that suits them (was 0 GB)
    assert "memory by phase" in table.stderr and "measure " in table.stderr


# ----------------------------------------------------------------------------------------------------------------------
# 11. verify reports identical captions on different images of a split


def test_verify_counts_captions_shared_by_different_images(tmp_path: Path):
    from vsectl.data.store import StoreWriter
    from vsectl.data.verify import verify_path

    captions = {0: ["Crawfish.", "A red crawfish"], 1: ["crawfish.", "Blue man."], 2: ["Blue  man."],
                3: ["A dog", "a dog"], 4: ["Tree."]}  # image 3 repeats its own caption: not a tie between images
    with StoreWriter(tmp_path / "test.h5", feat_dim=4) as writer:
        for image, texts in captions.items():
            writer.add_image(f"im{image}", np.ones((2, 4), dtype=np.float32))
            for text in texts:
                writer.add_caption(text, image)
    owners: dict[str, set[int]] = {}  # the reference: case and spacing aside, which texts sit on 2+ images
    for image, texts in captions.items():
        for text in texts:
            owners.setdefault(" ".join(text.lower().split()), set()).add(image)
    shared = {t: o for t, o in owners.items() if len(o) > 1}
    report = verify_path(tmp_path)
    split = report["splits"]["test"]
    assert (split["shared_captions"], split["images_with_shared_captions"]) == (len(shared), len(set().union(
        *shared.values()))) == (2, 3)
    assert report["ok"] and any("2 caption text(s) appear on more than one image" in w for w in report["warnings"])
    result = runner.invoke(app, ["data", "verify", str(tmp_path)])
    assert result.exit_code == 0 and "captions on 2+ images" in result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# 5. embed reuses the run's stored features and takes a whole feature folder


def embed_cli(*args: str) -> None:
    result = runner.invoke(app, ["-q", "embed", *args, "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output


def test_embed_of_a_feature_folder_is_its_stores_one_after_the_other(clipart_run, tmp_path: Path):
    import vsectl

    run, feats = str(clipart_run["run"]), clipart_run["feats"]
    embed_cli(run, "--features", str(feats), "--out", str(tmp_path / "all"))
    parts = []
    for split in ("train", "dev", "test"):
        embed_cli(run, "--features", str(feats / f"{split}.h5"), "--out", str(tmp_path / split))
        parts.append(vsectl.open_embeddings(tmp_path / split))
    whole = vsectl.open_embeddings(tmp_path / "all")
    # batches cross the split boundaries in one embed and not in the other: the same sums in another grouping
    np.testing.assert_allclose(whole.images, np.concatenate([p.images for p in parts]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(whole.captions, np.concatenate([p.captions for p in parts]), atol=1e-6, rtol=0)
    offsets = np.cumsum([0] + [p.n_images for p in parts[:-1]])
    shifted = [p.cap2img + o for p, o in zip(parts, offsets, strict=True)]
    np.testing.assert_array_equal(whole.cap2img, np.concatenate(shifted))
    assert [whole.image(i)["id"] for i in range(whole.n_images)] == [
        p.image(i)["id"] for p in parts for i in range(p.n_images)]


def test_embed_of_the_raw_dataset_reuses_the_stored_features_instead_of_the_backbone(clipart_run, tmp_path: Path,
                                                                                    monkeypatch):
    import vsectl
    from vsectl.retrieval import model as retrieval_model
    from vsectl.retrieval import stored

    run, raw = str(clipart_run["run"]), str(clipart_run["raw"])
    replayed = []
    real = retrieval_model.RetrievalModel.image_features

    def counting(self, paths, **kwargs):  # noqa: ANN001, ANN003, ANN202
        replayed.extend(paths)
        return real(self, paths, **kwargs)

    monkeypatch.setattr(retrieval_model.RetrievalModel, "image_features", counting)
    embed_cli(run, "--data", raw, "--split", "test", "--out", str(tmp_path / "reused"))
    assert replayed == []  # every test image's set is in the run's test.h5
    monkeypatch.setattr(stored, "reusable_sets", lambda *a, **k: None)  # what embed did before: the backbone
    embed_cli(run, "--data", raw, "--split", "test", "--out", str(tmp_path / "replayed"))
    assert len(replayed) == vsectl.open_embeddings(tmp_path / "replayed").n_images
    a, b = vsectl.open_embeddings(tmp_path / "reused"), vsectl.open_embeddings(tmp_path / "replayed")
    np.testing.assert_allclose(a.images, b.images, atol=1e-5)
    np.testing.assert_array_equal(a.captions, b.captions)


def test_stored_features_of_another_recipe_are_not_reused(clipart_run, tmp_path: Path):
    from vsectl.io import sha256_file
    from vsectl.retrieval import stored
    from vsectl.retrieval.recipe import store_recipe

    feats = clipart_run["feats"]
    recipe = store_recipe(feats / "test.h5")
    items = [{"id": i} for i in __import__("vsectl.data.store", fromlist=["x"]).read_store_captions(
        feats / "test.h5")[2]]
    digest = sha256_file(clipart_run["raw"] / "dataset.json")
    assert len(stored.reusable_sets(items, digest, recipe, feats).rows) == len(items)
    other = recipe.__class__(**{**recipe.__dict__, "input_size": recipe.input_size * 2})
    assert stored.reusable_sets(items, digest, other, feats) is None  # another input size: other numbers
    assert stored.reusable_sets(items, "0" * 64, recipe, feats) is None  # another dataset


# ----------------------------------------------------------------------------------------------------------------------
# 14. the Ctrl-C line of extract names real folders; what the repository ignores


def test_ctrl_c_in_extract_names_the_split_folders_it_kept(tmp_path: Path, monkeypatch):
    import vsectl.extract

    out = tmp_path / "feats"

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        (out / "train.shards").mkdir(parents=True)
        for k in range(2):
            (out / "train.shards" / f"shard-{k:05d}.h5").write_bytes(b"x")
        (out / "dev.h5").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(vsectl.extract, "extract", killed)
    result = runner.invoke(app, ["extract", "--backbone", "efficientnet-lite0", "--data", str(tmp_path / "raw"),
                                 "--out", str(out)])
    assert result.exit_code == 130
    line = " ".join(result.stderr.split())
    assert "<split>" not in line and f"2 finished shard(s) (2 in {out / 'train.shards'})" in line
    assert "finished stores dev.h5" in line


def test_the_outputs_the_readme_writes_are_ignored_by_git(tmp_path: Path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    readme = (REPO / "README.md").read_text()
    outputs = ["exports/demo/text.onnx", "runs/demo/config.yaml", "data/demo_emb/meta.json", "results/apple.png"]
    for path in outputs:
        assert path.split("/")[0] + "/" in readme or path in readme, path  # the README's own examples
    ignored = subprocess.run(["git", "check-ignore", *outputs], cwd=REPO, capture_output=True, text=True).stdout
    assert ignored.split() == outputs


# ----------------------------------------------------------------------------------------------------------------------
# 7. make test says what it installs, before it does


@pytest.mark.parametrize(("target", "package"), [("browser", "chromium"), ("compiler", "gcc")])
def test_make_says_in_one_line_before_it_installs_a_system_package(target: str, package: str, tmp_path: Path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    fake = tmp_path / "bin"  # nothing else on PATH: no chromium, no cc; `id` says root; apt-get only records
    fake.mkdir()
    log = tmp_path / "apt.log"
    (fake / "id").write_text("#!/bin/sh\necho 0\n")
    (fake / "apt-get").write_text(f"#!/bin/sh\necho \"apt-get $*\" >> {log}\n")
    for script in fake.iterdir():
        script.chmod(0o755)
    env = {"PATH": str(fake), "HOME": str(tmp_path)}
    run = subprocess.run([make, "-s", "-C", str(REPO), target], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("make: installing") and package in lines[0]
    assert "NO_SYSTEM_PACKAGES=1" in lines[0] and package in log.read_text()
    log.unlink()
    skipped = subprocess.run([make, "-s", "-C", str(REPO), target, "NO_SYSTEM_PACKAGES=1"], env=env,
                             capture_output=True, text=True)
    assert skipped.stdout.startswith("warning:") and not log.exists()
