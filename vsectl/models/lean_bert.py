"""BERT's inference forward in a dozen tensor operations per layer, the same numbers `transformers` computes.

A query typed into `vsectl serve` is a handful of tokens: the body's matrix products are then short, and much of a
`transformers` forward went to its Python layers (mask building, output classes, hooks). Whole query encodes
(tokenising and pooling included) on one core of an Intel Xeon with AMX, 6-layer MiniLM: 9.19 → 7.62 ms for one text,
15.18 → 13.25 ms for three, 23.64 → 21.68 ms for eight (`benchmarks/bench_text_encode.py`). The weights, buffers and
activation are read from the body's own modules at every call, so a body moved to another device or updated in
training is seen as it is.

Only bodies whose forward this repeats operation for operation are taken (`lean_ok`): a plain `BertModel` with
PyTorch's fused attention, no decoder, cross-attention or chunked feed-forward, plain linear, norm and embedding
layers and no hooks. Anything else keeps its own forward. Tested equal bit for bit to `transformers` on the CPU in
float32, float64 and under bfloat16 autocast.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = frozenset({"bert"})  # architectures whose embeddings and layers are exactly those below
PLAIN = (nn.Linear, nn.LayerNorm, nn.Embedding)  # these must be exactly these classes (an adapter subclass is not)


def _plain_modules(body: nn.Module) -> bool:
    """No hooks anywhere (this forward would skip them), and no subclass standing in for a plain layer."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    for m in body.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, PLAIN) and type(m) not in PLAIN:
            return False
    return True


def lean_ok(body: nn.Module) -> bool:
    """Whether `lean_states` computes what `body` computes in eval mode."""
    config = getattr(body, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    from transformers import BertModel  # the body is a transformers model: the package is already imported

    return (type(body) is BertModel
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and not getattr(config, "is_decoder", False) and not getattr(config, "add_cross_attention", False)
            and not getattr(config, "chunk_size_feed_forward", 0)
            and _plain_modules(body))


def _heads(x: torch.Tensor, linear: nn.Linear, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return F.linear(x, linear.weight, linear.bias).view(batch, length, heads, -1).transpose(1, 2)  # (B, h, T, d)


def _layer(x: torch.Tensor, layer: Any, keep: torch.Tensor | None, heads: int, eps: float,
           width: tuple[int]) -> torch.Tensor:
    attention = layer.attention
    q, k, v = (_heads(x, getattr(attention.self, name), heads) for name in ("query", "key", "value"))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=attention.self.scaling)     # (B, h, T, d)
    a = a.transpose(1, 2).reshape(x.shape)                                                        # (B, T, H)
    out = attention.output
    x = F.layer_norm(F.linear(a, out.dense.weight, out.dense.bias) + x, width, out.LayerNorm.weight,
                     out.LayerNorm.bias, eps)
    inner, out = layer.intermediate, layer.output
    h = inner.intermediate_act_fn(F.linear(x, inner.dense.weight, inner.dense.bias))              # (B, T, I)
    return F.layer_norm(F.linear(h, out.dense.weight, out.dense.bias) + x, width, out.LayerNorm.weight,
                        out.LayerNorm.bias, eps)


def lean_states(body: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids and (B, T) bool attention mask → (B, T, H) last hidden states, as `body` gives in eval mode.

    Token types and positions are the body's own buffers' first T entries, what `transformers` uses when none are
    given; a batch without padding attends without a mask, as `transformers` does (it picks the same kernel).
    """
    config, emb = body.config, body.embeddings
    length = tokens.shape[1]
    eps = config.layer_norm_eps
    x = F.embedding(tokens, emb.word_embeddings.weight)                                            # (B, T, H)
    x = x + emb.token_type_embeddings.weight[emb.token_type_ids[0, :length]]
    x = x + emb.position_embeddings.weight[emb.position_ids[0, :length]]
    width = (config.hidden_size,)  # a plain int, not a traced size (ONNX export traces this function)
    x = F.layer_norm(x, width, emb.LayerNorm.weight, emb.LayerNorm.bias, eps)
    keep = mask[:, None, None, :].bool()                                                           # (B, 1, 1, T)
    if not torch.jit.is_tracing() and bool(mask.all()):  # a traced graph (ONNX) must keep the mask for any input
        keep = None
    for layer in body.encoder.layer:
        x = _layer(x, layer, keep, config.num_attention_heads, eps, width)
    return x
