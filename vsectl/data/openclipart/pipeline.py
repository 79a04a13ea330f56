"""The openclipart driver: source → metadata → cleaning → render → splits → a raw dataset folder (resumable)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl import __version__
from vsectl.data.openclipart.cleaning import CleanRules, clean_records
from vsectl.data.openclipart.metadata import scan_svgs
from vsectl.data.openclipart.package import resolve_source
from vsectl.data.openclipart.render import (
    RENDER_RETRY_FACTOR,
    RENDER_VERSION,
    RenderFn,
    drop_duplicate_renders,
    render_items,
    render_png,
)
from vsectl.data.openclipart.splits import _split_sizes, assign_splits
from vsectl.data.raw import count_lines, finished_dataset, write_raw_dataset
from vsectl.data.tokenize import word_tokenize
from vsectl.errors import DataError

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)


PIPELINE_VERSION = 4  # bump when the cleaning or caption code changes, so finished datasets are rebuilt
LICENSE_TEXT = """\
The images and captions in this folder are derived from the Open Clip Art Library (https://openclipart.org), as
packaged by Debian in `openclipart-svg`. Every drawing in that package was released into the public domain by its
author (Creative Commons Public Domain Dedication / Certification, see /usr/share/doc/openclipart-svg/copyright in the
package). The derived PNGs, the captions built from the drawings' metadata and the split files are likewise dedicated
to the public domain; no rights are reserved.
"""


def _provenance(source: dict[str, Any], counts: dict[str, Any], params: dict[str, Any]) -> str:
    src = (f"Debian package `{source.get('package')}` version {source.get('version')} ({source.get('deb')}, sha256 "
           f"{source.get('deb_sha256')})" if "deb_sha256" in source else f"the SVG folder {source.get('dir')}")
    lines = [
        "# Provenance: openclipart demo dataset",
        "",
        f"Built by `vsectl data prepare openclipart` (vsectl {__version__}) from {src}.",
        "Source: the Open Clip Art Library (public domain), SVGs under `usr/share/openclipart/svg/`.",
        "",
        "What was done:",
        "1. every SVG was hashed (sha256 of its bytes); duplicates and symbolic links were dropped, first path wins;",
        "2. dc:title, dc:description, dc:subject keywords and dc:creator were read from each SVG's RDF metadata;",
        "3. icon sets, shapes, gradients, card decks and flags were excluded by folder; titles, descriptions and",
        "   keywords repeated across many files (collection boilerplate), generic titles, author names among keywords",
        "   and over-frequent keywords were removed (rules in docs/data.md and in manifest.json `params`);",
        "4. up to three captions per image: the cleaned title, the description's first sentence, and the title with",
        "   up to three informative keywords;",
        f"5. each SVG was rendered with cairosvg to a {params['size']}×{params['size']} RGB PNG (aspect kept,",
        f"   centred on white) with a {params['timeout']:g} s limit per file, and a render past it retried once with",
        f"   {params['timeout'] * params['render_retry_factor']:g} s; failed or hung renders were skipped;",
        "6. images were split by normalised title (no title in two splits) in a stable hash order.",
        "",
        *count_lines(counts),
        "",
    ]
    return "\n".join(lines)


def prepare_openclipart(
    out: str | Path,
    *,
    cache: str | Path | None = None,
    from_deb: str | Path | None = None,
    from_dir: str | Path | None = None,
    size: int = 224,
    max_images: int | None = None,
    timeout: float = 10.0,
    workers: int = 2,
    min_test: int = 500,
    dev_fraction: float = 0.1,
    rules: CleanRules | None = None,
    progress: Progress | None = None,
    render_fn: RenderFn = render_png,
) -> Path:
    """Build the openclipart raw dataset in `out` (resumable; a finished, matching dataset returns at once).

    Args:
        out: output folder (dataset.json, manifest.json, images/, LICENSE.txt, PROVENANCE.md).
        cache: where the .deb is downloaded and unpacked (default `default_cache()`).
        from_deb: use this .deb instead of `apt-get download`.
        from_dir: use the SVGs under this folder instead of a package.
        size: PNG side in pixels.
        max_images: keep at most this many cleaned images (chosen by content hash order), before rendering.
        timeout: seconds allowed per SVG render.
        workers: render processes.
        min_test: least number of test images (reduced, with a warning, when the data is too small).
        dev_fraction: share of the images for dev ("val"), at least.
        rules: cleaning rules.
        progress: progress reporting (silent by default).
        render_fn: renders (svg path, png path, size); runs in the worker processes.

    Returns:
        `out`.
    """
    from vsectl.runtime import NullProgress

    if size < 8 or workers < 1 or timeout <= 0 or (max_images is not None and max_images < 1):
        raise DataError("--size must be ≥ 8, --workers ≥ 1, --timeout > 0 and --max-images ≥ 1")
    out, rules, progress = Path(out), rules or CleanRules(), progress or NullProgress()
    where = (Path(cache) if cache else None, from_deb and Path(from_deb), from_dir and Path(from_dir))
    svg_root, source = resolve_source(*where, unpack=False)
    params = {"pipeline": PIPELINE_VERSION, "render_version": RENDER_VERSION, "size": size,
              "max_images": max_images, "timeout": timeout, "render_retry_factor": RENDER_RETRY_FACTOR,
              "min_test": min_test, "dev_fraction": dev_fraction,
              "rules": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(rules).items()}}
    if finished_dataset(out, lambda recorded: recorded == source, params):
        log.info("%s is already prepared with these settings", out)
        return out
    start = time.monotonic()
    svg_root, source = resolve_source(*where)
    out.mkdir(parents=True, exist_ok=True)
    records, counts = scan_svgs(svg_root / source.get("svg_root", ""), progress)
    for r in records:
        r.source = r.path.relative_to(svg_root).as_posix()
    items, clean_counts = clean_records(records, rules)
    counts.update(clean_counts)
    if not items:
        raise DataError(f"no SVG under {svg_root} kept a usable title after cleaning ({counts}); is it openclipart?")
    if max_images is not None and len(items) > max_images:
        chosen = {id(it) for it in sorted(items, key=lambda it: it.record.sha256)[:max_images]}
        items = [it for it in items if id(it) in chosen]
    for it in items:
        it.filename = f"{it.record.sha256[:16]}.png"
    counts["selected"] = len(items)
    counts.update(render_items(items, out / "images", size, workers, timeout, render_fn, progress))
    items, png_sha, counts["duplicate_renders"] = drop_duplicate_renders(items, out, size)
    counts["rendered"] = len(items) + counts["duplicate_renders"]
    counts["images"] = len(items)
    test_n, dev_n = _split_sizes(len(items), min_test, round(dev_fraction * len(items)))
    splits = assign_splits([it.group for it in items], test_n, dev_n, rules.split_seed)
    entries = []
    for n, (it, split) in enumerate(zip(items, splits, strict=True)):
        entries.append({"filename": it.filename, "imgid": n, "split": split, "title": it.title,
                        "sentences": [{"raw": c, "tokens": word_tokenize(c)} for c in it.captions],
                        "sha256": png_sha[it.filename], "source": it.record.source,
                        "source_sha256": it.record.sha256})
    write_raw_dataset(out, "openclipart", entries, png_sha, counts=counts, source=source, params=params,
                      license_text=LICENSE_TEXT, provenance=lambda c: _provenance(source, c, params),
                      seconds=time.monotonic() - start)
    log.info("openclipart: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)))
    return out
