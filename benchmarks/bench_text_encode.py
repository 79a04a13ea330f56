"""Benchmark query-text encoding: the `transformers` body's own forward (the baseline) against the lean BERT forward
(`vsectl.models.lean_bert`), interleaved in one run, on the texts `vsectl serve` gets (a few short queries at a time).

The model is a trained run's text tower (default runs/demo: MiniLM-L6 body, projection, GPO). Both variants go through
`RetrievalModel.encode_text` (tokenising, pooling and normalising included); the baseline only turns the lean path
off. Their embeddings must be equal bit for bit. Per batch: milliseconds of process CPU time (the measure other load on
a shared machine does not inflate) and of wall time, medians over interleaved rounds.

    python benchmarks/bench_text_encode.py [--run runs/demo] [--threads 1] [--rounds 60] [--json F]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, begin, timed_interleaved_cpu, write_report

QUERIES = ["a red car", "two dogs playing in the snow", "a cat", "sun over the sea with birds",
           "black and white icon of a house", "flower", "a man riding a bicycle", "clip art of an apple"]
BATCHES = (1, 3, 8)


def variants(model: Any, texts: list[str]) -> dict[str, Any]:
    """The baseline (the body's own forward) and the lean forward, the same model and texts."""
    from vsectl.models import text_encoders

    lean_ok = text_encoders.lean_ok

    def baseline() -> np.ndarray:
        text_encoders.lean_ok = lambda body: False
        try:
            return model.encode_text(texts)
        finally:
            text_encoders.lean_ok = lean_ok

    return {"transformers forward": baseline, "lean forward": lambda: model.encode_text(texts)}


def measure(model: Any, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in BATCHES:
        fns = variants(model, QUERIES[:b])
        results = {name: fn() for name, fn in fns.items()}
        first, second = results.values()
        cpu, wall = timed_interleaved_cpu(fns, rounds)
        row = {name: {"cpu_ms": 1e3 * statistics.median(cpu[name]), "wall_ms": 1e3 * statistics.median(wall[name])}
               for name in fns}
        row["bit_identical"] = bool(np.array_equal(first, second))
        row["cpu_ratio"] = row["transformers forward"]["cpu_ms"] / row["lean forward"]["cpu_ms"]
        out[f"{b} text(s)"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (serve gives text encoding half the cores)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--json", type=Path, default=RESULTS / "text_encode.json")
    args = p.parse_args()
    load_before, meter, machine, t0 = begin(args.threads)
    import vsectl

    model = vsectl.load(args.run, device="cpu")
    report = {"machine": machine, "threads": args.threads, "rounds": args.rounds, "run": str(args.run),
              "load_before": load_before, "batches": measure(model, args.rounds)}
    report["load"] = meter.read()
    report["seconds"] = time.perf_counter() - t0
    print(f"{'texts':>8}  {'transformers ms':>16}  {'lean ms':>8}  {'ratio':>6}  bit-identical")
    for name, row in report["batches"].items():
        print(f"{name:>8}  {row['transformers forward']['cpu_ms']:16.2f}  {row['lean forward']['cpu_ms']:8.2f}  "
              f"{row['cpu_ratio']:6.2f}  {row['bit_identical']}")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
