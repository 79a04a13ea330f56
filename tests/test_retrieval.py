"""Retrieval with a trained run: embed → index → search agrees with eval to the last rank; the pieces; bad inputs."""

from __future__ import annotations

import dataclasses
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
import torch
from PIL import Image
from typer.testing import CliRunner

import vsectl
from vsectl.cli import app
from vsectl.errors import ConfigError, DataError
from vsectl.retrieval import exact

REPO = Path(__file__).resolve().parent.parent
FIXTURE_IMAGES = REPO / "tests" / "fixtures" / "clipart_mini" / "images"


def cli(*args: str) -> object:
    result = CliRunner().invoke(app, ["-q", *args])
    return result


@pytest.fixture(scope="module")
def model(clipart_run):
    return vsectl.load(clipart_run["run"], device="cpu")


@pytest.fixture(scope="module")
def test_emb(clipart_run, tmp_path_factory) -> Path:
    """The run's test split embedded from its feature store through the CLI, with a flat index."""
    out = tmp_path_factory.mktemp("emb") / "test"
    result = cli("embed", str(clipart_run["run"]), "--features", str(clipart_run["feats"] / "test.h5"), "--out",
                 str(out), "--device", "cpu", "--shard-size", "128")  # eval's batches
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return out


# ------------------------------------------------------------------------------------------------ exact top-k


def test_topk_matches_a_full_sort_over_several_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((37, 8)).astype(np.float32)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    monkeypatch.setattr(exact, "BLOCK_BYTES", 4 * 8 * 6)  # 6 rows per block: 7 blocks, the last one short
    scores, index = exact.topk(matrix, queries, k=9)
    for q in range(5):
        full = [float(queries[q] @ matrix[i]) for i in range(37)]
        expected = sorted(range(37), key=lambda i: -full[i])[:9]
        assert index[q].tolist() == expected
        np.testing.assert_allclose(scores[q], [full[i] for i in expected], rtol=1e-5)
    assert exact.topk(matrix, queries[0], k=37)[1].shape == (1, 37)


def test_importing_vsectl_does_not_import_torch():
    code = "import sys, vsectl; vsectl.search; vsectl.open_embeddings; assert 'torch' not in sys.modules, 'torch'"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# ------------------------------------------------------------------------------------------------ agreement with eval


