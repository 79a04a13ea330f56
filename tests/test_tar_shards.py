"""Webdataset tar shards: patterns, grouping by key, every sample exactly once over ranks × workers, embed --shards,
and a 2-process torchrun embed killed and restarted giving the same bytes as one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from vsectl.data.tar_shards import (
    ShardStream,
    expand_braces,
    read_shard,
    resolve_shards,
    slot_shards,
    write_tar_shards,
)
from vsectl.errors import DataError

REPO = Path(__file__).resolve().parent.parent
CLIPART = REPO / "tests" / "fixtures" / "clipart_mini"


def test_brace_patterns_expand_like_a_shell():
    assert expand_braces("s/{00..03}.tar") == ["s/00.tar", "s/01.tar", "s/02.tar", "s/03.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{00008..00010}") == ["00008", "00009", "00010"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_resolve_from_a_folder_a_pattern_or_a_glob_and_missing_ones_are_named(tmp_path):
    shards = write_tar_shards([(f"k{i}", {"txt": b"x"}) for i in range(5)], tmp_path, per_shard=2)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert resolve_shards(tmp_path) == resolve_shards(str(tmp_path / "{00000..00002}.tar"))
    assert resolve_shards(str(tmp_path / "*.tar")) == [p.resolve() for p in shards]
    with pytest.raises(DataError, match=r"1 tar shard\(s\) .* do not exist, first: .*00003.tar"):
        resolve_shards(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(DataError, match="no tar shards found"):
        resolve_shards(tmp_path / "nothing-here-*.tar")


def test_members_sharing_a_key_form_one_sample_with_image_caption_and_offset(tmp_path):
    [shard] = write_tar_shards([("a/001", {"jpg": b"JPEGDATA", "txt": b" a cat \n", "json": b"{}"}),
                                ("a/002", {"json": b'{"caption": "from json"}', "png": b"PNG"}),
                                ("a/003", {"txt": b"no image"})], tmp_path, per_shard=10)
    samples = list(read_shard(shard))
    assert [s.key for s in samples] == ["a/001", "a/002", "a/003"]
    assert [s.position for s in samples] == [0, 1, 2]
    assert [s.caption for s in samples] == ["a cat", "from json", "no image"]
    assert samples[0].image == b"JPEGDATA" and samples[2].image is None
    raw = shard.read_bytes()
    assert raw[samples[1].offset : samples[1].offset + samples[1].size] == b"PNG"  # where the image lies


def test_a_truncated_shard_is_one_line(tmp_path):
    [shard] = write_tar_shards([(f"k{i}", {"txt": b"x" * 2000}) for i in range(4)], tmp_path, per_shard=10)
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match="cannot be read"):
        list(read_shard(shard))


def _key(sample):
    return sample.key


def _keys_of(shards, world, workers) -> list[str]:
    """What every (rank, worker) slot reads, as embed does it: ranks take s % world, workers share a rank's."""
    keys = []
    for rank in range(world):
        stream = ShardStream(shards, slot_shards(len(shards), rank, world, 0, 1), _key, batch_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b, timeout=60 if
                            workers else 0)  # a hung worker fails the test instead of hanging it
        ends = []
        for batch in loader:
            keys += batch.items
            ends += [batch.shard] if batch.last else []
        assert sorted(ends) == sorted(stream.todo)  # every shard of the rank ends exactly once
    return keys


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_key_is_read_exactly_once_over_ranks_and_workers(tmp_path, world, workers):
    samples = [(f"s{i:03d}", {"txt": str(i).encode()}) for i in range(11)]
    few = write_tar_shards(samples, tmp_path / "few", per_shard=6)  # 2 shards: fewer than ranks × workers
    many = write_tar_shards(samples, tmp_path / "many", per_shard=2)  # 6 shards, the last one short
    for shards in (few, many):
        keys = _keys_of(shards, world, workers)
        assert sorted(keys) == [k for k, _ in samples]


def test_slots_cover_every_shard_once():
    for n in range(0, 9):
        for world in (1, 2, 3):
            for workers in (0, 1, 3):
                got = sorted(s for r in range(world) for w in range(max(1, workers))
                             for s in slot_shards(n, r, world, w, workers))
                assert got == list(range(n))


# ---------------------------------------------------------------------------------------------- embed --shards


def clipart_samples(n: int) -> list[tuple[str, dict[str, bytes]]]:
    entries = json.loads((CLIPART / "dataset.json").read_text())["images"][:n]
    return [(f"{i:06d}", {"png": (CLIPART / "images" / e["filename"]).read_bytes(),
                          "txt": e["sentences"][0]["raw"].encode()}) for i, e in enumerate(entries)]


@pytest.fixture(scope="module")
def clipart_shards(tmp_path_factory) -> Path:
    samples = clipart_samples(24)
    samples.insert(5, ("broken", {"jpg": b"not an image", "txt": b"a broken file"}))
    folder = tmp_path_factory.mktemp("shards")
    write_tar_shards(samples, folder, per_shard=5)  # 5 shards
    return folder


