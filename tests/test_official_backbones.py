"""The paper's grid backbones in their released layouts: BUTD detector ResNet-101 and WSL ResNeXt-101 32×8d (IMG-8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vsectl.errors import ConfigError
from vsectl.models.backbones import BACKBONES
from vsectl.models.resnets import ResNetC5, official_resnet_state

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_KEYS = FIXTURES / "grid_detector_img_enc_keys.json"  # the official grid image encoder: every key and shape
BASE_TOP = {"base.0": "conv1", "base.1": "bn1", "base.4": "layer1", "base.5": "layer2", "base.6": "layer3",
            "top.0": "layer4"}


def official_layout() -> dict[str, list[int]]:
    return json.loads(OFFICIAL_KEYS.read_text())["img_enc"]


def random_official_state(layout: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes; the base/top views share the resnet tensors, as in the official model."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in layout.items():
        if key.startswith("backbone.resnet."):
            state[key] = torch.randint(0, 50, shape, generator=g) if not shape else \
                torch.randn(shape, generator=g)
    for key in layout:
        for view, name in BASE_TOP.items():
            if key.startswith(f"backbone.{view}."):
                state[key] = state["backbone.resnet." + name + key[len(f"backbone.{view}"):]]
    return state


def test_detector_loads_the_official_grid_encoder_layout_img8(tmp_path):
    layout = official_layout()
    state = random_official_state(layout)
    assert len(state) == sum(k.startswith("backbone.") for k in layout)
    path = tmp_path / "detector.pth"
    torch.save(state, path)
    detector = BACKBONES.get("detector")(weights=path)
    own = detector.net.state_dict()
    expected = {k[len("backbone.resnet."):]: v for k, v in state.items()
                if k.startswith("backbone.resnet.") and not k.startswith("backbone.resnet.fc.")}
    assert set(own) == set(expected)  # every backbone key of the official model, nothing more (no classifier)
    for k, v in expected.items():
        assert torch.equal(own[k], v), k
    # Caffe conventions: stride on the first 1×1 conv, max-pool without padding in ceil mode; 512 px → 16×16.
    assert detector.net.layer2[0].conv1.stride == (2, 2) and detector.net.layer2[0].conv2.stride == (1, 1)
    assert detector.net.maxpool.ceil_mode and detector.net.maxpool.padding == 0
    assert detector.grid_shape() == (16, 16) and detector.size == 512 and detector.feat_dim == 2048
    with torch.no_grad():
        fmap = detector.net.eval()(torch.zeros(1, 3, 77, 77))
    assert tuple(fmap.shape[2:]) == detector.grid_shape(77)


def test_the_base_top_views_alone_load_too_and_must_agree_with_the_resnet_keys():
    state = random_official_state(official_layout())
    views = {k[len("backbone."):]: v for k, v in state.items() if k.startswith(("backbone.base.", "backbone.top."))}
    net = ResNetC5(caffe=True)
    net.load_state_dict(official_resnet_state(views, "detector"), strict=True)
    nested = {"base": {k[5:]: v for k, v in views.items() if k.startswith("base.")},
              "top": {k[4:]: v for k, v in views.items() if k.startswith("top.")}}
    net.load_state_dict(official_resnet_state(nested, "detector"), strict=True)
    clash = dict(state)
    clash["backbone.top.0.1.bn2.bias"] = clash["backbone.top.0.1.bn2.bias"] + 1
    with pytest.raises(ConfigError, match="two different tensors for layer4.1.bn2.bias"):
        official_resnet_state(clash, "detector")
    with pytest.raises(ConfigError, match="not part of the backbone"):
        official_resnet_state({**state, "image_encoder.fc.weight": torch.zeros(2, 2)}, "detector")


def test_detector_weights_of_the_wrong_network_are_one_clear_line(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(ResNetC5((1, 1, 1, 1), caffe=True).state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit the network: 0 missing keys|missing keys"):
        BACKBONES.get("detector")(weights=path)
    with pytest.raises(ConfigError, match="needs its weights file"):
        BACKBONES.get("detector")()


def torchvision_resnext101_32x8d_layout() -> dict[str, tuple[int, ...]]:
    """torchvision's resnext101_32x8d state-dict keys and shapes, derived from the architecture (no classifier).

    ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8): stem conv 7×7 3→64 + BN; in stage i (planes
    64·2^i) each block has width = planes·8/64·32, conv1 1×1 in→width, conv2 3×3 width→width in 32 groups, conv3 1×1
    width→4·planes, a BN after each, and the first block a 1×1 conv + BN downsample.
    """
    out: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        out.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                    f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    in_ch = 64
    for i, depth in enumerate((3, 4, 23, 3)):
        planes = 64 * 2**i
        width = planes * 8 // 64 * 32
        for b in range(depth):
            p = f"layer{i + 1}.{b}"
            out[f"{p}.conv1.weight"] = (width, in_ch, 1, 1)
            bn(f"{p}.bn1", width)
            out[f"{p}.conv2.weight"] = (width, width // 32, 3, 3)
            bn(f"{p}.bn2", width)
            out[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                out[f"{p}.downsample.0.weight"] = (planes * 4, in_ch, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            in_ch = planes * 4
    return out


def test_wsl_has_the_torchvision_resnext101_32x8d_layout_img8():
    expected = torchvision_resnext101_32x8d_layout()
    own = {k: tuple(v.shape) for k, v in ResNetC5(groups=32, width_per_group=8).state_dict().items()}
    assert own == expected
    assert sum(v.numel() for k, v in ResNetC5(groups=32, width_per_group=8).state_dict().items()
               if "running" not in k and "batches" not in k) == 86_742_336  # 88.79 M minus the 2.05 M classifier
    try:
        import torchvision
    except ImportError:
        return
    tv = {k: tuple(v.shape) for k, v in torchvision.models.resnext101_32x8d().state_dict().items()
          if not k.startswith("fc.")}
    assert own == tv


def test_wsl_loads_a_torchvision_checkpoint_and_the_official_prefixed_layout(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    plain = {k: torch.randn(s, generator=g) if s else torch.tensor(7) for k, s in
             torchvision_resnext101_32x8d_layout().items()}
    plain |= {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}  # torch hub's file has the classifier
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(plain, hub / "ig_resnext101_32x8-c38310e5.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    wsl = BACKBONES.get("wsl")()  # found in the torch hub cache
    assert torch.equal(wsl.net.layer3[17].conv2.weight, plain["layer3.17.conv2.weight"])
    assert wsl.net.layer2[0].conv2.stride == (2, 2) and wsl.net.layer2[0].conv2.groups == 32
    assert wsl.lr_mult == 0.01 and wsl.grid_shape() == (16, 16)
    prefixed = {f"backbone.resnet.{k}": v for k, v in plain.items()}
    net = ResNetC5(groups=32, width_per_group=8)
    net.load_state_dict(official_resnet_state(prefixed, "wsl"), strict=True)
