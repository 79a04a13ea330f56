"""Extraction: image preprocessing, the store it writes, skipped files, resume, rank partition, precision, the CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from vsectl.data.images import load_rgb, normalize, preprocess
from vsectl.data.sources import load_split
from vsectl.data.store import read_store_attrs
from vsectl.errors import ConfigError
from vsectl.extract import extract, extract_images
from vsectl.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_backbone

N_GOOD, SHARD = 8, 3  # 8 readable train images + 2 bad files = 10 entries → shards of 3, 3, 3, 1


class TinyBackbone(Backbone):
    """A random 4×4-stride conv: a fast, deterministic stand-in with the Backbone interface."""

    name = "tiny"

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.feat_dim, self.mean, self.std, self.size = 8, IMAGENET_MEAN, IMAGENET_STD, size
        self.weights_id, self.weights_files, self.tokens = "random", [], "conv cells"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).flatten(2).transpose(1, 2)  # (B, h·w, 8)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        side = (size or self.size) // 4
        return side, side


def make_raw(root: Path, n_train: int = N_GOOD, n_test: int = 2) -> Path:
    """A raw dataset folder: PNGs in RGB, L and RGBA, a truncated JPEG and a text file named .png, in train."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = []
    for k in range(n_train + n_test):
        pixels = rng.integers(0, 256, size=(20, 27, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(["RGB", "L", "RGBA"][k % 3]).save(images / f"im{k}.png")
        entries.append({"filename": f"im{k}.png", "imgid": k, "split": "train" if k < n_train else "test",
                        "sentences": [{"raw": f"image {k} caption {j}"} for j in range(2)]})
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "notes.png").write_text("not an image")
    entries.insert(2, {"filename": "bad.jpg", "imgid": 100, "split": "train", "sentences": [{"raw": "corrupt"}]})
    entries.insert(5, {"filename": "notes.png", "imgid": 101, "split": "train", "sentences": [{"raw": "text"}]})
    (root / "dataset.json").write_text(json.dumps({"dataset": "tiny", "images": entries}))
    (root / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "images"}))
    return root


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_raw(tmp_path_factory.mktemp("raw"))


@pytest.fixture
def tiny() -> TinyBackbone:
    return TinyBackbone()


def run(backbone: Backbone, raw: Path, out: Path, **kw: Any) -> list[Path]:
    options = dict(split="train", batch_size=2, workers=0, shard_size=SHARD, dtype="float32", device="cpu")
    return extract(backbone, raw, out, **{**options, **kw})


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("features/rows", "features/offsets", "images/ids", "captions/text",
                                      "captions/image_index")}


def assert_same_store(a: Path, b: Path) -> None:
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    for key in arrays_a:
        assert np.array_equal(arrays_a[key], arrays_b[key]), key


class StopAfter:
    """A Progress that raises KeyboardInterrupt (a Ctrl-C) once `n` images have been extracted."""

    def __init__(self, n: int | None = None) -> None:
        self.n, self.totals = n, []

    def track(self, iterable: Iterable, total: int | None, description: str) -> Iterator:
        self.totals.append(total)
        for k, item in enumerate(iterable):
            if k == self.n:
                raise KeyboardInterrupt
            yield item

    def update(self, **fields: Any) -> None:
        assert fields["images_per_s"] > 0


# ------------------------------------------------------------------------------------------------ images


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # one opaque pixel, the rest fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "gray.png")), np.repeat(gray[..., None], 3, axis=2))
    composited = np.asarray(load_rgb(tmp_path / "alpha.png"))
    assert composited[0, 0].tolist() == [10, 20, 30] and (composited[1:] == 255).all()


def test_preprocess_resizes_the_full_image_bilinear(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    x = preprocess(tmp_path / "x.png", 16)
    expected = np.asarray(Image.fromarray(arr).resize((16, 16), Image.BILINEAR)).transpose(2, 0, 1)
    assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), expected)
    torch.testing.assert_close(normalize(x[None], (0.5, 0.25, 0.0), (0.5, 0.5, 2.0))[0, 2], x[2].float() / 255 / 2)


