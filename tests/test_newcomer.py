"""What a new user hits: results kept per split and data, the dev/val alias, global flags, offline hub ids, Ctrl-C,
finished resumes, logging and workers, the verify table, and user-facing text without internal codes.

The one-line refusals of the same issue (a COCO protocol on a small split, images without captions, a missing toy
folder, a raw dataset as data.root, --checkpoint latest, an abbreviated backbone, a file as the run, a hub id not in
the cache) are cases in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data.toy import make_toy_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
FAST = ["--set", "train.max_steps_per_epoch=2", "--device", "cpu"]
runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("nc") / "toy", n_train=40, n_dev=10, n_test=10, seed=0)


@pytest.fixture(scope="module")
def done(toy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch tiny run on `toy` (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("runs")
    result = runner.invoke(app, ["-q", "train", str(TINY), "--out", str(out), "--set", f"data.root={toy}", "--set",
                                 "name=done", "--set", "train.epochs=2", *FAST])
    assert result.exit_code == 0, result.output
    return out / "done"


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def evaluate(run: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["-q", "eval", str(run), "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------------------------------------------------
# 1. the protocol is checked against the split before anything is encoded


def test_coco_protocol_on_a_small_split_is_refused_before_encoding(done: Path, monkeypatch) -> None:
    import vsectl.evaluation as ev
    from vsectl.errors import ConfigError

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("encoded before the protocol was checked")

    monkeypatch.setattr(ev, "encode_split", never)
    with pytest.raises(ConfigError, match="use --protocol f30k"):
        ev.evaluate_runs([done], protocol="all", split="test", write=False)


# ----------------------------------------------------------------------------------------------------------------------
# 2. results are keyed by protocol and split, record their data, and never replace a result of other data


def test_eval_of_another_split_or_data_root_keeps_the_test_result(done: Path, toy: Path, tmp_path: Path) -> None:
    run = copy_run(done, tmp_path / "run")
    evaluate(run, "--split", "test")
    test_file = run / "eval" / "f30k-test.json"
    before = test_file.read_bytes()
    saved = json.loads(before)
    assert saved["data_root"] == str(toy.resolve()) and re.fullmatch(r"[0-9a-f]{64}", saved["data_fingerprint"])

    evaluate(run, "--split", "dev")
    assert json.loads((run / "eval" / "f30k-dev.json").read_text())["split"] == "dev"

    other = shutil.copytree(toy, tmp_path / "other")
    lines = (other / "test_caps.txt").read_text().splitlines()
    lines[0] = "a different caption"
    (other / "test_caps.txt").write_text("\n".join(lines) + "\n")
    result = evaluate(run, "--split", "test", "--data-root", str(other))["f30k"]
    assert result["data_root"] == str(other.resolve()) and result["data_fingerprint"] != saved["data_fingerprint"]
    assert Path(result["path"]).name == f"f30k-test-{result['data_fingerprint'][:12]}.json"
    assert test_file.read_bytes() == before  # neither the dev eval nor the other data replaced it


def test_changed_data_under_the_runs_own_root_moves_the_old_result_aside(toy: Path, tmp_path: Path) -> None:
    data = shutil.copytree(toy, tmp_path / "toy")
    result = runner.invoke(app, ["-q", "train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={data}",
                                 "--set", "train.epochs=1", *FAST])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip())
    first = evaluate(run)["f30k"]
    (data / "test_caps.txt").write_text((data / "test_caps.txt").read_text().replace("a ", "one ", 1))
    second = evaluate(run)["f30k"]
    assert first["data_fingerprint"] != second["data_fingerprint"]
    assert json.loads((run / "eval" / "f30k-test.json").read_text())["data_fingerprint"] == second["data_fingerprint"]
    kept = run / "eval" / f"f30k-test-{first['data_fingerprint'][:12]}.json"
    assert json.loads(kept.read_text())["metrics"] == first["metrics"]


def test_fingerprint_follows_the_data_not_the_folder(toy: Path, tmp_path: Path) -> None:
    from vsectl.data.sources import load_split, split_fingerprint

    copy = shutil.copytree(toy, tmp_path / "copy")
    assert split_fingerprint(load_split(copy, "test")) == split_fingerprint(load_split(toy, "test"))
    ims = np.load(copy / "test_ims.npy", mmap_mode="r+")
    ims[-1, -1, -1] += 1.0  # one value at the end of the feature file
    ims.flush()
    del ims
    assert split_fingerprint(load_split(copy, "test")) != split_fingerprint(load_split(toy, "test"))


def test_gridsearch_reads_only_the_result_of_its_cells_split_and_data(tmp_path: Path) -> None:
    from vsectl.science import gridsearch as gs

    run = tmp_path / "cell"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "f30k-test.json").write_text(json.dumps({"split": "test", "data_root": str(tmp_path / "a")}))
    assert not gs.is_finished(run, "f30k", "test", tmp_path / "a")  # no rule recorded: the old optimistic default
    (run / "eval" / "f30k-test.json").write_text(json.dumps({"split": "test", "data_root": str(tmp_path / "a"),
                                                             "tie_rule": "expected"}))
    assert gs.is_finished(run, "f30k", "test", tmp_path / "a")
    assert not gs.is_finished(run, "f30k", "test", tmp_path / "b")  # made on other data: not this cell's result
    assert not gs.is_finished(run, "f30k", "dev", tmp_path / "a")


def test_verify_names_a_captionless_split_a_search_collection(tmp_path: Path) -> None:
    from vsectl.data.store import StoreWriter
    from vsectl.data.verify import verify_path

    with StoreWriter(tmp_path / "test.h5", feat_dim=8) as writer:
        for k in range(3):
            writer.add_image(f"im{k}", np.ones((2, 8), dtype=np.float32))
    report = verify_path(tmp_path)
    assert report["ok"] and any("search collection" in w for w in report["warnings"])


# ----------------------------------------------------------------------------------------------------------------------
# 5. one name, dev, in every command; val accepted everywhere


def test_val_is_dev_for_eval(done: Path, tmp_path: Path) -> None:
    run = copy_run(done, tmp_path / "run")
    result = evaluate(run, "--split", "val")["f30k"]
    assert result["split"] == "dev" and Path(result["path"]).name == "f30k-dev.json"


def test_val_is_dev_for_extract_and_import(toy: Path, tmp_path: Path) -> None:
    from vsectl.data.prepare import import_precomp

    result = runner.invoke(app, ["extract", "--backbone", "efficientnet-lite0", "--data", str(tmp_path / "raw"),
                                 "--out", str(tmp_path / "f"), "--split", "val"])
    assert result.exit_code == 2 and "raw dataset folder" in result.stderr  # the split was accepted
    written = import_precomp(toy, tmp_path / "store", splits=["val"])
    assert [p.name for p in written] == ["dev.h5"]


# ----------------------------------------------------------------------------------------------------------------------
# 7. global flags before or after the subcommand; plain metavars


def test_global_flags_work_after_the_subcommand(tmp_path: Path) -> None:
    from vsectl.errors import CheckpointError

    result = runner.invoke(app, ["eval", str(tmp_path / "runs" / "dmeo"), "--debug"])
    assert isinstance(result.exception, CheckpointError)  # --debug: the error is raised, not a one-liner
    result = runner.invoke(app, ["eval", str(tmp_path / "dmeo"), "-q"])
    assert result.exit_code == 2 and "no such run" in result.stderr


def test_help_shows_plain_metavars() -> None:
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["data", "verify", "--help"]):
        text = runner.invoke(app, argv).output
        assert not re.search(r"<(bool|str|path|list\[\w+\]|int)>|\{\w+\}", text), (argv, text)
    assert "KEY=VALUE" in runner.invoke(app, ["train", "--help"]).output
    assert "Usage: root train [OPTIONS] RECIPE" in runner.invoke(app, ["train", "--help"]).output


# ----------------------------------------------------------------------------------------------------------------------
# 8. hub ids are looked up in the local cache only, unless downloads are allowed


def fake_hub_cache(cache: Path, repo: str, source: Path) -> None:
    """The Hugging Face cache layout for `repo`: refs/main naming a snapshot that holds `source`'s files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    shutil.copytree(source, folder / "snapshots" / "0123abcd")


