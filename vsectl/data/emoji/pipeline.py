"""The emoji driver: packages → emoji list and CLDR names → cleaning → drawing → splits → a raw dataset folder."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl import __version__
from vsectl.data.emoji.catalog import load_catalog
from vsectl.data.emoji.cleaning import EmojiItem, EmojiRules, select_emoji
from vsectl.data.emoji.render import FONT_SIZE, RENDER_VERSION, EmojiRenderer, font_facts, pixel_sha256, save_png
from vsectl.data.emoji.sources import resolve_sources
from vsectl.data.openclipart.splits import _split_sizes, assign_splits
from vsectl.data.raw import count_lines, finished_dataset, write_raw_dataset
from vsectl.data.tokenize import word_tokenize
from vsectl.errors import DataError

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when the cleaning or caption code changes, so finished datasets are rebuilt
LICENSE_TEXT = """\
The images in this folder are drawings of emoji by the Noto Color Emoji font (Google; Debian package
fonts-noto-color-emoji), licensed under the SIL Open Font License 1.1, which places no restriction on documents or
images made with the font. The captions are built from the English names and keywords of the Unicode Common Locale
Data Repository (Debian package unicode-cldr-core) and the emoji list from Unicode's emoji-test.txt (Debian package
unicode-data), both under the Unicode License (Unicode-DFS-2016; copyright Unicode, Inc.), which allows use,
modification and redistribution with this notice. See /usr/share/doc/<package>/copyright in each package.
"""


def _filename(seq: str) -> str:
    return "-".join(f"{ord(c):x}" for c in seq) + ".png"


def _provenance(source: dict[str, Any], counts: dict[str, Any], params: dict[str, Any]) -> str:
    pkgs = "; ".join(f"`{p}` {s.get('version')} ({s.get('deb')}, sha256 {s.get('deb_sha256')})"
                     for p, s in source["packages"].items())
    lines = [
        "# Provenance: emoji dataset",
        "",
        f"Built by `vsectl data prepare emoji` (vsectl {__version__}) from the Debian packages {pkgs}.",
        f"Drawn with Pillow {source['drawing']['pillow']} (FreeType {source['drawing']['freetype']}, libraqm "
        f"{source['drawing']['raqm']}).",
        "",
        "What was done:",
        "1. every fully-qualified emoji of emoji-test.txt was taken, without the Component group, the excluded",
        f"   subgroups ({', '.join(params['rules']['exclude_subgroups']) or 'none'}) and, unless asked, skin-tone",
        "   variants;",
        "2. each was named by CLDR's English name (tts) and keywords (annotations/en.xml, annotationsDerived/en.xml);",
        "   emoji without an English name were dropped;",
        "3. captions: the name; the name with up to three keywords that add a word; the keywords alone. A caption",
        "   text given to more than one emoji was dropped;",
        f"4. each emoji was drawn at font size {params['font_size']} (the colour bitmaps' size), centred on white with",
        f"   a margin, and resized to {params['size']}×{params['size']} px; sequences the font draws as several",
        "   pictures, blank or missing glyphs, and renders pixel-identical to an earlier one were dropped;",
        "5. images were split by the picture they show (skin tone, hair, gender and age aside), so look-alikes",
        "   share a split, in a stable hash order.",
        "",
        *count_lines(counts),
        "",
    ]
    return "\n".join(lines)


def _same_source(source: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """The manifest's source matches: the same .debs (their file lists aside) and the same drawing stack."""
    def same(recorded: dict[str, Any]) -> bool:
        debs = {p: {k: v for k, v in s.items() if k != "files"} for p, s in recorded["packages"].items()}
        return debs == source["packages"] and recorded.get("drawing") == source["drawing"]
    return same


def draw_items(items: list[EmojiItem], images: Path, renderer: EmojiRenderer, progress: Progress
               ) -> tuple[list[EmojiItem], dict[str, str], dict[str, int]]:
    """Draw every item to `images/<filename>`; drop the ones the font cannot draw and pixel-identical repeats.

    Returns:
        (drawn items, their PNG sha256 by filename, counts {"several_glyphs", "blank", "missing_glyph",
        "duplicate_renders"}).
    """
    images.mkdir(parents=True, exist_ok=True)
    counts = Counter({"several_glyphs": 0, "blank": 0, "missing_glyph": 0, "duplicate_renders": 0})
    first_of: dict[str, str] = {}
    kept, png_sha = [], {}
    for it in progress.track(items, total=len(items), description="draw emoji"):
        image, reason = renderer.render(it.entry.seq)
        if image is None:
            counts[reason] += 1
            log.debug("not drawn: %s %s (%s)", it.entry.seq, it.name, reason)
            continue
        if first_of.setdefault(pixel_sha256(image), it.filename) != it.filename:
            counts["duplicate_renders"] += 1
            log.debug("same pixels as an earlier emoji: %s %s", it.entry.seq, it.name)
            continue
        png_sha[it.filename] = save_png(image, images / it.filename)
        kept.append(it)
        progress.update(drawn=len(kept))
    return kept, png_sha, dict(counts)