def test_embed_from_shards_equals_embedding_the_image_files(clipart_run, clipart_shards, tmp_path):
    import vsectl

    model = vsectl.load(clipart_run["run"], device="cpu")
    out = vsectl.embed(model, tmp_path / "emb", shards=str(clipart_shards / "{00000..00004}.tar"), workers=2,
                       batch_size=3)
    emb = vsectl.open_embeddings(out)
    entries = json.loads((CLIPART / "dataset.json").read_text())["images"][:24]
    reference = model.encode_images([CLIPART / "images" / e["filename"] for e in entries])
    np.testing.assert_allclose(emb.images, reference, atol=1e-6)
    assert (emb.n_images, emb.n_captions, emb.meta["n_skipped"]) == (24, 24, 1)
    assert emb.meta["skipped"][0]["key"] == "broken" and "broken.jpg" in emb.meta["skipped"][0]["reason"]
    assert emb.image(5)["id"] == "000005" and emb.caption(5) == {"text": entries[5]["sentences"][0]["raw"],
                                                                  "image": 5}
    np.testing.assert_allclose(emb.captions, model.encode_text([e["sentences"][0]["raw"] for e in entries]),
                               atol=1e-6)
    member = emb.image(0)["tar"]
    data = Path(member["file"]).read_bytes()[member["offset"] : member["offset"] + member["size"]]
    assert data == (CLIPART / "images" / entries[0]["filename"]).read_bytes()


def test_embed_takes_the_precomp_npy_training_reads(clipart_run, toy_root, tmp_path):
    import vsectl
    from vsectl.config import load_recipe
    from vsectl.data.sources import load_split
    from vsectl.training import train

    run = train(load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={toy_root}", "train.epochs=1",
                                                             "name=npy"]), tmp_path, device="cpu")
    model = vsectl.load(run, device="cpu")
    out = vsectl.embed(model, tmp_path / "emb", features=toy_root / "test_ims.npy")
    emb = vsectl.open_embeddings(out)
    split = load_split(toy_root, "test")
    sets = [split.features.get(i) for i in range(split.n_images)]
    np.testing.assert_allclose(emb.images, model.encode_images(sets), atol=1e-6)
    assert emb.n_captions == split.n_captions and emb.caption(7)["text"] == split.captions[7]
    assert np.array_equal(np.asarray(emb.cap2img), split.cap2img)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    return subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", "-m", "vsectl", "-q", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=REPO)


