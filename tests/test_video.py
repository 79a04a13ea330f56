"""The video variant: frame-feature sets of varying length, 1 to 20 captions per video, V→T / T→V evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vsectl.builders import load_run
from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.data.sources import load_split
from vsectl.data.store import StoreWriter
from vsectl.evaluation import encode_split, evaluate_runs
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent
WORDS = ["dog", "cat", "car", "ball", "man", "woman", "tree", "boat", "bird", "horse"]


def make_video_store(root: Path, split: str, n_videos: int, captions_per_video: list[int], seed: int) -> None:
    """Videos of 3-20 frames (16-d); each shows one or two concept words; captions name them."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).normal(size=(len(WORDS), 16))
    with StoreWriter(root / f"{split}.h5", 16, attrs={"source": "generated video fixture"}) as w:
        for v in range(n_videos):
            concepts = rng.choice(len(WORDS), size=2, replace=False)
            frames = rng.normal(size=(int(rng.integers(3, 21)), 16)) * 0.5
            frames[: len(frames) // 2] += 2 * directions[concepts[0]]
            frames[len(frames) // 2 :] += 2 * directions[concepts[1]]
            idx = w.add_image(f"video{v}", frames.astype(np.float32))
            for _ in range(captions_per_video[v % len(captions_per_video)]):
                w.add_caption(f"a {WORDS[concepts[0]]} then a {WORDS[concepts[1]]}", idx)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video")
    make_video_store(root, "train", 40, [20, 1, 5], seed=0)   # MSR-VTT-like training: up to 20 captions per video
    make_video_store(root, "dev", 12, [1], seed=1)
    make_video_store(root, "test", 15, [1], seed=2)           # 1k-A-like test: one caption per video
    return root


def test_video_store_holds_variable_frame_counts_and_caption_counts(video_root):
    split = load_split(video_root, "train")
    lengths = split.features.lengths()
    assert lengths.min() >= 3 and lengths.max() <= 20 and len(set(lengths.tolist())) > 3
    counts = np.bincount(split.cap2img)
    assert set(counts.tolist()) == {1, 5, 20}


def test_video_recipes_load_with_the_paper_settings():
    for name in ("msrvtt_gpo", "vatex_gpo"):
        cfg = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert cfg.data.modality == "video" and cfg.model.image.encoder == "grid"
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.lr_decay_epoch, cfg.data.batch_size) == (35, 1e-4, 25, 128)
        assert (cfg.loss.margin, cfg.model.embed_dim) == (0.2, 1024)


def test_video_training_and_eval_match_a_loop_reference(video_root, tmp_path):
    overrides = [f"data.root={video_root}", "model.image.feat_dim=16", "model.embed_dim=32", "model.text.word_dim=16",
                 "model.text.vocab_min_count=1", "data.batch_size=16", "data.num_workers=0", "train.epochs=2",
                 "train.lr=2e-3", "name=video"]
    run = train(load_recipe(REPO / "recipes" / "msrvtt_gpo.yaml", overrides), tmp_path, device="cpu")
    result = evaluate_runs([run], protocol="f30k", split="test", device="cpu", write=False,
                           tie_rule="optimistic")["f30k"]  # the loops below count strictly greater scores
    assert result["modality"] == "video" and result["n_images"] == 15 and result["n_captions"] == 15

    cfg, model, text = load_run(run, "best")
    split = load_split(video_root, "test")
    vid, cap = encode_split(model, split, text, torch.device("cpu"))
    sims = (vid @ cap.T).tolist()
    v2t = [min(sum(s > sims[i][j] for s in sims[i]) for j in np.flatnonzero(split.cap2img == i)) for i in range(15)]
    t2v = [sum(sims[k][j] > sims[split.cap2img[j]][j] for k in range(15)) for j in range(15)]
    r1 = 100 * np.mean(np.array(v2t) < 1)
    assert result["metrics"]["i2t_r1"] == pytest.approx(r1)
    assert result["metrics"]["t2i_r10"] == pytest.approx(100 * np.mean(np.array(t2v) < 10))
    assert result["metrics"]["i2t_meanr"] == pytest.approx(np.mean(v2t) + 1)


def test_eval_table_names_the_video_directions(video_root, tmp_path):
    overrides = [f"data.root={video_root}", "model.image.feat_dim=16", "model.embed_dim=16", "model.text.word_dim=8",
                 "model.text.vocab_min_count=1", "data.batch_size=16", "data.num_workers=0", "train.epochs=1",
                 "train.max_steps_per_epoch=2", "name=v2"]
    run = train(load_recipe(REPO / "recipes" / "vatex_gpo.yaml", overrides), tmp_path, device="cpu")
    result = CliRunner().invoke(app, ["eval", str(run), "--split", "test", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "video→text" in result.output and "text→video" in result.output
