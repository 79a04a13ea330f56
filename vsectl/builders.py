"""Assemble a run's model and text processing from its config and run directory (shared by train and eval)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vsectl.checkpoint import load_checkpoint, load_model_state, read_metadata
from vsectl.config import RunConfig, config_from_yaml
from vsectl.data.captions import HFTextProcessor, VocabTextProcessor
from vsectl.data.vocab import Vocab, build_vocab
from vsectl.errors import CheckpointError, ConfigError
from vsectl.losses import create_loss
from vsectl.models.text_encoders import load_pretrained_text, text_body_from_folder
from vsectl.models.vse import VSEModel, create_model
from vsectl.registry import did_you_mean

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
TEXT_MODEL_DIR = "text_model"  # transformers config + tokenizer files, so eval needs no hub


@dataclass
class TextSide:
    """What the data side needs to turn captions into ids, and what the model side needs to build the encoder."""

    vocab: Vocab | None
    tokenizer: Any
    body: torch.nn.Module | None

    def processor(self, augment: bool) -> VocabTextProcessor | HFTextProcessor:
        if self.vocab is not None:
            return VocabTextProcessor(self.vocab, augment=augment)
        return HFTextProcessor(self.tokenizer, augment=augment)

    @property
    def vocab_size(self) -> int | None:
        return len(self.vocab) if self.vocab is not None else None

    @property
    def pad_id(self) -> int:
        if self.vocab is not None:
            return 0
        return int(self.tokenizer.pad_token_id or 0)


def prepare_text(cfg: RunConfig, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
    """Create the text side of a new run and save what eval will need into `run_dir`.

    BiGRU: the vocabulary from `captions` (train + dev, count ≥ min_count) or `model.text.vocab_file`.
    Transformers: the pretrained body and tokenizer; their config and tokenizer files are copied to the run.
    """
    text = cfg.model.text
    if text.encoder == "bigru":
        if text.vocab_file:
            if not Path(text.vocab_file).is_file():
                raise ConfigError(f"model.text.vocab_file not found: {text.vocab_file}")
            vocab = Vocab.load(text.vocab_file)
        else:
            vocab = build_vocab(captions, min_count=text.vocab_min_count)
        if write:
            vocab.save(run_dir / VOCAB_FILE)
        log.info("vocabulary: %d tokens", len(vocab))
        return TextSide(vocab=vocab, tokenizer=None, body=None)
    body, tokenizer = load_pretrained_text(text.pretrained)
    if write:
        body.config.save_pretrained(run_dir / TEXT_MODEL_DIR)
        tokenizer.save_pretrained(run_dir / TEXT_MODEL_DIR)
    return TextSide(vocab=None, tokenizer=tokenizer, body=body)


def load_text(cfg: RunConfig, run_dir: Path) -> TextSide:
    """Rebuild the text side of an existing run from its directory (random body weights: the checkpoint fills them)."""
    if cfg.model.text.encoder == "bigru":
        path = run_dir / VOCAB_FILE
        if not path.is_file():
            raise CheckpointError(f"run {run_dir} has no {VOCAB_FILE}; it is not a complete vsectl run directory")
        return TextSide(vocab=Vocab.load(path), tokenizer=None, body=None)
    folder = run_dir / TEXT_MODEL_DIR
    if not folder.is_dir():
        raise CheckpointError(f"run {run_dir} has no {TEXT_MODEL_DIR}/; it is not a complete vsectl run directory")
    body, tokenizer = text_body_from_folder(folder)
    return TextSide(vocab=None, tokenizer=tokenizer, body=body)


def build_model(cfg: RunConfig, text: TextSide, init_words: bool = False) -> VSEModel:
    """The model of `cfg`; `init_words` starts a new BiGRU run's word table from GloVe when the recipe asks."""
    model = create_model(cfg.model, vocab_size=text.vocab_size, text_body=text.body, loss=create_loss(cfg.loss))
    if init_words and cfg.model.text.glove and text.vocab is not None:
        from vsectl.models.glove import glove_matrix

        table, _ = glove_matrix(text.vocab.idx2word, cfg.model.text.glove, cfg.model.text.word_dim, seed=cfg.seed)
        with torch.no_grad():
            model.text.embed.weight.copy_(torch.from_numpy(table))
    return model


CHECKPOINTS = ("best", "last")  # the checkpoints a run keeps


def resolve_checkpoint(path: Path, which: str = "best") -> tuple[Path, Path]:
    """Accept a run directory or a checkpoint folder; return (run_dir, checkpoint_dir)."""
    path = Path(path)
    if which not in CHECKPOINTS:
        raise CheckpointError(f"unknown checkpoint '{which}'{did_you_mean(which, list(CHECKPOINTS))}; a run keeps "
                              f"{' and '.join(CHECKPOINTS)}")
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    if (path / "model.safetensors").is_file() or path.name.startswith("model") and path.suffix == ".safetensors":
        ckpt = path if path.is_dir() else path.parent
        return ckpt.parent.parent, ckpt
    if not path.is_dir():
        official = f"; a model_best.pth of the official code becomes a run with: vsectl import official {path} " \
            "--out runs/NAME" if path.suffix in (".pth", ".pt", ".tar") else ""
        raise CheckpointError(f"{path} is a file, not a vsectl run: give the run directory (e.g. runs/NAME, made by "
                              f"vsectl train) or one of its checkpoints/best or checkpoints/last folders{official}")
    ckpt = path / "checkpoints" / which
    if not ckpt.exists() and not any(path.glob(f"checkpoints/.old-{which}-*")):
        if which == "best" and (path / "checkpoints" / "last").exists():
            ckpt = path / "checkpoints" / "last"
        else:
            raise CheckpointError(f"run {path} has no checkpoint ({ckpt} is missing); train it first or check the path")
    return path, ckpt


def load_run(
    path: Path, which: str = "best", device: torch.device | str = "cpu"
) -> tuple[RunConfig, VSEModel, TextSide]:
    """Load a trained model from a run directory or checkpoint folder, in eval mode on `device`."""
    run_dir, ckpt = resolve_checkpoint(path, which)
    meta = read_metadata(ckpt) if (ckpt / "model.safetensors").is_file() else {}
    if "config" in meta:
        cfg = config_from_yaml(meta["config"])
    elif (run_dir / "config.yaml").is_file():
        cfg = config_from_yaml((run_dir / "config.yaml").read_text())
    else:
        raise CheckpointError(f"cannot find the configuration of {path}")
    text = load_text(cfg, run_dir)
    model = build_model(cfg, text)
    state = load_checkpoint(ckpt)
    load_model_state(model, state["model"])
    model.to(device).eval()
    return cfg, model, text
