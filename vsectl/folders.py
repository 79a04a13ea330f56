"""Publishing a finished output folder without ever deleting what vsectl did not write.

`staged_folder(out)` yields a fresh temporary sibling `.NAME.vsectl-tmp-PID-RAND/`; the caller writes the whole result
into it, and on success it takes `out`'s place by rename:

- `out` missing or empty: one rename.
- `out` holds only files vsectl wrote there (listed in its `.vsectl-owned.json`, or recognised by the caller as an
  earlier output of the same kind): `out` is set aside, the new folder renamed in, and the listed files of the old
  one removed. A kill between the two renames leaves the old folder aside; the next writer puts it back first.
- `out` holds anything else: refused, unless `force`, which moves in only the new files (replacing vsectl's own, and
  files of the same names) and keeps every other file.

Run it under the folder's lock (`vsectl.locks.folder_lock`): it then knows that every temporary sibling of `out` it
finds was left by a writer that was killed (every writer of `out` holds that lock while its folders exist, so the pid in
a folder's name is not asked: it may have been reused by an unrelated process), and removes those. Only folders named
exactly as vsectl names them for `out` are touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from vsectl.errors import ConfigError
from vsectl.locks import holds_lock

log = logging.getLogger(__name__)

OWNED_FILE = ".vsectl-owned.json"  # in a published folder: the entries vsectl wrote there
TMP_TAG = "vsectl-tmp"
OLD_TAG = "vsectl-old"

Legacy = Callable[[Path], set[str]]  # an output folder → the entries an earlier vsectl wrote there (none if foreign)


def _alive(pid: int, locked: bool) -> bool:
    """Whether the writer that named a folder with `pid` may still be writing it. Under the target's lock (`locked`)
    none is; else this process's own folders are left-overs of a write that failed, and other pids are asked."""
    if locked or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, pattern: str) -> list[tuple[Path, int]]:
    """The folders beside `out` whose whole name matches `pattern` (its group: the writer's pid), with that pid."""
    name = re.compile(pattern)
    try:
        found = [(p, name.fullmatch(p.name)) for p in out.parent.iterdir()]
    except FileNotFoundError:
        return []
    return sorted((p, int(m.group(1))) for p, m in found if m and p.is_dir() and not p.is_symlink())


def _named(out: Path, tag: str) -> str:
    """The pattern of the folders `new_stage` and `_swap` name for `out`: .NAME.TAG-PID-8 hex digits."""
    return rf"\.{re.escape(out.name)}\.{tag}-(\d+)-[0-9a-f]{{8}}"


