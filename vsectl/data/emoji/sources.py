"""The three Debian packages behind the emoji set, fetched with apt-get and unpacked once, and the files read from them.

`fonts-noto-color-emoji` draws the pictures, `unicode-data` lists the emoji (`emoji-test.txt`: status, group and
subgroup of every sequence) and `unicode-cldr-core` names them (`annotations/en.xml`, `annotationsDerived/en.xml`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vsectl.data.openclipart.package import _run, deb_info, unpack_deb
from vsectl.errors import DataError
from vsectl.io import sha256_file

log = logging.getLogger(__name__)

FONT_PACKAGE = "fonts-noto-color-emoji"
LIST_PACKAGE = "unicode-data"
NAMES_PACKAGE = "unicode-cldr-core"
PACKAGES = (FONT_PACKAGE, LIST_PACKAGE, NAMES_PACKAGE)
FONT_FILE = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
ANNOTATIONS = "usr/share/unicode/cldr/common/annotations/en.xml"
DERIVED = "usr/share/unicode/cldr/common/annotationsDerived/en.xml"
FILES = {FONT_PACKAGE: (FONT_FILE,), LIST_PACKAGE: (EMOJI_TEST,), NAMES_PACKAGE: (ANNOTATIONS, DERIVED)}


def default_cache() -> Path:
    """`$VSECTL_CACHE/emoji`, else `~/.cache/vsectl/emoji`."""
    import os

    root = os.environ.get("VSECTL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vsectl") / "emoji"


def find_deb(folder: Path, package: str) -> Path | None:
    """The newest-named `<package>_*.deb` in `folder`, or None."""
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_deb(cache: Path, package: str) -> Path:
    """The `package` .deb in `cache`, downloaded with `apt-get download` when none is there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    deb = find_deb(cache, package)
    if deb is None:
        log.info("downloading %s with apt-get into %s", package, cache)
        try:
            _run(["apt-get", "download", package], cwd=cache)
        except DataError as e:
            raise DataError(f"cannot download {package}: {str(e).split(';')[0]}; run `apt-get update` first, or "
                            f"put the .deb files of {', '.join(PACKAGES)} in a folder and pass --from-debs DIR") from e
        deb = find_deb(cache, package)
        if deb is None:
            raise DataError(f"apt-get download finished but no {package}_*.deb appeared in {cache}")
    return deb


def resolve_sources(cache: Path | None, from_debs: Path | None, unpack: bool = True) -> tuple[dict[str, Path], dict]:
    """Find (fetch, unpack) the three packages and return the paths of the files read from them.

    Args:
        cache: download/unpack folder (None: `default_cache()`).
        from_debs: a folder holding the three .deb files, instead of `apt-get download`.
        unpack: unpack the .debs now (False only identifies them, for the already-finished check).

    Returns:
        ({"font", "emoji_test", "annotations", "derived"}: paths (meaningful only when unpacked), provenance for the
        manifest: per package its version, .deb name and sha256, and the sha256 of each file read from it).
    """
    cache = Path(cache) if cache is not None else default_cache()
    if from_debs is not None and not Path(from_debs).is_dir():
        raise DataError(f"--from-debs {from_debs} is not a folder")
    paths: dict[str, Path] = {}
    source: dict[str, Any] = {}
    for package in PACKAGES:
        if from_debs is not None:
            deb = find_deb(Path(from_debs), package)
            if deb is None:
                raise DataError(f"no {package}_*.deb in {from_debs}; get it with `apt-get download {package}`")
        else:
            deb = fetch_deb(cache, package)
        digest = sha256_file(deb)
        root = cache / f"unpacked-{package}-{digest[:12]}"
        facts: dict[str, Any] = {**deb_info(deb), "deb": deb.name, "deb_sha256": digest}
        if unpack:
            unpack_deb(deb, root)
            files = {}
            for rel in FILES[package]:
                if not (root / rel).is_file():
                    raise DataError(f"{deb} holds no {rel}; is it the {package} package?")
                files[rel] = sha256_file(root / rel)
            facts["files"] = files
        source[package] = facts
        for key, rel in zip(_KEYS[package], FILES[package], strict=True):
            paths[key] = root / rel
    return paths, source


_KEYS = {FONT_PACKAGE: ("font",), LIST_PACKAGE: ("emoji_test",), NAMES_PACKAGE: ("annotations", "derived")}