def test_a_hub_id_loads_from_the_local_cache_without_network(tiny_bert_dir: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    from vsectl.errors import ConfigError
    from vsectl.models.text_encoders import load_pretrained_text

    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-bert", tiny_bert_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("VSECTL_ALLOW_DOWNLOADS", raising=False)

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    body, tokenizer = load_pretrained_text("tiny-org/tiny-bert")
    assert body.config.hidden_size == 16 and tokenizer("a dog")["input_ids"][0] == tokenizer.cls_token_id
    with pytest.raises(ConfigError) as err:
        load_pretrained_text("tiny-org/not-cached")
    assert str(tmp_path / "hub") in str(err.value) and "VSECTL_ALLOW_DOWNLOADS=1" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# 9. Ctrl-C says what was kept and how to resume; resuming a finished run says it is complete


def test_ctrl_c_in_train_says_what_was_kept_and_how_to_resume(toy: Path, tmp_path: Path, monkeypatch) -> None:
    import vsectl.training as training

    real = training.train_one_epoch

    def interrupted_in_epoch_1(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if args[5] == 1:  # the epoch argument
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", interrupted_in_epoch_1)
    argv = ["train", str(TINY), "--out", str(tmp_path), "--set", f"data.root={toy}", "--set", "train.epochs=2", *FAST]
    result = runner.invoke(app, argv)
    assert result.exit_code == 130, result.output
    line = " ".join(result.stderr.split())
    assert "interrupted:" in line and "checkpoint after epoch 1" in line and "--resume" in line
    resume = line[line.index("resume with: ") + len("resume with: "):].split()
    monkeypatch.setattr(training, "train_one_epoch", real)
    again = runner.invoke(app, ["-q", *resume[1:]])  # the command it printed, without the program name
    assert again.exit_code == 0, again.output


def test_ctrl_c_in_extract_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    import vsectl.extract

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        (tmp_path / "f" / "train.shards").mkdir(parents=True)
        (tmp_path / "f" / "train.shards" / "shard-00000.h5").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(vsectl.extract, "extract", interrupted)
    result = runner.invoke(app, ["extract", "--backbone", "efficientnet-lite0", "--data", str(tmp_path / "raw"),
                                 "--out", str(tmp_path / "f")])
    assert result.exit_code == 130
    line = " ".join(result.stderr.split())
    assert "1 finished shard(s)" in line and "run the same command again to resume" in line


def test_resume_of_a_finished_run_says_it_is_complete(done: Path, toy: Path, tmp_path: Path) -> None:
    copy_run(done, tmp_path / "done")
    result = runner.invoke(app, ["train", str(TINY), "--out", str(tmp_path), "--set", "name=done", "--set",
                                 f"data.root={toy}", "--set", "train.epochs=2", "--resume", *FAST])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stderr.split())
    assert "is already complete: 2 of 2 epochs" in text and "resumed at" not in text


# ----------------------------------------------------------------------------------------------------------------------
# 12. log lines go through the console that draws the bars; workers follow the CPUs this process may use


def test_log_lines_go_through_the_progress_console() -> None:
    from vsectl.cli.common import RichProgress, err

    runner.invoke(app, ["env", "--json"])
    handler = logging.getLogger("vsectl").handlers[0]
    assert handler.console is err and RichProgress().bar.console is err


def test_loader_workers_follow_the_cpu_affinity(toy: Path, monkeypatch) -> None:
    import os

    from vsectl.builders import prepare_text
    from vsectl.config import load_recipe
    from vsectl.data.sources import load_split
    from vsectl.runtime import loader_workers
    from vsectl.training import make_loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert loader_workers(8) == 3 and loader_workers(2) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    cfg = load_recipe(TINY, [f"data.root={toy}", "data.num_workers=2"])
    split = load_split(toy, "train")
    text = prepare_text(cfg, Path("."), split.captions, write=False)
    loader = make_loader(cfg, split, text, epoch=0, start_batch=0)
    assert loader.num_workers == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "suggested max number of worker" is a UserWarning
        next(iter(loader))


# ----------------------------------------------------------------------------------------------------------------------
# 13. data verify fits 80 columns


def test_verify_table_has_whole_labels_at_80_columns(toy: Path) -> None:
    from rich.console import Console

    from vsectl.cli.data import verify_table
    from vsectl.data.verify import verify_path

    console = Console(width=80, record=True, file=open(__import__("os").devnull, "w"))  # noqa: SIM115
    console.print(verify_table(verify_path(toy)))
    text = console.export_text()
    assert "…" not in text
    for word in ("train", "dev", "test", "images", "captions", "feature dim", "NaN/inf values", "unreadable images"):
        assert word in text, text


# ----------------------------------------------------------------------------------------------------------------------
# 14. user-facing text stands on its own


CODE = re.compile(r"\b(DATA|IMG|EVAL|GPO|TXT|LOSS|OPT)-\d+\b|§|\bspec\b|\.\./shared|issue #\d")


def user_strings(path: Path) -> list[tuple[int, str]]:
    """String literals of a module (messages, log lines, help), without docstrings except a CLI command's (help)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                is_command = isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list)
                if not is_command:
                    docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_messages_and_help_cite_no_internal_codes() -> None:
    found = [f"{p.relative_to(REPO)}:{line}: {text[:80]!r}" for p in sorted((REPO / "vsectl").rglob("*.py"))
             for line, text in user_strings(p) if CODE.search(text)]
    assert not found, "\n".join(found)


def test_readme_docs_and_benchmarks_stand_on_their_own() -> None:
    for path in [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]:
        hits = [line for line in path.read_text().splitlines() if CODE.search(line)]
        assert not hits, (path.name, hits[:3])
    assert (REPO / "docs" / "method.md").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# tie rules (exact ties with the ground truth: optimistic, pessimistic, expected)


def loop_reference(sims: np.ndarray, cap2img: np.ndarray) -> dict[str, list[tuple[int, int, int]]]:
    """Per query (greater, tied competitors, tied own items), by loops over every candidate."""
    n, c = sims.shape
    i2t, t2i = [], []
    for i in range(n):
        own = [j for j in range(c) if cap2img[j] == i]
        best = max(sims[i, j] for j in own)
        i2t.append((sum(sims[i, j] > best for j in range(c)), sum(sims[i, j] == best for j in range(c) if j not in own),
                    sum(sims[i, j] == best for j in own)))
    for j in range(c):
        gt = sims[cap2img[j], j]
        others = [k for k in range(n) if k != cap2img[j]]
        t2i.append((sum(sims[k, j] > gt for k in others), sum(sims[k, j] == gt for k in others), 1))
    return {"i2t": i2t, "t2i": t2i}


def orderings_reference(rows: list[tuple[int, int, int]], rule: str) -> dict[str, float]:
    """R@K, medr, meanr by enumerating every placement of each query's tied items (the first own item ranks)."""
    from itertools import combinations

    ranks_per_query = []
    for g, t, m in rows:  # every placement of the m own items among the t + m tied slots is equally likely
        ranks = [g + min(slots) for slots in combinations(range(t + m), m)]  # competitors before the first own
        ranks_per_query.append({"optimistic": [g], "pessimistic": [g + t], "expected": ranks}[rule])
    out = {f"r{k}": 100.0 * np.mean([np.mean([r < k for r in rs]) for rs in ranks_per_query]) for k in (1, 5, 10)}
    expected_rank = [np.mean(rs) for rs in ranks_per_query]
    out.update(medr=float(np.floor(np.median(expected_rank)) + 1), meanr=float(np.mean(expected_rank) + 1))
    return out


@pytest.mark.parametrize("chunk_size", [3, 64])  # banded counting across chunks, and one chunk
def test_tie_counts_and_rules_match_loop_and_ordering_references(chunk_size: int) -> None:
    import torch

    from vsectl.scoring.metrics import rank_counts, tie_counts, tie_ranked_metrics

    g = torch.Generator().manual_seed(0)
    img = torch.randint(-1, 2, (7, 3), generator=g).float()  # tiny integer vectors: exact scores, many exact ties
    cap2img = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 6])
    cap = torch.randint(-1, 2, (14, 3), generator=g).float()
    cap[1] = cap[0]  # two identical captions of one image
    img[4] = img[3]  # a duplicate image
    counts = rank_counts([(img, cap)], cap2img, chunk_size=chunk_size)
    ref = loop_reference((img @ cap.T).double().numpy(), cap2img.numpy())
    got_i2t = list(zip(counts.i2t.tolist(), counts.i2t_ties.tolist(), counts.i2t_own_ties.tolist(), strict=True))
    got_t2i = list(zip(counts.t2i.tolist(), counts.t2i_ties.tolist(), [1] * 14, strict=True))
    assert got_i2t == [tuple(map(int, r)) for r in ref["i2t"]] and got_t2i == [tuple(map(int, r)) for r in ref["t2i"]]
    assert sum(t > 0 for _, t, _ in ref["t2i"]) > 0 and sum(t > 0 for _, t, _ in ref["i2t"]) > 0  # ties do occur
    assert tie_counts(counts) == {"i2t_queries_with_ties": sum(t > 0 for _, t, _ in ref["i2t"]),
                                  "t2i_queries_with_ties": sum(t > 0 for _, t, _ in ref["t2i"])}
    for rule in ("optimistic", "pessimistic", "expected"):
        metrics = tie_ranked_metrics(counts, rule)
        for d in ("i2t", "t2i"):
            want = orderings_reference(ref[d], rule)
            for key, value in want.items():
                assert metrics[f"{d}_{key}"] == pytest.approx(value, abs=1e-9), (rule, d, key)


