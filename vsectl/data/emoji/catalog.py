"""Reading the emoji list (`emoji-test.txt`) and the CLDR English names and keywords (`annotations*/en.xml`)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from vsectl.errors import DataError

VS16 = "\ufe0f"  # emoji presentation selector; CLDR removes it from its keys
_LINE = re.compile(r"^([0-9A-Fa-f ]+);\s*([a-z-]+)\s*#\s*\S+\s+E(\d+\.\d+)\s+(.+)$")


@dataclass
class EmojiEntry:
    """One line of emoji-test.txt."""

    seq: str  # the code points, as text
    status: str  # fully-qualified, minimally-qualified, unqualified or component
    group: str
    subgroup: str
    version: str  # emoji version that introduced it ("E1.0" → "1.0")
    name: str  # Unicode's short name (CLDR's English name at the time of the file)


@dataclass
class Annotation:
    """The CLDR English name ("tts") and keywords of one emoji."""

    name: str = ""
    keywords: list[str] = field(default_factory=list)


def parse_emoji_test(text: str) -> list[EmojiEntry]:
    """Every sequence line of an emoji-test.txt, in file order, with its group and subgroup."""
    group = subgroup = ""
    out: list[EmojiEntry] = []
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            m = _LINE.match(line.strip())
            if m is None:
                raise DataError(f"emoji-test.txt: cannot read the line {line.strip()[:80]!r}")
            seq = "".join(chr(int(cp, 16)) for cp in m.group(1).split())
            out.append(EmojiEntry(seq, m.group(2), group, subgroup, m.group(3), m.group(4).strip()))
    if not out:
        raise DataError("emoji-test.txt lists no emoji; is it Unicode's emoji-test.txt?")
    return out


def parse_annotations(data: bytes, into: dict[str, Annotation] | None = None) -> dict[str, Annotation]:
    """CLDR `<annotation cp=...>` keywords ("a | b | c") and `type="tts"` names, keyed by the text without U+FE0F.

    Entries already in `into` are updated: a derived file adds sequences to the base file's entries.
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(f"CLDR annotations are not valid XML ({e})") from e
    out = into if into is not None else {}
    for el in root.iter("annotation"):
        cp = (el.get("cp") or "").replace(VS16, "")
        text = " ".join((el.text or "").split())
        if not cp or not text:
            continue
        ann = out.setdefault(cp, Annotation())
        if el.get("type") == "tts":
            ann.name = text
        else:
            ann.keywords = [k.strip() for k in text.split("|") if k.strip()]
    return out


def load_catalog(emoji_test: Path, annotations: Path, derived: Path) -> tuple[list[EmojiEntry], dict[str, Annotation]]:
    """The emoji list and the merged English annotations (derived entries win for the sequences they hold)."""
    entries = parse_emoji_test(emoji_test.read_text(encoding="utf-8"))
    names = parse_annotations(annotations.read_bytes())
    parse_annotations(derived.read_bytes(), into=names)
    return entries, names
