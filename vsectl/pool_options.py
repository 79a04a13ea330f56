"""Typed options of each pooler: one frozen dataclass per pooler name, checked when the recipe is loaded.

A recipe's `pool:` section is read into the options class of its `name`, so a key that pooler does not take
(`pool.k` under `gpo`) fails with a did-you-mean instead of being ignored. The pooler modules themselves live in
`vsectl/models/pooling/` and take these fields as plain keyword arguments; this file imports no torch, so recipes load
without the models.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from vsectl.errors import ConfigError
from vsectl.registry import Registry, did_you_mean
from vsectl.strict import coerce

DEFAULT_POOLER = "gpo"


@dataclass(frozen=True)
class PoolOptions:
    """What every pooler's options have: the registry name. Subclasses add the pooler's own fields."""

    name: str = DEFAULT_POOLER      # a key of the POOLERS registry: gpo, mean, max, maxk (kmax), gem, gpo_*

    AT_LEAST: ClassVar[dict[str, int]] = {}   # field → its smallest allowed value
    POSITIVE: ClassVar[tuple[str, ...]] = ()  # fields that must be > 0

    def __post_init__(self) -> None:
        for key, low in self.AT_LEAST.items():
            if getattr(self, key) < low:
                raise ConfigError(f"pool.{key} must be >= {low}, got {getattr(self, key)}")
        for key in self.POSITIVE:
            if getattr(self, key) <= 0:
                raise ConfigError(f"pool.{key} must be positive, got {getattr(self, key)}")

    def kwargs(self) -> dict[str, Any]:
        """The pooler's constructor keyword arguments (every field but `name`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def keys(self) -> list[str]:
        """The recipe keys this pooler takes, `name` included."""
        return [f.name for f in dataclasses.fields(self)]

    @classmethod
    def from_mapping(cls, data: dict, prefix: str) -> PoolOptions:
        """A `pool:` section → the options class of its `name`; keys of other poolers are refused by name."""
        name = coerce(data.get("name", DEFAULT_POOLER), str, prefix + "name")
        try:
            chosen = options_class(name)
        except ConfigError as err:
            raise ConfigError(f"{prefix}name: {err}") from None
        takes = chosen().keys()
        for key in data:
            if key not in takes:
                others = known_keys().get(str(key))
                close = "" if others else did_you_mean(prefix + str(key), [prefix + k for k in takes])
                whose = f" ({', '.join(others)} take{'s' if len(others) == 1 else ''} it)" if others else ""
                raise ConfigError(f"unknown key '{prefix}{key}'{close}: pooler '{name}' takes {', '.join(takes)}"
                                  f"{whose}")
        hints = typing.get_type_hints(chosen)
        kwargs = {key: coerce(value, hints[key], prefix + key) for key, value in data.items()}
        try:
            return chosen(**kwargs | {"name": name})
        except ConfigError as err:  # the options' own checks name keys as "pool.<key>"
            raise ConfigError(str(err).replace("pool.", prefix)) from None


@dataclass(frozen=True)
class NoOptions(PoolOptions):
    """mean and max: θ is fixed by the set size and there is nothing to set."""


@dataclass(frozen=True)
class MaxKOptions(PoolOptions):
    name: str = "maxk"
    k: int = 10                     # mean of the top-k values per dimension, clipped to the set size

    AT_LEAST: ClassVar[dict[str, int]] = {"k": 1}


@dataclass(frozen=True)
class GeMOptions(PoolOptions):
    name: str = "gem"
    p: float = 3.0                  # initial exponent (learned)


@dataclass(frozen=True)
class GPOOptions(PoolOptions):
    """GPO (Cos/Sin PE → BiGRU) and gpo_mlp (the PE of each rank scored by an MLP)."""

    d_pe: int = 32                  # positional-encoding size (even)
    d_hidden: int = 32              # sequence-model hidden size
    temperature: float = 0.1        # softmax temperature over ranks (official code; the paper does not state it)

    POSITIVE: ClassVar[tuple[str, ...]] = ("d_pe", "d_hidden", "temperature")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_pe % 2:
            raise ConfigError(f"pool.d_pe must be even (sin/cos pairs), got {self.d_pe}")


@dataclass(frozen=True)
class IndexBiGRUOptions(GPOOptions):
    name: str = "gpo_index_bigru"
    max_index: int = 1000           # rows of the learned index table, i.e. the longest set allowed


