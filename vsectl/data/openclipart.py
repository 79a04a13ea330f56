"""The openclipart demo dataset: public-domain SVGs from Debian's `openclipart-svg`, cleaned, captioned and rendered.

`prepare_openclipart` writes a raw dataset folder (layout in `vsectl.data.raw`). The cleaning and caption rules are
documented on `CleanRules`, `clean_title` and `build_captions`, and in docs/data.md. The file runs long because it
holds the whole pipeline, in order: metadata, cleaning and captions, splits, the render pool, the package, the driver.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl import __version__
from vsectl.data.captions import word_tokenize
from vsectl.data.raw import DATASET_JSON, MANIFEST_JSON, RAW_FORMAT, RAW_VERSION, sha256_file, write_json_atomic
from vsectl.errors import DataError
from vsectl.io import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)

PACKAGE = "openclipart-svg"
SVG_SUBDIR = "usr/share/openclipart/svg"
STATE_JSON = ".render-state.json"  # per-PNG source hash and size, so a rerun skips finished renders
PIPELINE_VERSION = 4  # bump when the cleaning or caption code changes, so finished datasets are rebuilt
RENDER_VERSION = 3  # bump when the rendering code changes, so cached PNGs are rendered again
STATE_EVERY = 100  # renders between state saves: a kill loses at most this much work
NS_DC = "{http://purl.org/dc/elements/1.1/}"
NS_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
NS_CC = "{http://web.resource.org/cc/}"
_RDF_BLOCK = re.compile(rb"<(?:[\w.-]+:)?RDF\b.*?</(?:[\w.-]+:)?RDF\s*>", re.S)
_XMLNS = re.compile(rb"xmlns:([\w.-]+)\s*=\s*(\"[^\"]*\"|'[^']*')")
# "Clipart by Nicu Buculei - piggybank": the author credit is not a description.
_BY_PREFIX = re.compile(r"^\s*(?:clip\s*arts?|drawings?|images?|pictures?)\s+by\s+[^-–:]+[-–:]\s*", re.I)
_COLLECTION = re.compile(r"\b(?:part of|collection|theme|icon ?set|iconset|cliparts|clip arts|series)\b", re.I)
# Descriptions about the file rather than the picture: "Created with Inkscape", "released into the Public Domain".
_DESC_NOISE = re.compile(r"public domain|inkscape|sodipodi|illustrator|created (?:with|by|using)|released|licen[cs]e|"
                         r"copyright|openclip|clip ?art library|e-?mail|\bemail|\bsvg\b", re.I)
_NOISE_WORDS = re.compile(r"\b(?:in svg format|svg|clip ?art|openclipart|vectori[sz]ed|bw|b ?& ?w|b w)\b", re.I)
GENERIC_TITLES = frozenset(
    "untitled unnamed new document image images drawing picture clipart clip art svg icon logo layer graphic vector "
    "sketch test title mr mrs symbol sign shape object thing misc various".split()
)
STOP_KEYWORDS = frozenset(
    "hash|icon|icons|theme|clipart|clip art|svg|image|drawing|picture|unsorted|special|simple|white|black|color|colour|"
    "coloring|misc|other|various|stuff|magick|geometry|action|mapsym|mimetypes|mime types|webpage|remix|openclipart|"
    "open clip art|public domain|vector|outline|bw|new".split("|")
)
CATEGORY_WORDS = frozenset(  # the package's top-level folders: too broad to describe an image
    "animals|buildings|buttons|computer|containers|decorations|education|electronics|food|geography|logos|office|"
    "people|plants|recreation|science|shapes|signs and symbols|special|tools|transportation|unsorted".split("|")
)
FUNCTION_WORDS = frozenset("a an the of and or with in on at to for by from de la le".split())
DEFAULT_EXCLUDE = (  # ~290 national flags named only by country, and 58 identical "led circle" lamps
    "signs_and_symbols/flags",
    "signs_and_symbols/led",
)


@dataclass
class CleanRules:
    """Rule parameters of the openclipart cleaning (recorded in the manifest).

    A file is kept when its cleaned title is informative: not generic, not a collection name, not repeated across
    more than `max_title_repeats` unique files, and holding a word that `min_word_creators` different authors used.
    """

    max_title_repeats: int = 10  # a title shared by more unique files is an icon-set or collection name
    max_desc_repeats: int = 3  # a description shared by more files is boilerplate ("Part of Hotel Icons Collection")
    max_keyword_share: float = 0.08  # keywords on more than this fraction of files ("hash", "computer") say nothing
    max_keywords: int = 3  # keywords in the third caption
    min_title_letters: int = 3
    min_word_creators: int = 2  # a title word used by this many authors (or in the file's own keywords or
    # description) grounds the title; this drops most non-English titles
    max_desc_words: int = 30  # longer first sentences are cut at a word boundary
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # category folders skipped entirely
    split_seed: int = 0


@dataclass
class SvgRecord:
    """One unique SVG and its raw RDF metadata."""

    source: str  # path inside the package (or --from-dir folder)
    path: Path
    sha256: str
    title: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""


@dataclass
class Item:
    """A kept image: its captions and the key that groups it for splitting."""

    record: SvgRecord
    title: str
    captions: list[str]
    group: str
    filename: str = ""


# ---------------------------------------------------------------------------------------------------------- metadata


def _text(el: ET.Element | None) -> str:
    return " ".join("".join(el.itertext()).split()) if el is not None else ""


def parse_svg_metadata(data: bytes) -> dict[str, Any] | None:
    """Read dc:title, dc:description, dc:subject keywords and dc:creator from an SVG's RDF block.

    Only the RDF block is parsed (with the namespace declarations found before it), so Illustrator entities or
    broken markup elsewhere in the file do not matter.

    Returns:
        {"title", "description", "keywords" (list), "creator"}, or None without a parsable RDF block.
    """
    m = _RDF_BLOCK.search(data)
    if m is None:
        return None
    decls = dict(_XMLNS.findall(data[: m.start()] + m.group(0)[:4096]))
    wrapper = b"<w " + b" ".join(b"xmlns:" + k + b"=" + v for k, v in decls.items()) + b">" + m.group(0) + b"</w>"
    try:
        root = ET.fromstring(wrapper)
    except ET.ParseError:
        return None
    work = root.find(f".//{NS_CC}Work")
    scope = work if work is not None else root
    keywords = [_text(li) for li in scope.findall(f"{NS_DC}subject//{NS_RDF}li")]
    if not keywords:  # some files hold a plain-text subject
        keywords = re.split(r"[,;]", _text(scope.find(f"{NS_DC}subject")))
    desc = scope.find(f"{NS_DC}description")
    lines = "".join(desc.itertext()).splitlines() if desc is not None else []  # keep line breaks: first line wins
    return {
        "title": _text(scope.find(f"{NS_DC}title")),
        "description": "\n".join(line.strip() for line in lines).strip(),
        "keywords": [k.strip() for k in keywords if k.strip()],
        "creator": _text(scope.find(f"{NS_DC}creator")),
    }


def scan_svgs(root: Path, progress: Progress) -> tuple[list[SvgRecord], dict[str, int]]:
    """Hash and parse every SVG under `root`; keep the first file (in path order) of each distinct content.

    Returns:
        (records with metadata, counts {"svg_files", "unique", "with_metadata"}).
    """
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".svg" and p.is_file())
    seen: set[str] = set()
    records: list[SvgRecord] = []
    unique = 0
    for path in progress.track(files, total=len(files), description="read SVGs"):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        unique += 1
        meta = parse_svg_metadata(data)
        if meta is None or not (meta["title"] or meta["description"] or meta["keywords"]):
            continue
        records.append(SvgRecord(source=path.relative_to(root).as_posix(), path=path, sha256=digest, **meta))
    return records, {"svg_files": len(files), "unique": unique, "with_metadata": len(records)}


# ---------------------------------------------------------------------------------------------------------- cleaning


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.casefold())


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def group_key(text: str) -> str:
    """Normalised title used to keep same-titled images in one split: letters only, plural s dropped."""
    return " ".join(_singular(w) for w in _words(text))


def clean_title(raw: str, names: Iterable[str] = ()) -> str:
    """Turn a raw dc:title into a short lower-case phrase, or "" when it is generic.

    Auto-generated credits ("Clipart by NAME - smiley111") and collection names ("Part of the Flat Icon
    Collection", "Lemon SVG theme") give "". Otherwise drops parenthesised remarks, the words svg, clipart,
    vectorized and b/w, trailing numbers (tigre02), words with digits (2004, 8ball) and the words in `names` (the
    author's name), and splits camelCase and snake_case. Generic leftovers ("untitled", "image", "drawing") give "".

    Args:
        raw: the dc:title text.
        names: lower-case words to remove (the creator's name).
    """
    if not raw.strip() or _BY_PREFIX.match(raw) or _COLLECTION.search(raw):
        return ""
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", raw)
    text = re.sub(r"\.svg$", "", text.strip(), flags=re.I)
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)  # PiggyBank → Piggy Bank
    text = re.sub(r"[_\-–/.,:;+]+", " ", text)
    text = _NOISE_WORDS.sub(" ", text)
    text = re.sub(r"(?<=[^\W\d_])\d+\b", "", text)  # guitar2, Tigre02: numbering
    text = re.sub(r"\b\w*\d\w*\b", " ", text)  # 49pt16step, 2004
    drop = set(names)
    words = [w for w in re.findall(r"[^\W\d_][\w'&]*", text.casefold()) if w not in drop]
    while words and words[-1] in FUNCTION_WORDS:
        words.pop()
    phrase = " ".join(words)
    if not words or phrase in GENERIC_TITLES or all(w in GENERIC_TITLES | FUNCTION_WORDS for w in words):
        return ""
    return phrase if sum(c.isalpha() for c in phrase) >= 3 else ""


def first_sentence(description: str, max_words: int) -> str:
    """The first sentence (or line) of a description, cut to `max_words` words, or "" when it is not prose.

    Addresses, links, Perl object dumps ("HASH(0x874ce84)") and remarks about the file rather than the picture
    ("Created with Inkscape", "released into the Public Domain") do not describe the image.
    """
    text = description.strip().split("\n")[0]
    text = re.split(r"(?<=[.!?])\s+", text)[0].strip()
    if "@" in text or "http" in text.casefold() or "www." in text.casefold() or re.search(r"HASH\(0x", text):
        return ""
    if _DESC_NOISE.search(text):
        return ""
    words = text.split()
    text = " ".join(words[:max_words]).rstrip(".!?,;: ")
    return text if len(_words(text)) >= 2 else ""


def _keyword_norm(raw: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", raw).casefold().split())


def clean_keywords(keywords: Iterable[str], names: Iterable[str] = (), drop: Iterable[str] = ()) -> list[str]:
    """Informative keywords, lower-case, in order, without repeats (singular and plural count as one).

    Drops empty, short (< 3 chars) or long (> 3 words, > 24 chars) keywords, ones with digits or symbols, the stop
    list, category folder names, the keywords in `drop` (over-frequent ones, authors' full names) and keywords
    containing a word of `names` (this file's author).
    """
    names, drop = set(names), set(drop)
    out: list[str] = []
    seen: set[str] = set()
    for raw in keywords:
        kw = _keyword_norm(raw)
        if len(kw) < 3 or len(kw) > 24 or len(kw.split()) > 3 or re.search(r"[^a-z' ]", kw):
            continue
        if kw in STOP_KEYWORDS or kw in CATEGORY_WORDS or kw in drop or names & set(kw.split()):
            continue
        if group_key(kw) in seen:
            continue
        seen.add(group_key(kw))
        out.append(kw)
    return out


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def build_captions(title: str, description: str, keywords: list[str], max_keywords: int = 3) -> list[str]:
    """Up to three captions for one image.

    1. the cleaned title as a sentence: "Elephant outline.";
    2. the description's first sentence, when given and not just the title again;
    3. "<Title>, with keywords k1, k2 and k3." using up to `max_keywords` keywords that add a word to the title
       ("A drawing, with keywords ..." without a title).

    Args:
        title: cleaned title ("" if none).
        description: cleaned first sentence of the description ("" if none or boilerplate).
        keywords: cleaned informative keywords.
        max_keywords: keywords in the third caption.
    """
    captions = []
    if title:
        captions.append(_sentence(title))
    if description and group_key(description) not in (group_key(title), ""):
        captions.append(_sentence(description))
    title_words = set(group_key(title).split())
    extra = [k for k in keywords if not set(group_key(k).split()) <= title_words][:max_keywords]
    if extra:
        captions.append(_sentence(f"{title or 'a drawing'}, with keywords {_join(extra)}"))
    return captions


def _authors_by_word(records: list[SvgRecord]) -> dict[str, set[str]]:
    # word → the authors that used it anywhere in their metadata; words of several authors are likely English
    users: dict[str, set[str]] = {}
    for r in records:
        who = _norm(r.creator) or r.source
        for w in set(_words(" ".join([r.title, r.description, *r.keywords]))):
            users.setdefault(w, set()).add(who)
    return users


def clean_records(records: list[SvgRecord], rules: CleanRules) -> tuple[list[Item], dict[str, int]]:
    """Apply the cleaning rules (see `CleanRules`) and build captions.

    Returns:
        (kept items in record order, counts {"excluded_folder", "boilerplate_title", "no_informative_title",
        "kept"}).
    """
    title_freq = Counter(_norm(r.title) for r in records if r.title.strip())
    desc_freq = Counter(_norm(r.description) for r in records if r.description.strip())
    kw_freq = Counter(k for r in records for k in {_keyword_norm(k) for k in r.keywords})
    drop_kw = {k for k, c in kw_freq.items() if c > rules.max_keyword_share * max(1, len(records))}
    drop_kw |= {_norm(r.creator) for r in records if r.creator.strip()}  # author names used as keywords
    users = _authors_by_word(records)
    counts = Counter({"excluded_folder": 0, "boilerplate_title": 0, "no_informative_title": 0})
    items: list[Item] = []
    for r in records:
        if any(f"/{ex}/" in f"/{r.source}" for ex in rules.exclude):
            counts["excluded_folder"] += 1
            continue
        if title_freq[_norm(r.title)] > rules.max_title_repeats:
            counts["boilerplate_title"] += 1
            continue
        names = {w for w in _words(r.creator) if len(w) >= 4 and len(users.get(w, ())) <= 1}  # rare: a name
        desc = ""
        if r.description.strip() and desc_freq[_norm(r.description)] <= rules.max_desc_repeats:
            desc = first_sentence(r.description, rules.max_desc_words)
            desc = "" if group_key(desc) == group_key(r.title) else desc  # "Lemon (Whole)" again
        keywords = clean_keywords(r.keywords, names, drop_kw)
        title = clean_title(r.title, names)
        own = set(_words(" ".join([desc, *keywords])))
        grounded = any(len(users.get(w, ())) >= rules.min_word_creators or w in own
                       for w in title.split() if w not in FUNCTION_WORDS)
        if not title or not grounded or sum(c.isalpha() for c in title) < rules.min_title_letters:
            counts["no_informative_title"] += 1
            continue
        items.append(Item(record=r, title=title, captions=build_captions(title, desc, keywords, rules.max_keywords),
                          group=group_key(title)))
    counts["kept"] = len(items)
    return items, dict(counts)


def assign_splits(groups: list[str], min_test: int, n_dev: int, seed: int = 0) -> list[str]:
    """Assign each image to "train", "val" or "test", keeping images of one group in one split.

    Groups are ordered by sha256(seed:group), a stable pseudo-random order; whole groups go to test until it holds at
    least `min_test` images, then to val until it holds at least `n_dev`, the rest to train.

    Args:
        groups: the group key of each image.
        min_test: least number of test images.
        n_dev: least number of val images (0 for none).
        seed: changes the order.

    Returns:
        The split of each image.
    """
    sizes = Counter(groups)
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    split_of: dict[str, str] = {}
    n_test = n_val = 0
    for g in order:
        if n_test < min_test:
            split_of[g], n_test = "test", n_test + sizes[g]
        elif n_val < n_dev:
            split_of[g], n_val = "val", n_val + sizes[g]
        else:
            split_of[g] = "train"
    return [split_of[g] for g in groups]


# ---------------------------------------------------------------------------------------------------------- rendering


def render_png(src: str, dst: str, size: int) -> None:
    """Render an SVG to a `size`×`size` RGB PNG: aspect ratio kept, centred, transparency composited on white."""
    import cairosvg
    from PIL import Image

    im = Image.open(io.BytesIO(cairosvg.svg2png(url=src, output_width=size))).convert("RGBA")
    flat = Image.new("RGB", im.size, (255, 255, 255))
    flat.paste(im, (0, 0), im)  # composite before any resampling, so edges blend with white, not black
    if flat.height > size:  # taller than wide: shrink to fit (half the files; cheaper than a second render)
        flat = flat.resize((max(1, round(flat.width * size / flat.height)), size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - flat.width) // 2, (size - flat.height) // 2))
    if all(lo == hi for lo, hi in canvas.getextrema()):
        raise ValueError("blank render (nothing drawn)")
    with atomic_path(Path(dst)) as tmp:
        canvas.save(tmp, format="PNG")


RenderFn = Callable[[str, str, int], None]


def _render_worker(conn: Connection, render_fn: RenderFn) -> None:
    while True:
        task = conn.recv()
        if task is None:
            return
        key, src, dst, size = task
        try:
            render_fn(src, dst, size)
            conn.send((key, "ok", ""))
        except Exception as e:  # noqa: BLE001 - any failure of one file is reported, the run goes on
            conn.send((key, "failed", f"{type(e).__name__}: {e}"[:200]))


class _Slot:
    """One worker process and the task it is running."""

    def __init__(self, ctx: Any, render_fn: RenderFn) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_render_worker, args=(child, render_fn), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[str, str, str, int] | None = None
        self.started = 0.0

    def give(self, task: tuple[str, str, str, int]) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def render_all(
    tasks: list[tuple[str, str, str, int]], workers: int, timeout: float, render_fn: RenderFn = render_png
) -> Iterator[tuple[str, str, str]]:
    """Render (key, src, dst, size) tasks in `workers` processes, each file within `timeout` seconds.

    A render that runs past the limit has its process killed and replaced. Forked workers inherit `render_fn`, so it
    need not be importable by name.

    Yields:
        (key, status, message) in completion order; status is "ok", "failed" or "timeout".
    """
    if not tasks:
        return
    if render_fn is render_png:  # import once here: forked workers inherit it instead of paying it inside the limit
        import cairosvg  # noqa: F401
        import PIL.Image  # noqa: F401
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = deque(tasks)
    slots = [_Slot(ctx, render_fn) for _ in range(max(1, min(workers, len(pending))))]
    try:
        for slot in slots:
            if pending:
                slot.give(pending.popleft())
        while any(s.task is not None for s in slots):
            busy = [s for s in slots if s.task is not None]
            deadline = min(s.started for s in busy) + timeout
            ready = wait([s.conn for s in busy], timeout=max(0.0, deadline - time.monotonic()))
            for k, slot in enumerate(slots):
                if slot.task is None:
                    continue
                key, _, dst, _ = slot.task
                if slot.conn in ready:
                    try:
                        result = slot.conn.recv()
                    except EOFError:  # the worker died (e.g. a crash inside cairo)
                        result = (key, "failed", f"worker exited with code {slot.proc.exitcode}")
                        slot.kill()
                        slot = slots[k] = _Slot(ctx, render_fn)
                elif time.monotonic() - slot.started >= timeout:
                    slot.kill()
                    for stale in Path(dst).parent.glob(Path(dst).name + ".*.tmp"):
                        stale.unlink(missing_ok=True)
                    result = (key, "timeout", f"no result within {timeout:g} s")
                    slot = slots[k] = _Slot(ctx, render_fn)
                else:
                    continue
                slot.task = None
                if pending:
                    slot.give(pending.popleft())
                yield result
    finally:
        for slot in slots:
            if slot.proc.is_alive():
                slot.kill()


# ---------------------------------------------------------------------------------------------------------- sources


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


# ---------------------------------------------------------------------------------------------------------- pipeline


def _load_state(path: Path, size: int) -> dict[str, dict[str, str]]:
    import json

    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = state.get("size") == size and state.get("render_version") == RENDER_VERSION
    return state.get("files", {}) if same else {}


def render_items(
    items: list[Item],
    images: Path,
    size: int,
    workers: int,
    timeout: float,
    render_fn: RenderFn,
    progress: Progress,
) -> dict[str, int]:
    """Render every item to `images/<filename>`, skipping PNGs whose source hash and size match the saved state.

    Sets nothing on failed items; the caller keeps items whose PNG exists. Returns counts of the render stage.
    """
    images.mkdir(parents=True, exist_ok=True)
    state_path = images.parent / STATE_JSON
    state = _load_state(state_path, size)
    tasks, reused, known_bad = [], 0, 0
    for it in items:
        done = state.get(it.filename, {})
        if done.get("source_sha256") == it.record.sha256:
            if done.get("status") == "ok" and (images / it.filename).is_file():
                reused += 1
                continue
            if done.get("status") == "duplicate" or (done.get("status") in ("failed", "timeout")
                                                      and done.get("timeout") == timeout):
                known_bad += 1  # failures, and renders identical to another image's, are not retried
                continue
        tasks.append((it.filename, str(it.record.path), str(images / it.filename), size))
    sha_of = {it.filename: it.record.sha256 for it in items}
    status = Counter({"ok": 0, "failed": 0, "timeout": 0})
    results = render_all(tasks, workers=workers, timeout=timeout, render_fn=render_fn)
    for n, (key, outcome, message) in enumerate(progress.track(results, total=len(tasks), description="render"), 1):
        status[outcome] += 1
        state[key] = {"source_sha256": sha_of[key], "status": outcome, "timeout": timeout}
        if outcome != "ok":
            log.debug("render %s: %s (%s)", key, outcome, message)  # counted below; each reason is in the state file
            state[key]["message"] = message
        progress.update(ok=status["ok"], failed=status["failed"] + status["timeout"])
        if n % STATE_EVERY == 0:
            write_json_atomic(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state})
    write_json_atomic(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state})
    bad = {s: sum(1 for it in items if state.get(it.filename, {}).get("status") == s) for s in ("failed", "timeout")}
    log.info("rendered %d, reused %d, failed %d, timed out %d", status["ok"], reused, bad["failed"], bad["timeout"])
    if bad["failed"] or bad["timeout"]:
        log.warning("%d SVGs could not be rendered and are left out (reasons in %s; --verbose lists them)",
                    bad["failed"] + bad["timeout"], state_path)
    return {"rendered_now": status["ok"], "render_reused": reused, "render_failed": bad["failed"],
            "render_timed_out": bad["timeout"], "render_skipped_known": known_bad}


def drop_duplicate_renders(items: list[Item], out: Path, size: int) -> tuple[list[Item], dict[str, str], int]:
    """Keep the first item of each distinct PNG (different SVG bytes can draw the same pixels).

    Later copies are marked "duplicate" in the render state, so reruns neither render nor keep them.

    Returns:
        (items with a unique, existing PNG; their PNG sha256 by filename; number of duplicates).
    """
    state_path = out / STATE_JSON
    state = _load_state(state_path, size)
    png_sha: dict[str, str] = {}
    first_of: dict[str, str] = {}
    kept = []
    for it in items:
        done = state.get(it.filename, {})
        if done.get("status") != "ok" or not (out / "images" / it.filename).is_file():
            continue
        digest = sha256_file(out / "images" / it.filename)
        first = first_of.setdefault(digest, it.filename)
        if first != it.filename:
            state[it.filename] = {**done, "status": "duplicate", "of": first}
            continue
        png_sha[it.filename] = digest
        kept.append(it)
    write_json_atomic(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state})
    duplicates = sum(1 for it in items if state.get(it.filename, {}).get("status") == "duplicate")
    return kept, png_sha, duplicates


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
        f"   centred on white) with a {params['timeout']:g} s limit per file; failed or hung renders were skipped;",
        "6. images were split by normalised title (no title in two splits) in a stable hash order.",
        "",
        "Counts: " + ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)),
        "Splits: " + ", ".join(f"{s} {v['images']} images / {v['captions']} captions"
                                for s, v in counts.get("splits", {}).items()),
        "",
    ]
    return "\n".join(lines)


def _finished(out: Path, source: dict[str, Any], params: dict[str, Any]) -> bool:
    import json

    try:
        manifest = json.loads((out / MANIFEST_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("source") != source or manifest.get("params") != params:
        return False
    if not (out / DATASET_JSON).is_file() or sha256_file(out / DATASET_JSON) != manifest["checksums"][DATASET_JSON]:
        return False
    return all((out / "images" / name).is_file() for name in manifest["checksums"]["images"])


def _split_sizes(n: int, min_test: int, n_dev: int) -> tuple[int, int]:
    if min_test + n_dev <= n // 2:
        return min_test, n_dev
    scale = (n // 2) / max(1, min_test + n_dev)  # too few images: test and dev share half of them
    log.warning("only %d images: test/dev reduced from %d/%d", n, min_test, n_dev)
    return max(1, int(min_test * scale)), int(n_dev * scale)


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
              "max_images": max_images, "timeout": timeout, "min_test": min_test, "dev_fraction": dev_fraction,
              "rules": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(rules).items()}}
    if _finished(out, source, params):
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
    counts["splits"] = {s: {"images": sum(1 for e in entries if e["split"] == s),
                            "captions": sum(len(e["sentences"]) for e in entries if e["split"] == s)}
                        for s in ("train", "val", "test")}
    keep = set(png_sha)
    for stale in (out / "images").glob("*.png"):
        if stale.name not in keep:
            stale.unlink()
    dataset_sha = write_json_atomic(out / DATASET_JSON, {"dataset": "openclipart", "images": entries})
    atomic_write_text(out / "LICENSE.txt", LICENSE_TEXT)
    atomic_write_text(out / "PROVENANCE.md", _provenance(source, counts, params))
    manifest = {"format": RAW_FORMAT, "version": RAW_VERSION, "dataset": "openclipart", "image_root": "images",
                "vsectl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.monotonic() - start, 1), "source": source, "params": params,
                "counts": counts, "checksums": {DATASET_JSON: dataset_sha, "images": png_sha}}
    write_json_atomic(out / MANIFEST_JSON, manifest, indent=1)
    log.info("openclipart: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict)))
    return out