def prepare_emoji(
    out: str | Path,
    *,
    cache: str | Path | None = None,
    from_debs: str | Path | None = None,
    size: int = 224,
    max_images: int | None = None,
    min_test: int = 400,
    dev_fraction: float = 0.1,
    rules: EmojiRules | None = None,
    progress: Progress | None = None,
) -> Path:
    """Build the emoji raw dataset in `out` (a finished, matching dataset returns at once).

    Args:
        out: output folder (dataset.json, manifest.json, images/, LICENSE.txt, PROVENANCE.md).
        cache: where the .debs are downloaded and unpacked (default `$VSECTL_CACHE/emoji`).
        from_debs: a folder holding the fonts-noto-color-emoji, unicode-data and unicode-cldr-core .debs.
        size: PNG side in pixels.
        max_images: keep at most this many cleaned emoji (chosen by a hash of the sequence), before drawing.
        min_test: least number of test images (reduced, with a warning, when the data is too small).
        dev_fraction: share of the images for dev ("val"), at least.
        rules: cleaning rules.
        progress: progress reporting (silent by default).

    Returns:
        `out`.
    """
    import hashlib

    from vsectl.runtime import NullProgress

    if size < 8 or (max_images is not None and max_images < 1) or min_test < 1 or not 0 <= dev_fraction < 0.5:
        raise DataError("--size must be ≥ 8, --max-images ≥ 1, --min-test ≥ 1 and --dev-fraction in [0, 0.5)")
    out, rules, progress = Path(out), rules or EmojiRules(), progress or NullProgress()
    where = (Path(cache) if cache else None, Path(from_debs) if from_debs else None)
    params = {"pipeline": PIPELINE_VERSION, "render_version": RENDER_VERSION, "size": size, "font_size": FONT_SIZE,
              "max_images": max_images, "min_test": min_test, "dev_fraction": dev_fraction,
              "rules": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(rules).items()}}
    _, debs = resolve_sources(*where, unpack=False)
    if finished_dataset(out, _same_source({"packages": debs, "drawing": font_facts()}), params):
        log.info("%s is already prepared with these settings", out)
        return out
    start = time.monotonic()
    paths, debs = resolve_sources(*where)
    source = {"packages": debs, "drawing": font_facts()}
    renderer = EmojiRenderer(paths["font"], size)
    entries, names = load_catalog(paths["emoji_test"], paths["annotations"], paths["derived"])
    items, counts = select_emoji(entries, names, rules)
    if not items:
        raise DataError(f"no emoji kept a CLDR English name after cleaning ({counts}); are these the right packages?")
    if max_images is not None and len(items) > max_images:
        rank = {id(it): hashlib.sha256(it.entry.seq.encode()).hexdigest() for it in items}
        chosen = set(sorted(rank, key=rank.__getitem__)[:max_images])
        items = [it for it in items if id(it) in chosen]
    counts["selected"] = len(items)
    for it in items:
        it.filename = _filename(it.entry.seq)
    items, png_sha, draw_counts = draw_items(items, out / "images", renderer, progress)
    counts.update(draw_counts)
    counts["images"] = len(items)
    if not items:
        raise DataError(f"the font {paths['font']} drew none of the {counts['selected']} emoji")
    test_n, dev_n = _split_sizes(len(items), min_test, round(dev_fraction * len(items)))
    splits = assign_splits([it.group for it in items], test_n, dev_n, rules.split_seed)
    entries_out = []
    for n, (it, split) in enumerate(zip(items, splits, strict=True)):
        entries_out.append({"filename": it.filename, "imgid": n, "split": split, "title": it.name,
                            "sentences": [{"raw": c, "tokens": word_tokenize(c)} for c in it.captions],
                            "sha256": png_sha[it.filename], "emoji": it.entry.seq,
                            "codepoints": " ".join(f"U+{ord(c):04X}" for c in it.entry.seq),
                            "group": it.entry.group, "subgroup": it.entry.subgroup, "split_group": it.group,
                            "emoji_version": it.entry.version})
    write_raw_dataset(out, "emoji", entries_out, png_sha, counts=counts, source=source, params=params,
                      license_text=LICENSE_TEXT, provenance=lambda c: _provenance(source, c, params),
                      seconds=time.monotonic() - start)
    log.info("emoji: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)))
    return out