@dataclass(frozen=True)
class InterpOptions(PoolOptions):
    name: str = "gpo_interp"
    n_knots: int = 21               # learned knots over rank ratio [0, 1], initialised to 1/(n_knots - 1)
    temperature: float = 0.1        # softmax temperature over ranks

    AT_LEAST: ClassVar[dict[str, int]] = {"n_knots": 2}
    POSITIVE: ClassVar[tuple[str, ...]] = ("temperature",)


@dataclass(frozen=True)
class TransformerOptions(GPOOptions):
    name: str = "gpo_transformer"
    transformer_layers: int = 1     # encoder layers (not published; ours)
    transformer_heads: int = 4      # attention heads; must divide d_hidden
    transformer_ffn: int = 64       # feed-forward width (dropout is 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_hidden % self.transformer_heads:
            raise ConfigError(f"pool.transformer_heads ({self.transformer_heads}) must divide pool.d_hidden "
                              f"({self.d_hidden})")

    def kwargs(self) -> dict[str, Any]:
        out = super().kwargs()
        return out | {"layers": out.pop("transformer_layers"), "heads": out.pop("transformer_heads"),
                      "ffn": out.pop("transformer_ffn")}


@dataclass(frozen=True)
class FeatureSizedOptions(GPOOptions):
    """gpo_perdim (a θ per dimension) and gpo_featin (features fed to the generator) need the feature size D."""

    name: str = "gpo_perdim"
    in_dim: int = 0                 # size D of the pooled features; 0 = the encoder's model.embed_dim

    def kwargs(self) -> dict[str, Any]:
        out = super().kwargs()
        if out["in_dim"] <= 0:
            raise ConfigError(f"pooler '{self.name}' needs pool.in_dim, the size of the features it pools "
                              "(the encoders pass model.embed_dim; standalone, set it), e.g. pool.in_dim=1024")
        return out | {"dim": out.pop("in_dim")}


@dataclass(frozen=True)
class Pooler:
    """One row of the pooler table.

    Attributes:
        names: the recipe names (`pool.name`); the first is the pooler's own, the others name it too.
        options: its options class.
        module: its nn.Module class, as 'module:Class' (imported by `vsectl.models.pooling`, which needs torch).
        onnx: `vsectl export --format onnx` can export it.
    """

    names: tuple[str, ...]
    options: type[PoolOptions]
    module: str
    onnx: bool


_P = "vsectl.models.pooling."
POOLER_TABLE = (  # the one list of poolers: POOL_OPTIONS, POOLERS and the exportable names come from it
    Pooler(("gpo",), GPOOptions, _P + "gpo:GPO", onnx=True),
    Pooler(("gpo_perdim",), FeatureSizedOptions, _P + "gpo_perdim:PerDimGPO", onnx=True),
    Pooler(("gpo_mlp",), GPOOptions, _P + "gpo_mlp:MLPGPO", onnx=True),
    Pooler(("gpo_interp",), InterpOptions, _P + "gpo_interp:InterpGPO", onnx=True),
    Pooler(("mean",), NoOptions, _P + "mean:MeanPool", onnx=True),
    Pooler(("max",), NoOptions, _P + "max:MaxPool", onnx=True),
    Pooler(("maxk", "kmax"), MaxKOptions, _P + "maxk:MaxKPool", onnx=True),
    Pooler(("gem",), GeMOptions, _P + "gem:GeMPool", onnx=True),
    Pooler(("gpo_index_bigru",), IndexBiGRUOptions, _P + "gpo_index_bigru:IndexBiGRUGPO", onnx=False),
    Pooler(("gpo_transformer",), TransformerOptions, _P + "gpo_transformer:TransformerGPO", onnx=False),
    Pooler(("gpo_featin",), FeatureSizedOptions, _P + "gpo_featin:FeatInGPO", onnx=False),
)

POOL_OPTIONS: Registry[type[PoolOptions]] = Registry("pooler")  # pooler name → its options class
for _row in POOLER_TABLE:
    for _name in _row.names:
        POOL_OPTIONS.register(_name)(_row.options)


def exportable_poolers() -> tuple[str, ...]:
    """The poolers that export to ONNX, by their own names."""
    return tuple(row.names[0] for row in POOLER_TABLE if row.onnx)


def options_class(name: str) -> type[PoolOptions]:
    """The options class of pooler `name`; unknown names fail with the list of known ones."""
    return POOL_OPTIONS.get(name)


def known_keys() -> dict[str, list[str]]:
    """Every key a pooler takes → the poolers that take it (for error messages)."""
    out: dict[str, list[str]] = {}
    for name in POOL_OPTIONS.names():
        for key in options_class(name)().keys():
            out.setdefault(key, []).append(name)
    return out
