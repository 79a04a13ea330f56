"""The lean BERT forward equals `transformers`' own, bit for bit, and is taken only where it does."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vsectl.models import lean_bert  # noqa: E402
from vsectl.models.lean_bert import lean_ok, lean_states  # noqa: E402


def tiny_bert(seed: int = 0, attn: str = "sdpa", **overrides):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=40, max_position_embeddings=32, **overrides)
    config._attn_implementation = attn
    return transformers.BertModel(config, add_pooling_layer=False).eval()


def batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, 50, (n,), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    return tokens, mask


def slow_states(body, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BERT written out token by token and head by head in float64: embeddings, then per layer softmax attention
    over the kept keys, residual + LayerNorm, GELU feed-forward, residual + LayerNorm."""
    sd = {k: v.double() for k, v in body.state_dict().items()}
    cfg = body.config
    heads, eps = cfg.num_attention_heads, cfg.layer_norm_eps

    def norm(v, w, b):
        mean = v.mean()
        var = ((v - mean) ** 2).mean()
        return (v - mean) / math.sqrt(var + eps) * w + b

    def lin(v, name):
        return sd[name + ".weight"] @ v + sd[name + ".bias"]

    out = torch.zeros(*tokens.shape, cfg.hidden_size, dtype=torch.float64)
    for b in range(tokens.shape[0]):
        e = "embeddings."
        xs = [norm(sd[e + "word_embeddings.weight"][tokens[b, t]] + sd[e + "token_type_embeddings.weight"][0]
                   + sd[e + "position_embeddings.weight"][t], sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"])
              for t in range(tokens.shape[1])]
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q = [lin(x, p + "attention.self.query") for x in xs]
            k = [lin(x, p + "attention.self.key") for x in xs]
            v = [lin(x, p + "attention.self.value") for x in xs]
            d = cfg.hidden_size // heads
            new = []
            for t in range(len(xs)):
                a = torch.zeros(cfg.hidden_size, dtype=torch.float64)
                for h in range(heads):
                    s = slice(h * d, (h + 1) * d)
                    logits = [float(q[t][s] @ k[u][s]) / math.sqrt(d) for u in range(len(xs)) if mask[b, u]]
                    top = max(logits)
                    w = [math.exp(z - top) for z in logits]
                    kept = [u for u in range(len(xs)) if mask[b, u]]
                    a[s] = sum(wi / sum(w) * v[u][s] for wi, u in zip(w, kept, strict=True))
                y = norm(lin(a, p + "attention.output.dense") + xs[t], sd[p + "attention.output.LayerNorm.weight"],
                         sd[p + "attention.output.LayerNorm.bias"])
                f = lin(torch.nn.functional.gelu(lin(y, p + "intermediate.dense")), p + "output.dense")
                new.append(norm(f + y, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"]))
            xs = new
        out[b] = torch.stack(xs)
    return out


def same_states(body, tokens, mask, autocast: bool = False) -> None:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = lean_states(body, tokens, mask)
        theirs = body(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    kept = mask[..., None].expand_as(ours)
    assert ours.dtype == theirs.dtype and torch.equal(ours[kept], theirs[kept])


@pytest.mark.parametrize("lengths", [[1], [7], [5, 2, 9], [4, 4]])
@pytest.mark.parametrize("precision", ["float32", "float64", "bf16 autocast"])
def test_equals_transformers_bit_for_bit(lengths, precision):
    """float64 tells the attention scales apart (1/sqrt(d) and d**-0.5 differ in the last bit for d = 8 here)."""
    body = tiny_bert().to(torch.float64 if precision == "float64" else torch.float32)
    tokens, mask = batch(lengths)
    same_states(body, tokens, mask, autocast=precision == "bf16 autocast")


def test_the_activation_is_the_body_own():
    body = tiny_bert(hidden_act="gelu_new")  # the tanh approximation, not torch's exact GELU
    assert lean_ok(body)
    same_states(body, *batch([6, 2]))


def test_matches_a_slow_reference():
    body = tiny_bert(seed=3)
    tokens, mask = batch([6, 3], seed=4)
    with torch.no_grad():
        ours = lean_states(body, tokens, mask).double()
    ref = slow_states(body, tokens, mask)
    kept = mask[..., None].expand_as(ours)
    torch.testing.assert_close(ours[kept], ref[kept], atol=1e-5, rtol=0)


def test_follows_weights_changed_in_place():
    body = tiny_bert()
    tokens, mask = batch([5, 3])
    with torch.no_grad():
        before = lean_states(body, tokens, mask)
        body.encoder.layer[1].output.dense.weight.mul_(1.5)
        after = lean_states(body, tokens, mask)
        theirs = body(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    kept = mask[..., None].expand_as(after)
    assert not torch.equal(before[kept], after[kept])
    assert torch.equal(after[kept], theirs[kept])


@pytest.mark.parametrize("overrides", [{"attn": "eager"}, {"is_decoder": True}, {"chunk_size_feed_forward": 2}])
def test_other_bodies_keep_their_own_forward(overrides):
    assert lean_ok(tiny_bert())
    assert not lean_ok(tiny_bert(**overrides))


def test_hooks_and_stand_in_layers_keep_the_body_own_forward():
    """A forward hook would be skipped, and a Linear subclass (an adapter, say) could compute something else."""
    body = tiny_bert()
    handle = body.encoder.layer[0].output.register_forward_hook(lambda *a: None)
    assert not lean_ok(body)
    handle.remove()
    assert lean_ok(body)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = body.encoder.layer[1].attention.self
    scaled = Scaled(24, 24)
    scaled.load_state_dict(layer.value.state_dict())
    layer.value = scaled
    assert not lean_ok(body)


def test_other_architectures_are_not_taken():
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                        intermediate_size=40, max_position_embeddings=40)
    config._attn_implementation = "sdpa"
    body = transformers.RobertaModel(config, add_pooling_layer=False).eval()
    assert not lean_ok(body)  # same module names, but positions start after the padding id


def test_text_encoder_uses_it_in_eval_only(monkeypatch):
    from vsectl.models.pooling.gpo import GPO
    from vsectl.models.text_encoders import TransformerTextEncoder

    enc = TransformerTextEncoder(tiny_bert(), 8, GPO(d_pe=8, d_hidden=8))
    calls = []
    real = lean_bert.lean_states
    monkeypatch.setattr("vsectl.models.text_encoders.lean_states",
                        lambda *a: calls.append(1) or real(*a))
    tokens, mask = batch([5, 3])
    lengths = mask.sum(1)
    enc.eval()
    with torch.no_grad():
        fast = enc.states(tokens, lengths)
    assert calls == [1]
    enc.train()
    torch.manual_seed(0)
    enc.states(tokens, lengths)  # training mode: the body's own forward (dropout included)
    assert calls == [1]
    enc.eval()
    with torch.no_grad():
        monkeypatch.setattr("vsectl.models.text_encoders.lean_ok", lambda body: False)
        slow = enc.states(tokens, lengths)
    kept = mask[..., None].expand_as(fast)
    assert torch.equal(fast[kept], slow[kept])
