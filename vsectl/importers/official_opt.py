"""The official VSE∞ training options (`opt`, an argparse Namespace in each checkpoint) → a vsectl RunConfig.

Every option the official code defines is either mapped to a recipe key, checked, or ignored with a reason; any other
option stops the import, because vsectl cannot promise the imported model computes what the original did.
Source of the rules: the official code (woodfrog/vse_infty, `arguments.py`, `train.py`, `lib/vse.py`), both branches.
"""

from __future__ import annotations

from typing import Any

from vsectl.config import (
    BackboneConfig,
    DataConfig,
    ImageConfig,
    LossConfig,
    LRMultConfig,
    ModelConfig,
    RunConfig,
    TextConfig,
    TrainConfig,
    pool_options,
)
from vsectl.errors import CheckpointError, ConfigError
from vsectl.pool_options import PoolOptions
from vsectl.recipe_yaml import MAX_STRING, shown

# argparse defaults of the official code, used (and recorded as such) when an option is absent from a checkpoint
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "data_name": "precomp", "margin": 0.2, "num_epochs": 30, "batch_size": 128, "word_dim": 300, "embed_size": 1024,
    "num_layers": 1, "grad_clip": 2.0, "learning_rate": 0.0002, "lr_update": 15, "optim": "adam", "log_step": 10,
    "img_dim": 2048, "no_imgnorm": False, "no_txtnorm": False, "precomp_enc_type": "basic",
    "vse_mean_warmup_epochs": 0, "drop": True,
    # grid checkpoints (precomp_enc_type=backbone) only
    "backbone_source": "detector", "embedding_warmup_epochs": 2, "backbone_warmup_epochs": 5,
    "backbone_lr_factor": 0.01, "input_scale_factor": 1.0,
}
GRID_OPTIONS = ("backbone_source", "embedding_warmup_epochs", "backbone_warmup_epochs", "backbone_lr_factor",
                "input_scale_factor")
GRID_BACKBONES = ("detector", "wsl")  # backbone_source values and vsectl's backbones of the same layout
BASE_IMAGE_SIDE = 256                 # the official raw-image loader: side = 256 × input_scale_factor

MAPPED: dict[str, str] = {  # option → where its value goes
    "data_name": "data.root (data/coco or data/f30k; grid: data/coco_raw or data/f30k_raw; eval takes --data-root) "
                 "and the suggested eval protocol",
    "margin": "loss.margin",
    "num_epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "word_dim": "model.text.word_dim (BiGRU; unused by the BERT text side)",
    "embed_size": "model.embed_dim",
    "num_layers": "checked: the BiGRU text encoder has 1 layer",
    "grad_clip": "train.grad_clip",
    "learning_rate": "train.lr",
    "lr_update": "train.lr_decay_epoch (the official loop multiplies every LR by 0.1 once, at that epoch)",
    "optim": "train.optimizer ('adam' builds AdamW in the official code)",
    "log_step": "train.log_every",
    "img_dim": "model.image.feat_dim",
    "no_imgnorm": "checked: must be false (vsectl always L2-normalises the image embedding)",
    "no_txtnorm": "checked: must be false (vsectl always L2-normalises the caption embedding)",
    "precomp_enc_type": "model.image.encoder ('basic' = precomputed regions → region; 'backbone' = raw images → "
                        "backbone, the grid model)",
    "vse_mean_warmup_epochs": "loss.hardest_negative_from_epoch",
    "drop": "model.text.size_augment (the BiGRU branch's caption augmentation switch)",
    "vocab_size": "checked: the --vocab file plus <mask> has this many words, as the word table has rows",
    "backbone_source": "grid: model.image.backbone.name ('detector' or 'wsl'); ignored in region checkpoints",
    "embedding_warmup_epochs": "grid: train.embedding_warmup_epochs (the backbone is frozen before it); ignored in "
                               "region checkpoints",
    "backbone_warmup_epochs": "grid: train.backbone_warmup_epochs; ignored in region checkpoints",
    "backbone_lr_factor": "grid: train.lr_mult.backbone; ignored in region checkpoints",
    "input_scale_factor": "grid: model.image.backbone.size = 256 × this (2.0 → 512 px); ignored in region "
                          "checkpoints",
}

