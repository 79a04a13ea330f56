"""Run every benchmark and collect their JSON reports in benchmarks/results/ (what `make bench` calls).

Order matters: bench_training runs before bench_data, which reads the training pairs/s from training.json.

    python benchmarks/run_all.py            # quick mode, every benchmark (about 15 minutes on 2 idle cores)
    python benchmarks/run_all.py --full     # the figures of BENCHMARKS.md (tens of minutes; wait for an idle machine)
    python benchmarks/run_all.py --only training data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import QUIET_LOAD, RESULTS, read_json, render_targets, wait_for_quiet

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # name → script; run in this order
    "ranking": "bench_ranking.py",
    "training": "bench_training.py",
    "data": "bench_data.py",
    "extract": "bench_extract.py",
    "embed": "bench_embed.py",
    "backbone": "bench_backbone.py",
    "retrieval": "bench_retrieval.py",
    "serve": "bench_serve.py",
}


def run_one(name: str, full: bool, results: Path, threads: int) -> dict:
    cmd = [sys.executable, str(HERE / SCRIPTS[name]), "--json", str(results / f"{name}.json")]
    if not full:
        cmd.append("--quick")
    if threads and name != "ranking":  # bench_ranking keeps torch's default
        cmd += ["--threads", str(threads)]
    print(f"== {name}: {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode  # output streams through; the repository root stays the working directory
    return {"name": name, "rc": rc, "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full mode (default: --quick for every script)")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the scripts (default: torch's)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help=f"first wait up to this long for an idle machine (load average below {QUIET_LOAD})")
    args = parser.parse_args()
    if args.wait_quiet > 0:
        state = wait_for_quiet(args.wait_quiet)
        print(f"{'idle' if state['quiet'] else 'NOT idle'} after waiting {state['waited_s']:.0f} s: load "
              f"{state['load_1min']:.2f}, other processes {state['others_cores']:.2f} cores", file=sys.stderr)
    os.chdir(HERE.parent)  # scripts read recipes/ and data/ relative to the repository root
    runs = [run_one(name, args.full, args.results, args.threads) for name in SCRIPTS if name in args.only]
    print("\n== summary")
    for r in runs:
        report = read_json(args.results / f"{r['name']}.json") or {}
        status = "ok" if r["rc"] == 0 else f"FAILED (exit {r['rc']})"
        before = report.get("load_average_before", ["?"])[0]
        others = report.get("cpu_during_run", {}).get("others_cores")
        others_text = "?" if others is None else f"{others:.2f}"
        print(f"{r['name']:9} {status:18} {r['wall_s']:7.0f} s  load before {before}, other processes "
              f"{others_text} cores during the run")
        checks = [c for c in report.get("targets", []) if "target" in c]
        if checks:
            print(render_targets(checks))
    total = sum(r["wall_s"] for r in runs)
    print(f"total {total:.0f} s; reports in {args.results}")
    (args.results / "run_all.json").write_text(json.dumps({"runs": runs, "full": args.full}, indent=2) + "\n")
    if any(r["rc"] for r in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
