"""The noisy-correspondence measurement: test rsum at several noise ratios and seeds, VSE∞'s hardest negatives against
the sum of hinges, on the clip-art demo and the emoji set (docs/noise.md).

Each cell is `vsectl train RECIPE --set data.noise.ratio=R --set seed=S [--set loss.hardest_negative_from_epoch=1000]`
then `vsectl eval RUN --protocol f30k --split test --ties expected`; the noise index is the same for every seed of a
ratio (data.noise.seed 0), as with a published index file. Cells already evaluated are skipped and a killed cell
resumes, so the script can be run again until it finishes. The runs share one text-state cache per data set.

    python benchmarks/noise_sweep.py --recipe recipes/demo.yaml --out runs/noise
    vsectl report 'runs/noise/demo-*' --baseline demo-hardest-n0 --out docs/noise_demo
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

RATIOS = (0.0, 0.2, 0.5, 0.8)
SEEDS = (0, 1, 2)
LOSSES = {"hardest": [], "sum": ["loss.hardest_negative_from_epoch=1000"]}  # sum of hinges in every epoch


def cells(recipe: Path, ratios: tuple[float, ...], seeds: tuple[int, ...]) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of every cell, seeds innermost so a partial sweep has whole groups first."""
    stem = recipe.stem
    out = []
    for ratio in ratios:
        for loss, extra in LOSSES.items():
            for seed in seeds:
                name = f"{stem}-{loss}-n{int(round(100 * ratio))}-s{seed}"
                out.append((name, [f"name={name}", f"seed={seed}", f"data.noise.ratio={ratio}", *extra]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/noise"))
    parser.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--set", action="append", default=[], help="extra overrides for every cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # on shared cores one thread wastes less time waiting for the other
    from vsectl.config import load_recipe
    from vsectl.evaluation import evaluate_runs, result_path
    from vsectl.logs import setup_logging
    from vsectl.training import train

    setup_logging(verbose=False, quiet=False)
    log = logging.getLogger("vsectl.noise_sweep")
    ratios = tuple(float(r) for r in args.ratios.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cache = args.out / ".text_cache" / args.recipe.stem
    for name, overrides in cells(args.recipe, ratios, seeds):
        run_dir = args.out / name
        if result_path(run_dir, "f30k", "test", tie_rule="expected").is_file():
            continue
        t0, c0 = time.time(), time.process_time()
        cfg = load_recipe(args.recipe, overrides + args.set)
        train(cfg, out_root=args.out, resume=(run_dir / "config.yaml").is_file(), text_cache_dir=cache)
        result = evaluate_runs([run_dir], protocol="f30k", split="test", tie_rule="expected")["f30k"]
        log.info("%s: test rsum %.1f (%.0f s wall, %.0f s CPU in this process)", name, result["metrics"]["rsum"],
                 time.time() - t0, time.process_time() - c0)


if __name__ == "__main__":
    main()