IGNORED: dict[str, str] = {  # option → why it does not enter the config
    "data_path": "a folder on the training machine; eval takes --data-root",
    "vocab_path": "where the training machine kept the vocabulary; the file itself is given with --vocab",
    "workers": "data-loader processes of the training machine (data.num_workers keeps the paper recipes' 4, or 8 "
               "for grid models)",
    "val_step": "defined but not used by the official training loop (it validates once per epoch, as vsectl does)",
    "logger_name": "TensorBoard folder on the training machine",
    "model_name": "checkpoint folder on the training machine",
    "resume": "the checkpoint a run was resumed from; not part of the model",
    "reset_start_epoch": "a resume switch; not part of the model",
    "max_violation": "the official loop turns hardest negatives on at vse_mean_warmup_epochs whatever this held, and "
                     "writes True back into opt, so vse_mean_warmup_epochs carries the schedule",
    "backbone_path": "the backbone's starting weights on the training machine; a grid checkpoint holds the trained "
                     "backbone itself",
}

# Not options but constants of the official code, so they are set here rather than read.
WEIGHT_DECAY = {"bigru": 0.01,   # BiGRU branch, region features: AdamW built without weight_decay → its default 0.01
                "bert": 1.0e-4}  # BERT branch: decay_factor = 1e-4 passed to AdamW
GRID_WEIGHT_DECAY = 1.0e-4       # grid runs of both branches pass decay_factor = 1e-4
LR_DECAY_FACTOR = 0.1            # adjust_learning_rate: LR × 0.1 at lr_update
BERT_LR_MULT = 0.1               # the BERT body's parameter group runs at learning_rate × 0.1
RECIPE_WORKERS = 4               # data.num_workers of the paper recipes
GRID_RECIPE_WORKERS = 8          # ... and of the grid recipes (JPEG decoding in the workers)


FLAGS = ("no_imgnorm", "no_txtnorm", "drop", "max_violation", "reset_start_epoch")  # argparse store_true options
WHOLE = ("num_epochs", "batch_size", "word_dim", "embed_size", "num_layers", "lr_update", "log_step", "img_dim",
         "vse_mean_warmup_epochs", "vocab_size", "embedding_warmup_epochs", "backbone_warmup_epochs", "workers",
         "val_step")
REAL = ("margin", "grad_clip", "learning_rate", "backbone_lr_factor", "input_scale_factor")


