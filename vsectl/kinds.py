"""Encoder kinds: what each registered image and text encoder kind reads and takes, asked instead of its name.

A recipe names a kind (`model.image.encoder: region`); callers look the kind up here and ask it what it does (does it
read stored feature sets or pixels? what do the data workers drop? does it train a backbone?). This module imports no
torch, so a recipe is checked without the models; a kind names its builder as `module:function`, imported when a
model is built (or gives the function itself).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from vsectl.registry import Registry


class ImageInput(str, Enum):
    """What an image encoder kind takes in, and so which image sources can serve it (`vsectl.data.door`)."""

    FEATURES = "features"  # stored feature sets (regions or grid cells), (B, K, D) with (B,) lengths
    PIXELS = "pixels"      # decoded images, (B, 3, S, S) uint8; the encoder holds its own backbone

    @property
    def rate_name(self) -> str:
        """The training throughput's name in progress lines: images for pixels (the cost), pairs for sets."""
        return "images_per_s" if self is ImageInput.PIXELS else "pairs_per_s"


class TextInput(str, Enum):
    """The form of the `tokens` a batch carries."""

    IDS = "ids"        # (B, T) int64 token ids, padded with the tokenizer's pad id
    STATES = "states"  # (B, T, H) float32 token states of a frozen transformers body, zero-padded (text_cache.py)


def text_input_for(cache_states: bool) -> TextInput:
    """A run whose recipe caches a frozen body's token states (`model.text.cache_states`) trains on states."""
    return TextInput.STATES if cache_states else TextInput.IDS


def resolve(target: str | Callable[..., Any]) -> Callable[..., Any]:
    """A callable given as itself or as 'package.module:name' (imported now)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ImageKind:
    """One image encoder kind.

    Attributes:
        name: the recipe's `model.image.encoder`.
        reads: what the encoder takes in; the data door opens a split with a source that provides it.
        build: `(ImageConfig, embed_dim) -> nn.Module`, or its 'module:function'. A PIXELS encoder exposes
            `input_size` (the square side it takes).
        worker_drop: the share of each feature set the data workers drop in training when `model.image.size_augment`
            (0: none there; an encoder may augment on the device instead).
        trains_backbone: the encoder holds a backbone whose stages the schedule holds fixed and then releases
            (`set_fixed_blocks`, `backbone_parameters`), with the loss-scale ramp of its first unfrozen epoch.
    """

    name: str
    reads: ImageInput
    build: str | Callable[..., Any]
    worker_drop: float = 0.0
    trains_backbone: bool = False

    def drop(self, size_augment: bool) -> float:
        """The per-element drop rate of the data workers for this kind."""
        return self.worker_drop if size_augment else 0.0


@dataclass(frozen=True)
class TextKind:
    """One text encoder kind (a text tower).

    Attributes:
        name: the recipe's `model.text.encoder`.
        side: the `TextSide` class (or its 'module:Class') that prepares a new run's text processing (a vocabulary, a
            pretrained body and its tokenizer), saves it into the run and loads it back.
        build: `(TextConfig, embed_dim, vocab_size=, body=) -> nn.Module`, or its 'module:function'. The module may
            define `body_parameters()` (a pretrained body: trained with `train.lr_mult.text_body`).
        only: `model.text` switches that only this kind reads; setting one under another kind is refused.
    """

    name: str
    side: str | Callable[..., Any]
    build: str | Callable[..., Any]
    only: tuple[str, ...] = ()


IMAGE_KINDS: Registry[ImageKind] = Registry("image encoder")
TEXT_KINDS: Registry[TextKind] = Registry("text encoder")


def register_image_kind(kind: ImageKind) -> ImageKind:
    return IMAGE_KINDS.register(kind.name)(kind)


def register_text_kind(kind: TextKind) -> TextKind:
    return TEXT_KINDS.register(kind.name)(kind)


REGION_DROP = 0.2  # BUTD regions dropped i.i.d. with p = 0.2 in the data worker (spec §3)

register_image_kind(ImageKind("region", ImageInput.FEATURES, "vsectl.models.image_encoders:build_region",
                              worker_drop=REGION_DROP))
register_image_kind(ImageKind("grid", ImageInput.FEATURES, "vsectl.models.image_encoders:build_grid"))  # on device
register_image_kind(ImageKind("backbone", ImageInput.PIXELS, "vsectl.models.grid:build_backbone",
                              trains_backbone=True))
register_text_kind(TextKind("bigru", "vsectl.builders:VocabSide", "vsectl.models.text_encoders:build_bigru",
                            only=("glove",)))
register_text_kind(TextKind("transformers", "vsectl.builders:PretrainedSide",
                            "vsectl.models.text_encoders:build_transformers", only=("freeze_body",)))
