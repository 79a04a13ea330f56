"""Nothing run that should not be: a library planted in a kernel cache is never loaded, and a hung compiler is
stopped with every process it started. Other users are simulated (we may run as root): a folder handed to another
uid with chown, or opened to everyone with chmod 0777."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vsectl import native
from vsectl.cli import app

REPO = Path(__file__).resolve().parent.parent
OTHER_UID = 54321  # a user that is not us
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


def compiler() -> list[str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this machine (make compiler installs one)")
    return [cc]


def plant(folder: Path, tmp_path: Path) -> Path:
    """A library whose constructor writes a marker, under every name vsectl might load from `folder`."""
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    cc = compiler()
    lib = tmp_path / "planted.so"
    subprocess.run([*cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    source = (REPO / "vsectl" / "native" / "sortsets.c").read_bytes()
    key = hashlib.sha256(source + b"\0" + native._compiler_version(cc).encode() + b"\0" +
                         native._cpu_key().encode()).hexdigest()
    stem = f"sortsets-{key[:20]}"
    data = lib.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.so").write_bytes(data)  # the name a library built from this source gets
    (folder / f"{stem}.{digest[:16]}.so").write_bytes(data)  # and one with a record that matches it
    (folder / f"{stem}.json").write_text(json.dumps({"file": f"{stem}.{digest[:16]}.so", "sha256": digest}))
    for p in folder.iterdir():
        os.chmod(p, 0o755)
    return folder


def run_env(tmp_path: Path, cache: Path) -> tuple[subprocess.CompletedProcess, Path]:
    marker = tmp_path / "PLANTED-RAN"
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "vsectl", "env", "--json"], capture_output=True, text=True,
                          env={**os.environ, "VSECTL_CACHE": str(cache), "PLANTED_MARKER": str(marker),
                               "TMPDIR": str(temp), "PYTHONPATH": str(REPO)}, timeout=300)
    return done, marker


@pytest.mark.parametrize("how", ["world-writable", "another user's"])
def test_a_library_planted_in_a_shared_cache_is_never_loaded(tmp_path: Path, how: str) -> None:
    shared = tmp_path / "shared"
    folder = plant(shared / "native", tmp_path)
    if how == "world-writable":
        os.chmod(folder, 0o777)
    else:
        for p in [folder, *folder.iterdir()]:
            os.chown(p, OTHER_UID, OTHER_UID)
    done, marker = run_env(tmp_path, shared)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not marker.exists(), "the planted library's code ran"
    assert json.loads(done.stdout)["native_kernels"]["sortsets"] == "native"  # built where it is safe instead
    reason = "can be written by other users" if how == "world-writable" else "belongs to another user"
    assert f"not loading native kernels from {folder}: it {reason}" in done.stderr


def test_a_library_under_the_predictable_name_in_ones_own_cache_is_not_loaded(tmp_path: Path) -> None:
    """Only what this user built, as recorded with its sha256, is loaded: a file dropped under the name a build would
    get (by an earlier vsectl, a copy, another tool) is not."""
    folder = plant(tmp_path / "mine" / "native", tmp_path)
    (folder / next(p.name for p in folder.glob("*.json"))).unlink()  # no record of ours
    done, marker = run_env(tmp_path, tmp_path / "mine")
    assert done.returncode == 0 and not marker.exists()


def test_a_library_that_changed_since_it_was_built_or_is_not_ours_is_built_again(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path))
    native.reset()
    assert native.load("sortsets") is not None
    record = next((tmp_path / "native").glob("*.json"))
    lib = tmp_path / "native" / json.loads(record.read_text())["file"]
    changed = lib.with_suffix(".new")
    changed.write_bytes(lib.read_bytes() + b"\0")
    os.replace(changed, lib)  # changed after the build: its sha256 no longer matches
    native.reset()
    assert native.load("sortsets") is not None
    assert json.loads(record.read_text())["sha256"] == hashlib.sha256(
        (tmp_path / "native" / json.loads(record.read_text())["file"]).read_bytes()).hexdigest()
    lib = tmp_path / "native" / json.loads(record.read_text())["file"]
    os.chown(lib, OTHER_UID, OTHER_UID)
    native.reset()
    assert native.load("sortsets") is not None  # not loaded from the foreign file: rebuilt
    assert os.stat(tmp_path / "native" / json.loads(record.read_text())["file"]).st_uid == os.getuid()
    native.reset()


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie has ended; only its exit status waits to be read


def test_a_hung_compiler_is_stopped_in_time_with_every_process_it_started(tmp_path, monkeypatch) -> None:
    children = tmp_path / "children"
    slowcc = tmp_path / "slowcc"
    slowcc.write_text(f"#!/bin/sh\nsleep 20 &\necho $! >> {children}\nwait\n")
    slowcc.chmod(0o755)
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(slowcc))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 2)
    native.reset()
    start = time.monotonic()
    assert native.load("sortsets") is None
    took = time.monotonic() - start
    status = native.status()["sortsets"]
    native.reset()
    assert took < 10, f"the build took {took:.0f} s"
    assert "slowcc --version ran longer than 2 s and was stopped" in status
    pids = [int(p) for p in children.read_text().split()]
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pids and all(_gone(p) for p in pids), "the compiler's children were left running"
    native.reset()


def test_a_cc_with_an_unbalanced_quote_is_one_status_line_not_a_traceback(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", 'gcc "-O2')
    native.reset()
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)["native_kernels"]["sortsets"]
    assert status == "no C compiler: CC='gcc \"-O2' is not a command line (No closing quotation)"
    native.reset()
