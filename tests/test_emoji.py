"""The emoji dataset: emoji-test.txt and CLDR parsing, cleaning rules, captions, split groups, drawing, the driver.

Drawing is tested with a tiny outline font built here with fontTools (shapes, two ZWJ ligatures, an empty glyph, a
missing one); the driver with three tiny .debs built from tests/fixtures/emoji_mini and that font.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data import emoji as em
from vsectl.data.emoji import sources
from vsectl.data.raw import load_raw_dataset
from vsectl.data.verify import verify_path
from vsectl.errors import DataError
from vsectl.io import sha256_file

FIXTURE = Path(__file__).parent / "fixtures" / "emoji_mini"
runner = CliRunner()


# --- a tiny test font --------------------------------------------------------------------------------------------

UPM = 1000


def _poly(pen, points):  # noqa: ANN001 - a fontTools pen and a list of points
    pen.moveTo(points[0])
    for p in points[1:]:
        pen.lineTo(p)
    pen.closePath()


SHAPES = {  # glyph name → polygons in font units (the em box is 0..1000 wide, -200..800 high)
    ".notdef": [[(100, -100), (900, -100), (900, 700), (100, 700)], [(200, 0), (200, 600), (800, 600), (800, 0)]],
    "grin": [[(150, -50), (150, 650), (850, 650), (850, -50)]],
    "bigeyes": [[(500, -100), (100, 300), (500, 700), (900, 300)]],
    "heart": [[(100, 600), (900, 600), (500, -100)]],
    "person": [[(400, -100), (400, 700), (600, 700), (600, -100)]],
    "man": [[(300, -100), (300, 700), (450, 700), (450, -100)]],
    "woman": [[(550, -100), (550, 700), (700, 700), (700, -100)]],
    "pan": [[(100, 0), (100, 200), (900, 200), (900, 0)]],
    "tone": [[(100, 500), (100, 700), (900, 700), (900, 500)]],
    "cook": [[(100, -100), (100, 700), (300, 700), (300, -100)], [(500, 0), (500, 400), (900, 400), (900, 0)]],
    "mancook": [[(100, -100), (500, 700), (900, -100)]],
    "bulb": [[(150, -50), (150, 650), (850, 650), (850, -50)]],
    "torch": [],
    "zwj": [],
    "vs16": [],
}
CMAP = {0x1F600: "grin", 0x1F603: "bigeyes", 0x2764: "heart", 0x1F9D1: "person", 0x1F468: "man", 0x1F469: "woman",
        0x1F373: "pan", 0x1F3FB: "tone", 0x1F4A1: "bulb", 0x1F526: "torch", 0x200D: "zwj", 0xFE0F: "vs16"}
FEATURES = """
languagesystem DFLT dflt;
feature ccmp {
    sub person zwj pan by cook;
    sub man zwj pan by mancook;
} ccmp;
"""


def build_emoji_font(path: Path) -> Path:
    """Write the test font to `path` (a TrueType file) and return it."""
    from fontTools.feaLib.builder import addOpenTypeFeaturesFromString
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    fb = FontBuilder(UPM, isTTF=True)
    fb.setupGlyphOrder(list(SHAPES))
    fb.setupCharacterMap(CMAP)
    glyphs = {}
    for name, polys in SHAPES.items():
        pen = TTGlyphPen(None)
        for poly in polys:
            _poly(pen, poly)
        glyphs[name] = pen.glyph()
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (0 if n in ("zwj", "vs16") else UPM, 0) for n in SHAPES})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "VsectlTestEmoji", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    addOpenTypeFeaturesFromString(fb.font, FEATURES)
    fb.save(str(path))
    return path


@pytest.fixture(scope="module")
def font(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("fontTools", reason="the emoji tests build their font with fontTools (the dev extra)")
    return build_emoji_font(tmp_path_factory.mktemp("font") / "test-emoji.ttf")


def catalog() -> tuple[list[em.EmojiEntry], dict[str, em.Annotation]]:
    return em.load_catalog(FIXTURE / "emoji-test.txt", FIXTURE / "annotations" / "en.xml",
                           FIXTURE / "annotationsDerived" / "en.xml")


# --- parsing -----------------------------------------------------------------------------------------------------

def test_parse_emoji_test_reads_sequences_status_group_and_subgroup() -> None:
    entries = em.parse_emoji_test((FIXTURE / "emoji-test.txt").read_text(encoding="utf-8"))
    assert len(entries) == 14
    heart = entries[2]
    assert heart.seq == "\u2764\ufe0f" and heart.status == "fully-qualified" and heart.name == "red heart"
    assert (heart.group, heart.subgroup, heart.version) == ("Smileys & Emotion", "heart", "0.6")
    assert entries[3].status == "unqualified"
    cook = next(e for e in entries if e.name == "man cook")
    assert cook.seq == "\U0001F468\u200d\U0001F373" and cook.subgroup == "person-role"
    assert [e.group for e in entries if e.status == "component"] == ["Component"]
    with pytest.raises(DataError, match="cannot read the line"):
        em.parse_emoji_test("# group: X\n1F600 ; fully-qualified\n")
    with pytest.raises(DataError, match="lists no emoji"):
        em.parse_emoji_test("# just comments\n")


def test_parse_annotations_keys_without_fe0f_and_merges_derived() -> None:
    _, names = catalog()
    assert names["\u2764"].name == "red heart" and names["\u2764"].keywords == ["heart"]
    assert names["\U0001F600"].keywords == ["face", "grin", "grinning face"]
    assert names["\U0001F468\U0001F3FB\u200d\U0001F373"].name == "man cook: light skin tone"  # from the derived file
    assert names["{"].name == "open curly bracket"  # not an emoji: emoji-test.txt decides what is one
    with pytest.raises(DataError, match="not valid XML"):
        em.parse_annotations(b"<ldml><annotations>")


# --- cleaning, captions, groups ----------------------------------------------------------------------------------

def test_select_emoji_applies_each_rule_once_and_counts_it() -> None:
    entries, names = catalog()
    items, counts = em.select_emoji(entries, names, em.EmojiRules())
    assert counts == {"listed": 14, "component": 1, "not_fully_qualified": 1, "excluded_subgroup": 1,
                      "skin_tone_variant": 1, "no_cldr_name": 1, "kept": 9, "captions_ambiguous_dropped": 2}
    assert [it.name for it in items] == ["grinning face", "grinning face with big eyes", "red heart", "cook",
                                         "man cook", "woman cook", "light bulb", "flashlight", "candle"]
    _, counts = em.select_emoji(entries, names, em.EmojiRules(skin_tones=True, exclude_subgroups=()))
    assert counts["skin_tone_variant"] == 0 and counts["excluded_subgroup"] == 0 and counts["kept"] == 11


def test_captions_name_keywords_and_keywords_alone() -> None:
    assert em.build_captions("grinning face", ["face", "grin", "grinning face"]) == [
        "Grinning face.", "Grinning face, with keywords grin.", "An emoji with keywords face and grin."]
    assert em.build_captions("flashlight", ["electric", "light", "tool", "torch"], max_keywords=2) == [
        "Flashlight.", "Flashlight, with keywords electric and light.",
        "An emoji with keywords electric, light, tool and torch."]
    assert em.build_captions("red heart", ["heart", "love"]) == ["Red heart.", "Red heart, with keywords love.",
                                                                 "An emoji with keywords heart and love."]
    assert em.build_captions("kick scooter", ["kick", "scooter"]) == ["Kick scooter."]  # only the name's words
    assert em.build_captions("cook", ["cook"]) == ["Cook."]  # the only keyword is the name
    assert em.build_captions("candle", ["candle", "light"], keyword_caption=False) == [
        "Candle.", "Candle, with keywords light."]


def test_a_caption_two_emoji_would_share_is_dropped_from_both() -> None:
    entries, names = catalog()
    items, _ = em.select_emoji(entries, names, em.EmojiRules())
    by_name = {it.name: it.captions for it in items}
    assert by_name["grinning face"] == ["Grinning face.", "Grinning face, with keywords grin."]
    assert by_name["grinning face with big eyes"] == ["Grinning face with big eyes.",
                                                      "Grinning face with big eyes, with keywords grin."]
    texts = [c.casefold() for caps in by_name.values() for c in caps]
    assert len(texts) == len(set(texts))


@pytest.mark.parametrize(("a", "b"), [
    ("\U0001F468\u200d\U0001F373", "\U0001F469\u200d\U0001F373"),  # man cook, woman cook
    ("\U0001F9D1\u200d\U0001F373", "\U0001F468\U0001F3FD\u200d\U0001F373"),  # cook, man cook: medium skin tone
    ("\U0001F926\u200d\u2640\ufe0f", "\U0001F926\U0001F3FF"),  # woman facepalming, person facepalming: dark tone
    ("\U0001F468\u200d\U0001F9B0", "\U0001F469\u200d\U0001F9B3"),  # man: red hair, woman: white hair
    ("\U0001F491", "\U0001F469\u200d\u2764\ufe0f\u200d\U0001F468"),  # couple with heart, couple: woman, man
    ("\U0001F46A", "\U0001F468\u200d\U0001F468\u200d\U0001F466"),  # family, family: man, man, boy
    ("\U0001F474", "\U0001F475"),  # old man, old woman
])
def test_look_alikes_share_a_group(a: str, b: str) -> None:
    assert em.group_key(a) == em.group_key(b)


def test_different_pictures_get_different_groups() -> None:
    seqs = ["\U0001F600", "\U0001F603", "\u2764\ufe0f", "\U0001F373", "\U0001F9D1\u200d\U0001F373",
            "\U0001F9D1\u200d\U0001F393", "\U0001F491", "\U0001F48F", "\U0001F9D1"]
    assert len({em.group_key(s) for s in seqs}) == len(seqs)


# --- drawing -----------------------------------------------------------------------------------------------------

def test_renderer_draws_ligatures_and_says_why_others_cannot_be_drawn(font: Path) -> None:
    r = em.EmojiRenderer(font, 32, font_size=40)
    drawn = {}
    for seq in ["\U0001F600", "\u2764\ufe0f", "\U0001F9D1\u200d\U0001F373", "\U0001F468\u200d\U0001F373"]:
        image, why = r.render(seq)
        assert why == "ok" and image is not None and image.mode == "RGB" and image.size == (32, 32)
        assert image.getpixel((0, 0)) == (255, 255, 255) and image.getextrema() == ((0, 255),) * 3  # margin, ink
        drawn[seq] = em.pixel_sha256(image)
    assert len(set(drawn.values())) == 4  # the two ligatures are their own glyphs, not their parts
    assert r.render("\U0001F469\u200d\U0001F373") == (None, "several_glyphs")  # no ligature in the font
    assert r.render("\U0001F526") == (None, "blank")
    assert r.render("\U0001F56F\ufe0f") == (None, "missing_glyph")
    assert em.pixel_sha256(r.render("\U0001F4A1")[0]) == drawn["\U0001F600"]  # same outline, same pixels


def test_load_font_refuses_a_file_that_is_not_a_font(tmp_path: Path) -> None:
    (tmp_path / "x.ttf").write_bytes(b"not a font")
    with pytest.raises(DataError, match="cannot open the font"):
        em.load_font(tmp_path / "x.ttf")


# --- the driver, on three tiny .debs -----------------------------------------------------------------------------

def build_deb(root: Path, package: str, files: dict[str, Path], out: Path) -> Path:
    tree = root / package
    for rel, src in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tree / rel)
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.0-test\nArchitecture: all\nMaintainer: vsectl tests <t@example.org>\n"
        f"Description: vsectl test package\n")
    deb = out / f"{package}_1.0-test_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory, font: Path) -> Path:
    if shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None:
        pytest.skip("dpkg-deb is not installed: `vsectl data prepare emoji` unpacks Debian packages with dpkg")
    work, out = tmp_path_factory.mktemp("debs-src"), tmp_path_factory.mktemp("debs")
    build_deb(work, sources.FONT_PACKAGE, {sources.FONT_FILE: font}, out)
    build_deb(work, sources.LIST_PACKAGE, {sources.EMOJI_TEST: FIXTURE / "emoji-test.txt"}, out)
    build_deb(work, sources.NAMES_PACKAGE, {sources.ANNOTATIONS: FIXTURE / "annotations" / "en.xml",
                                            sources.DERIVED: FIXTURE / "annotationsDerived" / "en.xml"}, out)
    return out


def test_prepare_emoji_builds_a_raw_dataset_with_grouped_splits(debs: Path, font: Path, tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        out = em.prepare_emoji(tmp_path / "out", cache=tmp_path / "cache", from_debs=debs, size=16, min_test=1,
                               dev_fraction=0.2)
    finally:
        os.umask(old)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert (counts["kept"], counts["several_glyphs"], counts["blank"], counts["missing_glyph"],
            counts["duplicate_renders"], counts["images"]) == (9, 1, 1, 1, 1, 5)
    data = load_raw_dataset(out, check_files=True)
    assert [im["title"] for im in data.images] == ["grinning face", "grinning face with big eyes", "red heart",
                                                   "cook", "man cook"]
    split_of = {im["title"]: im["split"] for im in data.images}
    assert split_of["cook"] == split_of["man cook"]  # one picture up to gender: one split
    assert {s: len(data.split(s)) for s in ("train", "dev", "test")} == {
        s: v["images"] for s, v in zip(("train", "dev", "test"), counts["splits"].values(), strict=True)}
    assert len(data.split("test")) >= 1 and len(data.split("dev")) >= 1
    caption_split: dict[str, str] = {}
    for im in data.images:
        for c in im["captions"]:
            assert caption_split.setdefault(c.casefold(), im["split"]) == im["split"]
    entry = json.loads((out / "dataset.json").read_text())["images"][2]
    assert entry["filename"] == "2764-fe0f.png" and entry["codepoints"] == "U+2764 U+FE0F"
    pkgs = manifest["source"]["packages"]
    assert set(pkgs) == set(sources.PACKAGES) and all(p["version"] == "1.0-test" for p in pkgs.values())
    assert pkgs[sources.FONT_PACKAGE]["files"] == {sources.FONT_FILE: sha256_file(font)}
    assert pkgs[sources.FONT_PACKAGE]["deb_sha256"] == sha256_file(debs / "fonts-noto-color-emoji_1.0-test_all.deb")
    assert set(manifest["checksums"]["images"]) == {p.name for p in (out / "images").glob("*.png")}
    assert all((p.stat().st_mode & 0o777) == 0o664 for p in (out / "images").glob("*.png"))
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o664
    assert "Unicode" in (out / "LICENSE.txt").read_text() and "1.0-test" in (out / "PROVENANCE.md").read_text()
    assert verify_path(out)["problems"] == []
    stamp = (out / "manifest.json").stat().st_mtime_ns
    em.prepare_emoji(out, cache=tmp_path / "cache", from_debs=debs, size=16, min_test=1, dev_fraction=0.2)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # finished with the same settings: nothing redone
    again = em.prepare_emoji(tmp_path / "again", cache=tmp_path / "cache", from_debs=debs, size=16, min_test=1,
                             dev_fraction=0.2)
    assert (again / "dataset.json").read_bytes() == (out / "dataset.json").read_bytes()  # deterministic


def test_cli_prepare_emoji_and_its_one_line_errors(debs: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "emoji", "--from-debs", str(debs), "--cache",
                                 str(tmp_path / "c"), "--out", str(tmp_path / "o"), "--size", "16", "--min-test", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "o")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["data", "prepare", "emoji", "--from-debs", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no fonts-noto-color-emoji_*.deb in" in " ".join(result.output.split())
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "o2").exists()


def test_no_apt_get_is_one_line_naming_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on it
    with pytest.raises(DataError, match=r"cannot download unicode-data: `apt-get` is not installed.*--from-debs"):
        sources.fetch_deb(tmp_path / "cache", "unicode-data")
