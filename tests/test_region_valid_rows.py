"""The region encoder's products over the valid rows only give what fc(x) + MLP(x) over every padded row gives."""

from __future__ import annotations

import copy

import pytest
import torch

from vsectl.models.image_encoders import RegionEncoder
from vsectl.models.pooling.base import length_mask
from vsectl.models.pooling.gpo import GPO

LENGTHS = torch.tensor([5, 2, 3, 1])


def plain(enc: RegionEncoder, feats: torch.Tensor) -> torch.Tensor:
    """Slow reference: every row, padding included, through fc and the MLP (BN over all B·K rows)."""
    return enc.fc(feats) + enc.mlp(feats)


def batch(pad: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    feats = torch.randn(4, 5, 8, dtype=torch.float64)
    valid = length_mask(LENGTHS, 5)[..., None]
    return torch.where(valid, feats, torch.full_like(feats, pad)), valid


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("pad", [0.0, 0.5])  # 0.5: padding as no collate writes it, so the plain form runs
def test_valid_rows_equal_the_plain_form(train: bool, pad: float) -> None:
    torch.manual_seed(1)
    enc = RegionEncoder(8, 6, GPO(), mlp_hidden=4).double().train(train)
    ref_enc = copy.deepcopy(enc)
    feats, valid = batch(pad)
    weight = torch.randn(4, 5, 6, dtype=torch.float64)
    got, ref = enc.project(feats, LENGTHS), plain(ref_enc, feats)
    assert torch.allclose(got, ref, atol=1e-12)  # padded rows too: any pooler sees the same input
    (got * weight).sum().backward()
    (ref * weight).sum().backward()
    grads = dict(ref_enc.named_parameters())
    for name, p in enc.named_parameters():
        if name.startswith("pool."):  # the pooler is not part of the projection
            continue
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-10), name
    for name, buf in ref_enc.mlp.bn.named_buffers():
        assert torch.allclose(getattr(enc.mlp.bn, name).double(), buf.double(), atol=1e-12), name


def test_the_encoder_output_is_unchanged_and_bf16_stays_close() -> None:
    torch.manual_seed(2)
    enc = RegionEncoder(8, 6, GPO(), mlp_hidden=4).eval()
    feats = batch()[0].float()
    emb, _ = enc(feats, LENGTHS)
    pooled, _ = enc.pool(plain(enc, feats), LENGTHS)
    assert torch.allclose(emb, pooled / pooled.norm(dim=-1, keepdim=True), atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x16, ref16 = enc.project(feats, LENGTHS), plain(enc, feats)
    assert x16.dtype == ref16.dtype == torch.bfloat16
    assert (x16.float() - ref16.float()).abs().max() < 5e-2
