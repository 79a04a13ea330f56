"""The grid of a pooling sweep: poolers × branches × seeds expanded into cells, each a list of recipe overrides."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsectl.config import RunConfig, apply_overrides
from vsectl.errors import ConfigError
from vsectl.registry import did_you_mean
from vsectl.science.experiment import read_mapping
from vsectl.strict import from_dict, to_dict

BRANCHES = ("image", "text", "both")
FIXED_POOLS = ("max", "kmax", "mean")  # θ fixed by the set size: the "fixed pooling" side of the verdict
GPO = "gpo"


@dataclass(frozen=True)
class PoolChoice:
    """One pooler on one branch; kmax carries its K (k = 1 is folded into max, as the two are the same θ)."""

    name: str
    k: int = 0

    @property
    def id(self) -> str:
        return f"kmax{self.k}" if self.name == "kmax" else self.name

    @property
    def label(self) -> str:
        if self.name == "kmax":
            return f"K={self.k}"
        return {"max": "max (K=1)", "mean": "mean (K=N)"}.get(self.name, self.name)

    @property
    def sort_key(self) -> tuple:
        """Fixed poolers by K (max = 1, mean = N last among them), then the learned ones by name."""
        order = {"max": 1, "kmax": self.k, "mean": math.inf}
        return (0, order[self.name], "") if self.name in order else (1, 0, self.name)

    def overrides(self, branch: str) -> list[str]:
        out = [f"model.{branch}.pool.name={self.name}"]
        return out + [f"model.{branch}.pool.k={self.k}"] if self.name == "kmax" else out


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: a pooling combination (None = the recipe's own pooler on that branch) and a seed."""

    key: str
    seed: int
    image: PoolChoice | None
    text: PoolChoice | None
    gpo: bool = False  # the GPO reference cell

    @property
    def name(self) -> str:
        return f"{self.key}-s{self.seed}"

    @property
    def fixed(self) -> bool:
        """True when every swept branch uses a fixed pooler (max, kmax, mean)."""
        swept = [c for c in (self.image, self.text) if c is not None]
        return bool(swept) and all(c.name in FIXED_POOLS for c in swept)

    def overrides(self) -> list[str]:
        out = self.image.overrides("image") if self.image else []
        out += self.text.overrides("text") if self.text else []
        return out + [f"seed={self.seed}", f"name={self.name}"]


@dataclass(frozen=True)
class GridSpec:
    """What `--grid FILE.yaml` holds; command-line options override its fields."""

    pool: tuple[str, ...] = ("max", "mean", "kmax")
    k: tuple[int, ...] = (1, 2, 5, 10, 20)
    branch: str = "both"
    seeds: tuple[int, ...] = (0, 1, 2)
    gpo: bool = True                 # add the GPO run of the same recipe on the swept branch(es)


QUICK_GRID = GridSpec(pool=("max", "mean", "kmax"), k=(2,), branch="image", seeds=(0,))  # --quick: 4 small cells


