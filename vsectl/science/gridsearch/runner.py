"""Running a sweep: train and evaluate each unfinished cell (resumably, optionally in parallel), read results back."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from vsectl.config import RunConfig, changed_keys
from vsectl.data.splits import canonical_split
from vsectl.errors import ConfigError
from vsectl.runtime import NullProgress, Progress, usable_cpus
from vsectl.science.gridsearch.grid import Cell, cell_config
from vsectl.strict import from_dict, to_dict

log = logging.getLogger(__name__)


def eval_path(run_dir: Path, protocol: str, split: str, tie_rule: str | None = None) -> Path:
    from vsectl.evaluation import DEFAULT_TIE_RULE, result_path

    return result_path(run_dir, protocol, split, tie_rule=tie_rule or DEFAULT_TIE_RULE)


def is_finished(run_dir: Path, protocol: str, split: str, data_root: str | Path | None = None,
                tie_rule: str | None = None) -> bool:
    """A cell is finished when its eval JSON for this protocol, split and tie rule exists, made on the cell's own data.

    A trained cell without the JSON of another tie rule is only evaluated again (its training is complete).
    """
    from vsectl.evaluation import same_root

    path = eval_path(run_dir, protocol, split, tie_rule)
    if not path.is_file():
        return False
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    from vsectl.scoring.tie_rules import DEFAULT_TIE_RULE, LEGACY_TIE_RULE

    same_rule = result.get("tie_rule", LEGACY_TIE_RULE) == (tie_rule or DEFAULT_TIE_RULE)  # an older default's file
    return result.get("split") == split and same_rule and (data_root is None or same_root(result.get("data_root", ""),
                                                                                          data_root))


def run_cell(cfg: RunConfig, runs_root: str | Path, protocol: str, split: str, device: str = "auto",
             tie_rule: str | None = None) -> str:
    """Train one cell (resuming a partial run from its last checkpoint) and evaluate its best checkpoint.

    Returns:
        the cell's run directory.
    """
    from vsectl.evaluation import DEFAULT_TIE_RULE, evaluate_runs
    from vsectl.runtime import resolve_device
    from vsectl.training import train

    run_dir = Path(runs_root) / cfg.name
    resume = (run_dir / "config.yaml").is_file()  # a killed cell: train() continues from checkpoints/last
    if resume:
        log.info("resuming %s", run_dir)
    fresh = not run_dir.exists()
    try:  # frozen-body state caches live beside runs/, shared by every cell and seed that computes the same states
        train(cfg, out_root=runs_root, device=device, resume=resume, text_cache_dir=Path(runs_root).parent /
              "text_cache")
    except BaseException:
        if fresh and not (run_dir / "checkpoints").exists():  # a start that failed (no data, no model) leaves nothing
            shutil.rmtree(run_dir, ignore_errors=True)
            if runs_root_empty(Path(runs_root)):
                Path(runs_root).rmdir()
        raise
    evaluate_runs([run_dir], protocol=protocol, split=split, device=resolve_device(device), which="best", write=True,
                  tie_rule=tie_rule or DEFAULT_TIE_RULE)
    return str(run_dir)


def runs_root_empty(runs_root: Path) -> bool:
    return runs_root.is_dir() and not any(runs_root.iterdir())


def check_buildable(configs: Iterable[RunConfig]) -> None:
    """Build every distinct pooler once (tiny modules), so a bad pooler setting fails before any cell has run."""
    from vsectl.models.pooling import create_pooler

    for pool in {getattr(cfg.model, b).pool for cfg in configs for b in ("image", "text")}:
        create_pooler(pool)


def check_existing(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to mix in a run made with another configuration (finished or not) under the cell's name."""
    from vsectl.config import config_from_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    changed = changed_keys(config_from_yaml(path.read_text()), cfg)
    if changed:
        raise ConfigError(f"{run_dir} was made with another configuration ({', '.join(changed[:4])} differ); "
                          "use another --out, or delete that folder")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_cell_job(args: tuple[dict, str, str, str, str, str | None]) -> str:
    cfg_dict, runs_root, protocol, split, device, tie_rule = args
    return run_cell(from_dict(RunConfig, cfg_dict), runs_root, protocol, split, device, tie_rule)


