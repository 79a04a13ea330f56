"""Dataset preparation: openclipart cleaning, captions, splits, rendering; Karpathy prepare; precomp import; verify."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_checks import one_error_line
from PIL import Image
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data import openclipart as oc
from vsectl.data import prepare as prep
from vsectl.data.prepare import import_precomp, prepare_karpathy
from vsectl.data.raw import load_raw_dataset
from vsectl.data.sources import load_split
from vsectl.data.store import read_store_attrs
from vsectl.data.verify import verify_path
from vsectl.errors import DataError
from vsectl.runtime import NullProgress

FIXTURE = Path(__file__).parent / "fixtures" / "clipart_mini"
D = 4


def svg(title: str = "", description: str = "", keywords: tuple[str, ...] = (), creator: str = "",
        shape: str = '<rect x="2" y="2" width="6" height="4" fill="#c00"/>') -> str:
    """A tiny SVG with Open Clip Art style RDF metadata (an empty field is left out)."""
    meta = ""
    if title or description or keywords or creator:
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        meta = (
            '<metadata><rdf:RDF><cc:Work rdf:about="">'
            + (f"<dc:title>{title}</dc:title>" if title else "")
            + (f"<dc:description>{description}</dc:description>" if description else "")
            + (f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>" if keywords else "")
            + (f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>" if creator else "")
            + "</cc:Work></rdf:RDF></metadata>"
        )
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        f'width="10" height="10" viewBox="0 0 10 10">{meta}{shape}</svg>'
    )


def record(title: str, description: str = "", keywords: list[str] | None = None, creator: str = "Ann Artist",
           source: str = "animals/x.svg") -> oc.SvgRecord:
    return oc.SvgRecord(source=source, path=Path(source), sha256=title + source, title=title,
                        description=description, keywords=keywords or [], creator=creator)


# --- metadata and cleaning -----------------------------------------------------------------------------------------


def test_parse_svg_metadata_reads_title_description_keywords_and_creator() -> None:
    data = svg("Red Apple", "A shiny red apple.\nSecond line.", ("fruit", "food"), "Ann Artist").encode()
    meta = oc.parse_svg_metadata(data)
    assert meta == {"title": "Red Apple", "description": "A shiny red apple.\nSecond line.",
                    "keywords": ["fruit", "food"], "creator": "Ann Artist"}


def test_parse_svg_metadata_handles_missing_metadata() -> None:
    assert oc.parse_svg_metadata(svg().encode()) is None
    meta = oc.parse_svg_metadata(svg(keywords=("dog",)).encode())
    assert meta == {"title": "", "description": "", "keywords": ["dog"], "creator": ""}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Untitled", ""),
        ("drawing", ""),
        ("image 3", ""),
        ("SVG", ""),
        ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", ""),
        ("Clipart by Nicu Buculei - piggybank", ""),
        ("Lemon SVG theme", ""),
        ("Tigre02", "tigre"),
        ("Flat_Cake_bw", "flat cake"),
        ("Lemon (Whole)", "lemon"),
        ("PiggyBank", "piggy bank"),
        ("Dog 01 Drawn With Straight Lines", "dog drawn with straight lines"),
    ],
)
def test_clean_title(raw: str, expected: str) -> None:
    assert oc.clean_title(raw) == expected


def test_clean_title_removes_author_name_words() -> None:
    assert oc.clean_title("Rollandin Cat", names={"rollandin"}) == "cat"


def test_boilerplate_is_found_by_frequency_not_a_fixed_list() -> None:
    rules = oc.CleanRules(max_title_repeats=2, max_desc_repeats=2, min_word_creators=1)
    many = [record("Zork Icon Set Item", f"Made for project Zork {i // 9}", source=f"a/{i}.svg") for i in range(3)]
    desc = [record(f"dog {w}", "Part of the Zork bundle.", ["dog"], source=f"b/{w}.svg") for w in ("one", "two", "x")]
    items, counts = oc.clean_records(many + desc, rules)
    assert counts["boilerplate_title"] == 3  # the same title on 3 > 2 files
    assert [it.title for it in items] == ["dog one", "dog two", "dog x"]
    assert all("Zork" not in c for it in items for c in it.captions)  # description on 3 > 2 files dropped


def test_clean_records_drops_generic_and_ungrounded_titles_and_excluded_folders() -> None:
    recs = [record("untitled", keywords=["dog"]), record("Cane", keywords=["bird"], creator="Solo Author"),
            record("Cat", keywords=["cat"]), record("Cat sitting", source="signs_and_symbols/flags/cat.svg")]
    items, counts = oc.clean_records(recs, oc.CleanRules(max_keyword_share=1.0))  # few files: no keyword is common
    assert [it.title for it in items] == ["cat"]  # "cane" is grounded by no second author nor its own keywords
    assert counts == {"excluded_folder": 1, "boilerplate_title": 0, "no_informative_title": 2, "kept": 1}


def test_clean_keywords_drops_authors_stop_words_and_repeats() -> None:
    kept = oc.clean_keywords(["Ann Artist", "hash", "icons", "", "animals", "Dogs", "dog", "artist things", "x1",
                              "a_very_long_keyword_that_goes_on", "red ball"], names={"artist"}, drop={"ann artist"})
    assert kept == ["dogs", "red ball"]


def test_build_captions_rules() -> None:
    caps = oc.build_captions("red apple", "A shiny red apple on a table", ["fruit", "apple", "food", "snack", "x"])
    assert caps == ["Red apple.", "A shiny red apple on a table.", "Red apple, with keywords fruit, food and snack."]
    assert oc.build_captions("red apple", "Red apple", []) == ["Red apple."]  # the description only repeats it
    assert oc.build_captions("", "", ["cat"]) == ["A drawing, with keywords cat."]


def test_first_sentence_skips_addresses_and_dumps() -> None:
    assert oc.first_sentence("A big dog. It barks.", 30) == "A big dog"
    assert oc.first_sentence("jean@example.com", 30) == ""
    assert oc.first_sentence("HASH(0x874ce84)", 30) == ""
    assert oc.first_sentence("one two three four", 2) == "one two"


def test_scan_svgs_drops_duplicate_content(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cat.svg").write_text(svg("Cat", keywords=("cat",)))
    (tmp_path / "b.svg").write_text(svg("Cat", keywords=("cat",)))  # same bytes, another path
    (tmp_path / "c.svg").symlink_to(tmp_path / "b.svg")
    (tmp_path / "d.svg").write_text(svg("Dog"))
    (tmp_path / "e.svg").write_text(svg())  # no metadata
    records, counts = oc.scan_svgs(tmp_path, NullProgress())
    assert counts == {"svg_files": 5, "unique": 3, "with_metadata": 2}
    assert [r.source for r in records] == ["a/cat.svg", "d.svg"]  # first path in sorted order wins


# --- splits --------------------------------------------------------------------------------------------------------


def test_assign_splits_keeps_groups_together_and_fills_test_first() -> None:
    rng = np.random.default_rng(0)
    groups = [f"title {int(g)}" for g in rng.integers(0, 40, size=200)]
    splits = oc.assign_splits(groups, min_test=30, n_dev=20)
    by_group: dict[str, set[str]] = {}
    for g, s in zip(groups, splits, strict=True):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    assert splits.count("test") >= 30 and splits.count("val") >= 20 and splits.count("train") > 0
    assert oc.assign_splits(groups, min_test=30, n_dev=20) == splits  # deterministic
    assert oc.assign_splits(list(reversed(groups)), 30, 20) == list(reversed(splits))  # order-free, hash based


# --- rendering -----------------------------------------------------------------------------------------------------


def test_render_png_gives_rgb_on_white(tmp_path: Path) -> None:
    src = tmp_path / "x.svg"
    src.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="5"><rect x="0" y="0" width="10" '
                   'height="5" fill="#0000ff" fill-opacity="1"/></svg>')
    oc.render_png(str(src), str(tmp_path / "x.png"), 20)
    im = Image.open(tmp_path / "x.png")
    assert im.mode == "RGB" and im.size == (20, 20)
    assert im.getpixel((10, 2)) == (255, 255, 255)  # letterbox above the wide drawing
    assert im.getpixel((10, 8)) == (0, 0, 255)
    assert list(tmp_path.glob("*.tmp")) == []


def busy(seconds: float) -> None:
    """Spend `seconds` of CPU time (a render that is slow because of its work, not because the machine is busy)."""
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def sleepy_render(src: str, dst: str, size: int) -> None:
    """Hangs (spinning on the CPU) on files named hang*.svg; renders the others (runs in a forked worker)."""
    if Path(src).name.startswith("hang"):
        busy(60)
    oc.render_png(src, dst, size)


def test_hung_render_is_killed_skipped_and_counted(tmp_path: Path) -> None:
    tasks = []
    for name in ("a", "hang", "b"):
        (tmp_path / f"{name}.svg").write_text(svg(name))
        tasks.append((name, str(tmp_path / f"{name}.svg"), str(tmp_path / f"{name}.png"), 8))
    start = time.monotonic()
    results = {key: status for key, status, _ in oc.render_all(tasks, workers=2, timeout=0.5, render_fn=sleepy_render)}
    assert time.monotonic() - start < 5
    assert results == {"a": "ok", "hang": "timeout", "b": "ok"}
    assert not (tmp_path / "hang.png").exists()


def slow_cat_render(src: str, dst: str, size: int) -> None:
    """cat.svg takes 0.6 s of CPU, past a 0.25 s limit but within the retry's 1 s."""
    if Path(src).name == "cat.svg":
        busy(0.6)
    oc.render_png(src, dst, size)


