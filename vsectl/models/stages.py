"""Split a CNN backbone into the five stages the freeze schedule works on: stem, C2, C3, C4, C5 (spec IMG-10).

The stages are plain callables over the backbone's own modules: they register nothing, so state-dict keys stay the
backbone's, and the grid encoder runs them in turn (optionally under activation checkpointing).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

N_STAGES = 5  # stem, then the maps at strides 4, 8, 16, 32 (ResNet conv1+pool, layer1..layer4)


class EfficientNetStage(nn.Module):
    """Some consecutive MBConv blocks of an EfficientNet (plus its stem or head), with the package's drop-connect.

    Args:
        net: the `efficientnet_lite_pytorch.EfficientNet`.
        block_ids: indices into `net._blocks`, in order.
        stem: run the stem (conv, BN, ReLU6) first.
        head: run the head (1×1 conv to 1280, BN, ReLU6) last.
    """

    def __init__(self, net: Any, block_ids: list[int], stem: bool = False, head: bool = False) -> None:
        super().__init__()
        self.__dict__["net"] = net  # a plain reference: the parameters stay registered in the backbone only
        self.block_ids = block_ids
        self.stem = stem
        self.head = head

    def owned_modules(self) -> list[nn.Module]:
        """The backbone modules this stage runs (their parameters are registered in the backbone, not here)."""
        net = self.__dict__["net"]
        mods = [net._conv_stem, net._bn0] if self.stem else []
        mods += [net._blocks[i] for i in self.block_ids]
        return mods + ([net._conv_head, net._bn1] if self.head else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.__dict__["net"]
        if self.stem:
            x = net._swish(net._bn0(net._conv_stem(x)))
        rate = net._global_params.drop_connect_rate
        for i in self.block_ids:  # the package scales drop-connect by the block's depth, as extract_features does
            x = net._blocks[i](x, drop_connect_rate=rate * i / len(net._blocks) if rate else rate)
        if self.head:
            x = net._swish(net._bn1(net._conv_head(x)))
        return x


def efficientnet_stages(net: Any) -> list[nn.Module]:
    """Group an EfficientNet's blocks by their output stride: /2 (with the stem), /4, /8, /16, /32 (with the head)."""
    groups: list[list[int]] = [[] for _ in range(N_STAGES)]
    stride = net._conv_stem.stride[0]
    for i, block in enumerate(net._blocks):
        stride *= block._depthwise_conv.stride[0]
        groups[min(int(math.log2(stride)) - 1, N_STAGES - 1)].append(i)
    return [EfficientNetStage(net, ids, stem=k == 0, head=k == N_STAGES - 1) for k, ids in enumerate(groups)]


def stage_modules(stage: nn.Module) -> list[nn.Module]:
    """The modules holding one stage's parameters and BN statistics (views list theirs; other stages own them)."""
    return stage.owned_modules() if hasattr(stage, "owned_modules") else [stage]
