"""The paper's two grid backbones in their released layouts: the BUTD detector ResNet-101 and WSL ResNeXt-101 32×8d.

Chen et al., VSE∞ (CVPR 2021), grid rows: `detector` is the Faster R-CNN ResNet-101 of bottom-up attention (Caffe
weights, converted; the stride sits on each downsampling bottleneck's first 1×1 conv, max-pool 3/2 without padding in
ceil mode, BGR input minus pixel means); `wsl` is ResNeXt-101 32×8d weakly supervised on Instagram, in torchvision's
layout (stride on the grouped 3×3 conv). Both end at layer4 (C5): no average pool, no classifier. Weights come from a
file the user provides (or, for `wsl`, the torch hub cache) and load strictly through a key map of the official layouts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.backbone_base import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, Backbone, cnn_grid, read_state_dict

RESNET101_DEPTHS = (3, 4, 23, 3)        # bottlenecks per stage, ResNet-101 and ResNeXt-101
EXPANSION = 4                           # bottleneck output = 4 × its planes
CAFFE_PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)  # BUTD detector, on the 0-255 scale, no std division
GRID_SIDE = 512                         # 512 px → a 16×16 C5 grid (the paper's grid input)
BASE_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")  # the official `base` view, by index
WSL_CACHE_GLOB = "ig_resnext101_32x8*.pth"  # the file name torch.hub gives the WSL ResNeXt-101 32×8d weights


class Bottleneck(nn.Module):
    """1×1 → 3×3 (grouped) → 1×1 residual block with BN after every conv.

    Args:
        in_ch: input channels.
        planes: the block's base width; output = 4·planes.
        stride: spatial stride of the block.
        groups: groups of the 3×3 conv (32 for ResNeXt 32×8d).
        width: channels inside the block (planes for ResNet, planes·groups·8/64 for ResNeXt).
        stride_in_1x1: put the stride on the first 1×1 conv (Caffe/detector) instead of the 3×3 (torchvision).
    """

    def __init__(self, in_ch: int, planes: int, stride: int, groups: int, width: int, stride_in_1x1: bool) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=s1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNetC5(nn.Module):
    """conv1 → bn1 → relu → maxpool → layer1..layer4, returning the C5 map (B, 2048, H/32, W/32).

    Args:
        depths: bottlenecks per stage.
        groups: 3×3 conv groups (1 = ResNet).
        width_per_group: 64 for ResNet, 8 for ResNeXt 32×8d.
        caffe: the detector's Caffe conventions (stride in the first 1×1, max-pool without padding, ceil mode).
    """

    def __init__(self, depths: tuple[int, ...] = RESNET101_DEPTHS, groups: int = 1, width_per_group: int = 64,
                 caffe: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True) if caffe \
            else nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, depth in enumerate(depths):
            planes = 64 * 2**i
            width = planes * width_per_group // 64 * groups
            blocks = []
            for b in range(depth):
                stride = 2 if b == 0 and i > 0 else 1
                blocks.append(Bottleneck(in_ch, planes, stride, groups, width, stride_in_1x1=caffe))
                in_ch = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.out_channels = in_ch

    def stages(self) -> list[nn.Module]:
        """[stem (conv1, bn1, relu, maxpool), layer1, layer2, layer3, layer4]; their parameters stay registered here."""
        return [_Stem(self), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x  # (B, 2048, h, w)


class _Stem(nn.Module):
    """conv1 → bn1 → relu → maxpool of a ResNetC5, without registering them a second time."""

    def __init__(self, net: ResNetC5) -> None:
        super().__init__()
        self.__dict__["net"] = net  # a plain reference: no duplicate keys in any state dict

    def owned_modules(self) -> list[nn.Module]:
        """The modules this view runs (registered in the ResNetC5)."""
        return [self.__dict__["net"].conv1, self.__dict__["net"].bn1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.__dict__["net"]
        return net.maxpool(net.relu(net.bn1(net.conv1(x))))


# ---------------------------------------------------------------------------------------------------- key maps


def _flatten(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _view_key(key: str) -> str | None:
    """'base.4.0.conv1.weight' → 'layer1.0.conv1.weight'; 'top.0.2.bn3.bias' → 'layer4.2.bn3.bias'; else None."""
    head, _, rest = key.partition(".")
    index, _, tail = rest.partition(".")
    if head == "base" and index.isdigit() and int(index) < len(BASE_PARTS):
        return f"{BASE_PARTS[int(index)]}.{tail}"
    if head == "top" and index == "0":
        return f"layer4.{tail}"
    return None


def resnet_key(key: str) -> tuple[str, bool]:
    """An official backbone key → (its plain torchvision-style name, whether it came through a `base`/`top` view).

    'backbone.resnet.layer1.0.conv1.weight' → ('layer1.0.conv1.weight', False);
    'backbone.base.4.0.conv1.weight' → ('layer1.0.conv1.weight', True). Names outside the layout pass through.
    """
    name = key
    for prefix in ("module.", "backbone.", "resnet."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    view = _view_key(name)
    return (view, True) if view is not None else (name, False)


def official_resnet_state(state: dict[str, Any], what: str) -> dict[str, torch.Tensor]:
    """Map a released ResNet state dict onto `ResNetC5`'s keys, strictly.

    Accepted layouts (mixed freely): plain torchvision names (`conv1.weight`, `layer3.22.bn2.bias`), the same under
    `resnet.`/`backbone.resnet.`/`module.` prefixes (the official grid image encoder), and the official `base`/`top`
    views (`base.0` = conv1, `base.1` = bn1, `base.4..6` = layer1..3, `top.0` = layer4), flat or as nested dicts. A
    key given twice (a tensor and its view) must hold the same values. The classifier (`fc.*`) is dropped: the grid
    path ends at C5. Any other key is an error.

    Raises:
        ConfigError: unknown keys, or two views of one key that disagree.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in _flatten(state).items():
        mapped, _ = resnet_key(key)
        if mapped.startswith("fc."):
            continue
        if not (mapped.startswith(("conv1.", "bn1.")) or mapped.split(".")[0] in {f"layer{i}" for i in range(1, 5)}):
            unknown.append(key)
            continue
        if mapped in out and not torch.equal(out[mapped], value):
            raise ConfigError(f"{what} weights hold two different tensors for {mapped} (one of them {key})")
        out[mapped] = value
    if unknown:
        raise ConfigError(f"{what} weights hold {len(unknown)} keys that are not part of the backbone, e.g. "
                          f"{unknown[:2]}; pass the backbone's state dict (or the official image encoder's)")
    return out


