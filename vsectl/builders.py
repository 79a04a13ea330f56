"""Assemble a run's model and text processing from its config and run directory (shared by train and eval).

The text sides of the text kinds live here: `VocabSide` (BiGRU) and `PretrainedSide` (transformers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vsectl.checkpoint import load_checkpoint, load_model_state, read_metadata
from vsectl.config import RunConfig, TextConfig, config_from_yaml
from vsectl.data.captions import HFTextProcessor, VocabTextProcessor
from vsectl.data.vocab import Vocab, build_vocab
from vsectl.errors import CheckpointError, ConfigError
from vsectl.kinds import TEXT_KINDS, resolve
from vsectl.losses import create_loss
from vsectl.models.text_encoders import load_pretrained_text, text_body_from_folder
from vsectl.models.vse import VSEModel, create_model
from vsectl.registry import did_you_mean

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
TEXT_MODEL_DIR = "text_model"  # transformers config + tokenizer files, so eval needs no hub


@dataclass
class TextSide:
    """A run's text processing: what the data side needs to turn captions into ids, and what the text tower is built
    from. Each text kind (`vsectl.kinds.TEXT_KINDS`) names its subclass, which prepares a new run's side, saves what
    eval needs into the run directory and loads it back.
    """

    vocab: Vocab | None = None
    tokenizer: Any = None
    body: torch.nn.Module | None = None

    @classmethod
    def prepare(cls, cfg: TextConfig, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
        """The side of a new run from its training + dev `captions`; with `write`, saved into `run_dir`."""
        raise NotImplementedError

    @classmethod
    def load(cls, cfg: TextConfig, run_dir: Path) -> TextSide:
        """The side of an existing run, from its directory (a body's weights come from the checkpoint)."""
        raise NotImplementedError

    def processor(self, augment: bool) -> Any:
        """Captions → token ids (`encode(caption, rng)`), with the token-level size augmentation when `augment`."""
        raise NotImplementedError

    def init_weights(self, encoder: torch.nn.Module, cfg: TextConfig, seed: int) -> None:
        """Start a new run's tower from what the recipe names (GloVe words); nothing by default."""

    @property
    def vocab_size(self) -> int | None:
        return len(self.vocab) if self.vocab is not None else None

    @property
    def pad_id(self) -> int:
        return 0


class VocabSide(TextSide):
    """The BiGRU's side: a word vocabulary built from the captions (count ≥ min_count) or read from a file."""

    @classmethod
    def prepare(cls, cfg: TextConfig, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
        if cfg.vocab_file:
            if not Path(cfg.vocab_file).is_file():
                raise ConfigError(f"model.text.vocab_file not found: {cfg.vocab_file}")
            vocab = Vocab.load(cfg.vocab_file)
        else:
            vocab = build_vocab(captions, min_count=cfg.vocab_min_count)
        if write:
            vocab.save(run_dir / VOCAB_FILE)
        log.info("vocabulary: %d tokens", len(vocab))
        return cls(vocab=vocab)

    @classmethod
    def load(cls, cfg: TextConfig, run_dir: Path) -> TextSide:
        path = run_dir / VOCAB_FILE
        if not path.is_file():
            raise CheckpointError(f"run {run_dir} has no {VOCAB_FILE}; it is not a complete vsectl run directory")
        return cls(vocab=Vocab.load(path))

    def processor(self, augment: bool) -> VocabTextProcessor:
        return VocabTextProcessor(self.vocab, augment=augment)

    def init_weights(self, encoder: torch.nn.Module, cfg: TextConfig, seed: int) -> None:
        if cfg.glove:
            from vsectl.models.glove import glove_matrix

            table, _ = glove_matrix(self.vocab.idx2word, cfg.glove, cfg.word_dim, seed=seed)
            with torch.no_grad():
                encoder.embed.weight.copy_(torch.from_numpy(table))


class PretrainedSide(TextSide):
    """A pretrained transformers body and its tokenizer; their config and tokenizer files are copied to the run."""

    @classmethod
    def prepare(cls, cfg: TextConfig, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
        body, tokenizer = load_pretrained_text(cfg.pretrained)
        if write:
            body.config.save_pretrained(run_dir / TEXT_MODEL_DIR)
            tokenizer.save_pretrained(run_dir / TEXT_MODEL_DIR)
        return cls(tokenizer=tokenizer, body=body)

    @classmethod
    def load(cls, cfg: TextConfig, run_dir: Path) -> TextSide:
        folder = run_dir / TEXT_MODEL_DIR
        if not folder.is_dir():
            raise CheckpointError(f"run {run_dir} has no {TEXT_MODEL_DIR}/; it is not a complete vsectl run directory")
        body, tokenizer = text_body_from_folder(folder)
        return cls(tokenizer=tokenizer, body=body)

    def processor(self, augment: bool) -> HFTextProcessor:
        return HFTextProcessor(self.tokenizer, augment=augment)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)


def text_side(cfg: TextConfig) -> type[TextSide]:
    """The TextSide class of the text kind `cfg.encoder` names."""
    return resolve(TEXT_KINDS.get(cfg.encoder).side)


def prepare_text(cfg: RunConfig, run_dir: Path, captions: list[str], write: bool = True) -> TextSide:
    """Create the text side of a new run and save what eval will need into `run_dir`."""
    return text_side(cfg.model.text).prepare(cfg.model.text, run_dir, captions, write=write)


def load_text(cfg: RunConfig, run_dir: Path) -> TextSide:
    """Rebuild the text side of an existing run from its directory (random body weights: the checkpoint fills them)."""
    return text_side(cfg.model.text).load(cfg.model.text, run_dir)


def build_model(cfg: RunConfig, text: TextSide, init_words: bool = False) -> VSEModel:
    """The model of `cfg`; `init_words` starts a new run's text tower from what the recipe names (GloVe)."""
    model = create_model(cfg.model, vocab_size=text.vocab_size, text_body=text.body, loss=create_loss(cfg.loss))
    if init_words:
        text.init_weights(model.text, cfg.model.text, cfg.seed)
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
