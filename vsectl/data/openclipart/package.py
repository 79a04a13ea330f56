"""The source SVGs: Debian's `openclipart-svg` package (fetched with apt-get, unpacked once) or a given folder."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

from vsectl.errors import DataError
from vsectl.io import sha256_file

log = logging.getLogger(__name__)


PACKAGE = "openclipart-svg"
SVG_SUBDIR = "usr/share/openclipart/svg"


def default_cache() -> Path:
    """`$VSECTL_CACHE/openclipart`, else `~/.cache/vsectl/openclipart`."""
    root = os.environ.get("VSECTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsectl") / "openclipart"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise DataError(f"`{cmd[0]}` is not installed; pass --from-deb FILE or --from-dir DIR instead") from e
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {tail[0]}")
    return done.stdout


def fetch_deb(cache: Path) -> Path:
    """The `openclipart-svg` .deb in `cache`, downloaded with `apt-get download` when none is there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if not found:
        log.info("downloading %s with apt-get into %s", PACKAGE, cache)
        try:
            _run(["apt-get", "download", PACKAGE], cwd=cache)
        except DataError as e:
            raise DataError(f"{e}; run `apt-get update` first, or pass --from-deb FILE / --from-dir DIR") from e
        found = sorted(cache.glob(f"{PACKAGE}_*.deb"))
        if not found:
            raise DataError(f"apt-get download finished but no {PACKAGE}_*.deb appeared in {cache}")
    return found[-1]


def deb_info(deb: Path) -> dict[str, str]:
    """Package name and version of a .deb (from `dpkg-deb -f`, else from the file name)."""
    try:
        fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"])
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines() if ": " in line)
        return {"package": info.get("Package", PACKAGE), "version": info.get("Version", "")}
    except DataError:
        parts = urllib.parse.unquote(deb.name).split("_")
        return {"package": parts[0], "version": parts[1] if len(parts) > 2 else ""}


def unpack_deb(deb: Path, dest: Path) -> Path:
    """`dpkg -x deb dest` once (a `.complete` marker makes reruns free); returns `dest`."""
    if (dest / ".complete").is_file():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    partial.mkdir(parents=True)
    log.info("unpacking %s", deb)
    _run(["dpkg", "-x", str(deb), str(partial)])
    os.replace(partial, dest)
    (dest / ".complete").touch()
    return dest


def _dir_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.svg")):
        if p.is_file():
            h.update(f"{p.relative_to(folder).as_posix()}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


def resolve_source(
    cache: Path | None, from_deb: Path | None, from_dir: Path | None, unpack: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Find (and fetch/unpack if needed) the SVG folder.

    Args:
        cache: download/unpack folder (None: `default_cache()`).
        from_deb: a given .deb instead of `apt-get download`.
        from_dir: a folder of SVGs instead of a package.
        unpack: unpack the .deb now (False only identifies it, for the already-finished check).

    Returns:
        (folder whose relative paths become each image's "source", provenance dict for the manifest).
    """
    if from_deb is not None and from_dir is not None:
        raise DataError("pass either --from-deb or --from-dir, not both")
    if from_dir is not None:
        if not Path(from_dir).is_dir():
            raise DataError(f"--from-dir {from_dir} is not a folder")
        folder = Path(from_dir).resolve()
        return folder, {"dir": str(folder), "dir_fingerprint": _dir_fingerprint(folder)}
    cache = Path(cache) if cache is not None else default_cache()
    if from_deb is not None and not Path(from_deb).is_file():
        raise DataError(f"--from-deb {from_deb} does not exist")
    deb = Path(from_deb) if from_deb is not None else fetch_deb(cache)
    digest = sha256_file(deb)
    root = cache / f"unpacked-{digest[:12]}"
    if unpack:
        unpack_deb(deb, root)
    if unpack and not (root / SVG_SUBDIR).is_dir():
        raise DataError(f"{deb} holds no {SVG_SUBDIR}; is it the {PACKAGE} package?")
    return root, {**deb_info(deb), "deb": deb.name, "deb_sha256": digest, "svg_root": SVG_SUBDIR}
