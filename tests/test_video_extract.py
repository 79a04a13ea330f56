"""`extract --videos`: decoded frames through a backbone into frame-feature sets, the skip report, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from test_extract import TinyBackbone
from typer.testing import CliRunner
from videos import VFR_PTS, write_broken, write_video

from vsectl.cli import app
from vsectl.data.images import normalize
from vsectl.data.sources import load_split
from vsectl.data.store import read_store_attrs
from vsectl.data.video_files import FrameSampling, probe, sample_indices
from vsectl.errors import ConfigError
from vsectl.extract import VideoFileSampling, extract

pytest.importorskip("av")

GOOD = {"a.mp4": 12, "b.webm": 7, "c.avi": 15}  # file: frame count, at 10 fps


def make_video_raw(root: Path, with_broken: bool = True) -> tuple[Path, dict[str, str]]:
    """A raw video dataset: three good clips, one variable-frame-rate clip and (optionally) each broken case."""
    videos = root / "videos"
    videos.mkdir(parents=True)
    for name, n in GOOD.items():
        write_video(videos / name, n, size=32)
    write_video(videos / "vfr.mp4", len(VFR_PTS), size=32, pts=VFR_PTS, ticks_per_s=100)
    broken = write_broken(videos) if with_broken else {}
    names = [*GOOD, "vfr.mp4", *broken]
    entries = [{"filename": name, "id": Path(name).stem + Path(name).suffix[1:], "split": "train",
                "sentences": [{"raw": f"clip {name}"}]} for name in names]
    (root / "dataset.json").write_text(json.dumps({"dataset": "clips", "images": entries}))
    (root / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "videos",
                                                    "modality": "video_files"}))
    return root, broken


def expected_set(backbone: TinyBackbone, path: Path, sampling: FrameSampling) -> np.ndarray:
    """The reference: decode each sampled frame alone, one backbone pass per frame, mean over its tokens."""
    from vsectl.data.video_files import read_frames

    info = probe(path)
    rows = []
    for _, frame in read_frames(path, sample_indices(info, sampling), info, backbone.size):
        x = normalize(torch.from_numpy(frame).permute(2, 0, 1)[None], backbone.mean, backbone.std)
        with torch.no_grad():
            rows.append(backbone(x)[0].mean(0).numpy())
    return np.stack(rows)


def test_video_files_become_frame_sets_with_every_broken_file_in_the_skip_report(tmp_path):
    raw, broken = make_video_raw(tmp_path / "raw")
    backbone = TinyBackbone(size=16)
    video = VideoFileSampling(frames=4)
    [store] = extract(backbone, raw, tmp_path / "feats", "train", workers=2, batch_size=5, shard_size=3,
                      dtype="float32", device="cpu", video=video)
    split = load_split(tmp_path / "feats", "train")
    assert split.image_ids == ["amp4", "bwebm", "cavi", "vfrmp4"]
    for k, name in enumerate([*GOOD, "vfr.mp4"]):
        want = expected_set(backbone, raw / "videos" / name, video.sampling())
        np.testing.assert_allclose(split.features.get(k), want, rtol=1e-5, atol=1e-5)
    assert split.features.lengths().tolist() == [4, 4, 4, 4]
    attrs = read_store_attrs(store)
    skipped = json.loads(attrs["skipped"])
    assert attrs["n_skipped"] == len(broken) == 6
    assert {Path(r["id"]).name: r["kind"] for r in skipped} == {Path(n).stem + Path(n).suffix[1:]: k
                                                               for n, k in broken.items()}
    assert all("\n" not in r["reason"] for r in skipped)
    vfr = json.loads(attrs["variable_frame_rate"])
    assert attrs["n_variable_frame_rate"] == 1 and vfr[0]["id"] == "vfrmp4"
    assert json.loads(attrs["video"]) == {"frames": 4, "fps": None, "max_frames": None, "frame_pool": "mean",
                                          "input": "video files"}


def test_fixed_rate_gives_sets_as_long_as_the_videos_and_resumes(tmp_path):
    raw, _ = make_video_raw(tmp_path / "raw", with_broken=False)
    video = VideoFileSampling(fps=5.0, frame_pool="none")
    out = tmp_path / "feats"
    extract(TinyBackbone(size=16), raw, out, "train", workers=0, shard_size=2, device="cpu", video=video)
    lengths = load_split(out, "train").features.lengths().tolist()
    tokens = 16  # a 16-px frame through the 4×4-stride conv: 4×4 cells, all kept with frame_pool none
    # 1.2, 0.7 and 1.5 s at 5 fps; the variable-rate clip's 2.1 s give 10 sample times on only 7 distinct frames
    assert lengths == [6 * tokens, 4 * tokens, 8 * tokens, 7 * tokens]
    first = (out / "train.h5").stat().st_mtime_ns
    extract(TinyBackbone(size=16), raw, out, "train", workers=0, shard_size=2, device="cpu", video=video)
    assert (out / "train.h5").stat().st_mtime_ns == first  # same settings: reused, not extracted again


def test_videos_and_images_refuse_each_others_flags(tmp_path):
    raw, _ = make_video_raw(tmp_path / "raw", with_broken=False)
    with pytest.raises(ConfigError, match="--videos"):
        extract(TinyBackbone(size=16), raw, tmp_path / "f", "train", device="cpu")
    manifest = json.loads((raw / "manifest.json").read_text())
    (raw / "manifest.json").write_text(json.dumps({**manifest, "modality": "image"}))
    with pytest.raises(ConfigError, match="drop --videos"):
        extract(TinyBackbone(size=16), raw, tmp_path / "f", "train", device="cpu", video=VideoFileSampling(frames=2))


def test_extract_cli_on_video_files_prints_the_store_and_refuses_mistakes_in_one_line(tmp_path):
    raw, broken = make_video_raw(tmp_path / "raw")
    runner = CliRunner()
    base = ["extract", "--backbone", "efficientnet-lite0", "--size", "32", "--data", str(raw), "--device", "cpu"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "feats"), "--videos", "--frames", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "feats" / "train.h5")
    assert read_store_attrs(tmp_path / "feats" / "train.h5")["n_skipped"] == len(broken)
    for extra, words in ((["--frames", "3"], "add --videos"), (["--videos"], "exactly one of --frames"),
                         (["--videos", "--video", "--fps", "1"], "not both"),
                         (["--videos", "--frames", "2", "--fps", "1"], "exactly one of --frames")):
        line = one_error_line(runner.invoke(app, [*base, "--out", str(tmp_path / "x"), *extra]))
        assert words in line, line



def test_embed_replays_the_video_recipe_on_a_folder_of_videos(tmp_path):
    from vsectl.config import load_recipe
    from vsectl.retrieval import embed, open_embeddings
    from vsectl.retrieval.model import load
    from vsectl.training import train

    raw, broken = make_video_raw(tmp_path / "raw")
    feats = tmp_path / "feats"
    extract("efficientnet-lite0", raw, feats, "train", size=32, device="cpu", workers=0,
            video=VideoFileSampling(frames=3))
    for split in ("dev", "test"):  # the recipe wants them; the same clips will do
        (feats / f"{split}.h5").symlink_to(feats / "train.h5")
    repo = Path(__file__).resolve().parent.parent
    cfg = load_recipe(repo / "recipes" / "msrvtt_gpo.yaml", [
        f"data.root={feats}", "model.image.feat_dim=1280", "model.embed_dim=16", "model.text.word_dim=8",
        "model.text.vocab_min_count=1", "data.batch_size=2", "data.num_workers=0", "train.epochs=1",
        "train.max_steps_per_epoch=1", "name=vid"])
    run = train(cfg, tmp_path / "runs", device="cpu")
    out = embed(run, tmp_path / "emb", videos=raw / "videos", device="cpu", workers=0)
    emb = open_embeddings(out)
    assert emb.meta["n_images"] == 4 and emb.meta["n_skipped"] == len(broken)
    model = load(run, device="cpu")
    split = load_split(feats, "train")
    want = model.encode_feature_sets([split.features.get(k) for k in range(4)])
    rows = {emb.image(i)["id"]: emb.side("images")[i] for i in range(emb.n_images)}
    for k, name in enumerate([*GOOD, "vfr.mp4"]):  # the store's set k was made from this file
        np.testing.assert_allclose(rows[name], want[k], atol=1e-5)
    from PIL import Image

    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pictures" / "one.png")
    with pytest.raises(ConfigError, match="trained on features of video files"):
        embed(run, tmp_path / "emb2", images=tmp_path / "pictures", device="cpu")


def test_data_verify_demuxes_video_files_and_names_the_broken_ones(tmp_path):
    from vsectl.data.verify import verify_path

    raw, broken = make_video_raw(tmp_path / "raw")
    report = verify_path(raw)
    # all but damaged.mp4, whose index and packets are intact: only decoding (extract) finds it
    assert report["splits"]["train"]["unreadable_images"] == len(broken) - 1
    problem = next(p for p in report["problems"] if "unreadable" in p)
    assert "(empty)" in problem or "(corrupt)" in problem or "(truncated)" in problem, problem