def test_eval_records_the_tie_rule_and_tie_counts(done: Path, tmp_path: Path) -> None:
    run = copy_run(done, tmp_path / "run")
    default = evaluate(run)["f30k"]
    assert default["tie_rule"] == "expected" and set(default["ties"]) == {"i2t_queries_with_ties",
                                                                           "t2i_queries_with_ties"}
    optimistic = evaluate(run, "--ties", "optimistic")["f30k"]
    assert optimistic["tie_rule"] == "optimistic" and Path(optimistic["path"]).name == "f30k-test-optimistic.json"
    assert (run / "eval" / "f30k-test.json").is_file()  # the default rule's result is kept beside it
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--ties", "random"])
    assert result.exit_code == 2 and "unknown tie rule 'random'" in result.stderr


def test_a_bad_recipe_fails_in_one_line_before_torch_is_imported(tmp_path: Path) -> None:
    """The CLI and the recipe check import no torch, so a typo in a recipe path or key fails in under a second."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {epochz: 2}\n")
    probe = ("import sys\nfrom vsectl.cli import app\n"
             "for argv in (['train', 'missing.yaml'], ['train', sys.argv[1]]):\n"
             "    try:\n        app(argv)\n    except SystemExit as e:\n        assert e.code == 2, e.code\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and "missing.yaml" in lines[0] and "epochz" in lines[1], lines
