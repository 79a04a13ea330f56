"""The base of the image backbones: the `Backbone` interface, its registry, normalisation constants, the CNN grid
size and strict state-dict loading. The members live in `backbones.py` (EfficientNet-Lite, transformers towers) and
`resnets.py` (the official detector and WSL layouts); both import from here, so neither imports the other.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vsectl.errors import ConfigError
from vsectl.io import sha256_file
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
    lr_mult: ClassVar[float] = 0.1  # the paper's backbone LR factor for ImageNet classifiers (0.01 detector / WSL)
    bgr: ClassVar[bool] = False     # channels fed in BGR order (Caffe-converted weights)

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

    def stages(self) -> list[nn.Module] | None:
        """The network as five modules applied in turn, image → stem, C2, C3, C4, C5 map (B, C, h, w).

        Training end to end freezes a prefix of them (the freeze schedule) and may checkpoint each. None: the backbone
        has no such split (vision transformers), so it trains or freezes as a whole and `forward` gives the set.
        """
        return None

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


def read_state_dict(path: Path, what: str) -> dict[str, Any]:
    """A torch state dict file (tensors only: `weights_only`) or a .safetensors file, or a one-line ConfigError."""
    if Path(path).suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{what} weights {path} are not a readable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for files that are not state dicts
        raise ConfigError(f"{what} weights {path} are not a readable torch state dict ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what} weights {path} hold a {type(state).__name__}, not a state dict")
    return state


def load_state_dict_strict(module: nn.Module, path: Path, what: str) -> None:
    """Load a plain torch state dict file into `module`, requiring every key to match (one-line error otherwise)."""
    state = read_state_dict(path, what)
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