def waiting_render(src: str, dst: str, size: int) -> None:
    """Every file waits 1 s on the clock, using no CPU: what a render looks like on a machine busy with other work."""
    time.sleep(1.0)
    oc.render_png(src, dst, size)


def test_a_render_slowed_by_a_busy_machine_is_not_cut_off(tmp_path: Path) -> None:
    """The limit counts CPU time: the demo's data set must not lose an image because other work shared the cores."""
    tasks = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.svg").write_text(svg(name))
        tasks.append((name, str(tmp_path / f"{name}.svg"), str(tmp_path / f"{name}.png"), 8))
    results = {key: status for key, status, _ in oc.render_all(tasks, workers=2, timeout=0.5, render_fn=waiting_render)}
    assert results == {"a": "ok", "b": "ok"}


def test_a_render_that_times_out_is_retried_once_with_a_longer_limit(tmp_path: Path) -> None:
    src, out = make_svg_dir(tmp_path / "svg"), tmp_path / "out"
    oc.prepare_openclipart(out, from_dir=src, size=16, workers=2, min_test=3, dev_fraction=0.2, timeout=0.25,
                           render_fn=slow_cat_render)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["rendered"] == 12 and counts["render_timed_out"] == 0
    assert 0.25 * oc.RENDER_RETRY_FACTOR < 60  # a hang is still cut off: see test_hung_render_is_killed...