def test_missing_pillow_is_a_clear_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match=r"pip install 'vsectl\[images\]'"):
        load_rgb(tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ the store


def test_extraction_writes_a_loadable_store_and_counts_bad_files(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    [path] = run(tiny, raw, tmp_path / "out")
    assert path == tmp_path / "out" / "train.h5" and not (tmp_path / "out" / "train.shards").exists()
    split = load_split(tmp_path / "out", "train")
    ids = [str(k) for k in range(N_GOOD)]
    assert split.image_ids == ids and split.features.feat_dim == 8
    assert split.captions == [f"image {k} caption {j}" for k in range(N_GOOD) for j in range(2)]
    assert split.cap2img.tolist() == [k for k in range(N_GOOD) for _ in range(2)]
    # Naive reference: the backbone on each file, one at a time.
    for k in (0, 1, 2, 7):  # RGB, L, RGBA and the last image
        x = normalize(preprocess(raw / "images" / f"im{k}.png", tiny.size)[None], tiny.mean, tiny.std)
        with torch.no_grad():
            expected = tiny(x)[0].numpy()  # (16, 8)
        np.testing.assert_allclose(split.features.get(k), expected, rtol=1e-5, atol=1e-6)
    attrs = read_store_attrs(path)
    assert attrs["n_images"] == N_GOOD and attrs["n_skipped"] == 2
    assert [s["id"] for s in json.loads(attrs["skipped"])] == ["100", "101"]
    for key in ("backbone", "weights", "weights_sha256", "input_size", "mean", "std", "precision", "grid_shape",
                "vsectl_version", "split", "source_dataset", "source_manifest_sha256", "dtype", "tokens"):
        assert key in attrs, key
    assert json.loads(attrs["grid_shape"]) == [4, 4] and attrs["input_size"] == 16


def test_out_h5_takes_one_split_and_a_folder_takes_all(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    assert run(tiny, raw, tmp_path / "feats.h5", split="test") == [tmp_path / "feats.h5"]
    with pytest.raises(ConfigError, match="single .h5 file"):
        run(tiny, raw, tmp_path / "feats.h5", split="all")
    paths = run(tiny, raw, tmp_path / "root", split="all", workers=1)  # no dev images: skipped with a warning
    assert paths == [tmp_path / "root" / "train.h5", tmp_path / "root" / "test.h5"]
    assert load_split(tmp_path / "root", "test").image_ids == [str(N_GOOD), str(N_GOOD + 1)]


def test_finished_rerun_returns_without_extracting(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    [path] = run(tiny, raw, tmp_path)
    stamp = path.stat().st_mtime_ns
    progress = StopAfter()
    assert run(tiny, raw, tmp_path, progress=progress) == [path]
    assert progress.totals == [] and path.stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------------ resume, ranks


def test_resumed_run_equals_an_uninterrupted_one(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    [reference] = run(tiny, raw, tmp_path / "ref")
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(tiny, raw, out, progress=StopAfter(SHARD))  # killed after the first shard
    shards = out / "train.shards"
    assert sorted(p.name for p in shards.iterdir()) == ["manifest.json", "shard-00000.h5"]  # no partial files
    assert not (out / "train.h5").exists()
    progress = StopAfter()
    [path] = run(tiny, raw, out, progress=progress)
    assert progress.totals == [10 - SHARD]  # only the missing shards were extracted
    assert_same_store(path, reference)


def test_ranks_write_their_own_shards_and_rank0_merges(
    raw: Path, tiny: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [reference] = run(tiny, raw, tmp_path / "single")
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run(tiny, raw, out) == []
    assert sorted(p.name for p in (out / "train.shards").glob("*.h5")) == ["shard-00001.h5", "shard-00003.h5"]
    monkeypatch.setenv("RANK", "0")
    [path] = run(tiny, raw, out)
    assert_same_store(path, reference)
    assert not (out / "train.shards").exists()


HOLD = """
import sys, time
from vsectl.locks import folder_lock
with folder_lock(sys.argv[1], "vsectl extract (the first)"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_extract_into_the_same_store_is_refused_naming_the_first(
    raw: Path, tiny: TinyBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two extracts of one split would write the same shards and each merge and delete them; rank 0 holds the store's
    lock, other torchrun ranks only write their own shards."""
    import subprocess

    from vsectl.locks import FolderBusy

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "train.h5")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"train.h5 is being written by another process \(pid {holder.pid}: "
                                             r"vsectl extract \(the first\)"):
            run(tiny, raw, out)
        assert not (out / "train.shards").exists()
        run(tiny, raw, out, split="test")  # another split of the same folder is another store
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        assert run(tiny, raw, out) == [] and (out / "train.shards").is_dir()
    finally:
        holder.kill()
        holder.wait()


def test_changed_settings_are_extracted_again(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    run(tiny, raw, tmp_path)
    [path] = run(tiny, raw, tmp_path, dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["features/rows"].dtype == np.float16


# ------------------------------------------------------------------------------------------------ precision, layout


@pytest.fixture(scope="module")
def lite0_64():
    return create_backbone("efficientnet-lite0", size=64)


def sets(backbone: Backbone, raw: Path, **kw: Any) -> np.ndarray:
    paths = [raw / "images" / f"im{k}.png" for k in range(3)]
    out = list(extract_images(backbone, paths, batch_size=3, workers=0, **kw))
    assert [i for i, _, _ in out] == [0, 1, 2]
    return np.stack([f for _, f, _ in out])  # (3, N, C)


def test_bf16_is_close_to_fp32(raw: Path, tiny: TinyBackbone) -> None:
    # A plain conv: this CPU has no bf16 units and EfficientNet's depthwise convs take seconds in bf16 here.
    fp32, bf16 = sets(tiny, raw, precision="fp32"), sets(tiny, raw, precision="bf16")
    assert fp32.shape == bf16.shape == (3, 16, 8)
    assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()  # loose: bf16 keeps 8 bits of mantissa
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.99


def test_channels_last_gives_the_same_features(raw: Path, lite0_64) -> None:
    torch.testing.assert_close(torch.from_numpy(sets(lite0_64, raw, channels_last=True)),
                               torch.from_numpy(sets(lite0_64, raw, channels_last=False)), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_help_lists_the_options() -> None:
    from typer.testing import CliRunner

    from vsectl.cli import app

    result = CliRunner().invoke(app, ["extract", "--help"])
    assert result.exit_code == 0
    for option in ("--backbone", "--weights", "--shard-size", "--channels-last", "--precision", "--limit"):
        assert option in result.output


def test_cli_extracts_and_prints_the_path(raw: Path, tmp_path: Path) -> None:
    from transformers import ResNetConfig, ResNetModel
    from typer.testing import CliRunner

    from vsectl.cli import app

    folder = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 12], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(folder)
    args = ["extract", "--backbone", "resnet", "--weights", str(folder), "--data", str(raw), "--out",
            str(tmp_path / "out"), "--size", "64", "--workers", "0", "--limit", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, ["--quiet", *args])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "out" / "train.h5")
    split = load_split(tmp_path / "out", "train")
    assert split.image_ids == ["0", "1", "2"] and split.features.lengths().tolist() == [4, 4, 4]  # 4 entries, 1 bad


def test_cli_missing_weights_exits_2_with_one_line(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants
    from typer.testing import CliRunner

    from vsectl.cli import app

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = ["extract", "--backbone", "resnet", "--data", str(raw), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "resnet weights 'microsoft/resnet-152' is not a local folder" in result.output
    assert not (tmp_path / "out").exists()  # refused before anything is written, its lock included


# ------------------------------------------------------------------------------------------------ video


def make_video_raw(root: Path) -> Path:
    """Frame folders: 12 frames named frame_1..frame_12 (natural order), 3 frames one corrupt, an empty folder."""
    frames = root / "frames"
    rng = np.random.default_rng(1)
    for name, n in (("v0", 12), ("v1", 3), ("v2", 0), ("v3", 5)):
        (frames / name).mkdir(parents=True)
        for k in range(1, n + 1):
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(frames / name / f"frame_{k}.png")
    (frames / "v1" / "frame_3.png").write_bytes(b"not a png")
    (frames / "v0" / "notes.txt").write_text("not a frame")
    entries = [{"filename": name, "split": "train", "sentences": [{"raw": f"{name} caption {j}"} for j in range(c)]}
               for name, c in (("v0", 20), ("v1", 1), ("v2", 2), ("v3", 1))]
    (root / "dataset_videos.json").write_text(json.dumps({"dataset": "videos", "images": entries}))
    return frames


def test_video_extraction_samples_frames_pools_each_and_skips_empty_videos(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from vsectl.cli import app
    from vsectl.extract import VideoSampling, list_frames

    frames = make_video_raw(tmp_path)
    runner = CliRunner()
    prepared = runner.invoke(app, ["-q", "data", "prepare", "karpathy", "--json", str(tmp_path / "dataset_videos.json"),
                                   "--images", str(frames), "--out", str(tmp_path / "raw"), "--video"])
    assert prepared.exit_code == 0, prepared.output
    with pytest.raises(ConfigError, match="add --video"):
        run(TinyBackbone(), tmp_path / "raw", tmp_path / "out")

    sampling = VideoSampling(stride=2, max_frames=4, frame_pool="mean")
    kept = [p.name for p in list_frames(frames / "v0", sampling)]
    assert kept == ["frame_1.png", "frame_5.png", "frame_7.png", "frame_11.png"]  # 1,3,..,11 then 4 spread
    torch.manual_seed(0)
    backbone = TinyBackbone()
    (out,) = run(backbone, tmp_path / "raw", tmp_path / "out", video=sampling, batch_size=3)
    split = load_split(tmp_path / "out", "train")
    assert split.image_ids == ["0", "1", "3"]  # the empty folder (imgid 2) is skipped and counted
    assert split.features.lengths().tolist() == [4, 1, 3]  # v1: frames 1 and 3 kept by the stride, 3 unreadable
    assert np.bincount(split.cap2img).tolist() == [20, 1, 1]
    attrs = read_store_attrs(out)
    assert (attrs["n_skipped"], attrs["n_unreadable_frames"]) == (1, 1)
    # each stored frame vector is the mean of that frame's own token set
    expected = [f for _, f, _ in extract_images(backbone, [frames / "v0" / n for n in kept], workers=0)]
    stored = split.features.get(0)
    np.testing.assert_allclose(stored, np.stack([f.mean(axis=0) for f in expected]), rtol=1e-5, atol=1e-6)

    run(backbone, tmp_path / "raw", tmp_path / "tokens", video=VideoSampling(max_frames=2, frame_pool="none"))
    assert load_split(tmp_path / "tokens", "train").features.lengths().tolist() == [2 * 16, 1 * 16, 2 * 16]


def test_image_fingerprint_has_no_video_key(raw: Path, tiny: TinyBackbone, tmp_path: Path) -> None:
    """Image stores keep the fingerprint they had before `--video` existed, so they are not extracted again."""
    (out,) = run(tiny, raw, tmp_path / "out", limit=2)
    attrs = read_store_attrs(out)
    assert "video" not in json.loads(attrs["fingerprint"]) and "video" not in attrs
    assert "n_unreadable_frames" not in attrs


def test_video_options_are_checked() -> None:
    from vsectl.extract import VideoSampling

    for kwargs, message in (({"stride": 0}, "stride"), ({"max_frames": 0}, "max frames"),
                            ({"frame_pool": "median"}, "frame pooling")):
        with pytest.raises(ConfigError, match=message):
            VideoSampling(**kwargs)


@pytest.mark.parametrize("units", [[], ["avx512_bf16"]])
def test_bf16_extraction_warns_only_where_bf16_is_emulated(raw: Path, tiny: TinyBackbone, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, caplog, units) -> None:
    import vsectl.extract.pipeline as pipeline

    monkeypatch.setattr(pipeline, "cpu_bf16_units", lambda: units)  # the probe training's precision choice uses
    with caplog.at_level("WARNING", logger="vsectl"):
        run(tiny, raw, tmp_path / "out", precision="bf16", limit=2)
    warned = [r.message for r in caplog.records if "emulated" in r.message]
    assert len(warned) == (0 if units else 1)
