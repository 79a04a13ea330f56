"""Image and text encoders, the joint model and its parameter groups (spec §5, §6, §8.2)."""

from __future__ import annotations

import math

import pytest
import torch

from vsectl.config import ImageConfig, LRMultConfig, ModelConfig, TextConfig, pool_options
from vsectl.kinds import TextInput
from vsectl.models.image_encoders import GridEncoder, RegionEncoder, grid_size_augment, l2_normalize
from vsectl.models.pooling import MaxPool, MeanPool
from vsectl.models.text_encoders import BiGRUTextEncoder, load_pretrained_text
from vsectl.models.vse import create_model, param_groups


def test_l2_normalize_adds_eps_to_the_norm_gpo18():
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(l2_normalize(x), x / (5.0 + 1e-8))


def test_region_fc_is_xavier_uniform_with_zero_bias_img2():
    enc = RegionEncoder(feat_dim=200, embed_dim=100, pool=MaxPool(), mlp_hidden=16)
    bound = math.sqrt(6 / (200 + 100))
    assert enc.fc.weight.abs().max() <= bound and enc.fc.weight.abs().max() > 0.9 * bound
    assert torch.all(enc.fc.bias == 0)


def test_region_encoder_is_fc_plus_mlp_then_pool_then_l2_img4():
    torch.manual_seed(0)
    enc = RegionEncoder(feat_dim=6, embed_dim=5, pool=MeanPool(), mlp_hidden=4).eval()
    feats, lengths = torch.randn(3, 4, 6), torch.tensor([4, 2, 3])
    emb, _ = enc(feats, lengths)
    for b, n in enumerate(lengths.tolist()):
        rows = enc.fc(feats[b : b + 1]) + enc.mlp(feats[b : b + 1])  # eval BN: per-row, no batch statistics
        expected = rows[0, :n].mean(0)
        torch.testing.assert_close(emb[b], expected / (expected.norm() + 1e-8), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_region_mlp_batchnorm_sees_padded_rows_in_training_img3():
    torch.manual_seed(0)
    enc = RegionEncoder(feat_dim=4, embed_dim=3, pool=MeanPool(), mlp_hidden=4).train()
    feats, lengths = torch.randn(2, 5, 4), torch.tensor([5, 2])
    feats[1, 2:] = 0.0
    enc.mlp.bn.reset_running_stats()
    enc(feats, lengths)
    h = enc.mlp.fc1(feats).reshape(10, 4)  # all B·K rows, zero rows included
    torch.testing.assert_close(enc.mlp.bn.running_mean, 0.1 * h.mean(0).detach())


def test_region_encoder_has_no_unused_batchnorm_img5():
    enc = RegionEncoder(feat_dim=8, embed_dim=6, pool=MaxPool(), mlp_hidden=4)
    assert [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm1d)] == [enc.mlp.bn]


def test_grid_size_augment_keeps_order_pads_with_zero_and_never_empties():
    torch.manual_seed(3)
    b, k = 64, 20
    feats = torch.arange(1, k + 1, dtype=torch.float32).repeat(b, 1)[..., None]  # value = position + 1
    lengths = torch.full((b,), k)
    out, new_lengths = grid_size_augment(feats, lengths)
    assert out.size(1) == int(new_lengths.max())
    assert torch.all(new_lengths >= 1)
    for i in range(b):
        n = int(new_lengths[i])
        kept = out[i, :n, 0]
        assert torch.all(kept[1:] > kept[:-1])  # survivors keep their order
        assert torch.all(out[i, n:] == 0)


def test_grid_size_augment_drop_rate_matches_spec():
    """u ~ U(0,1); if u > 0.2 drop each cell with p = 0.2·u: expected fraction dropped 0.8·0.2·0.6 = 9.6%."""
    torch.manual_seed(0)
    feats, lengths = torch.ones(4000, 50, 1), torch.full((4000,), 50)
    _, new_lengths = grid_size_augment(feats, lengths)
    dropped = 1 - new_lengths.float().mean().item() / 50
    assert dropped == pytest.approx(0.096, abs=0.004)
    assert (new_lengths == 50).float().mean().item() >= 0.2 - 0.02  # about 20% keep everything


def test_grid_encoder_augments_only_in_training():
    torch.manual_seed(0)
    enc = GridEncoder(feat_dim=4, embed_dim=3, pool=MeanPool())
    feats, lengths = torch.randn(8, 30, 4), torch.full((8,), 30)
    enc.eval()
    a, _ = enc(feats, lengths)
    b, _ = enc(feats, lengths)
    torch.testing.assert_close(a, b)
    enc.train()
    c, _ = enc(feats, lengths)
    assert not torch.allclose(a, c)


def test_bigru_encoder_shapes_init_and_unit_norm_txt2_txt3():
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=20, word_dim=8, embed_dim=6, pool=MeanPool())
    assert enc.embed.weight.abs().max() <= 0.1
    tokens, lengths = torch.randint(1, 20, (3, 7)), torch.tensor([7, 2, 5])
    emb, _ = enc(tokens, lengths)
    assert emb.shape == (3, 6)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_bigru_encoder_ignores_padding_and_averages_directions_txt3():
    torch.manual_seed(0)
    enc = BiGRUTextEncoder(vocab_size=20, word_dim=8, embed_dim=6, pool=MeanPool())
    tokens, lengths = torch.randint(1, 20, (2, 7)), torch.tensor([7, 3])
    emb, _ = enc(tokens, lengths)
    out, _ = enc.rnn(enc.embed(tokens[1:2, :3]))  # the short caption alone, no padding at all
    h = (out[..., :6] + out[..., 6:]) / 2
    expected = h[0].mean(0)
    torch.testing.assert_close(emb[1], expected / (expected.norm() + 1e-8), atol=1e-6, rtol=1e-5)