def counting_render(src: str, dst: str, size: int) -> None:
    """Logs each render to renders.log in the dataset folder (the parent of images/), then renders."""
    with open(Path(dst).parent.parent / "renders.log", "a") as f:
        f.write(Path(src).name + "\n")
    oc.render_png(src, dst, size)


def make_svg_dir(root: Path, n: int = 12) -> Path:
    animals = ["cat", "dog", "horse", "cow", "sheep", "goat", "duck", "goose", "fish", "bird", "frog", "bear"]
    for k in range(n):
        sub = root / ("animals" if k % 2 else "food")
        sub.mkdir(parents=True, exist_ok=True)
        colour = f"#{(k * 20) % 256:02x}40{(255 - k * 20) % 256:02x}"
        shape = f'<circle cx="5" cy="5" r="{1 + k % 4}" fill="{colour}"/>'
        (sub / f"{animals[k]}.svg").write_text(svg(f"Happy {animals[k]}", "", (animals[k], "animal"),
                                                    f"Author {k % 3}", shape))
    return root


def test_prepare_openclipart_builds_a_raw_dataset_and_rerun_skips_work(tmp_path: Path) -> None:
    src, out = make_svg_dir(tmp_path / "svg"), tmp_path / "out"
    kwargs: dict[str, Any] = dict(from_dir=src, size=16, workers=2, min_test=3, dev_fraction=0.2,
                                  render_fn=counting_render)
    oc.prepare_openclipart(out, **kwargs)
    renders = (out / "renders.log").read_text().splitlines()
    assert len(renders) == 12
    data = load_raw_dataset(out)
    assert len(data) == 12 and len(data.split("test")) >= 3 and len(data.split("dev")) >= 2
    assert all(im["path"].is_file() and im["captions"] for im in data.images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["rendered"] == 12 and manifest["image_root"] == "images"
    assert set(manifest["checksums"]["images"]) == {p.name for p in (out / "images").glob("*.png")}
    assert (out / "LICENSE.txt").is_file() and (out / "PROVENANCE.md").is_file()
    oc.prepare_openclipart(out, **kwargs)  # finished: returns at once
    (out / "manifest.json").unlink()
    oc.prepare_openclipart(out, **kwargs)  # unfinished: PNGs with matching source hashes are reused
    assert len((out / "renders.log").read_text().splitlines()) == 12
    assert json.loads((out / "manifest.json").read_text())["counts"]["render_reused"] == 12


# --- karpathy ------------------------------------------------------------------------------------------------------


def make_karpathy(root: Path, missing: str | None = None) -> tuple[Path, Path]:
    images = root / "imgs"
    entries = []
    for k, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                         ("test", "val2014")]):
        (images / folder).mkdir(parents=True, exist_ok=True)
        name = f"im{k}.jpg"
        if name != missing:
            Image.new("RGB", (4, 4), (k * 40, 0, 0)).save(images / folder / name, format="JPEG")
        sentences = [{"raw": f"caption {j} of image {k}", "tokens": []} for j in range(k + 1)]
        entries.append({"filename": name, "filepath": folder, "cocoid": 100 + k, "split": split,
                        "sentences": sentences})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path, images


