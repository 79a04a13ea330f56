"""Pooling grid searches: expand a grid of poolers into runs of `train()`, run them resumably, tabulate, judge.

The question is the paper's Fig. 6: how well does the best hand-picked pooling (max, K-max over K, mean) do against
GPO on the same recipe? Every number in the tables is read back from the runs' own eval JSON files. One role per
file: `grid.py` (cells and their overrides), `runner.py` (train + eval per cell, resumable), `stats.py` (means and
the paired test), `report.py` (tables), `figures.py` (the rsum figure), `command.py` (the whole command).
"""

from vsectl.science.gridsearch.command import (
    DEFAULT_RECIPE,
    QUICK_OVERRIDES,
    default_recipe,
    ensure_toy_data,
    gridsearch,
)
from vsectl.science.gridsearch.figures import draw_grid_figure, write_grid_figures
from vsectl.science.gridsearch.grid import (
    BRANCHES,
    FIXED_POOLS,
    GPO,
    QUICK_GRID,
    Cell,
    GridSpec,
    PoolChoice,
    cell_config,
    expand_grid,
    load_grid,
    parse_list,
    pool_choices,
    resolve_grid,
)
from vsectl.science.gridsearch.report import results_csv, results_markdown, write_results
from vsectl.science.gridsearch.runner import (
    check_buildable,
    check_existing,
    eval_path,
    is_finished,
    read_record,
    run_cell,
    run_sweep,
)
from vsectl.science.gridsearch.stats import ALPHA, METRICS, paired_test, summarise, verdict

__all__ = [
    "ALPHA", "BRANCHES", "DEFAULT_RECIPE", "FIXED_POOLS", "GPO", "METRICS", "QUICK_GRID", "QUICK_OVERRIDES", "Cell",
    "GridSpec", "PoolChoice", "cell_config", "check_buildable", "check_existing", "default_recipe", "draw_grid_figure",
    "ensure_toy_data", "eval_path", "expand_grid", "gridsearch", "is_finished", "load_grid", "paired_test",
    "parse_list", "pool_choices", "read_record", "resolve_grid", "results_csv", "results_markdown",
    "run_cell", "run_sweep", "summarise", "verdict", "write_grid_figures", "write_results",
]
