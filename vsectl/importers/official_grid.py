"""The image side of the official grid checkpoints (precomp_enc_type=backbone) → vsectl's `encoder: backbone`.

The official grid image encoder is `backbone` (a ResNet-101 detector or WSL ResNeXt-101 held as `backbone.resnet.*`,
plus `backbone.base.*` / `backbone.top.*`: two Sequential views that register the same tensors a second time) and
`image_encoder` (`fc` 2048 → E and the GPO `gpool`; no MLP on this path). vsectl's grid encoder is the same chain:
`image.backbone.net.*` (the backbone up to layer4), `image.fc.*`, `image.pool.*`. Every official key is placed,
dropped for a stated reason, or the import stops naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vsectl.errors import CheckpointError, ConfigError
from vsectl.models.resnets import official_resnet_state, resnet_key

BACKBONE_PREFIX = "backbone."           # the official ResnetFeatureExtractor
HEAD_PREFIX = "image_encoder."          # the official EncoderImageAggr (fc + gpool)
VSECTL_BACKBONE = "image.backbone.net."  # where `detector` / `wsl` keep their ResNetC5
BACKBONE_FILE = "backbone.safetensors"  # the imported run's copy of the trained backbone (what its config builds from)

# (official key prefix, vsectl key prefix, why dropped); as official.IMAGE_KEYS
GRID_HEAD_KEYS: list[tuple[str, str | None, str]] = [
    ("image_encoder.fc.", "image.fc.", ""),
    ("image_encoder.gpool.gru.", "image.pool.gru.", ""),
    ("image_encoder.gpool.linear.", "image.pool.scorer.", ""),
]
CLASSIFIER_WHY = "the backbone's classifier: the grid path ends at layer4 (C5) and the official forward never runs it"
VIEW_WHY = "the official base/top view of backbone.resnet.{name}: the same tensor, checked equal"


def split_grid_image(image: dict[str, torch.Tensor], source: Path
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a grid image encoder state into (backbone keys, head keys)."""
    backbone, head = {}, {}
    for key, value in image.items():
        if key.startswith(BACKBONE_PREFIX):
            backbone[key] = value
        elif key.startswith(HEAD_PREFIX):
            head[key] = value
        else:
            raise CheckpointError(f"{source}: cannot place image encoder key '{key}': a grid checkpoint's image side "
                                  f"holds only {BACKBONE_PREFIX}* and {HEAD_PREFIX}*")
    if not backbone:
        raise CheckpointError(f"{source}: the grid image encoder has no {BACKBONE_PREFIX}* weights")
    if HEAD_PREFIX + "fc.weight" not in head:
        raise CheckpointError(f"{source}: the grid image encoder has no {HEAD_PREFIX}fc.weight")
    return backbone, head


def map_grid_backbone(backbone: dict[str, torch.Tensor], source: Path, what: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, str]]]:
    """The official backbone keys → (the plain ResNetC5 state, vsectl model keys, the keys dropped and why).

    `backbone.resnet.X` becomes `image.backbone.net.X`; a `base`/`top` view key is dropped once its tensor has been
    checked equal to the `resnet` key it names (if only the views are there, they supply the tensors); the classifier
    `fc.*` is dropped. Anything else stops the import (official_resnet_state refuses it).
    """
    try:
        plain = official_resnet_state(backbone, f"{source}: {what} backbone")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    named = {key: resnet_key(key) for key in backbone}
    direct = {name for name, view in named.values() if not view}  # names some non-view key supplies
    dropped = []
    for key, (name, view) in named.items():
        if name.startswith("fc."):
            dropped.append({"key": f"image:{key}", "why": CLASSIFIER_WHY})
        elif view and name in direct:
            dropped.append({"key": f"image:{key}", "why": VIEW_WHY.format(name=name)})
    return plain, {VSECTL_BACKBONE + name: value for name, value in plain.items()}, dropped


def head_sizes_view(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head keys without `image_encoder.`, as the region encoder names them (for reading the GPO sizes)."""
    return {key[len(HEAD_PREFIX):]: value for key, value in head.items()}
