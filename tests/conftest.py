"""Shared fixtures: offline Hugging Face, seeded torch, the toy dataset, a tiny BERT folder."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine extra threads oversubscribe the
# cores (measured: a 2-step tiny train() took 20 s with 2 threads under load, 0.3 s with 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated toy dataset in precomp layout (small)."""
    from vsectl.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(root, n_train=120, n_dev=30, n_test=30, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT and fast WordPiece tokenizer saved to a local folder (built from configs, no download)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["a", "dog", "cat", "red", "blue", "ball", "on", "the", "grass", "and", "with", "##s", "run", "##ning",
             "man", "woman", "tree", "car", "big", "small", "next", "to", "sky", "water", "."]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


CLIPART_MINI = REPO / "tests" / "fixtures" / "clipart_mini"


@pytest.fixture(scope="session")
def clipart_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained run on the clip-art fixture, end to end through real parts (about 10 s on one core).

    clipart_mini (380 real images, 2 captions each) → `extract` with a tiny random ResNet saved as a local folder
    (64 px → 2×2 cells of 12-d) into feats/{train,dev,test}.h5 → one epoch of recipes/tiny.yaml on them.

    Returns:
        {"raw": the raw dataset, "feats": the store folder, "run": the run directory, "weights": the ResNet folder}.
    """
    from transformers import ResNetConfig, ResNetModel

    from vsectl.config import load_recipe
    from vsectl.extract import extract
    from vsectl.training import train

    root = tmp_path_factory.mktemp("clipart_run")
    weights = root / "resnet"
    torch.manual_seed(0)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 12], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(weights)
    extract("resnet", CLIPART_MINI, root / "feats", "all", weights=weights, size=64, workers=0, device="cpu")
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml", [f"data.root={root / 'feats'}", "name=clip",
                                                       "model.image.feat_dim=12", "train.epochs=1"])
    run = train(cfg, out_root=root / "runs", device="cpu")
    return {"raw": CLIPART_MINI, "feats": root / "feats", "run": run, "weights": weights}