def test_prepare_karpathy_and_load_raw_dataset_round_trip(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path)
    out = prepare_karpathy(json_path, images, tmp_path / "raw")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_root"] == str(images.resolve()) and manifest["counts"]["restval_to_train"] == 1
    data = load_raw_dataset(out, check_files=True)
    assert [im["split"] for im in data.images] == ["train", "train", "dev", "test"]
    assert [im["id"] for im in data.split("dev")] == ["102"]
    assert data.images[1]["path"] == images.resolve() / "val2014" / "im1.jpg"
    assert [len(im["captions"]) for im in data.images] == [1, 2, 3, 4]
    assert data.images[3]["captions"][0] == "caption 0 of image 3"
    stored = json.loads((out / "dataset.json").read_text())["images"][0]["sentences"][0]
    assert stored["tokens"] == ["caption", "0", "of", "image", "0"]  # empty tokens are filled in


def test_prepare_karpathy_missing_image_names_it(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path, missing="im2.jpg")
    with pytest.raises(DataError, match=r"1 of 4 images are missing.*val2014/im2\.jpg"):
        prepare_karpathy(json_path, images, tmp_path / "raw")


def test_load_raw_dataset_requires_manifest(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="manifest.json"):
        load_raw_dataset(tmp_path)


# --- import-precomp ------------------------------------------------------------------------------------------------


