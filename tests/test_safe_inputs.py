"""Inputs that gave a traceback, a hang or a silent wrong answer: each now gets one line (exit 2) or the right result.

Recipes (aliases, size, encoding, nesting, values, the run name), damaged embeddings and indexes, search bounds, the
contact sheet, checkpoints (NaN weights, a damaged trainer state, a missing RNG file), eval of the last checkpoint,
identical bytes for identical runs, and a full disk (a real limit set on the process, not a mock).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--device", "cpu"]


def refuse(*argv: str) -> str:
    """Run the CLI in-process; it must refuse in one short line. Returns the line."""
    line = one_error_line(CliRunner().invoke(app, ["-q", *argv]))
    assert len(line) < 600, f"a {len(line)}-character line"
    return line


def train_argv(recipe: Path, toy: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(recipe), "--out", str(out), "--set", f"data.root={toy}", *FAST, *extra]


# ------------------------------------------------------------------------------------------------ recipes


def laughs(levels: int) -> str:
    """A recipe whose name is a YAML alias bomb: `levels` levels of 9 aliases each (9**levels values, 1 KB)."""
    chain = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    chain += [f"&l{k} [{', '.join([f'*l{k - 1}'] * 9)}]" for k in range(1, levels)]
    return f"name: [{', '.join(chain)}]\n"


def tiny_with(text: str) -> str:
    return TINY.read_text() + text


RECIPES = {
    "billion laughs in name": (lambda: laughs(7), "expands to more than 100,000 values through YAML aliases"),
    "a 2 MB recipe": (lambda: tiny_with(f"# {'x' * (2 << 20)}\n"), "MB; a recipe is at most 1 MB"),
    "a 5000-character data.root": (lambda: TINY.read_text().replace("root: data/toy", f"root: {'d' * 5000}"),
                                   "data.root is 5,000 characters long; a value is at most 4096"),
    "not UTF-8": (lambda: TINY.read_text().replace("name: tiny", "name: tiny\udcff"), "is not UTF-8 text (byte 0xff"),
    "nested 5000 deep": (lambda: tiny_with(f"extra: {'[' * 5000}{']' * 5000}\n"), "nests deeper than 64 levels"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_a_hostile_recipe_is_refused_fast_in_one_line(case: str, tmp_path: Path, toy_root: Path) -> None:
    make, expect = RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(make().encode("utf-8", "surrogateescape"))
    start = time.monotonic()
    line = refuse("train", str(recipe), "--out", str(tmp_path / "runs"), *FAST)
    assert expect in line
    assert time.monotonic() - start < 10 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expect", [
    ("train.lr=.nan", "train.lr must be a finite number, got nan"),
    ("train.lr=-1", "train.lr must be positive, got -1.0"),
    ("loss.margin=.inf", "loss.margin must be a finite number, got inf"),
    ("seed=1099511627776", "seed = 1099511627776 is out of range; a seed lies within 0..4294967295"),
    ("model.embed_dim=1000000000", "model.embed_dim = 1000000000 is too large; a size in the model is at most 65536"),
    ("model.text.word_dim=0", "model.text.word_dim must be positive, got 0"),
    ("name=../escaped", "name '../escaped' cannot name a run folder"),
    ("name=/tmp/absolute", "name '/tmp/absolute' cannot name a run folder"),
    ("name=.", "name '.' cannot name a run folder"),
    ("name=", "name '' cannot name a run folder"),
])
def test_a_recipe_value_out_of_bounds_is_one_line(override: str, expect: str, tmp_path: Path, toy_root: Path) -> None:
    out = tmp_path / "runs"
    out.mkdir()
    (out / "config.yaml").write_text("mine\n")  # `name=.` once overwrote a file here
    line = refuse(*train_argv(TINY, toy_root, out, "--set", override))
    assert expect in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "runs"]
    assert (out / "config.yaml").read_text() == "mine\n"


def test_saved_configs_and_other_yaml_files_go_through_the_same_bounds(tmp_path: Path) -> None:
    from vsectl.config import config_from_yaml
    from vsectl.errors import ConfigError
    from vsectl.science.gridsearch.grid import load_grid

    with pytest.raises(ConfigError, match="expands to more than"):
        config_from_yaml(laughs(7))
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"pool: {'[' * 200}{']' * 200}\n")
    with pytest.raises(ConfigError, match="nests deeper than 64 levels"):
        load_grid(grid)


# ------------------------------------------------------------------------------------------------ embeddings, index


@pytest.fixture(scope="module")
def emb(clipart_run, tmp_path_factory) -> Path:
    from vsectl.retrieval import build_index, embed

    out = embed(clipart_run["run"], tmp_path_factory.mktemp("emb") / "E", features=clipart_run["feats"] / "test.h5",
                device="cpu")
    build_index(out, kind="hnsw")
    return out


def damaged(emb: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "E"
    shutil.copytree(emb, copy)
    return copy


def nan_row(folder: Path, row: int) -> None:
    matrix = np.load(folder / "images.npy", mmap_mode="r+")
    matrix[row] = np.nan
    matrix.flush()
    del matrix


def test_nan_rows_are_refused_on_open_and_never_reach_json(emb: Path, tmp_path: Path, monkeypatch) -> None:
    from vsectl.retrieval import finite as finite_module

    copy = damaged(emb, tmp_path)
    for index in copy.glob("index-*"):  # a stale index adds its own warning line; only the rows are under test here
        shutil.rmtree(index)
    nan_row(copy, 17)
    line = refuse("search", str(copy), "a red circle", "--json", "--device", "cpu")
    assert "row 17 of" in line and "images.npy holds NaN or inf values" in line
    monkeypatch.setattr(finite_module, "SAMPLE_ROWS", 2)  # a row the cheap check on open does not read
    line = refuse("search", str(copy), "a red circle", "--json", "--device", "cpu")
    assert "row 17 of" in line and "holds NaN or inf values" in line  # caught as the hit it would have been
    line = refuse("search", str(copy), "a red circle", "--verify", "--device", "cpu")
    assert "images.npy does not match the sha256 recorded in meta.json" in line


def test_json_output_never_holds_nan() -> None:
    from vsectl.io import json_text

    text = json_text({"score": float("nan"), "hits": [1.0, float("inf"), {"x": -float("inf")}]})
    assert json.loads(text) == {"score": None, "hits": [1.0, None, {"x": None}]}


def _edit_json(path: Path, edit) -> None:  # noqa: ANN001 - edit(dict) changes it in place
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGE = {
    "meta n_images not a number": (lambda e: _edit_json(e / "meta.json", lambda m: m.update(n_images="many")),
                                   "meta.json: n_images is 'many', not a valid int"),
    "meta fingerprint missing": (lambda e: _edit_json(e / "meta.json", lambda m: m.pop("fingerprint")),
                                 "meta.json: fingerprint is missing"),
    "images.jsonl garbage": (lambda e: (e / "images.jsonl").write_bytes(b"{" * (e / "images.jsonl").stat().st_size),
                             "images.jsonl: record 74 is not a JSON object"),
    "offsets cut short": (lambda e: np.save(e / "images.offsets.npy", np.load(e / "images.offsets.npy")[:-5]),
                          "images.offsets.npy does not index images.jsonl"),
    "images.npy grown": (lambda e: open(e / "images.npy", "ab").write(b"\0" * 64),
                         "images.npy is 30912 bytes, its header announces 30848"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_embeddings_folder_is_one_line(case: str, emb: Path, tmp_path: Path) -> None:
    edit, expect = DAMAGE[case]
    copy = damaged(emb, tmp_path)
    edit(copy)
    assert expect in refuse("search", str(copy), "a red circle", "-k", "120", "--exact", "--device", "cpu")


INDEX_DAMAGE = {
    "index.faiss truncated": (lambda i: (i / "index.faiss").write_bytes((i / "index.faiss").read_bytes()[:999]),
                              "index.faiss is not a readable faiss index"),
    "index.faiss garbage": (lambda i: (i / "index.faiss").write_bytes(b"garbage!" * 100),
                            "index.faiss is not a readable faiss index"),
    "index.faiss empty": (lambda i: (i / "index.faiss").write_bytes(b""), "index.faiss is not a readable faiss index"),
    "index.faiss missing": (lambda i: (i / "index.faiss").unlink(), "index.faiss is missing; rebuild it"),
    "index.json params null": (lambda i: _edit_json(i / "index.json", lambda m: m.update(params=None)),
                               "index.json is damaged (no params)"),
    "index.json without ef_search": (lambda i: _edit_json(i / "index.json", lambda m: m["params"].pop("ef_search")),
                                     "index.json is damaged (params.ef_search is missing)"),
    "index.json side missing": (lambda i: _edit_json(i / "index.json", lambda m: m.pop("side")),
                                "index.json is damaged (side is missing)"),
}


@pytest.mark.parametrize("case", list(INDEX_DAMAGE))
def test_a_damaged_index_is_one_line(case: str, emb: Path, tmp_path: Path) -> None:
    edit, expect = INDEX_DAMAGE[case]
    copy = damaged(emb, tmp_path)
    edit(copy / "index-hnsw-images")
    assert expect in refuse("search", str(copy / "index-hnsw-images"), "a red circle", "--device", "cpu")


@pytest.mark.parametrize("args, expect", [
    (["--kind", "hnsw", "--m", "100000000"], "--m must be between 2 and 512, got 100000000"),
    (["--kind", "hnsw", "--ef-search", "2000000000000"], "--ef-search must be between 1 and 65536"),
    (["--kind", "ivf", "--nlist", "0"], "nlist must be in [1, 120] for 120 vectors, got 0"),
])
def test_index_parameters_out_of_bounds_are_one_line(args: list[str], expect: str, emb: Path, tmp_path) -> None:
    copy = damaged(emb, tmp_path)
    assert expect in refuse("index", str(copy), *args)


def test_query_length_count_and_paths_are_bounded(emb: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("a red circle " * 1_000_000)  # 13 MB on one line
    start = time.monotonic()
    assert "line 1 is 12999999 characters long; a query is at most 1000" in refuse(
        "search", str(emb), "--queries", str(big), "--device", "cpu")
    assert time.monotonic() - start < 10
    long_line = tmp_path / "long.txt"
    long_line.write_text("red " * 300 + "\n")
    assert "line 1 is 1199 characters long; a query is at most 1000" in refuse(
        "search", str(emb), "--queries", str(long_line), "--device", "cpu")
    assert "query 1 is 1200 characters long" in refuse("search", str(emb), "red " * 300, "--device", "cpu")
    assert f"queries file {tmp_path} is a folder" in refuse("search", str(emb), "--queries", str(tmp_path))
    assert f"--sheet {tmp_path} is a folder" in refuse("search", str(emb), "red", "--sheet", str(tmp_path))


def test_a_sheet_replaces_only_a_sheet(emb: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert "--sheet" in refuse("search", str(emb), "a red circle", "--sheet", str(notes), "--device", "cpu")
    assert notes.read_text() == "my notes\n"
    sheet = tmp_path / "hits.png"
    for _ in range(2):  # a sheet vsectl wrote is replaced by the next one
        result = CliRunner().invoke(app, ["-q", "search", str(emb), "a red circle", "--sheet", str(sheet),
                                          "--device", "cpu"])
        assert result.exit_code == 0, result.output


def test_embed_takes_val_for_dev(clipart_run, tmp_path: Path) -> None:
    from vsectl.retrieval import embed, open_embeddings

    val = embed(clipart_run["run"], tmp_path / "val", data=clipart_run["raw"], split="val", device="cpu", workers=0)
    dev = embed(clipart_run["run"], tmp_path / "dev", data=clipart_run["raw"], split="dev", device="cpu", workers=0)
    assert open_embeddings(val).meta["source"]["split"] == "dev"
    assert (val / "images.npy").read_bytes() == (dev / "images.npy").read_bytes()


# ------------------------------------------------------------------------------------------------ runs and checkpoints


@pytest.fixture(scope="module")
def done_run(toy_root: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(app, ["-q", *train_argv(TINY, toy_root, out, "--set", "name=done")])
    assert result.exit_code == 0, result.output
    return out / "done"


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def resume_argv(run: Path, toy: Path, *extra: str) -> list[str]:
    return ["train", str(TINY), "--out", str(run.parent), "--set", f"name={run.name}", "--set", f"data.root={toy}",
            "--resume", *FAST, "--set", "train.epochs=2", *extra]


def test_a_checkpoint_with_nan_weights_is_one_line(done_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    run = copy_run(done_run, tmp_path)
    model = run / "checkpoints" / "best" / "model.safetensors"
    tensors = load_file(str(model))
    tensors["image.fc.weight"][0, 0] = float("nan")
    save_file(tensors, str(model))
    line = refuse("eval", str(run), "--device", "cpu")
    assert "weight image.fc.weight holds NaN or inf values" in line


def test_a_trainer_state_without_its_epoch_is_one_line(done_run: Path, tmp_path: Path, toy_root: Path) -> None:
    run = copy_run(done_run, tmp_path)
    _edit_json(run / "checkpoints" / "last" / "trainer_state.json", lambda s: s.pop("epoch"))
    assert "trainer_state.json is damaged (epoch is missing)" in refuse(*resume_argv(run, toy_root))


def test_a_run_whose_state_holds_minus_infinity_resumes_and_is_then_strict_json(done_run: Path, tmp_path: Path,
                                                                                 toy_root: Path) -> None:
    run = copy_run(done_run, tmp_path)  # an older vsectl wrote best_rsum -Infinity until a validation beat it
    _edit_json(run / "checkpoints" / "last" / "trainer_state.json", lambda s: s.update(best_rsum=-math.inf,
                                                                                       best_epoch=-1))
    assert "-Infinity" in (run / "checkpoints" / "last" / "trainer_state.json").read_text()
    result = CliRunner().invoke(app, ["-q", *resume_argv(run, toy_root)])
    assert result.exit_code == 0, result.output
    for folder in ("last", "best"):
        text = (run / "checkpoints" / folder / "trainer_state.json").read_text()
        state = json.loads(text, parse_constant=pytest.fail)  # NaN, Infinity, -Infinity are not JSON
        assert state["epoch"] == 2 and state["best_epoch"] == 1 and math.isfinite(state["best_rsum"])


def test_a_resume_without_the_rng_file_says_what_is_lost(done_run: Path, tmp_path: Path, toy_root: Path) -> None:
    run = copy_run(done_run, tmp_path)
    (run / "checkpoints" / "last" / "rng.safetensors").unlink()
    result = CliRunner().invoke(app, ["-q", *resume_argv(run, toy_root)])
    assert result.exit_code == 0, result.output
    assert "has no rng.safetensors: the run resumes with fresh random state" in result.stderr


def test_eval_of_the_last_checkpoint_keeps_the_best_ones_result(done_run: Path, tmp_path: Path) -> None:
    run = copy_run(done_run, tmp_path)
    for which in ("best", "last"):
        result = CliRunner().invoke(app, ["-q", "eval", str(run), "--checkpoint", which, "--device", "cpu"])
        assert result.exit_code == 0, result.output
    best = json.loads((run / "eval" / "f30k-test.json").read_text())
    last = json.loads((run / "eval" / "f30k-test-last.json").read_text())
    assert best["checkpoint"] == "best" and last["checkpoint"] == "last"


def test_identical_runs_write_identical_checkpoint_bytes(toy_root: Path, tmp_path: Path) -> None:
    """Two runs of one recipe, and one stopped after its first epoch and resumed: the same checkpoint bytes."""
    from vsectl.retrieval import run_fingerprint

    runs = []
    for k in range(2):
        argv = train_argv(TINY, toy_root, tmp_path / f"r{k}", "--set", "name=same", "--set", "train.epochs=2")
        assert CliRunner().invoke(app, ["-q", *argv]).exit_code == 0
        runs.append(tmp_path / f"r{k}" / "same")
    first = train_argv(TINY, toy_root, tmp_path / "r2", "--set", "name=same")  # one epoch, then resumed to two
    assert CliRunner().invoke(app, ["-q", *first]).exit_code == 0
    assert CliRunner().invoke(app, ["-q", *first, "--set", "train.epochs=2", "--resume"]).exit_code == 0
    runs.append(tmp_path / "r2" / "same")
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        digests = {hashlib.sha256((r / "checkpoints" / "last" / name).read_bytes()).hexdigest() for r in runs}
        assert len(digests) == 1, name
    assert len({run_fingerprint(r, "last") for r in runs}) == 1


def test_checkpoint_files_are_the_same_bytes_whatever_the_process(tmp_path: Path) -> None:
    """safetensors' own writer orders the metadata by a hash seeded per process: compare two processes."""
    code = ("import sys, torch; from vsectl.checkpoint import save_checkpoint; torch.manual_seed(0); "
            "save_checkpoint(sys.argv[1], {'w': torch.randn(3, 2), 'b': torch.zeros(2, dtype=torch.float16)}, "
            "{'epoch': 1}, {'config': 'a: 1', 'vsectl_version': '0', 'format': 'f', 'frozen': '{}'}, rng=False)")
    for k in range(2):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"c{k}")], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    files = {(tmp_path / f"c{k}" / "model.safetensors").read_bytes() for k in range(2)}
    assert len(files) == 1


