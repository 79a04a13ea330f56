"""The joint visual-semantic embedding model: an image encoder and a text encoder into one L2-normalised space."""

from __future__ import annotations

import torch
from torch import nn

from vsectl.config import LRMultConfig, ModelConfig
from vsectl.kinds import TextInput
from vsectl.losses import ContrastiveLoss
from vsectl.models.image_encoders import create_image_encoder
from vsectl.models.text_encoders import create_text_encoder


class VSEModel(nn.Module):
    """Image and text encoders whose outputs are compared by cosine similarity, and the training loss.

    The loss is a submodule so that a learned part of it (InfoNCE's temperature) is saved, restored and optimised
    with the model; the hinge has no state, so hinge checkpoints hold the encoders only.
    """

    def __init__(self, image: nn.Module, text: nn.Module, loss: nn.Module | None = None) -> None:
        super().__init__()
        self.image = image
        self.text = text
        self.loss = loss if loss is not None else ContrastiveLoss()

    def encode_image(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, D) sets, (B,) lengths → (B, E) fp32 unit vectors and the pooling weights."""
        return self.image(feats, lengths)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, text_input: TextInput = TextInput.IDS
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) ids (or, for STATES, (B, T, H) cached token states), (B,) lengths → (B, E) fp32 unit vectors and
        the pooling weights."""
        if TextInput(text_input) is TextInput.STATES:
            if not hasattr(self.text, "forward_states"):
                raise ValueError(f"{type(self.text).__name__} takes token ids only, not cached token states")
            return self.text.forward_states(tokens, lengths)
        return self.text(tokens, lengths)

    def forward(self, batch: dict[str, torch.Tensor], text_input: TextInput = TextInput.IDS
                ) -> tuple[torch.Tensor, torch.Tensor]:
        img, _ = self.encode_image(batch["images"], batch.get("image_lengths"))  # raw images carry no lengths
        cap, _ = self.encode_text(batch["tokens"], batch["token_lengths"], text_input)
        return img, cap


def create_model(cfg: ModelConfig, vocab_size: int | None = None, text_body: nn.Module | None = None,
                 loss: nn.Module | None = None) -> VSEModel:
    """Build the model from its config. `vocab_size` is for the BiGRU; `text_body` a ready transformers model; `loss`
    the training loss (`losses.create_loss`; the hinge when None)."""
    image = create_image_encoder(cfg.image, cfg.embed_dim)
    text = create_text_encoder(cfg.text, cfg.embed_dim, vocab_size=vocab_size, body=text_body)
    return VSEModel(image, text, loss)


def param_groups(model: VSEModel, mult: LRMultConfig) -> list[dict]:
    """Split parameters into named groups with their LR multipliers (spec §8.2).

    Groups: image_head (fc, MLP, pooler), backbone (the image backbone of a `backbone` encoder: 0.01 for the detector
    and WSL, 0.1 for ImageNet classifiers unless `train.lr_mult.backbone` says otherwise), text_head, text_body, and
    loss (a learned temperature: the base LR, no weight decay, as open_clip).

    Returns:
        dicts with 'name', 'lr_mult' and 'params' (and 'weight_decay' where it differs); empty groups are dropped.
    """
    body_ids = {id(p) for p in model.text.body_parameters()} if hasattr(model.text, "body_parameters") else set()
    text_body: list[nn.Parameter] = []
    text_head: list[nn.Parameter] = []
    for param in model.text.parameters():
        if param.requires_grad:  # a frozen body belongs to no group
            (text_body if id(param) in body_ids else text_head).append(param)
    backbone = getattr(model.image, "backbone", None)
    # The whole backbone joins its group even while the schedule holds it fixed: the optimizer then already knows
    # every parameter when blocks unfreeze, and a resumed run rebuilds the same groups at any epoch.
    backbone_params = model.image.backbone_parameters() if backbone is not None else []
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    backbone_mult = mult.backbone if mult.backbone >= 0 else (backbone.lr_mult if backbone is not None else 0.0)
    groups = [
        {"name": "image_head", "lr_mult": mult.image_head,
         "params": [p for p in model.image.parameters() if p.requires_grad and id(p) not in backbone_ids]},
        {"name": "backbone", "lr_mult": backbone_mult, "params": backbone_params},
        {"name": "text_head", "lr_mult": mult.text_head, "params": text_head},
        {"name": "text_body", "lr_mult": mult.text_body, "params": text_body},
        {"name": "loss", "lr_mult": 1.0, "weight_decay": 0.0, "params": [p for p in model.loss.parameters()
                                                                         if p.requires_grad]},
    ]
    return [g for g in groups if g["params"]]
