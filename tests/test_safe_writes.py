"""Nothing lost: one writer per output folder (two real processes), folders published without deleting what vsectl
did not write, unfinished embeds that are not vsectl's left alone, and temporary folders of killed writers removed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"


def vsectl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vsectl", "-q", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    start = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the first writer ended (exit {proc.returncode}) before {what}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the lock itself


HOLD = """
import sys, time
from vsectl.locks import folder_lock
with folder_lock(sys.argv[1], "holder for the test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_process_is_refused_naming_the_holder_and_a_crashed_holder_is_stale(tmp_path: Path) -> None:
    from vsectl.locks import FolderBusy, folder_lock, lock_path

    folder = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "60"], stdout=subprocess.PIPE, text=True,
                              env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"pid {holder.pid}: holder for the test"):
            with folder_lock(folder):
                pass
        holder.send_signal(signal.SIGKILL)  # a crash: its lock file stays, its flock goes with the process
        holder.wait()
        assert lock_path(folder).exists()
        with folder_lock(folder):  # stale: taken over
            with folder_lock(folder):  # re-entrant within one process
                pass
        assert not lock_path(folder).exists()  # released on exit
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_a_lock_file_of_a_dead_process_is_stale(tmp_path: Path, monkeypatch) -> None:
    import fcntl

    from vsectl.locks import FolderBusy, folder_lock, lock_path

    def no_flock(fd, op):  # noqa: ANN001, ANN202 - a network file system without flock
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(folder).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename,
                                             "command": "vsectl embed"}))
    with folder_lock(folder):  # its process is gone: stale
        assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    assert not lock_path(folder).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_path(folder).write_text(json.dumps({"pid": alive.pid, "host": os.uname().nodename,
                                                 "command": "vsectl train x"}))
        with pytest.raises(FolderBusy, match=f"pid {alive.pid}: vsectl train x"):
            with folder_lock(folder):
                pass
    finally:
        alive.kill()
        alive.wait()


# ------------------------------------------------------------------------------------------------ two real writers


def _freeze_when(proc: subprocess.Popen, condition: Callable[[], bool], what: str) -> None:
    """Stop `proc` (SIGSTOP) once it has started writing, so the second writer surely meets it mid-way."""
    wait_for(condition, proc, what)
    proc.send_signal(signal.SIGSTOP)


