"""The whole `gridsearch`: load the recipe, expand the grid, run the sweep, write the reports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from vsectl.config import RunConfig
from vsectl.runtime import Progress
from vsectl.science.experiment import shipped_recipe
from vsectl.science.gridsearch.grid import GridSpec, expand_grid
from vsectl.science.gridsearch.report import write_results
from vsectl.science.gridsearch.runner import run_sweep

log = logging.getLogger(__name__)


QUICK_OVERRIDES = ("train.epochs=2", "train.max_steps_per_epoch=20")  # --quick: 2 short epochs per cell
DEFAULT_RECIPE = "tiny.yaml"  # the toy data, generated when missing: a sweep that works on a fresh clone


def default_recipe() -> Path:
    """recipes/tiny.yaml of the working directory when it exists, else the copy shipped with vsectl."""
    local = Path("recipes") / DEFAULT_RECIPE
    return local if local.is_file() else shipped_recipe(DEFAULT_RECIPE)


def ensure_toy_data(cfg: RunConfig) -> None:
    """Generate the toy dataset the default recipe points at when it is missing (only for a folder named *toy*)."""
    root = Path(cfg.data.root)
    if root.exists() or "toy" not in root.name:
        return
    from vsectl.data.toy import make_toy_dataset

    log.info("generating the toy dataset in %s", root)
    make_toy_dataset(root, feat_dim=cfg.model.image.feat_dim)


def gridsearch(
    recipe: str | Path | None,
    grid: GridSpec,
    out_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
    protocol: str = "f30k",
    split: str = "test",
    device: str = "auto",
    jobs: int = 1,
    progress: Progress | None = None,
    tie_rule: str | None = None,
) -> dict:
    """Load the recipe (default: `default_recipe()`), expand `grid`, run the sweep, write the results.

    Args:
        grid: the grid (`resolve_grid`; with `quick`, start from QUICK_GRID).
        overrides: `--set` values applied to every cell (after the --quick ones, so they win).
        quick: shorten every run with QUICK_OVERRIDES.
        tie_rule: how exact ties count in every cell's evaluation (`vsectl eval --ties`; None: eval's default).

    Returns:
        {"rows", "verdict", "paths", "out_dir", "records"}.
    """
    from vsectl.config import load_recipe

    path = Path(recipe) if recipe is not None else default_recipe()
    base = load_recipe(path, [*(QUICK_OVERRIDES if quick else ()), *overrides])
    if recipe is None:
        ensure_toy_data(base)
    cells = expand_grid(grid.pool, grid.k, grid.branch, grid.seeds, grid.gpo)
    out = Path(out_dir) if out_dir is not None else Path("results") / "gridsearch" / path.stem
    records = run_sweep(base, cells, out, protocol=protocol, split=split, device=device, jobs=jobs,
                        progress=progress, tie_rule=tie_rule)
    meta = {"recipe": str(path), "overrides": list(overrides), "quick": quick, "protocol": protocol, "split": split,
            "tie_rule": records[0]["tie_rule"] if records else tie_rule, "branch": grid.branch,
            "select_tie_rule": base.train.select_tie_rule,
            "pool": list(grid.pool), "k": list(grid.k), "seeds": list(grid.seeds), "gpo": grid.gpo, "cells": len(cells)}
    written = write_results(out, records, grid.branch, meta)
    return {**written, "out_dir": str(out), "records": records}