def _remove_entries(folder: Path, names: set[str] | list[str]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def owned_entries(out: Path, legacy: Legacy | None = None) -> set[str]:
    """The entries of `out` that vsectl wrote: those its `.vsectl-owned.json` lists, or an earlier output's."""
    owned: set[str] = set()
    try:
        listed = json.loads((out / OWNED_FILE).read_text(encoding="utf-8"))
        if isinstance(listed, dict) and isinstance(listed.get("entries"), list):
            owned = {str(e) for e in listed["entries"] if "/" not in str(e) and str(e) not in ("", ".", "..")}
            owned.add(OWNED_FILE)
    except (OSError, ValueError):
        pass
    if legacy is not None:
        owned |= legacy(out)
    return owned


def recover(out: Path, legacy: Legacy | None = None) -> None:
    """Undo what killed writers left (call it holding `out`'s lock): an old folder set aside by a swap that did not
    finish is put back if `out` is missing; temporary folders of writers that are gone are removed."""
    locked = holds_lock(out)
    for old, pid in _siblings(out, _named(out, OLD_TAG)):
        if _alive(pid, locked):
            continue
        if not out.exists():
            log.warning("restoring %s, set aside by a write that was interrupted", out)
            os.rename(old, out)
            continue
        _remove_entries(old, owned_entries(old, legacy))
        with contextlib.suppress(OSError):
            old.rmdir()
    ours = [(tmp, pid, locked) for tmp, pid in _siblings(out, _named(out, TMP_TAG))]
    older = [(tmp, pid, False) for tmp, pid in _siblings(out, rf"\.{re.escape(out.name)}\.(\d+)\.tmp")]  # vsectl
    for tmp, pid, lock_tells in ours + older:  # 0.1 named them so; its writers took no lock, so their pid is asked
        if not _alive(pid, lock_tells):
            log.info("removing %s, left by an interrupted write", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def foreign_entries(out: Path, legacy: Legacy | None = None) -> list[str]:
    """The entries of an existing folder `out` that vsectl did not write (empty when it is new, empty or ours)."""
    if not out.exists() and not out.is_symlink():
        return []
    if out.is_symlink() or not out.is_dir():
        return [out.name]
    owned = owned_entries(out, legacy)
    return sorted(p.name for p in out.iterdir() if p.name not in owned)


def check_target(out: Path, hint: str, legacy: Legacy | None = None, force: bool = False) -> None:
    """Refuse, before any work, an output that is a file or a folder holding files vsectl did not write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"{out} exists and is not a folder; {hint}")
    foreign = foreign_entries(out, legacy)
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{out} holds files vsectl did not write ({shown}); {hint}")


def new_stage(out: Path) -> Path:
    """A fresh, empty temporary sibling of `out` (mode from the umask, like any folder the user makes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out.parent / f".{out.name}.{TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue


def _write_owned(folder: Path, entries: set[str]) -> None:
    (folder / OWNED_FILE).write_text(json.dumps({"written_by": "vsectl", "entries": sorted(entries)}) + "\n",
                                     encoding="utf-8")


def _swap(tmp: Path, out: Path, legacy: Legacy | None) -> None:
    old = out.parent / f".{out.name}.{OLD_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    os.rename(tmp, out)
    _remove_entries(old, owned_entries(old, legacy))
    try:
        old.rmdir()
    except OSError:  # a file appeared in it since the check: never removed, only reported
        log.warning("%s holds files vsectl did not write; they were kept there", old)


def _merge(tmp: Path, out: Path, legacy: Legacy | None) -> None:
    """`--force` into a folder with other files: the new entries replace those of the same names, the rest stays."""
    kept = owned_entries(out, legacy) & {p.name for p in out.iterdir()}
    trash = new_stage(out)
    new = {p.name for p in tmp.iterdir()} - {OWNED_FILE}
    for name in sorted(new):
        if (out / name).exists() or (out / name).is_symlink():
            os.rename(out / name, trash / name)
        os.rename(tmp / name, out / name)
    _write_owned(out, (kept | new) - {OWNED_FILE})
    shutil.rmtree(trash)
    shutil.rmtree(tmp)


def publish(tmp: Path, out: Path, legacy: Legacy | None = None, force: bool = False) -> None:
    """Put the finished folder `tmp` in `out`'s place (see the module docstring for the cases)."""
    entries = {p.name for p in tmp.iterdir()} - {OWNED_FILE}
    foreign = foreign_entries(out, legacy)
    if foreign and not force:
        raise ConfigError(f"{out} now holds files vsectl did not write ({', '.join(foreign[:5])}); nothing was "
                          "replaced")
    if foreign:
        _merge(tmp, out, legacy)
        return
    _write_owned(tmp, entries)
    if out.exists() and any(out.iterdir()):
        _swap(tmp, out, legacy)
    else:
        os.rename(tmp, out)  # onto a missing or empty folder


@contextlib.contextmanager
def staged_folder(out: str | Path, hint: str, legacy: Legacy | None = None, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; on success it becomes `out`, on failure it is removed.

    Args:
        out: the output folder.
        hint: what the user can do when `out` holds other files (e.g. "choose a new or empty --out folder").
        legacy: recognises the entries of an earlier output written before `.vsectl-owned.json` existed.
        force: keep other files and replace only what this write produces.
    """
    out = Path(out)
    recover(out, legacy)
    check_target(out, hint, legacy, force)
    tmp = new_stage(out)
    try:
        yield tmp
        publish(tmp, out, legacy, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
