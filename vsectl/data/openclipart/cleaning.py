"""Cleaning and captions: which SVGs are kept, their cleaned titles, keywords and up to three captions.

The rules are documented on `CleanRules`, `clean_title` and `build_captions`, and in docs/data.md.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from vsectl.data.openclipart.metadata import SvgRecord

# "Clipart by Nicu Buculei - piggybank": the author credit is not a description.
_BY_PREFIX = re.compile(r"^\s*(?:clip\s*arts?|drawings?|images?|pictures?)\s+by\s+[^-–:]+[-–:]\s*", re.I)
_COLLECTION = re.compile(r"\b(?:part of|collection|theme|icon ?set|iconset|cliparts|clip arts|series)\b", re.I)
# Descriptions about the file rather than the picture: "Created with Inkscape", "released into the Public Domain".
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
class Item:
    """A kept image: its captions and the key that groups it for splitting."""

    record: SvgRecord
    title: str
    captions: list[str]
    group: str
    filename: str = ""


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
