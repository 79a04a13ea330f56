"""BERT's inference forward in a dozen tensor operations per layer, bit for bit the states `transformers` computes.

A query typed into `vsectl serve` is a handful of tokens: the body's matrix products are then short, and much of a
`transformers` forward went to its Python layers (mask building, output classes, hooks). Whole query encodes
(tokenising and pooling included) on one core of an Intel Xeon with AMX, 6-layer MiniLM: 9.19 → 7.62 ms for one text,
15.18 → 13.25 ms for three, 23.64 → 21.68 ms for eight (`benchmarks/bench_text_encode.py`). The weights are read from
the body's own modules at every call, so a body moved to another device or updated in training is seen as it is.

Only bodies whose forward this reproduces are taken (`lean_ok`): model type "bert" with absolute positions, the
exact GELU (or ReLU), PyTorch's fused attention, no decoder or cross-attention. Anything else keeps its own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = frozenset({"bert"})  # architectures whose embeddings and layers are exactly those below
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # transformers' "gelu" is the exact (erf) GELU


def lean_ok(body: nn.Module) -> bool:
    """Whether `lean_states` computes exactly what `body` computes in eval mode."""
    config = getattr(body, "config", None)
    if config is None:
        return False
    return (getattr(config, "model_type", None) in MODEL_TYPES
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and getattr(config, "hidden_act", None) in ACTIVATIONS
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and not getattr(config, "is_decoder", False) and not getattr(config, "add_cross_attention", False)
            and hasattr(body, "embeddings") and hasattr(body, "encoder"))


def _heads(x: torch.Tensor, linear: nn.Linear, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return F.linear(x, linear.weight, linear.bias).view(batch, length, heads, -1).transpose(1, 2)  # (B, h, T, d)


def _layer(x: torch.Tensor, layer: Any, keep: torch.Tensor, heads: int, act: Any, eps: float,
           width: tuple[int]) -> torch.Tensor:
    attention = layer.attention
    q, k, v = (_heads(x, getattr(attention.self, name), heads) for name in ("query", "key", "value"))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(x.shape)   # (B, T, H)
    out = attention.output
    x = F.layer_norm(F.linear(a, out.dense.weight, out.dense.bias) + x, width, out.LayerNorm.weight,
                     out.LayerNorm.bias, eps)
    inner, out = layer.intermediate.dense, layer.output
    h = act(F.linear(x, inner.weight, inner.bias))                                                 # (B, T, 4H)
    return F.layer_norm(F.linear(h, out.dense.weight, out.dense.bias) + x, width, out.LayerNorm.weight,
                        out.LayerNorm.bias, eps)


def lean_states(body: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and (B, T) bool attention mask → (B, T, H) last hidden states, as `body` gives in eval mode.

    Token types are all 0 and positions 0..T-1, the defaults `transformers` uses when none are given.
    """
    config, emb = body.config, body.embeddings
    length = tokens.shape[1]
    eps = config.layer_norm_eps
    x = F.embedding(tokens, emb.word_embeddings.weight) + emb.token_type_embeddings.weight[0]
    x = x + emb.position_embeddings.weight[:length]                                                 # (B, T, H)
    width = (config.hidden_size,)  # a plain int, not a traced size (ONNX export traces this function)
    x = F.layer_norm(x, width, emb.LayerNorm.weight, emb.LayerNorm.bias, eps)
    keep = mask[:, None, None, :].bool()                                                           # (B, 1, 1, T)
    act = ACTIVATIONS[config.hidden_act]
    for layer in body.encoder.layer:
        x = _layer(x, layer, keep, config.num_attention_heads, act, eps, width)
    return x
