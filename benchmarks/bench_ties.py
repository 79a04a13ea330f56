"""Cost of counting exact ties in the ranking pass: `rank_counts` against the ranking of a baseline commit.

    python benchmarks/bench_ties.py [--baseline 639aa30] [--images 5000] [--rounds 3]

The baseline's `vsectl/metrics.py` (its path at that revision) is read with `git show` and imported as a module, so both
run in one process on the same embeddings (COCO 5K size by default: 5,000 images × 25,000 captions × 1024), alternating,
median of rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ranking import make_embeddings  # noqa: E402

from vsectl.scoring.metrics import rank_counts  # noqa: E402


def baseline_module(rev: str):  # noqa: ANN201 - a module
    source = subprocess.run(["git", "show", f"{rev}:vsectl/metrics.py"], capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp()) / "baseline_metrics.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("baseline_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="639aa30")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = baseline_module(args.baseline)
    img, cap, cap2img = make_embeddings(args.images)
    times: dict[str, list[float]] = {"baseline rank_retrieval": [], "rank_counts (with ties)": []}
    for _ in range(args.rounds):
        for name, fn in (("baseline rank_retrieval", lambda: base.rank_retrieval([(img, cap)], cap2img)),
                         ("rank_counts (with ties)", lambda: rank_counts([(img, cap)], cap2img))):
            tic = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - tic)
    assert torch.equal(out.i2t, base.rank_retrieval([(img, cap)], cap2img)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s [{min(v):.3f}–{max(v):.3f}]")
    print(f"ratio: {med['rank_counts (with ties)'] / med['baseline rank_retrieval']:.2f}×")


if __name__ == "__main__":
    main()
