"""What a caption is on its way into the text encoder, chosen once when a run is built: token ids or cached states."""

from __future__ import annotations

from enum import Enum


class TextInput(str, Enum):
    """The form of the `tokens` a batch carries."""

    IDS = "ids"        # (B, T) int64 token ids, padded with the tokenizer's pad id
    STATES = "states"  # (B, T, H) float32 token states of a frozen transformers body, zero-padded (text_cache.py)


def text_input_for(cache_states: bool) -> TextInput:
    """A run whose recipe caches a frozen body's token states (`model.text.cache_states`) trains on states."""
    return TextInput.STATES if cache_states else TextInput.IDS