def run_sweep(
    base: RunConfig,
    cells: Sequence[Cell],
    out_dir: str | Path,
    protocol: str = "f30k",
    split: str = "test",
    device: str = "auto",
    jobs: int = 1,
    progress: Progress | None = None,
    tie_rule: str | None = None,
) -> list[dict]:
    """Run every unfinished cell (train + eval into `out_dir/runs/<cell.name>`) and read all cells back.

    Finished cells (eval JSON present) are skipped, so a rerun resumes a killed sweep; the cell it was in continues
    from its last checkpoint. `jobs` > 1 runs cells in that many spawned processes, usable CPUs // jobs torch threads
    each. A frozen text body's token states are computed once into `out_dir/text_cache/` and shared by all cells.

    Returns:
        one record per cell (see `read_record`), in `cells` order.
    """
    progress = progress or NullProgress()
    runs_root = Path(out_dir) / "runs"
    from vsectl.scoring.tie_rules import TIE_RULES

    if tie_rule is not None and tie_rule not in TIE_RULES:  # evaluation would refuse it only after the first training
        raise ConfigError(f"unknown tie rule '{tie_rule}'; use one of {', '.join(TIE_RULES)}")
    configs = {cell.name: cell_config(base, cell) for cell in cells}  # validates every cell before any compute
    check_buildable(configs.values())
    for name, cfg in configs.items():
        check_existing(runs_root / name, cfg)
    split = canonical_split(split)
    todo = [c for c in cells
            if not is_finished(runs_root / c.name, protocol, split, configs[c.name].data.root, tie_rule)]
    log.info("gridsearch: %d cells, %d finished, %d to run", len(cells), len(cells) - len(todo), len(todo))
    if jobs > 1 and len(todo) > 1:
        cpus = usable_cpus()  # the CPUs this process may run on (affinity, cgroups' cpusets), not the machine's
        if jobs > cpus:
            log.warning("--jobs %d is more than the %d CPUs this process may use; cells will share cores", jobs, cpus)
        threads = max(1, cpus // jobs)
        args = [(to_dict(configs[c.name]), str(runs_root), protocol, split, device, tie_rule) for c in todo]
        with mp.get_context("spawn").Pool(min(jobs, len(todo)), _init_worker, (threads,)) as pool:
            for run_dir in progress.track(pool.imap_unordered(_run_cell_job, args), total=len(todo),
                                          description="gridsearch"):
                log.info("finished %s", run_dir)
    else:
        for cell in progress.track(todo, total=len(todo), description="gridsearch"):
            log.info("cell %s", cell.name)
            run_cell(configs[cell.name], runs_root, protocol, split, device, tie_rule)
    return [read_record(cell, runs_root / cell.name, protocol, split, tie_rule, configs[cell.name]) for cell in cells]


def best_dev(run_dir: Path) -> tuple[float | None, int | None]:
    """The dev rsum (and epoch) of the run's best checkpoint: the one that was evaluated.

    Read from checkpoints/best/trainer_state.json, which `train()` writes with the checkpoint it selected by that
    rsum; a run without it (an older layout) falls back to the last validation record flagged best in metrics.jsonl
    (a resumed run's metrics.jsonl has no records past its checkpoint, so that is the same epoch).
    """
    state = run_dir / "checkpoints" / "best" / "trainer_state.json"
    if state.is_file():
        try:
            saved = json.loads(state.read_text())
            if saved["best_rsum"] is None or not math.isfinite(saved["best_rsum"]):
                return None, None  # no validation was best yet (null; -Infinity in older files): an imported run
            return float(saved["best_rsum"]), int(saved["best_epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("%s is unreadable; reading the best dev rsum from metrics.jsonl", state)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, None
    best: tuple[float | None, int | None] = (None, None)
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "val" and rec.get("best") and "rsum" in rec:
            best = float(rec["rsum"]), rec.get("epoch")
    return best


def read_record(cell: Cell, run_dir: Path, protocol: str, split: str, tie_rule: str | None = None,
                cfg: RunConfig | None = None) -> dict:
    """One cell's result, read from the run's own files: eval/<protocol>-<split>[-<rule>].json and the best
    checkpoint's dev rsum (`best_dev`). A branch the grid does not vary is named by the pooler the recipe gives it
    (`cfg`, the cell's config), e.g. "gpo (recipe)"."""
    result = json.loads(eval_path(run_dir, protocol, split, tie_rule).read_text())
    dev_rsum, dev_epoch = best_dev(run_dir)

    def label(choice: object, branch: str) -> str:
        if choice is not None:
            return choice.label
        return f"{getattr(cfg.model, branch).pool.name} (recipe)" if cfg is not None else "recipe"

    return {
        "cell": cell.key, "seed": cell.seed, "run": str(run_dir), "gpo": cell.gpo, "fixed": cell.fixed,
        "image": label(cell.image, "image"), "text": label(cell.text, "text"),
        "split": result.get("split"), "n_images": result.get("n_images"), "metrics": result["metrics"],
        "tie_rule": result.get("tie_rule", tie_rule), "ties": result.get("ties"),
        "dev_best_rsum": dev_rsum, "dev_best_epoch": dev_epoch,
    }