def write_precomp(folder: Path, split: str, n: int, per_caption: bool, k: int = 3, nan_image: int | None = None,
                  empty_caption: int | None = None, first_id: int = 100) -> np.ndarray:
    """SCAN precomp files with random features; returns the (n, k, D) unique-image features."""
    folder.mkdir(parents=True, exist_ok=True)
    feats = np.random.default_rng(n).normal(size=(n, k, D)).astype(np.float32)
    if nan_image is not None:
        feats[nan_image, 1, 2] = np.nan
    stride = 5 if per_caption else 1
    np.save(folder / f"{split}_ims.npy", np.repeat(feats, stride, axis=0))
    caps = [f"caption {c} of image {c // 5}" for c in range(5 * n)]
    if empty_caption is not None:
        caps[empty_caption] = ""
    (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    (folder / f"{split}_ids.txt").write_text("\n".join(str(first_id + i // stride) for i in range(n * stride)) + "\n")
    return feats


@pytest.mark.parametrize("per_caption", [False, True])
def test_import_precomp_round_trip_in_chunks_through_memmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_caption: bool
) -> None:
    feats = write_precomp(tmp_path / "src", "train", n=7, per_caption=per_caption)
    calls: list[dict] = []
    real_load = np.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    paths = import_precomp(tmp_path / "src", tmp_path / "store", chunk_images=3)
    assert paths == [tmp_path / "store" / "train.h5"]
    assert calls and all(c.get("mmap_mode") == "r" for c in calls)
    split = load_split(tmp_path / "store", "train")
    assert split.image_ids == [str(100 + i) for i in range(7)]
    np.testing.assert_array_equal(np.stack([split.features.get(i) for i in range(7)]), feats)
    assert split.captions[5] == "caption 5 of image 1" and split.cap2img.tolist() == [c // 5 for c in range(35)]
    attrs = read_store_attrs(paths[0])
    facts = json.loads(attrs["source_files"])["train_ims.npy"]
    assert facts["size"] == (tmp_path / "src" / "train_ims.npy").stat().st_size


def test_import_precomp_skips_finished_split_unless_forced(tmp_path: Path) -> None:
    write_precomp(tmp_path / "src", "dev", n=2, per_caption=False)
    write_precomp(tmp_path / "src", "test", n=2, per_caption=False)
    store = tmp_path / "store"
    import_precomp(tmp_path / "src", store, dtype="float16")
    stamp = (store / "dev.h5").stat().st_mtime_ns
    import_precomp(tmp_path / "src", store)
    assert (store / "dev.h5").stat().st_mtime_ns == stamp
    import_precomp(tmp_path / "src", store, splits=["dev"], force=True)
    assert (store / "dev.h5").stat().st_mtime_ns != stamp
    with pytest.raises(DataError, match="'train'"):
        import_precomp(tmp_path / "src", store, splits=["train"])


def test_import_precomp_wrong_caption_count_raises(tmp_path: Path) -> None:
    write_precomp(tmp_path, "test", n=2, per_caption=False)
    (tmp_path / "test_caps.txt").write_text("only one\n")
    with pytest.raises(DataError, match="5 consecutive captions per image"):
        import_precomp(tmp_path, tmp_path / "store")
    assert not (tmp_path / "store" / "test.h5").exists()


# --- verify --------------------------------------------------------------------------------------------------------


def test_verify_reports_clean_data_as_clean(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n=4, per_caption=True)
    write_precomp(tmp_path / "s", "test", n=3, per_caption=False, first_id=200)
    import_precomp(tmp_path / "s", tmp_path)
    report = verify_path(tmp_path)
    assert report["ok"] and report["kind"] == "features", report["problems"]
    assert report["splits"]["train"]["images"] == 4 and report["splits"]["train"]["row_stride"] == 5
    assert report["splits"]["test"]["set_size"] == {"min": 3.0, "mean": 3.0, "max": 3.0}
    assert report["splits"]["test"]["captions_per_image"]["mean"] == 5.0


def test_verify_finds_nan_features_in_precomp_and_store(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n=6, per_caption=False, nan_image=4)
    train = verify_path(tmp_path)["splits"]["train"]
    assert train["nonfinite_values"] == 1 and train["nonfinite_images"] == 1
    assert "image 4" in train["problems"][0]


def test_verify_finds_empty_captions_and_shared_ids(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n=3, per_caption=False, empty_caption=7)
    write_precomp(tmp_path, "dev", n=3, per_caption=False)  # same ids 100..102 as train
    report = verify_path(tmp_path)
    assert report["splits"]["train"]["empty_captions"] == 1
    assert report["overlaps"] == [{"splits": ["train", "dev"], "by": "image id", "count": 3,
                                   "examples": ["100", "101", "102"]}]
    assert not report["ok"]


def test_verify_raw_finds_corrupt_and_shared_images(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path)
    out = prepare_karpathy(json_path, images, tmp_path / "raw")
    assert verify_path(out)["ok"]
    (images / "val2014" / "im3.jpg").write_bytes(b"not a jpeg")
    (images / "val2014" / "im2.jpg").write_bytes((images / "train2014" / "im0.jpg").read_bytes())
    report = verify_path(out)
    assert report["splits"]["test"]["unreadable_images"] == 1
    assert any(o["by"] == "image file" and o["examples"] == ["im0.jpg"] for o in report["overlaps"])
    assert len(report["problems"]) == 2 and report["warnings"] == []


def test_verify_raw_shared_titles_are_problems_shared_first_captions_warnings(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path)
    data = json.loads(json_path.read_text())
    for entry in data["images"]:
        entry["sentences"][0]["raw"] = "A man rides a wave."
    json_path.write_text(json.dumps(data))
    report = verify_path(prepare_karpathy(json_path, images, tmp_path / "raw"))
    shared = [w for w in report["warnings"] if " share " in w]
    assert report["ok"] and len(shared) == 3  # train/dev, train/test, dev/test
    for entry in data["images"]:
        entry["title"] = "wave"
    json_path.write_text(json.dumps(data))
    report = verify_path(prepare_karpathy(json_path, images, tmp_path / "raw"))
    assert not report["ok"] and all("title" in p for p in report["problems"])


# --- CLI -----------------------------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_prepare_karpathy_and_verify(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path)
    result = runner.invoke(app, ["data", "prepare", "karpathy", "--json", str(json_path), "--images", str(images),
                                 "--out", str(tmp_path / "raw")])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "raw")
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_cli_user_mistakes_exit_2_with_one_line(tmp_path: Path) -> None:
    json_path, images = make_karpathy(tmp_path, missing="im1.jpg")
    result = runner.invoke(app, ["data", "prepare", "karpathy", "--json", str(json_path), "--images", str(images),
                                 "--out", str(tmp_path / "raw")])
    assert result.exit_code == 2 and "im1.jpg" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    result = runner.invoke(app, ["data", "import-precomp", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_cli_import_precomp_then_verify_nan_exits_2(tmp_path: Path) -> None:
    write_precomp(tmp_path / "src", "test", n=3, per_caption=False)
    result = runner.invoke(app, ["data", "import-precomp", str(tmp_path / "src"), "--out", str(tmp_path / "s"),
                                 "--dtype", "float16", "--splits", "test"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["data", "verify", str(tmp_path / "s" / "test.h5")]).exit_code == 0
    write_precomp(tmp_path / "bad", "test", n=3, per_caption=False, nan_image=0)
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "NaN/inf" in " ".join(result.output.split())


def test_cli_verify_is_quiet_with_q_and_json_only_with_json(tmp_path: Path) -> None:
    write_precomp(tmp_path / "good", "test", n=3, per_caption=False)
    for argv in (["-q", "data", "verify", str(tmp_path / "good")], ["data", "verify", str(tmp_path / "good"), "-q"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and result.stdout == "" and result.stderr == "", result.output
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "good"), "--json"])
    assert result.exit_code == 0 and result.stderr == "" and json.loads(result.stdout)["ok"] is True
    write_precomp(tmp_path / "bad", "test", n=3, per_caption=False, nan_image=0)
    result = runner.invoke(app, ["-q", "data", "verify", str(tmp_path / "bad")])
    assert result.stdout == "" and "NaN/inf" in one_error_line(result)
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "bad"), "--json"])
    assert json.loads(result.stdout)["ok"] is False and "NaN/inf" in one_error_line(result)
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "bad")])  # without -q: the table, then the line
    assert "feature dim" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: ")


# --- the committed fixture -----------------------------------------------------------------------------------------


def test_clipart_mini_fixture_loads_and_is_small() -> None:
    data = load_raw_dataset(FIXTURE, check_files=True)
    assert 300 <= len(data) <= 400 and len(data.split("test")) >= 100
    assert all(im["captions"] for im in data.images)
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size <= 3 * 2**20
    assert Image.open(data.images[0]["path"]).mode == "RGB"


def test_prepare_module_never_loads_whole_arrays() -> None:
    source = Path(prep.__file__).read_text()
    assert "np.load(" not in source  # features come only through load_split's memmap