def parse_list(value: str | Sequence | int, what: str, cast: type = str) -> tuple:
    """'1,2, 5' or [1, 2, 5] → (1, 2, 5), with a ConfigError naming `what` on a bad item."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, Sequence) else [value]
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            out.append(cast(text))
        except ValueError:
            raise ConfigError(f"{what}: '{text}' is not a valid {cast.__name__}") from None
    return tuple(out)


def load_grid(path: str | Path) -> GridSpec:
    """Read a grid YAML with keys pool, k, branch, seeds, gpo (lists or comma-separated strings)."""
    data = read_mapping(path, "grid file")
    known = ("pool", "k", "branch", "seeds", "gpo")
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' in {path}{did_you_mean(str(key), list(known))}; "
                              f"known: {', '.join(known)}")
    return resolve_grid(None, pool=data.get("pool"), k=data.get("k"), branch=data.get("branch"),
                        seeds=data.get("seeds"), gpo=data.get("gpo"))


def resolve_grid(grid: str | Path | GridSpec | None = None, pool: Any = None, k: Any = None, branch: str | None = None,
                 seeds: Any = None, gpo: bool | None = None, quick: bool = False) -> GridSpec:
    """Start from a grid file (or the defaults, `QUICK_GRID` with `quick`) and apply the values given (not None)."""
    base = load_grid(grid) if isinstance(grid, (str, Path)) else grid or (QUICK_GRID if quick else GridSpec())
    if gpo is not None and not isinstance(gpo, bool):
        raise ConfigError(f"gpo: expected true or false, got {gpo!r}")
    return GridSpec(
        pool=parse_list(pool, "pool") if pool is not None else base.pool,
        k=parse_list(k, "k", int) if k is not None else base.k,
        branch=branch if branch is not None else base.branch,
        seeds=parse_list(seeds, "seeds", int) if seeds is not None else base.seeds,
        gpo=gpo if gpo is not None else base.gpo,
    )


def pool_choices(pools: Sequence[str], ks: Sequence[int]) -> list[PoolChoice]:
    """Each pooler name once; kmax once per K. Unknown names fail with the registry's list of known ones."""
    from vsectl.models.pooling import POOLERS  # torch-heavy: only when a grid is really expanded

    choices: list[PoolChoice] = []
    for name in pools:
        POOLERS.get(name)
        if name in ("kmax", "maxk"):  # two names of one pooler; cells keep the name "kmax"
            if not ks:
                raise ConfigError("--pool kmax needs K values, e.g. --k 1,2,5,10,20")
            for k in ks:
                if k < 1:
                    raise ConfigError(f"k must be >= 1, got {k}")
                choices.append(PoolChoice("max") if k == 1 else PoolChoice("kmax", k))
        else:
            choices.append(PoolChoice(name))
    unique = list(dict.fromkeys(choices))
    return sorted(unique, key=lambda c: c.sort_key)


def expand_grid(pools: Sequence[str], ks: Sequence[int] = (), branch: str = "both", seeds: Sequence[int] = (0,),
                gpo: bool = True) -> list[Cell]:
    """Expand a pooling grid into cells, seed-major (every combination for the first seed comes first).

    Args:
        pools: pooler names (POOLERS keys); "kmax" expands over `ks`, with K = 1 folded into "max".
        ks: K values for kmax.
        branch: "image" or "text" sweeps that branch (the other keeps the recipe's pooler); "both" sweeps the
            visual × text product.
        seeds: every combination runs once per seed.
        gpo: add the GPO cell (GPO on the swept branch(es)) unless the grid already holds it.

    Returns:
        the cells, GPO last within each seed.
    """
    if branch not in BRANCHES:
        raise ConfigError(f"branch must be one of {', '.join(BRANCHES)}, got '{branch}'")
    if not seeds:
        raise ConfigError("give at least one seed")
    choices = pool_choices(pools, ks)
    if branch == "image":
        combos = [(c, None) for c in choices]
    elif branch == "text":
        combos = [(None, c) for c in choices]
    else:
        combos = [(i, t) for i in choices for t in choices]
    ref = PoolChoice(GPO)
    gpo_combo = (ref if branch != "text" else None, ref if branch != "image" else None)
    if gpo and gpo_combo not in combos:
        combos.append(gpo_combo)
    cells = []
    for seed in seeds:
        for image, text in combos:
            key = "__".join(f"{tag}-{c.id}" for tag, c in (("img", image), ("txt", text)) if c is not None)
            cells.append(Cell(key, seed, image, text, gpo=(image, text) == gpo_combo))
    return cells


def cell_config(base: RunConfig, cell: Cell) -> RunConfig:
    """The cell's RunConfig: the base recipe with the cell's overrides (strictly validated)."""
    return from_dict(RunConfig, apply_overrides(to_dict(base), cell.overrides()))