def test_two_embeds_into_one_folder_the_second_is_refused_and_the_first_finishes_whole(clipart_run, tmp_path):
    from vsectl.retrieval import open_embeddings

    out = tmp_path / "E"
    args = ("embed", str(clipart_run["run"]), "--features", str(clipart_run["feats"] / "train.h5"), "--out",
            str(out), "--shard-size", "4", "--batch-size", "4", "--device", "cpu")
    first = subprocess.Popen(vsectl_cmd(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _freeze_when(first, lambda: (tmp_path / "E.partial" / "manifest.json").is_file(), "the first embed's shards")
        line = one_line(subprocess.run(vsectl_cmd(*args), env=env(), capture_output=True, text=True, timeout=300))
        assert f"{out} is being written by another process (pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(300) == 0, first.stderr.read()[-2000:]
    open_embeddings(out, verify=True)  # complete and consistent: every hash and row checked


def test_a_second_train_or_a_resume_during_a_train_is_refused(toy_root, tmp_path):
    base = ("train", str(TINY), "--out", str(tmp_path), "--device", "cpu", "--set", f"data.root={toy_root}",
            "--set", "name=busy", "--set", "train.epochs=2")
    run = tmp_path / "busy"
    first = subprocess.Popen(vsectl_cmd(*base), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _freeze_when(first, lambda: (run / "config.yaml").is_file(), "the first train's run folder")
        other_lr = one_line(subprocess.run(vsectl_cmd(*base, "--set", "train.lr=0.01"), env=env(),
                                           capture_output=True, text=True, timeout=300))
        resume = one_line(subprocess.run(vsectl_cmd(*base, "--resume"), env=env(), capture_output=True, text=True,
                                         timeout=300))
        for line in (other_lr, resume):
            assert f"{run} is being written by another process (pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(300) == 0, first.stderr.read()[-2000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["global_step"]) for r in records]
    assert len(keys) == len(set(keys))  # one writer: no record twice
    assert "lr: 0.01" not in (run / "config.yaml").read_text()


# ------------------------------------------------------------------------------------------------ export


def test_export_never_deletes_files_it_did_not_write(clipart_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    folder = tmp_path / "P"
    (folder / "src").mkdir(parents=True)
    (folder / "export.json").write_text("{}")
    (folder / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    runner = CliRunner()
    line = one_error_line(runner.invoke(app, ["-q", "export", str(clipart_run["run"]), "--out", str(folder)]))
    assert "holds files vsectl did not write (export.json, src)" in line and "--force" in line
    assert (folder / "src" / "main.c").is_file() and (folder / "export.json").read_text() == "{}"
    forced = runner.invoke(app, ["-q", "export", str(clipart_run["run"]), "--out", str(folder), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (folder / "src" / "main.c").read_text().startswith("int main")  # kept
    assert json.loads((folder / "export.json").read_text())["format"] == "onnx"  # the export's own file replaced
    again = runner.invoke(app, ["-q", "export", str(clipart_run["run"]), "--out", str(folder), "--force"])
    assert again.exit_code == 0 and (folder / "src" / "main.c").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or lock left


def test_a_killed_export_leaves_nothing_behind_once_the_next_one_ran(clipart_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "onnx"
    args = vsectl_cmd("export", str(clipart_run["run"]), "--out", str(out))
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.is_dir() and p.name.startswith(".onnx.") for p in tmp_path.iterdir()), proc,
             "the export's temporary folder")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_stale_temporaries_are_told_by_the_targets_lock_and_only_vsectls_own_are_removed(tmp_path):
    from vsectl.folders import recover
    from vsectl.locks import folder_lock

    out = tmp_path / "onnx"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a pid reused by a non-writer
    try:
        stale = {"dead": tmp_path / f".onnx.vsectl-tmp-{dead}-0badcafe",
                 "reused": tmp_path / f".onnx.vsectl-tmp-{sleeper.pid}-deadbeef"}
        others = [".onnx.vsectl-tmp-notes", f".onnx.vsectl-tmp-{dead}-backup", f".other.vsectl-tmp-{dead}-0badcafe",
                  ".onnx.mine"]  # a user's look-alikes and another target's temporary
        for folder in [*stale.values(), *(tmp_path / name for name in others)]:
            folder.mkdir()
            (folder / "text.onnx").write_bytes(b"half")
        recover(out)  # without the lock a live pid may be a writer's: only the dead one's folder goes
        assert not stale["dead"].exists() and stale["reused"].is_dir()
        with folder_lock(out):  # every writer of the target holds this lock: the pid's process is not one
            recover(out)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".onnx.lock") == sorted(others)
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------------------------------ eval results


def test_eval_writes_its_result_under_the_eval_folders_lock_waiting_briefly_then_naming_the_holder(
        clipart_run, tmp_path, monkeypatch):
    import shutil

    import vsectl.evaluation

    run = Path(shutil.copytree(clipart_run["run"], tmp_path / "run"))
    argv = ["-q", "eval", str(run), "--device", "cpu", "--json"]
    result = run / "eval" / "f30k-test.json"
    monkeypatch.setattr(vsectl.evaluation, "RESULT_LOCK_WAIT", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / "eval"), "60"], stdout=subprocess.PIPE,
                              text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(CliRunner().invoke(app, argv))
        assert f"pid {holder.pid}: holder for the test" in line and "was not written" in line
        assert not result.exists()
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(vsectl.evaluation, "RESULT_LOCK_WAIT", 60.0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / "eval"), "1.5"], stdout=subprocess.PIPE,
                              text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        done = CliRunner().invoke(app, argv)  # a holder that lets go within the wait: this eval writes after it
        assert done.exit_code == 0, done.output
        assert json.loads(result.read_text())["metrics"] == json.loads(done.stdout)["f30k"]["metrics"]
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------ index


def test_an_index_swap_cut_short_loses_neither_index(clipart_run, tmp_path, monkeypatch):
    from vsectl.retrieval import build_index, embed, open_target

    emb = embed(clipart_run["run"], tmp_path / "E", features=clipart_run["feats"] / "test.h5", device="cpu")
    first = build_index(emb, kind="ivf", nlist=3)

    def cut(real: Callable) -> Callable:
        def call(src, dst, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - a kill as the new one goes in
            if Path(dst) == first and ("tmp" in Path(src).name or Path(src).name.endswith(".partial")):
                raise KeyboardInterrupt
            return real(src, dst, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "rename", cut(os.rename))
    monkeypatch.setattr(os, "replace", cut(os.replace))
    with pytest.raises(KeyboardInterrupt):
        build_index(emb, kind="ivf", nlist=4)
    monkeypatch.undo()
    kept = [json.loads(p.read_text()) for p in tmp_path.rglob("index.json")]
    assert [k["params"]["nlist"] for k in kept] == [3]  # the old index is still on disk
    again = build_index(emb, kind="ivf", nlist=5)
    assert open_target(again).params["nlist"] == 5
    assert sorted(p.name for p in (tmp_path / "E").iterdir() if p.name.startswith(".")) == []


def test_temporary_folders_of_killed_index_builds_are_removed_by_the_next(clipart_run, tmp_path):
    from vsectl.retrieval import build_index, embed

    emb = embed(clipart_run["run"], tmp_path / "E", features=clipart_run["feats"] / "test.h5", device="cpu")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = [emb / f".index-ivf-images.{pid}.tmp", emb / f".index-ivf-images.vsectl-tmp-{pid}-0badcafe"]
    for folder in left:  # what a SIGKILL during `index --kind ivf` leaves (the first name: earlier versions)
        folder.mkdir()
        (folder / "index.faiss").write_bytes(b"half")
    mine = emb / ".index-ivf-images.notes"  # a user's folder of a similar name is not vsectl's
    mine.mkdir()
    build_index(emb, kind="ivf")
    assert sorted(p.name for p in emb.iterdir() if p.name.startswith(".")) == [mine.name]


# ------------------------------------------------------------------------------------------------ embed's .partial


@pytest.mark.parametrize("manifest, what", [
    ('{"files": ["a.txt"]}', "its manifest.json is another program's"),
    ("not json at all", "manifest.json is not readable JSON"),
    (None, "no manifest.json"),
])
def test_an_unfinished_embed_folder_that_is_not_vsectls_is_left_alone(clipart_run, tmp_path, manifest, what):
    partial = tmp_path / "X.partial"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "notes.txt").write_text("mine")
    if manifest is not None:
        (partial / "manifest.json").write_text(manifest)
    before = sorted(str(p.relative_to(partial)) for p in partial.rglob("*"))
    result = CliRunner().invoke(app, ["-q", "embed", str(clipart_run["run"]), "--features",
                                      str(clipart_run["feats"] / "test.h5"), "--out", str(tmp_path / "X"),
                                      "--device", "cpu"])
    line = one_error_line(result)
    assert f"{partial} is not an unfinished embed of vsectl's ({what}" in line
    assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*")) == before
    assert (partial / "sub" / "notes.txt").read_text() == "mine" and not (tmp_path / "X").exists()
