"""Frame-count generalisation on the video demo: train on N frames per clip, test on N/2, N and 2N frames, with GPO,
mean or max pooling over the frames, several seeds. Writes a JSON of every result, a markdown table and a figure.

Each (pooling, seed) run trains with `recipes/video_demo.yaml` (only the video side's pooler and the seed change)
on the N-frame stores, then is evaluated (test split, ties at their expected rank) on test stores extracted with
N/2, N and 2N frames from the same clips. Finished runs and evaluations are reused, so a killed job resumes; jobs
for different `--pools` may run side by side, and a last one with every pool only gathers their results.

    python benchmarks/video_frame_counts.py --test 4=data/video_demo_f4 --test 8=data/video_demo_feats \
        --test 16=data/video_demo_f16 [--pools gpo,mean,max] [--seeds 0,1,2] [--out results/video_frames]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from vsectl.config import load_recipe
from vsectl.evaluation import evaluate_runs
from vsectl.io import atomic_write_json, atomic_write_text
from vsectl.training import train

REPO = Path(__file__).resolve().parent.parent


def run_dir(out: Path, pool: str, seed: int) -> Path:
    return out / "runs" / f"{pool}-s{seed}"


def train_once(recipe: Path, out: Path, pool: str, seed: int) -> Path:
    run = run_dir(out, pool, seed)
    if (run / "checkpoints" / "best" / "model.safetensors").is_file() and (run / "DONE").is_file():
        return run
    resume = (run / "checkpoints" / "last").is_dir()
    if run.exists() and not resume:
        shutil.rmtree(run)  # killed before its first checkpoint: nothing to keep
    cfg = load_recipe(recipe, [f"model.image.pool.name={pool}", f"seed={seed}", f"name={pool}-s{seed}"])
    start = time.perf_counter()
    path = train(cfg, out / "runs", device="cpu", resume=resume)
    (path / "DONE").write_text(f"{time.perf_counter() - start:.1f} s\n")
    return path


def evaluate_once(run: Path, frames: int, root: str) -> dict[str, Any]:
    """The run's test metrics on `root` (kept in RUN/frame_counts.json, one file per run: parallel jobs do not race)."""
    path = run / "frame_counts.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    if str(frames) not in done:
        result = evaluate_runs([run], protocol="f30k", split="test", data_root=root, device="cpu", write=False,
                               tie_rule="expected")["f30k"]
        done[str(frames)] = {k: result["metrics"][k] for k in ("rsum", "i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10")}
        done[str(frames)].update(n_videos=result["n_images"], data_root=root)
        atomic_write_json(path, done)
    return done[str(frames)]


def table(results: dict[str, Any], pools: list[str], seeds: list[int], frames: list[int], train_n: int) -> str:
    heads = [f"test {f} frames" + (" (= train)" if f == train_n else "") for f in frames]
    lines = [f"| video pooling | {' | '.join(heads)} |", "|---|" + "---:|" * len(frames)]
    for pool in pools:
        cells = []
        for f in frames:
            vals = [results[f"{pool}-s{s}@{f}"]["rsum"] for s in seeds]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        lines.append(f"| {pool} | {' | '.join(cells)} |")
    return "\n".join(lines)


def figure(results: dict[str, Any], pools: list[str], seeds: list[int], frames: list[int], train_n: int,
           path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=130)
    for k, (pool, marker) in enumerate(zip(pools, "osd^v", strict=False)):
        shift = 2 ** ((k - (len(pools) - 1) / 2) * 0.06)  # side by side on the log axis, so seeds do not hide
        xs = [f * shift for f in frames]
        per_seed = [[results[f"{pool}-s{s}@{f}"]["rsum"] for f in frames] for s in seeds]
        means = [statistics.mean(col) for col in zip(*per_seed, strict=True)]
        (line,) = ax.plot(xs, means, marker=marker, linewidth=2, label=f"{pool} (mean)")
        for values in per_seed:
            ax.plot(xs, values, color=line.get_color(), alpha=0.35, linewidth=0.8, marker=marker, markersize=3)
    ax.axvline(train_n, color="grey", linestyle=":", linewidth=1)
    ax.text(train_n, ax.get_ylim()[0], " trained on", color="grey", va="bottom", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.set_xlabel("frames per test clip")
    ax.set_ylabel(f"test rsum (thin: each of {len(seeds)} seeds)")
    ax.set_title("Video demo: frame-count generalisation", fontsize=10)
    ax.legend(title="pooling over frames", fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "video_demo.yaml")
    ap.add_argument("--test", action="append", required=True, help="FRAMES=STORE_FOLDER (repeat)")
    ap.add_argument("--train-frames", type=int, default=8)
    ap.add_argument("--pools", default="gpo,mean,max")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("results/video_frames"))
    args = ap.parse_args()
    pools, seeds = args.pools.split(","), [int(s) for s in args.seeds.split(",")]
    tests = dict(sorted((int(k), v) for k, v in (t.split("=", 1) for t in args.test)))
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [train_once(args.recipe, args.out, pool, seed) for pool in pools for seed in seeds]  # all, then eval
    results: dict[str, Any] = {}
    for run in runs:
        results[f"{run.name}:train_s"] = float((run / "DONE").read_text().split()[0])
        for frames, root in tests.items():
            results[f"{run.name}@{frames}"] = evaluate_once(run, frames, root)
    atomic_write_json(args.out / f"results-{'-'.join(pools)}.json", results)
    md = table(results, pools, seeds, list(tests), args.train_frames)
    atomic_write_text(args.out / "table.md", md + "\n")
    figure(results, pools, seeds, list(tests), args.train_frames, args.out / "frame_counts.png")
    print(md)


if __name__ == "__main__":
    main()
