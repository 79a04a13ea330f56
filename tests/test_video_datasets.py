"""`data prepare msrvtt | vatex | video-demo`: the published annotation layouts (written here, tiny) → raw datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data.raw import load_raw_dataset
from vsectl.errors import DataError

pytest.importorskip("av")


def msrvtt_files(root: Path) -> dict[str, Path]:
    """MSR-VTT in its layouts: 10 videos (train 0-5, validate 6-7, test 8-9), 3 captions each, the 1k-A lists."""
    def info(ids: range, split_of) -> dict:
        return {"info": {"year": "2016"},
                "videos": [{"category": 1, "url": "u", "video_id": f"video{i}", "start time": 1.0, "end time": 9.0,
                            "split": split_of(i), "id": i} for i in ids],
                "sentences": [{"caption": f"caption {j} of video {i}", "video_id": f"video{i}", "sen_id": 3 * i + j}
                              for i in ids for j in (2, 0, 1)]}  # out of sen_id order, as a file may be

    root.mkdir(parents=True, exist_ok=True)
    files = {"trainval": root / "train_val_videodatainfo.json", "test": root / "test_videodatainfo.json",
             "train9k": root / "MSRVTT_train.9k.csv", "jsfusion": root / "MSRVTT_JSFUSION_test.csv"}
    files["trainval"].write_text(json.dumps(info(range(8), lambda i: "train" if i < 6 else "validate")))
    files["test"].write_text(json.dumps(info(range(8, 10), lambda i: "test")))
    files["train9k"].write_text("video_id\n" + "".join(f"video{i}\n" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8)))
    files["jsfusion"].write_text(",key,vid_key,video_id,sentence\n0,ret0,msr9,video9,a man sings a song on stage\n")
    videos = root / "videos" / "TrainValVideo"
    videos.mkdir(parents=True)
    for i in range(10):
        (videos.parent if i >= 8 else videos).joinpath(f"video{i}.mp4").write_bytes(b"x")  # only names are read
    return files


def test_msrvtt_official_splits_keep_every_caption_in_sen_id_order(tmp_path):
    from vsectl.data.video_datasets import prepare_msrvtt

    f = msrvtt_files(tmp_path / "m")
    out = prepare_msrvtt([f["trainval"], f["test"]], tmp_path / "m" / "videos", tmp_path / "raw")
    raw = load_raw_dataset(out, check_files=True)
    assert raw.manifest["modality"] == "video_files"
    assert [len(raw.split(s)) for s in ("train", "dev", "test")] == [6, 2, 2]
    first = raw.split("train")[0]
    assert first["id"] == "video0" and first["captions"] == [f"caption {j} of video 0" for j in range(3)]
    assert raw.split("test")[0]["path"] == (tmp_path / "m" / "videos" / "video8.mp4").resolve()


def test_msrvtt_1k_a_lists_give_jsfusion_test_captions_and_a_held_out_dev(tmp_path):
    from vsectl.data.video_datasets import msrvtt_entries

    f = msrvtt_files(tmp_path / "m")
    entries = msrvtt_entries([f["trainval"], f["test"]], f["train9k"], f["jsfusion"])
    split = {e["id"]: e["split"] for e in entries}
    assert split == {**{f"video{i}": "train" for i in (0, 1, 2, 3, 4, 5, 8)}, "video6": "val", "video7": "val",
                     "video9": "test"}
    test = [e for e in entries if e["split"] == "test"]
    assert test[0]["captions"] == ["a man sings a song on stage"]  # the one 1k-A sentence, not the 20


def test_missing_videos_are_left_out_and_counted(tmp_path):
    from vsectl.data.video_datasets import prepare_msrvtt

    f = msrvtt_files(tmp_path / "m")
    (tmp_path / "m" / "videos" / "TrainValVideo" / "video3.mp4").unlink()
    out = prepare_msrvtt([f["trainval"], f["test"]], tmp_path / "m" / "videos", tmp_path / "raw")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["missing_videos"] == 1 and manifest["counts"]["splits"]["train"]["missing"] == 1
    assert "video3" not in [im["id"] for im in load_raw_dataset(out).images]


def vatex_files(root: Path, n_train: int = 3, n_val: int = 4) -> tuple[Path, Path, Path]:
    def items(prefix: str, n: int) -> list[dict]:
        return [{"videoID": f"{prefix}{k}_000010_000020", "enCap": [f"english {j} for {prefix}{k}" for j in range(10)],
                 "chCap": ["中文"] * 10} for k in range(n)]

    root.mkdir(parents=True, exist_ok=True)
    (root / "vatex_training_v1.0.json").write_text(json.dumps(items("tr", n_train)))
    (root / "vatex_validation_v1.0.json").write_text(json.dumps(items("va", n_val)))
    videos = root / "videos"
    videos.mkdir()
    for item in items("tr", n_train) + items("va", n_val):
        (videos / f"{item['videoID']}.mp4").write_bytes(b"x")
    return root / "vatex_training_v1.0.json", root / "vatex_validation_v1.0.json", videos


def test_vatex_english_captions_and_the_validation_split_in_halves_or_by_list(tmp_path):
    from vsectl.data.video_datasets import prepare_vatex

    train, val, videos = vatex_files(tmp_path / "v")
    raw = load_raw_dataset(prepare_vatex(train, val, videos, tmp_path / "raw"))
    assert [im["id"] for im in raw.split("train")] == [f"tr{k}_000010_000020" for k in range(3)]
    assert [im["id"] for im in raw.split("dev")] == ["va0_000010_000020", "va1_000010_000020"]
    assert [im["id"] for im in raw.split("test")] == ["va2_000010_000020", "va3_000010_000020"]
    assert raw.split("test")[0]["captions"] == [f"english {j} for va2" for j in range(10)]
    (tmp_path / "ids.txt").write_text("va0_000010_000020\n")
    raw = load_raw_dataset(prepare_vatex(train, val, videos, tmp_path / "raw2", test_list=tmp_path / "ids.txt"))
    assert [im["id"] for im in raw.split("test")] == ["va0_000010_000020"]


@pytest.mark.parametrize("content", ['{"videos": []}', '[{"video_id": "video1"}]', "not json", '{"images": []}'])
def test_an_unknown_msrvtt_layout_is_one_line_naming_the_expected_one(tmp_path, content):
    f = msrvtt_files(tmp_path / "m")
    f["trainval"].write_text(content)
    result = CliRunner().invoke(app, ["data", "prepare", "msrvtt", "--json", str(f["trainval"]), "--videos",
                                      str(tmp_path / "m" / "videos"), "--out", str(tmp_path / "raw")])
    line = one_error_line(result)
    assert "expected" in line and "MSR-VTT" in line, line


def test_an_unknown_vatex_layout_or_split_list_is_one_line(tmp_path):
    train, val, videos = vatex_files(tmp_path / "v")
    runner = CliRunner()
    base = ["data", "prepare", "vatex", "--train", str(train), "--videos", str(videos), "--out", str(tmp_path / "r")]
    val.write_text(json.dumps({"videos": [{"videoID": "x"}]}))  # an object, not VATEX's list
    assert "expected a VATEX annotation JSON" in one_error_line(runner.invoke(app, [*base, "--val", str(val)]))
    _, val, _ = vatex_files(tmp_path / "w")
    (tmp_path / "bad.csv").write_text("vid,caption\nva0,hello\n")
    line = one_error_line(runner.invoke(app, [*base, "--val", str(val), "--test-list", str(tmp_path / "bad.csv")]))
    assert "video_id" in line, line


def test_no_annotated_video_in_the_folder_is_one_error(tmp_path):
    from vsectl.data.video_datasets import prepare_vatex

    train, val, _ = vatex_files(tmp_path / "v")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="none of the 7 annotated videos"):
        prepare_vatex(train, val, tmp_path / "empty", tmp_path / "raw")


def test_video_demo_clips_are_real_h264_and_vp9_files_with_their_captions(tmp_path):
    from PIL import Image

    from vsectl.data.video_demo import DemoSettings, prepare_video_demo
    from vsectl.data.video_files import probe

    src = tmp_path / "art"
    (src / "images").mkdir(parents=True)
    entries = []
    for k, (name, colour) in enumerate([("red apple", "red"), ("blue car", "blue"), ("green tree", "green"),
                                        ("black cat", "black"), ("yellow sun", "yellow"), ("grey fish", "grey")]):
        Image.new("RGB", (40, 40), colour).save(src / "images" / f"{k}.png")
        entries.append({"filename": f"{k}.png", "imgid": k, "split": "test" if k >= 4 else "train",
                        "sentences": [{"raw": name.capitalize() + "."}]})
    (src / "dataset.json").write_text(json.dumps({"dataset": "art", "images": entries}))
    (src / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "images"}))
    out = prepare_video_demo(src, tmp_path / "demo", DemoSettings(size=32, fps=4, seconds=1.0))
    raw = load_raw_dataset(out, check_files=True)
    assert raw.manifest["modality"] == "video_files" and len(raw.split("train")) == 4 and len(raw.split("test")) == 2
    kinds = json.loads((out / "dataset.json").read_text())["images"]
    assert [e["kind"] for e in kinds[:4]] == ["pan", "zoom", "sequence2", "sequence3"]
    codecs = [probe(im["path"]).codec for im in raw.images]
    assert codecs[:2] == ["h264", "vp9"] and {p.suffix for p in (out / "videos").iterdir()} == {".mp4", ".webm"}
    assert probe(raw.images[0]["path"]).n_frames == 4  # 1 s at 4 fps
    assert raw.split("train")[0]["captions"][0].startswith("red apple, moving from")
    assert raw.split("train")[2]["captions"][0].startswith("green tree, then ")


def test_more_video_refusals_are_one_line_each(tmp_path):
    runner = CliRunner()
    f = msrvtt_files(tmp_path / "m")
    (tmp_path / "list.csv").write_text("video_id\nvideo77\n")
    line = one_error_line(runner.invoke(app, ["data", "prepare", "msrvtt", "--json", str(f["trainval"]), "--videos",
                                              str(tmp_path / "m" / "videos"), "--out", str(tmp_path / "o"),
                                              "--test-list", str(tmp_path / "list.csv")]))
    assert "not in the annotation JSON(s), e.g. video77" in line
    train, val, _ = vatex_files(tmp_path / "v")
    (tmp_path / "empty").mkdir()
    line = one_error_line(runner.invoke(app, ["data", "prepare", "vatex", "--train", str(train), "--val", str(val),
                                              "--videos", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]))
    assert "none of the 7 annotated videos" in line
    line = one_error_line(runner.invoke(app, ["embed", str(tmp_path / "run"), "--videos", str(tmp_path / "empty"),
                                              "--out", str(tmp_path / "e")]))
    assert "holds no video files" in line


def test_without_pyav_reading_a_video_names_the_extra(tmp_path, monkeypatch):
    import sys

    from vsectl.data.video_files import probe
    from vsectl.errors import ConfigError

    monkeypatch.setitem(sys.modules, "av", None)  # what a missing package looks like to `import av`
    with pytest.raises(ConfigError, match=r"pip install 'vsectl\[video\]'"):
        probe(tmp_path / "any.mp4")
