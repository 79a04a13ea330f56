"""The evaluation protocols `vsectl eval` offers: its choices, defaults, tables, JSON and help come from here.

The published protocols (f30k, coco1k, coco5k, dev1k and the group all) are registered below, ECCV Caption and CxC
(and the group extended) by `vsectl.scoring.annotated_protocols`; the `Protocol` class and the registry are in
`vsectl.scoring.protocol_base`. This module imports no torch (the CLI builds its help from it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsectl.errors import ConfigError
from vsectl.registry import did_you_mean
from vsectl.scoring.protocol_base import (
    COCO_5K_IMAGES,
    COCO_FOLD_SIZE,
    DEV_IMAGES,
    GROUPS,
    PROTOCOLS,
    RECALL_COLUMNS,
    FirstImages,
    Folds,
    Protocol,
    register_group,
    register_protocol,
)
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, TIE_RULES

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from vsectl.scoring.positives import GroundTruth

__all__ = ["COCO_5K_IMAGES", "COCO_FOLD_SIZE", "DEV_IMAGES", "GROUPS", "PROTOCOLS", "RECALL_COLUMNS", "FirstImages",
           "Folds", "Protocol", "choices", "evaluate_protocol", "expand", "register_group", "register_protocol"]


register_protocol(Protocol("f30k", "the whole split in one block (Flickr30K 1K test)"))
register_protocol(Folds("coco1k", "COCO 5K testall as five 1K folds, metrics averaged", block=COCO_FOLD_SIZE,
                        default_split="testall", images=COCO_5K_IMAGES))
register_protocol(Protocol("coco5k", "COCO 5K testall in one block", default_split="testall", images=COCO_5K_IMAGES))
register_protocol(FirstImages("dev1k", "the first 1,000 dev images (model selection)", block=DEV_IMAGES,
                              default_split="dev"))


# after the published ones, so that --help and choices() list those first
from vsectl.scoring import annotated_protocols  # noqa: E402, F401  (registers eccv, cxc and the group extended)


def expand(name: str) -> list[Protocol]:
    """The protocols a `--protocol` value names (a protocol, or a group such as `all`)."""
    if name in GROUPS:
        return [PROTOCOLS.get(n) for n in GROUPS[name]]
    if name not in PROTOCOLS:
        known = [n for n, _ in PROTOCOLS.items()] + list(GROUPS)
        raise ConfigError(f"unknown protocol '{name}'{did_you_mean(name, known)}; use one of {choices()}")
    return [PROTOCOLS.get(name)]


def choices() -> str:
    """`f30k | coco1k | … | all`, for help texts."""
    return " | ".join([name for name, _ in PROTOCOLS.items()] + list(GROUPS))


def evaluate_protocol(
    img_embs: Sequence[torch.Tensor],
    cap_embs: Sequence[torch.Tensor],
    cap2img: torch.Tensor | GroundTruth,
    protocol: str | Protocol,
    chunk_size: int = 1024,
    tie_rule: str = DEFAULT_TIE_RULE,
) -> dict:
    """Run one evaluation protocol (`vsectl.scoring.protocols.PROTOCOLS`) on the embeddings of one split.

    Several models form an equal-weight ensemble (per fold for fold protocols).

    Args:
        img_embs: Per model m, (N, E_m) image embeddings.
        cap_embs: Per model m, (C, E_m) caption embeddings.
        cap2img: (C,) image index of each caption, or the protocol's `GroundTruth`.
        protocol: a registered protocol or its name.
        chunk_size: Image rows per similarity chunk.
        tie_rule: how candidates tied exactly with the ground truth count (``TIE_RULES``).

    Returns:
        {"protocol", "tie_rule", "n_images", "n_captions" (the counts ranked), "metrics", "ties": queries with exact
        ties per direction} and what the protocol adds (fold protocols: "folds" and "fold_ties").

    Raises:
        ValueError: for an unknown protocol, a split of the wrong size, or bad inputs.
    """
    from vsectl.scoring.positives import GroundTruth

    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; known protocols: "
                             f"{', '.join(name for name, _ in PROTOCOLS.items())}")
        protocol = PROTOCOLS.get(protocol)
    if tie_rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    if len(img_embs) == 0 or len(img_embs) != len(cap_embs):
        raise ValueError(f"need one caption tensor per image tensor, got {len(img_embs)} and {len(cap_embs)}")
    gt = cap2img if isinstance(cap2img, GroundTruth) else GroundTruth.from_cap2img(cap2img)
    n_img = img_embs[0].shape[0]
    if protocol.images is not None and n_img != protocol.images:
        raise ValueError(f"protocol {protocol.name!r} needs a {protocol.images}-image split (its "
                         f"{protocol.default_split!r}), got {n_img} images")
    return {"protocol": protocol.name, "tie_rule": tie_rule,
            **protocol.evaluate(list(img_embs), list(cap_embs), gt, chunk_size, tie_rule)}