def _flag(name: str, value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise CheckpointError(f"{source}: official option {name}={shown(value)} is not true or false")


def _number(name: str, value: Any, source: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise CheckpointError(f"{source}: official option {name}={shown(value)} is not a finite number")
    if name in WHOLE:
        if value != int(value):
            raise CheckpointError(f"{source}: official option {name}={shown(value)} is not a whole number")
        return int(value)
    return value


def plain_options(opt: dict[Any, Any], source: str) -> dict[str, Any]:
    """The options as plain values: names are text, flags booleans (a string "False" is false, not a non-empty
    string), numbers finite numbers; a tensor, an object or a huge string is refused in one line."""
    out: dict[str, Any] = {}
    for name, value in opt.items():
        if not isinstance(name, str) or len(name) > 100:
            raise CheckpointError(f"{source}: official option name {shown(name)} is not a plain name")
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise CheckpointError(f"{source}: official option {name} is a {type(value).__name__}, not a plain value; "
                                  "an official checkpoint's options are text, numbers and true/false")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise CheckpointError(f"{source}: official option {name} is {len(value):,} characters long; an official "
                                  f"option is short (at most {MAX_STRING})")
        if name in FLAGS:
            value = _flag(name, value, source)
        elif name in WHOLE or name in REAL:
            value = _number(name, value, source)
        out[name] = value
    return out


def is_grid(opt: dict[str, Any]) -> bool:
    """Whether the checkpoint is a grid model (raw images through a CNN backbone) rather than a region model."""
    return opt.get("precomp_enc_type", OFFICIAL_DEFAULTS["precomp_enc_type"]) == "backbone"


def check_fields(opt: dict[str, Any], source: str) -> None:
    """Fail on the first option that is neither mapped nor known to be irrelevant, or an image side vsectl lacks."""
    kind = opt.get("precomp_enc_type", OFFICIAL_DEFAULTS["precomp_enc_type"])
    if kind not in ("basic", "backbone"):
        raise CheckpointError(f"{source}: cannot place official option precomp_enc_type={shown(kind)}; 'basic' (region "
                              "features) and 'backbone' (grid, raw images) import")
    if kind == "backbone" and _value(opt, "backbone_source") not in GRID_BACKBONES:
        raise CheckpointError(f"{source}: cannot place official option backbone_source="
                              f"{shown(_value(opt, 'backbone_source'))}; vsectl has the official "
                              f"{' and '.join(GRID_BACKBONES)} backbones")
    for name, value in opt.items():
        if name not in MAPPED and name not in IGNORED:
            raise CheckpointError(
                f"{source}: cannot place official option {name}={shown(value)}; vsectl does not know what it changes, "
                "so it cannot promise the imported model computes what the original did"
            )


def _value(opt: dict[str, Any], name: str) -> Any:
    return opt[name] if name in opt else OFFICIAL_DEFAULTS[name]


def data_root_for(data_name: str, grid: bool = False) -> str:
    """The data.root the paper recipes use for an official data_name (coco_precomp → data/coco; grid: data/coco_raw)."""
    name = str(data_name)
    suffix = "_raw" if grid else ""
    for known in ("coco", "f30k"):
        if known in name:
            return f"data/{known}{suffix}"
    return f"data/{name}{suffix}"


def protocol_for(data_name: str) -> str:
    """The eval protocol that reproduces the paper's table for this dataset."""
    return "coco5k" if "coco" in str(data_name) else "f30k"


def build_config(
    opt: dict[str, Any], branch: str, name: str, gpo_sizes: dict[str, tuple[int, int]], mlp_hidden: int,
    source: str, text_model: str = "", backbone_weights: str = "",
) -> RunConfig:
    """The RunConfig that reproduces the official model (and, for training, its recipe).

    Args:
        opt: the checkpoint's options as a dict.
        branch: "bigru" or "bert" (read from the text weights).
        name: the run name.
        gpo_sizes: {"image"|"text": (d_pe, d_hidden)} read from the GPO weights.
        mlp_hidden: hidden width of the region MLP, read from its weights (unused by grid checkpoints).
        source: the checkpoint path, for messages.
        text_model: BERT only: the folder or hub id the config and tokenizer came from.
        backbone_weights: grid only: the weights file the backbone is built from (the imported run's own copy).
    """
    check_fields(opt, source)
    for flag in ("no_imgnorm", "no_txtnorm"):
        if _value(opt, flag):
            raise CheckpointError(f"{source}: cannot place official option {flag}=True; vsectl always L2-normalises "
                                  "embeddings, so this model's similarities would differ")
    if _value(opt, "optim") != "adam":
        raise CheckpointError(f"{source}: cannot place official option optim={shown(_value(opt, 'optim'))}; vsectl "
                              "trains with AdamW only (the official 'adam')")
    if branch == "bigru" and _value(opt, "num_layers") != 1:
        raise CheckpointError(f"{source}: cannot place official option num_layers={shown(_value(opt, 'num_layers'))}; "
                              "vsectl's BiGRU text encoder has one layer")
    grid = is_grid(opt)

    def pool(side: str) -> PoolOptions:
        d_pe, d_hidden = gpo_sizes[side]
        return pool_options("gpo", d_pe=d_pe, d_hidden=d_hidden, temperature=0.1)

    try:
        if branch == "bigru":
            text = TextConfig(encoder="bigru", word_dim=int(_value(opt, "word_dim")), vocab_min_count=4,
                              size_augment=bool(_value(opt, "drop")), pool=pool("text"))
        else:
            text = TextConfig(encoder="transformers", pretrained=text_model, size_augment=True, pool=pool("text"))
        if grid:
            scale = float(_value(opt, "input_scale_factor"))
            backbone = BackboneConfig(name=str(_value(opt, "backbone_source")), weights=backbone_weights,
                                      size=int(BASE_IMAGE_SIDE * scale))
            image = ImageConfig(encoder="backbone", feat_dim=int(_value(opt, "img_dim")), size_augment=True,
                                pool=pool("image"), backbone=backbone)
        else:
            image = ImageConfig(encoder="region", feat_dim=int(_value(opt, "img_dim")), mlp_hidden=mlp_hidden,
                                size_augment=True, pool=pool("image"))
        return RunConfig(
            name=name,
            seed=0,  # the official runs are unseeded
            data=DataConfig(root=data_root_for(_value(opt, "data_name"), grid),
                            batch_size=int(_value(opt, "batch_size")),
                            num_workers=GRID_RECIPE_WORKERS if grid else RECIPE_WORKERS, val_images=1000,
                            drop_last=True),
            model=ModelConfig(embed_dim=int(_value(opt, "embed_size")), image=image, text=text),
            loss=LossConfig(margin=float(_value(opt, "margin")),
                            hardest_negative_from_epoch=int(_value(opt, "vse_mean_warmup_epochs"))),
            train=TrainConfig(
                epochs=int(_value(opt, "num_epochs")), optimizer="adamw", lr=float(_value(opt, "learning_rate")),
                lr_decay_epoch=int(_value(opt, "lr_update")), lr_decay_factor=LR_DECAY_FACTOR,
                weight_decay=GRID_WEIGHT_DECAY if grid else WEIGHT_DECAY[branch],
                grad_clip=float(_value(opt, "grad_clip")), precision="fp32",
                log_every=max(1, int(_value(opt, "log_step"))),
                lr_mult=LRMultConfig(image_head=1.0, text_head=1.0, text_body=BERT_LR_MULT,
                                     backbone=float(_value(opt, "backbone_lr_factor")) if grid else -1.0),
                **(_grid_schedule(opt) if grid else {}),
            ),
        )
    except (ConfigError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{source}: the official options do not make a valid vsectl config ({err})") from None


def _grid_schedule(opt: dict[str, Any]) -> dict[str, Any]:
    """The grid run's freeze schedule: the official loop's embedding/backbone warm-ups and its loss ramp."""
    return {"embedding_warmup_epochs": int(_value(opt, "embedding_warmup_epochs")),
            "backbone_warmup_epochs": int(_value(opt, "backbone_warmup_epochs")),
            "loss_scale_warmup": True}  # the official grid loop always ramps the loss in the first unfrozen epoch


BIGRU_ONLY = ("word_dim", "num_layers", "drop", "vocab_size")


def opt_record(opt: dict[str, Any], branch: str) -> dict[str, dict[str, Any]]:
    """For the provenance file: each option's value and where it went (or why it was ignored)."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in opt.items():
        plain = value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)
        if name in MAPPED:
            out[name] = {"value": plain, "maps_to": MAPPED[name]}
        else:
            out[name] = {"value": plain, "ignored": IGNORED.get(name, "")}
    for name, value in OFFICIAL_DEFAULTS.items():
        if name not in opt and not (branch == "bert" and name in BIGRU_ONLY) and \
                not (name in GRID_OPTIONS and not is_grid(opt)):
            out[name] = {"value": value, "maps_to": MAPPED[name], "absent": "official argparse default used"}
    return out
