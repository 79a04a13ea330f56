"""Reading the SVGs: content hashes, and the title, description, keywords and creator of their RDF metadata."""

from __future__ import annotations

import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsectl.runtime import Progress


NS_DC = "{http://purl.org/dc/elements/1.1/}"
NS_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
NS_CC = "{http://web.resource.org/cc/}"
_RDF_BLOCK = re.compile(rb"<(?:[\w.-]+:)?RDF\b.*?</(?:[\w.-]+:)?RDF\s*>", re.S)
_XMLNS = re.compile(rb"xmlns:([\w.-]+)\s*=\s*(\"[^\"]*\"|'[^']*')")
# "Clipart by Nicu Buculei - piggybank": the author credit is not a description.


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