def test_transformer_text_encoder_from_a_local_tiny_bert_txt5_txt6(tiny_bert_dir):
    cfg = ModelConfig(embed_dim=12, image=ImageConfig(feat_dim=8, mlp_hidden=4),
                      text=TextConfig(encoder="transformers", pretrained=str(tiny_bert_dir), pool=pool_options(d_pe=8)))
    model = create_model(cfg)
    _, tokenizer = load_pretrained_text(str(tiny_bert_dir))
    ids = [tokenizer("a dog on the grass")["input_ids"], tokenizer("a red ball")["input_ids"]]
    tokens = torch.zeros(2, len(ids[0]), dtype=torch.long)
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)] = torch.tensor(seq)
    model.eval()
    emb, theta = model.encode_text(tokens, torch.tensor([len(s) for s in ids]))
    assert emb.shape == (2, 12)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert theta.shape[1] == len(ids[0])  # GPO over all tokens, [CLS] and [SEP] included


def test_missing_pretrained_text_model_is_one_clear_error(tmp_path):
    from vsectl.errors import ConfigError

    with pytest.raises(ConfigError, match="not in the Hugging Face cache"):
        load_pretrained_text("no-such-org/no-such-model")


def test_param_groups_put_the_transformer_body_at_its_multiplier(tiny_bert_dir):
    cfg = ModelConfig(embed_dim=12, image=ImageConfig(feat_dim=8, mlp_hidden=4),
                      text=TextConfig(encoder="transformers", pretrained=str(tiny_bert_dir)))
    model = create_model(cfg)
    groups = {g["name"]: g for g in param_groups(model, LRMultConfig())}
    assert groups["text_body"]["lr_mult"] == 0.1
    body = {id(p) for p in model.text.body.parameters()}
    assert {id(p) for p in groups["text_body"]["params"]} == body
    assert all(id(p) not in body for p in groups["text_head"]["params"])
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_two_gpos_at_default_sizes_hold_25408_parameters_gpo19():
    model = create_model(ModelConfig(embed_dim=16, image=ImageConfig(feat_dim=8, mlp_hidden=4),
                                     text=TextConfig(word_dim=8)), vocab_size=10)
    assert sum(p.numel() for p in model.image.pool.parameters()) + sum(
        p.numel() for p in model.text.pool.parameters()) == 25_408


def test_frozen_body_gets_no_gradients_and_no_optimizer_group(tiny_bert_dir):
    cfg = ModelConfig(embed_dim=12, image=ImageConfig(feat_dim=8, mlp_hidden=4),
                      text=TextConfig(encoder="transformers", pretrained=str(tiny_bert_dir), freeze_body=True))
    model = create_model(cfg).train()
    assert not model.text.body.training  # no dropout in a frozen body
    names = [g["name"] for g in param_groups(model, LRMultConfig())]
    assert "text_body" not in names
    tokens, lengths = torch.tensor([[2, 5, 6, 3]]), torch.tensor([4])
    emb, _ = model.encode_text(tokens, lengths)
    emb.sum().backward()
    assert all(p.grad is None for p in model.text.body.parameters())
    assert model.text.proj.weight.grad.abs().sum() > 0  # the projection still learns


def test_cached_states_give_the_same_embedding_as_running_the_body(tiny_bert_dir):
    cfg = ModelConfig(embed_dim=12, image=ImageConfig(feat_dim=8, mlp_hidden=4),
                      text=TextConfig(encoder="transformers", pretrained=str(tiny_bert_dir), freeze_body=True))
    model = create_model(cfg).eval()
    tokens, lengths = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 8, 9, 3]]), torch.tensor([4, 5])
    direct, _ = model.encode_text(tokens, lengths)
    states = model.text.states(tokens, lengths).detach()
    cached, _ = model.encode_text(states, lengths, TextInput.STATES)
    torch.testing.assert_close(direct, cached)


def test_glove_initialises_known_words_and_keeps_uniform_elsewhere(tmp_path):
    from vsectl.models.glove import glove_matrix

    path = tmp_path / "glove.txt"
    path.write_text("dog 0.5 -0.5 1.0\ncat 1.5 2.0 -1.0\nunused 9 9 9\n")
    table, found = glove_matrix(["<pad>", "dog", "zebra", "cat"], str(path), dim=3)
    assert found == 2
    torch.testing.assert_close(torch.from_numpy(table[1]), torch.tensor([0.5, -0.5, 1.0]))
    torch.testing.assert_close(torch.from_numpy(table[3]), torch.tensor([1.5, 2.0, -1.0]))
    assert abs(table[2]).max() <= 0.1


def test_glove_dimension_mismatch_is_a_config_error(tmp_path):
    from vsectl.errors import ConfigError
    from vsectl.models.glove import glove_matrix

    path = tmp_path / "glove.txt"
    path.write_text("dog 0.5 -0.5 1.0\n")
    with pytest.raises(ConfigError, match="word_dim"):
        glove_matrix(["dog"], str(path), dim=300)