# ------------------------------------------------------------------------------------------------ a full disk


def limited(max_bytes: int):  # noqa: ANN201 - a preexec function
    """A child process whose files may not grow past `max_bytes`: the kernel refuses the write (EFBIG), as a full
    disk refuses it (ENOSPC); both are the same kind of failure for the code that writes."""
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return preexec


def run_limited(argv: list[str], max_bytes: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vsectl", "-q", *argv], capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(max_bytes), env={**os.environ, "PYTHONPATH": str(REPO),
                                                              "OMP_NUM_THREADS": "1"})


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_loses_nothing(done_run, tmp_path, toy_root) -> None:
    run = copy_run(done_run, tmp_path)
    last = run / "checkpoints" / "last"
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    line = one_line(run_limited(resume_argv(run, toy_root), 100_000))  # model.safetensors needs more
    assert "file larger than the file system or the size limit allows" in line and "model.safetensors" in line
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before
    assert not list((run / "checkpoints").glob(".tmp-*"))
    result = CliRunner().invoke(app, ["-q", *resume_argv(run, toy_root)])  # space again: the resume goes on
    assert result.exit_code == 0, result.output
    assert json.loads((last / "trainer_state.json").read_text())["epoch"] == 2


def test_a_full_disk_in_embed_and_index_is_one_line_and_the_rerun_completes(clipart_run, emb, tmp_path) -> None:
    args = ["embed", str(clipart_run["run"]), "--features", str(clipart_run["feats"] / "test.h5"), "--out",
            str(tmp_path / "E"), "--device", "cpu", "--shard-size", "16"]
    straight = [*args[:5], str(tmp_path / "straight"), *args[6:]]
    assert subprocess.run([sys.executable, "-m", "vsectl", "-q", *straight], env={**os.environ,
                          "PYTHONPATH": str(REPO)}, capture_output=True).returncode == 0
    line = one_line(run_limited(args, 20_000))  # images.npy (30 KB) does not fit
    assert "file larger than the file system or the size limit allows" in line
    assert subprocess.run([sys.executable, "-m", "vsectl", "-q", *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True).returncode == 0  # resumed from the shards that were written
    for name in ("images.npy", "captions.npy", "images.jsonl", "captions.jsonl", "meta.json"):
        assert (tmp_path / "E" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    line = one_line(run_limited(["index", str(tmp_path / "E"), "--kind", "hnsw"], 20_000))
    assert "file larger than the file system or the size limit allows" in line and "index.faiss" in line
    assert not (tmp_path / "E" / "index-hnsw-images").exists()
    assert sorted(p.name for p in (tmp_path / "E").iterdir() if p.name.startswith(".")) == []


def test_rows_of_a_mapped_matrix_are_read_from_its_file_as_the_map_shows_them(tmp_path):
    """The NaN/inf check reads a memory-mapped matrix by positioned reads (not through the map, whose read-ahead
    pages stayed resident): the rows it reads are the map's own, sampled or in a run; a short file is one line."""
    from vsectl.errors import DataError
    from vsectl.retrieval.finite import _read_rows, check_finite
    from vsectl.retrieval.rows import RowReader

    x = np.random.default_rng(4).standard_normal((1000, 24)).astype(np.float32)
    np.save(tmp_path / "m.npy", x)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    reader = RowReader(mapped.filename)
    rows = np.array([0, 3, 4, 517, 999])
    assert np.array_equal(_read_rows(mapped, reader, rows, contiguous=False), x[rows])
    assert np.array_equal(_read_rows(mapped, reader, np.arange(200, 740), contiguous=True), x[200:740])
    assert np.array_equal(_read_rows(x, None, rows, contiguous=False), x[rows])  # an in-memory array: indexed
    x[517, 5] = np.inf
    np.save(tmp_path / "m.npy", x)
    with pytest.raises(DataError, match="row 517 of .* holds NaN or inf"):
        check_finite("m.npy", np.load(tmp_path / "m.npy", mmap_mode="r"), rows)
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    with open(tmp_path / "m.npy", "r+b") as f:
        f.truncate(128 + 500 * 24 * 4)
    with pytest.raises(DataError, match="m.npy (is shorter than its header says|is not a readable .npy file)"):
        check_finite("m.npy", mapped, np.array([900]))