def load_resnet_weights(net: ResNetC5, path: Path, what: str) -> None:
    """Load a weights file into `net` through `official_resnet_state`; every key must match (one-line errors)."""
    state = read_state_dict(path, what)
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers around the weights
        if set(state) == {wrapper} or (wrapper in state and isinstance(state[wrapper], dict) and len(state) <= 3):
            state = state[wrapper]
    mapped = official_resnet_state(state, f"{what} ({path})")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(mapped))
    wrong = sorted(k for k in expected if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        raise ConfigError(f"{what} weights {path} do not fit the network: {len(missing)} missing keys {missing[:2]}, "
                          f"{len(wrong)} of the wrong shape {wrong[:2]}")
    net.load_state_dict(mapped, strict=True)


# ---------------------------------------------------------------------------------------------------- backbones


class OfficialResNet(Backbone):
    """Common part of `detector` and `wsl`: a `ResNetC5` at 512 px → 256 cells of 2048.

    Args:
        weights: the weights file (required for `detector`; `wsl` also looks in the torch hub cache).
        size: square input side; default 512 (a 16×16 grid).
    """

    default_size = GRID_SIDE
    lr_mult = 0.01  # the paper's factor for both detector and WSL backbones

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__()
        self.net = self.build()
        path = self.find_weights(weights)
        load_resnet_weights(self.net, path, self.name)
        self.size = size or self.default_size
        self.feat_dim = self.net.out_channels
        self.weights_id = str(path.resolve())
        self.weights_files = [path]
        self.tokens = "cells of the C5 map (layer4), row-major"

    def build(self) -> ResNetC5:
        raise NotImplementedError

    def find_weights(self, weights: str | Path | None) -> Path:
        if weights is None or str(weights) == "":
            raise ConfigError(f"{self.name} needs its weights file: set model.image.backbone.weights=/path/to/file.pth")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{self.name} weights file {path} not found; set model.image.backbone.weights")
        return path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten(2).transpose(1, 2)  # (B, h·w, 2048)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        side = size or self.size
        if self.name != "detector":
            return cnn_grid(side)
        side = math.ceil(side / 2)                      # conv1, stride 2, padding 3
        side = math.ceil((side - 3) / 2) + 1            # Caffe max-pool: kernel 3, stride 2, no padding, ceil mode
        side = cnn_grid(side, steps=3)[0]               # layer2..layer4: stride-2 1×1 convs
        return side, side

    def stages(self) -> list[nn.Module]:
        return self.net.stages()


@BACKBONES.register("detector")
class DetectorResNet101(OfficialResNet):
    """BUTD Faster R-CNN ResNet-101 (Caffe-converted weights): BGR, 0-255 minus pixel means, no std division."""

    name = "detector"
    bgr = True

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__(weights, size)
        # On the [0, 1] pixel scale: x·255 − mean  ==  (x − mean/255) / (1/255).
        self.mean = tuple(m / 255.0 for m in CAFFE_PIXEL_MEANS_BGR)
        self.std = (1 / 255.0,) * 3

    def build(self) -> ResNetC5:
        return ResNetC5(RESNET101_DEPTHS, groups=1, width_per_group=64, caffe=True)


@BACKBONES.register("wsl")
class WSLResNeXt101(OfficialResNet):
    """ResNeXt-101 32×8d, weakly supervised on Instagram (torchvision layout), ImageNet mean/std."""

    name = "wsl"

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__(weights, size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def build(self) -> ResNetC5:
        return ResNetC5(RESNET101_DEPTHS, groups=32, width_per_group=8, caffe=False)

    def find_weights(self, weights: str | Path | None) -> Path:
        if weights is None or str(weights) == "":
            hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
            cached = sorted(hub.glob(WSL_CACHE_GLOB)) if hub.is_dir() else []
            if cached:
                return cached[0]
            raise ConfigError(f"wsl weights not found (no {WSL_CACHE_GLOB} in {hub}); set "
                              "model.image.backbone.weights=/path/to/ig_resnext101_32x8.pth")
        return super().find_weights(weights)