def _ranks_from_search(target, emb, caption_target=None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks as eval defines them (candidates scored strictly above the ground truth), from search results.

    Clip art repeats captions ("Fire.") and images, so exact ties exist: a tied candidate listed before the ground
    truth does not count, as in eval.
    """
    n, c = emb.n_images, emb.n_captions
    cap2img = np.asarray(emb.cap2img)

    def rank(hits, is_gt) -> int:
        gt = next(h for h in hits if is_gt(h))
        return sum(h.score > gt.score for h in hits)

    t2i = [rank(r.hits, lambda h, j=j: h.index == cap2img[j])
           for j, r in enumerate(vsectl.search(target, np.asarray(emb.captions), k=n))]
    i2t = [rank(r.hits, lambda h, i=i: h.image == i)
           for i, r in enumerate(vsectl.search(caption_target or target, np.asarray(emb.images), k=c,
                                               side="captions"))]
    return np.asarray(i2t), np.asarray(t2i)


def test_search_ranks_equal_eval_ranks_both_directions(clipart_run, model, test_emb):
    from vsectl.builders import load_run
    from vsectl.data.sources import load_split
    from vsectl.evaluation import encode_split, evaluate_runs
    from vsectl.scoring.metrics import recall_metrics
    from vsectl.scoring.ranking import rank_retrieval

    indexes = []
    for side in ("images", "captions"):
        result = cli("index", str(test_emb), "--side", side)
        assert result.exit_code == 0, result.output
        indexes.append(vsectl.open_index(result.stdout.strip()))
    emb = indexes[0].embeddings
    i2t, t2i = _ranks_from_search(indexes[0], emb, indexes[1])

    # what `vsectl eval` computes for the same run and split
    cfg, net, text = load_run(clipart_run["run"])
    split = load_split(clipart_run["feats"], "test")
    img, cap = encode_split(net, split, text, torch.device("cpu"))
    ref_i2t, ref_t2i = rank_retrieval([(img, cap)], torch.as_tensor(split.cap2img))
    assert t2i.tolist() == ref_t2i.tolist()
    assert i2t.tolist() == ref_i2t.tolist()
    evaluated = evaluate_runs([clipart_run["run"]], protocol="f30k", split="test", write=False,
                              tie_rule="optimistic")["f30k"]  # search's ranks count strictly greater scores
    assert recall_metrics(i2t, t2i) == evaluated["metrics"]
    assert (emb.n_images, emb.n_captions) == (evaluated["n_images"], evaluated["n_captions"])
    # the embeddings are eval's, bit for bit, and records line up with the store
    assert np.array_equal(np.asarray(emb.images), img.numpy()) and np.array_equal(np.asarray(emb.captions), cap.numpy())
    assert [emb.image(i)["id"] for i in (0, emb.n_images - 1)] == [split.image_ids[0], split.image_ids[-1]]
    assert emb.caption(5)["text"] == split.captions[5] and Path(emb.image(0)["path"]).is_file()


def test_raw_images_replay_the_run_recipe(clipart_run, model, test_emb, tmp_path):
    out = tmp_path / "raw"
    vsectl.embed(model, out, data=clipart_run["raw"], split="test", workers=0, shard_size=50)
    raw, feats = vsectl.open_embeddings(out), vsectl.open_embeddings(test_emb)
    np.testing.assert_allclose(raw.images, feats.images, atol=1e-6)  # same backbone, rounded through float16
    assert raw.meta["backbone"]["backbone"] == "resnet" and raw.meta["backbone"]["input_size"] == 64
    assert _ranks_from_search(raw, raw)[1].tolist() == _ranks_from_search(feats, feats)[1].tolist()


def test_text_and_image_queries_encode_like_the_collection(clipart_run, model, test_emb):
    emb = vsectl.open_embeddings(test_emb)
    text = emb.caption(7)["text"]
    np.testing.assert_allclose(model.encode_text([text])[0], emb.captions[7], atol=1e-5)
    path = emb.image(3)["path"]
    np.testing.assert_allclose(model.encode_images([path])[0], emb.images[3], atol=1e-5)
    [hit] = vsectl.search(emb, model.encode_images([path]), k=1)[0].hits
    assert hit.index == 3 and hit.path == path
    vectors = model.encode_text(["a red apple", "a bird"])
    assert vectors.shape == (2, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ the CLI


def test_search_cli_table_json_sheet_and_queries_file(test_emb, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("traffic light\nbird of peace\n")
    sheet = tmp_path / "sheet.png"
    result = cli("search", str(test_emb), "a red apple", "--queries", str(queries), "-k", "4", "--json",
                 "--sheet", str(sheet), "--device", "cpu")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["query"] for r in payload] == ["a red apple", "traffic light", "bird of peace"]
    assert [h["rank"] for h in payload[0]["hits"]] == [1, 2, 3, 4]
    scores = [h["score"] for h in payload[0]["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert set(payload[0]["hits"][0]) == {"rank", "score", "index", "id", "path", "caption", "image"}
    with Image.open(sheet) as im:
        assert im.width > 4 * 150 and im.height > 3 * 150
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # thumbnails drawn, not a blank page
    table = CliRunner().invoke(app, ["search", str(test_emb), "a red apple", "-k", "2", "--captions",
                                     "--device", "cpu"])
    assert table.exit_code == 0 and "rank" in table.output and "caption" in table.output


def test_image_query_cli_finds_the_image_itself(test_emb):
    emb = vsectl.open_embeddings(test_emb)
    path = emb.image(11)["path"]
    result = cli("search", str(test_emb), "--image", path, "-k", "3", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    [found] = json.loads(result.stdout)
    assert found["query"] == f"image:{Path(path).name}" and found["hits"][0]["index"] == 11


def test_image_folder_skips_unreadable_files_and_counts_them(model, tmp_path):
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    names = sorted(p.name for p in FIXTURE_IMAGES.iterdir())[:5]
    for k, name in enumerate(names):
        shutil.copy(FIXTURE_IMAGES / name, folder / ("sub" if k % 2 else "") / name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "notes.txt").write_text("not an image, not counted")
    out = vsectl.embed(model, tmp_path / "emb", images=folder, workers=0)
    emb = vsectl.open_embeddings(out)
    assert (emb.n_images, emb.n_captions, emb.meta["n_skipped"]) == (5, 0, 1)
    assert emb.meta["skipped"][0]["id"] == "broken.png"
    ids = [emb.image(i)["id"] for i in range(5)]
    assert ids == sorted(ids) and sum(i.startswith("sub/") for i in ids) == 2
    reference = model.encode_images([folder / i for i in ids])
    np.testing.assert_allclose(emb.images, reference, atol=1e-6)
    assert vsectl.embed(model, out, images=folder, workers=0) == out  # finished: nothing to do


# ------------------------------------------------------------------------------------------------ approximate indexes


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_indexes_recall_the_exact_neighbours(test_emb, kind):
    pytest.importorskip("faiss")
    emb = vsectl.open_embeddings(test_emb)
    index = vsectl.open_index(vsectl.build_index(test_emb, kind, side="captions"))
    exact_hits = vsectl.search(emb, np.asarray(emb.images), k=10, side="captions")
    approx_hits = vsectl.search(index, np.asarray(emb.images), k=10, side="captions")
    recall = np.mean([len({h.index for h in a.hits} & {h.index for h in e.hits}) / 10
                      for a, e in zip(approx_hits, exact_hits, strict=True)])
    assert recall >= 0.95
    assert approx_hits[0].hits[0].score == pytest.approx(exact_hits[0].hits[0].score, abs=1e-5)


# ------------------------------------------------------------------------------------------------ resume after SIGKILL


def _same_folders(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


@pytest.mark.slow
def test_killed_embed_resumes_to_the_same_files(clipart_run, model, tmp_path):
    store = clipart_run["feats"] / "train.h5"  # 220 images, 440 captions: 55 + 110 shards of 4
    vsectl.embed(model, tmp_path / "straight", features=store, shard_size=4, batch_size=4)
    cmd = [sys.executable, "-m", "vsectl", "-q", "embed", str(clipart_run["run"]), "--features", str(store), "--out",
           str(tmp_path / "killed"), "--shard-size", "4", "--batch-size", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    shards = tmp_path / "killed.partial" / "shards"
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and len(list(shards.glob("images-*.json"))) < 3 and time.monotonic() - start < 120:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()  # the kill cut it short
    assert 0 < len(list(shards.glob("images-*.json"))) < 55
    assert subprocess.run(cmd, env=env, cwd=REPO, timeout=300).returncode == 0
    _same_folders(tmp_path / "straight", tmp_path / "killed")
    assert not (tmp_path / "killed.partial").exists()


class StopAfter:
    """A Progress that raises KeyboardInterrupt (a Ctrl-C) after `n` items of its first loop."""

    def __init__(self, n: int | None = None) -> None:
        self.n, self.totals = n, []

    def track(self, iterable, total, description):  # noqa: ANN001, ANN201 - the Progress protocol
        self.totals.append(total)
        for k, item in enumerate(iterable):
            if k == self.n:
                raise KeyboardInterrupt
            yield item

    def update(self, **fields) -> None:  # noqa: ANN003
        assert fields["images_per_s"] > 0


def test_interrupted_raw_embed_resumes_from_its_shards(clipart_run, model, tmp_path):
    options = dict(data=clipart_run["raw"], split="test", workers=0, shard_size=16)
    vsectl.embed(model, tmp_path / "straight", **options)
    with pytest.raises(KeyboardInterrupt):
        vsectl.embed(model, tmp_path / "resumed", progress=StopAfter(40), **options)  # after 2 of 8 shards
    progress = StopAfter()
    vsectl.embed(model, tmp_path / "resumed", progress=progress, **options)
    assert progress.totals == [120 - 32, 235]  # images: only the missing shards; captions: all
    _same_folders(tmp_path / "straight", tmp_path / "resumed")


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def other_run(clipart_run, tmp_path_factory) -> Path:
    """A copy of the run with perturbed weights: another model, another fingerprint."""
    from safetensors.torch import load_file, save_file

    from vsectl.checkpoint import read_metadata

    run = tmp_path_factory.mktemp("other") / "clip"
    shutil.copytree(clipart_run["run"], run)
    for which in ("best", "last"):
        path = run / "checkpoints" / which / "model.safetensors"
        state = load_file(str(path))
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(path),
                  metadata=read_metadata(path))
    return run


def _bad(*args: str) -> str:
    result = CliRunner().invoke(app, ["-q", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_queries_are_one_line_exit_2(test_emb, tmp_path):
    emb = str(test_emb)
    assert "query 1 is empty" in _bad("search", emb, "  ", "--device", "cpu")
    assert "k must be at least 1" in _bad("search", emb, "cat", "-k", "0")
    assert "larger than the collection (120 images)" in _bad("search", emb, "cat", "-k", "121")
    assert "give a query" in _bad("search", emb)
    blank = tmp_path / "q.txt"
    blank.write_text("cat\n\ndog\n")
    assert "line 2" in _bad("search", emb, "--queries", str(blank), "--device", "cpu")
    assert "does not exist" in _bad("search", emb, "--image", str(tmp_path / "nope.png"))
    assert "does not exist" in _bad("search", str(tmp_path / "nothing"), "cat")


def test_embeddings_of_another_run_are_refused(test_emb, other_run):
    line = _bad("search", str(test_emb), "a cat", "--run", str(other_run), "--device", "cpu")
    assert "embedded with another model" in line
    with pytest.raises(ConfigError, match="another model"):
        vsectl.search(test_emb, "a cat", model=vsectl.load(other_run, device="cpu"))


def test_an_index_whose_embeddings_changed_is_refused(test_emb, tmp_path):
    emb_dir = tmp_path / "emb"
    shutil.copytree(test_emb, emb_dir)
    index = vsectl.build_index(emb_dir, "flat")
    assert vsectl.open_index(index).kind == "flat"  # a copy that keeps the content is fine
    rows = np.load(emb_dir / "images.npy")
    np.save(emb_dir / "images.npy", rows[::-1].copy())  # same shape, other content
    assert "other embeddings" in _bad("search", str(index), "cat", "--device", "cpu")


def test_missing_faiss_names_the_extra(test_emb, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    line = _bad("index", str(test_emb), "--kind", "hnsw")
    assert "pip install 'vsectl[faiss]'" in line
    assert not list(Path(test_emb).glob("*hnsw-images*"))  # nothing written


def test_embed_refuses_empty_folders_unknown_recipes_and_wrong_stores(clipart_run, model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert "holds no images" in _bad("embed", str(clipart_run["run"]), "--images", str(tmp_path / "empty"),
                                     "--out", str(tmp_path / "e"), "--device", "cpu")
    assert "exactly one of" in _bad("embed", str(clipart_run["run"]), "--out", str(tmp_path / "e"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    with pytest.raises(DataError, match="none of the 1 images"):
        vsectl.embed(model, tmp_path / "e", images=tmp_path / "bad", workers=0)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()
    unknown = dataclasses.replace(model.recipe, weights_sha256={"model.safetensors": "0" * 64})
    with pytest.raises(ConfigError, match="cannot reproduce the run's feature recipe"):
        unknown.build_backbone()
    no_recipe = vsectl.load(clipart_run["run"], device="cpu")
    no_recipe.recipe = None
    with pytest.raises(ConfigError, match="without a recorded backbone"):
        vsectl.embed(no_recipe, tmp_path / "e", images=FIXTURE_IMAGES)
    (tmp_path / "no_stores").mkdir()
    line = _bad("embed", str(clipart_run["run"]), "--features", str(tmp_path / "no_stores"), "--out",
                str(tmp_path / "e"), "--device", "cpu")
    assert "holds no feature stores (<split>.h5)" in line


def test_a_store_from_another_backbone_is_refused(clipart_run, tmp_path):
    from transformers import ResNetConfig, ResNetModel

    from vsectl.extract import extract

    weights = tmp_path / "other-resnet"
    torch.manual_seed(1)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 12], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(weights)  # same shape, other weights
    [store] = extract("resnet", clipart_run["raw"], tmp_path / "feats", "test", weights=weights, size=64, workers=0,
                      device="cpu", limit=4)
    line = _bad("embed", str(clipart_run["run"]), "--features", str(store), "--out", str(tmp_path / "e"),
                "--device", "cpu")
    assert "another feature recipe" in line and "weights_sha256" in line


def test_a_run_that_trains_its_own_backbone_embeds_image_files(clipart_run, tmp_path):
    from vsectl.config import load_recipe
    from vsectl.evaluation import evaluate_runs
    from vsectl.scoring.metrics import recall_metrics
    from vsectl.training import train

    overrides = [f"data.root={clipart_run['raw']}", "name=bb", "data.batch_size=16", "data.val_images=16",
                 "model.embed_dim=32", "model.image.encoder=backbone", "model.image.feat_dim=1280",
                 "model.image.backbone.name=efficientnet-lite0", "model.image.backbone.size=32", "train.epochs=1",
                 "train.max_steps_per_epoch=2"]
    run = train(load_recipe(REPO / "recipes" / "tiny.yaml", overrides), out_root=tmp_path / "runs", device="cpu")
    model = vsectl.load(run, device="cpu")
    assert model.end_to_end
    emb = vsectl.open_embeddings(vsectl.embed(model, tmp_path / "emb", data=clipart_run["raw"], split="test",
                                              workers=0))
    assert (emb.n_images, emb.meta["backbone"]["end_to_end"]) == (120, True)
    np.testing.assert_allclose(model.encode_images([emb.image(5)["path"]])[0], emb.images[5], atol=1e-5)
    i2t, t2i = _ranks_from_search(emb, emb)
    evaluated = evaluate_runs([run], protocol="f30k", split="test", write=False,
                              tie_rule="optimistic")["f30k"]["metrics"]  # strict ranks, as read off the search
    ours = recall_metrics(i2t, t2i)
    assert ours == evaluated, (ours, evaluated)
    line = _bad("embed", str(run), "--features", str(clipart_run["feats"] / "test.h5"), "--out", str(tmp_path / "f"),
                "--device", "cpu")
    assert "trains its own image backbone" in line


@pytest.mark.parametrize("sizes", [(4, 4, 4), (3, 1, 5, 2)])
def test_store_blocks_pad_like_one_set_at_a_time(sizes, tmp_path):
    from vsectl.data.features import H5Features
    from vsectl.data.store import write_store
    from vsectl.retrieval.collection import padded_block
    from vsectl.retrieval.model import _pad_sets

    g = np.random.default_rng(0)
    sets = [g.standard_normal((n, 6)).astype(np.float32) for n in (2, *sizes, 7)]
    store = write_store(tmp_path / "s.h5", [(str(i), s) for i, s in enumerate(sets)], [], [], feat_dim=6,
                        dtype="float16")
    features = H5Features(store)
    rows, lengths = features.block(1, 1 + len(sizes))                     # one read for the middle sets
    feats, got_lengths = padded_block(rows, lengths, 6)
    want, want_lengths = _pad_sets([features.get(i) for i in range(1, 1 + len(sizes))])
    assert torch.equal(feats, want) and torch.equal(got_lengths, want_lengths)
    with pytest.raises(IndexError):
        features.block(3, len(sets) + 1)