def test_two_process_embed_killed_and_restarted_writes_the_bytes_of_one_process(clipart_run, clipart_shards,
                                                                                  tmp_path):
    import vsectl

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    one = vsectl.embed(clipart_run["run"], tmp_path / "one", shards=clipart_shards, device="cpu", workers=0,
                       batch_size=3)
    args = ["embed", str(clipart_run["run"]), "--shards", str(clipart_shards), "--out", str(tmp_path / "two"),
            "--device", "cpu", "--workers", "1", "--batch-size", "3"]
    proc = _torchrun(args, env)
    shards = tmp_path / "two.partial" / "shards"
    deadline = time.monotonic() + 240
    while not list(shards.glob("tar-*-captions.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
    proc.wait(30)
    assert not (tmp_path / "two").exists() and list(shards.glob("tar-*.json"))  # something kept, nothing published
    proc = _torchrun(args, env)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == str(tmp_path / "two")  # printed once, by rank 0
    for name in ("images.npy", "captions.npy", "cap2img.npy", "images.jsonl", "captions.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (one / name).read_bytes(), name
    assert not (tmp_path / "two.partial").exists()


# ---------------------------------------------------------------------------------------------- training from shards


@pytest.fixture(scope="module")
def clipart_tar_root(tmp_path_factory) -> Path:
    """The clip-art fixture as tar shards, one folder per split, each image with its first caption."""
    entries = json.loads((CLIPART / "dataset.json").read_text())["images"]
    root = tmp_path_factory.mktemp("tar_root")
    for split, folder in (("train", "train"), ("val", "val"), ("test", "test")):
        samples = [(f"{split}{i:04d}", {"png": (CLIPART / "images" / e["filename"]).read_bytes(),
                                        "txt": e["sentences"][0]["raw"].encode()})
                   for i, e in enumerate(x for x in entries if x["split"] == split)]
        write_tar_shards(samples, root / folder, per_shard=64)
    return root


def test_the_data_door_opens_tar_shards_as_their_own_source_with_the_raw_images_pixels(clipart_tar_root):
    from vsectl.data.door import open_split, subset
    from vsectl.data.raw_images import load_raw_split
    from vsectl.kinds import ImageInput

    tar = open_split(clipart_tar_root, "dev", ImageInput.PIXELS)  # dev is read from the val/ folder
    raw = load_raw_split(CLIPART, "dev")
    assert tar.source == "tar-shards" and tar.n_images == raw.n_images and tar.n_captions == raw.n_images
    assert tar.captions == [raw.captions[int(np.flatnonzero(raw.cap2img == i)[0])] for i in range(raw.n_images)]
    for i in (0, 7, tar.n_images - 1):
        for seed in (None, 3):
            rng_a = None if seed is None else np.random.default_rng(seed)
            rng_b = None if seed is None else np.random.default_rng(seed)
            assert np.array_equal(tar.features.read(i, 32, rng_a).numpy(), raw.features.read(i, 32, rng_b).numpy())
    assert subset(tar, 5).features.members == tar.features.members[:5]
    assert open_split(CLIPART, "dev", ImageInput.PIXELS).source == "pixels"  # a raw folder stays a raw folder


def test_a_backbone_run_trains_from_tar_shards(clipart_tar_root, tmp_path):
    from vsectl.config import load_recipe
    from vsectl.training import train

    sys.path.insert(0, str(REPO / "tests"))
    from test_backbone_training import RECIPE  # the tiny backbone recipe of the raw-image tests

    path = tmp_path / "bb.yaml"
    path.write_text(RECIPE.replace(str(CLIPART), str(clipart_tar_root)))
    cfg = load_recipe(path, ["train.epochs=1", "train.max_steps_per_epoch=2", "data.val_images=8"])
    run = train(cfg, out_root=tmp_path, device="cpu")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("train") == 2 and records[-1]["kind"] == "val"


def test_extract_from_shards_stores_what_extract_from_the_raw_folder_stores(clipart_run, clipart_tar_root, tmp_path):
    from vsectl.data.sources import load_split
    from vsectl.extract import extract

    [path] = extract("resnet", None, tmp_path / "tar", "dev", shards=clipart_tar_root / "val", weights=clipart_run[
        "weights"], size=64, workers=2, device="cpu", batch_size=7)
    tar, raw = load_split(tmp_path / "tar", "dev"), load_split(clipart_run["feats"], "dev")
    assert tar.n_images == raw.n_images == 40
    for i in range(tar.n_images):
        np.testing.assert_array_equal(tar.features.get(i), raw.features.get(i))
    assert tar.captions == [raw.captions[int(np.flatnonzero(raw.cap2img == i)[0])] for i in range(raw.n_images)]
    assert extract("resnet", None, tmp_path / "tar", "dev", shards=clipart_tar_root / "val", weights=clipart_run[
        "weights"], size=64, workers=0, device="cpu") == [path]  # finished: reused


def test_extract_and_embed_refuse_mixed_or_missing_inputs_in_one_line(clipart_run, tmp_path):
    from typer.testing import CliRunner

    from vsectl.cli import app

    def bad(*args: str) -> str:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    assert "exactly one of --data RAW" in bad("extract", "--backbone", "resnet", "--out", str(tmp_path / "x"))
    assert "no tar shards found" in bad("embed", str(clipart_run["run"]), "--shards", str(tmp_path / "*.tar"),
                                        "--out", str(tmp_path / "e"), "--device", "cpu")
    assert "tar shards have no splits" in bad("extract", "--backbone", "resnet", "--shards", str(tmp_path),
                                              "--split", "all", "--out", str(tmp_path / "x"))


def test_serve_shows_images_from_inside_their_tar_shards(clipart_run, clipart_shards, tmp_path):
    import threading
    import urllib.request

    import vsectl
    from vsectl.serving import open_server

    out = vsectl.embed(clipart_run["run"], tmp_path / "emb", shards=clipart_shards, device="cpu", workers=0)
    server = open_server(out, port=0, device="cpu")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        member = vsectl.open_embeddings(out).image(3)["tar"]
        with urllib.request.urlopen(server.url + "image/3", timeout=60) as response:
            body, kind = response.read(), response.headers["Content-Type"]
        raw = Path(member["file"]).read_bytes()
        assert kind == "image/png" and body == raw[member["offset"] : member["offset"] + member["size"]]
        with urllib.request.urlopen(server.url + "api/search?q=a+bird&k=5", timeout=60) as response:
            hits = json.loads(response.read())["hits"]
        assert [h["image_url"] for h in hits] == [f"/image/{h['image']}" for h in hits]  # they were all null
    finally:
        server.shutdown()
        server.server_close()
        server.engine.close()


def test_a_contact_sheet_draws_images_from_inside_their_tar_shards(clipart_run, clipart_shards, tmp_path):
    """The sheet drew the grey "no image" tile for every hit of a tar-shard collection."""
    from PIL import Image

    import vsectl
    from vsectl.retrieval.sheet import FONT_SIZE, PAD, THUMB, TITLE_SIZE, _font, _thumbnail

    out = vsectl.embed(clipart_run["run"], tmp_path / "emb", shards=clipart_shards, device="cpu", workers=0)
    from vsectl.retrieval.query import search_collection

    search_collection(out, ["a bird"], k=3, sheet=tmp_path / "sheet.png", device="cpu")
    sheet = Image.open(tmp_path / "sheet.png").convert("RGB")
    top = PAD + TITLE_SIZE + 2 * PAD  # the first row of thumbnails, under the query's title
    for n in range(3):
        tile = sheet.crop((PAD + n * (THUMB + PAD), top, PAD + n * (THUMB + PAD) + THUMB, top + THUMB))
        assert tile.tobytes() != _thumbnail(None, _font(FONT_SIZE)).tobytes(), f"thumbnail {n} is the no-image tile"
