"""Collections of millions: an index under a memory budget at 1M and 10M vectors, and serving from it.

    python benchmarks/bench_scale.py --run runs/demo --store data/demo_feats/train.h5 --work data/scale \
        --sizes 1000000,10000000 [--max-memory 4GB] [--kind auto] [--recall 0.95] [--max-query-ms MS] \
        [--seconds 30] [--json FILE] [--skip STAGES]

1. real: the store embedded with the run (the demo model's real image and caption embeddings).
2. fit: a low-rank Gaussian mixture fitted to them (benchmarks/scale_vectors.py), compared with them at their count.
3. per size: that many drawn image vectors written as an embeddings folder recorded as the run's (streamed, cached
   in --work), then `vsectl index EMB --kind KIND --max-memory M` in its own process: wall and CPU time, peak
   resident memory, the card (recall@1/10/100 against exact on held-out rows, single and batched query times).
   The same kind is built on the real embeddings too, whose card measures recall with the real captions as queries.
4. exact search at the smallest size: a batch of 1,000 drawn caption vectors against one query at a time.
5. serve at the largest size: `vsectl serve` on the embeddings folder (it picks the index), 8 loopback clients with
   the run's text queries for --seconds, p50 / p99.
The load of the shared machine is recorded around each stage (other processes' cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import scale_vectors
from common import LoadMeter, describe, machine, render_targets, target, write_report

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("real", "build", "exact", "serve")


def embed_real(run: Path, store: Path, work: Path) -> Path:
    import vsectl

    out = work / "real"
    if not (out / "meta.json").is_file():
        vsectl.embed(run, out, features=store, device="cpu")
    return out


def fitted(real: Path) -> tuple[Any, Any, dict[str, Any]]:
    import vsectl

    emb = vsectl.open_embeddings(real)
    images, captions = np.asarray(emb.images), np.asarray(emb.captions)
    mix_i, mix_c = scale_vectors.fit(images), scale_vectors.fit(captions, seed=1)
    rng = np.random.default_rng(7)
    check = {"images": scale_vectors.compare(images, scale_vectors.draw(mix_i, len(images), rng)),
             "captions": scale_vectors.compare(captions, scale_vectors.draw(mix_c, len(captions), rng)),
             "real_images": len(images), "real_captions": len(captions)}
    return mix_i, mix_c, check


def write_collection(folder: Path, mix: Any, n: int, run_meta: dict[str, Any]) -> dict[str, Any]:
    from vsectl.retrieval.embeddings import write_vectors

    if (folder / "meta.json").is_file():
        return {"cached": True}
    meter, t0 = LoadMeter(), time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    write_vectors(tmp, scale_vectors.blocks(mix, n, seed=n), n, mix.mean.shape[0], run_meta=run_meta,
                  ids=lambda i: f"drawn-{i:08d}")
    os.replace(tmp, folder)
    return {"seconds": time.perf_counter() - t0, "cpu": meter.read()}


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a command as a child; its wall time, CPU time, peak resident memory, and the machine's load meanwhile."""
    meter, t0 = LoadMeter(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = "", ""
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "load": meter.read(), "stdout": out.strip()}


def build(emb: Path, kind: str, max_memory: str, max_query_ms: float | None, procs: int,
          recall: float | None = None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    args = ["-m", "vsectl", "-q", "index", str(emb), "--kind", kind, "--max-memory", max_memory]
    args += ["--max-query-ms", str(max_query_ms)] if max_query_ms else []
    args += ["--recall", str(recall)] if recall else []
    if procs > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={procs}", *args[1:]]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, *args]
    result = run_measured(cmd, env)
    folder = Path(result["stdout"].splitlines()[-1])
    result["card"] = json.loads((folder / "card.json").read_text())
    result["index"] = str(folder)
    return result


def exact_batch(emb: Path, mix_c: Any) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_retrieval import bench_exact

    queries = scale_vectors.draw(mix_c, 1000, np.random.default_rng(3))
    np.save(emb.parent / "queries.npy", queries)
    return bench_exact(emb, queries, reps=3)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(emb: Path, seconds: float) -> dict[str, Any]:
    """`vsectl serve EMB` in its own process (not niced: it competes for the cores as the clients do); each phase
    also records the server's own CPU time per request, the figure the machine's load does not inflate."""
    from bench_serve import CLIENTS, load_phase

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vsectl", "-q", "serve", str(emb), "--port", "0", "--device",
                             "cpu"], stdout=subprocess.PIPE, text=True, env=env)
    url = proc.stdout.readline().strip()
    try:
        import urllib.request

        info = json.loads(urllib.request.urlopen(url + "api/info", timeout=120).read())
        load_phase(url, 1, 5.0)  # warm the encoder and the index's pages
        out: dict[str, Any] = {"info": info}
        for name, clients, secs in ((f"{CLIENTS} clients", CLIENTS, seconds), ("1 client", 1, seconds / 2)):
            cpu0 = proc_cpu_s(proc.pid)
            out[name] = r = load_phase(url, clients, secs)
            r["server_cpu_ms_per_request"] = 1000 * (proc_cpu_s(proc.pid) - cpu0) / max(1, r["requests"])
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--store", type=Path, required=True, help="a feature store the run can embed (real vectors)")
    p.add_argument("--work", type=Path, required=True, help="where the drawn collections are kept (GBs)")
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--kind", default="auto")
    p.add_argument("--max-memory", default="4GB")
    p.add_argument("--max-query-ms", type=float, default=None)
    p.add_argument("--recall", type=float, default=None, help="recall@10 the index tuning aims for [0.95]")
    p.add_argument("--procs", type=int, default=1, help="torchrun processes for the index build")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = p.parse_args()
    import vsectl

    sizes = [int(s) for s in args.sizes.split(",")]
    report: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(describe(report["machine"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    real = embed_real(args.run, args.store, args.work)
    model = vsectl.load(args.run, device="cpu")
    run_meta = {"run": str(model.run_dir), "checkpoint": model.checkpoint, "fingerprint": model.fingerprint}
    mix_i, mix_c, report["fit"] = fitted(real)
    print("fit:", json.dumps(report["fit"]), flush=True)
    kinds: dict[int, str] = {}
    if args.kind == "auto":  # every size gets the kind the budget picks for the largest, so they compare
        from vsectl.retrieval.index_plan import plan_index

        args.kind = plan_index(max(sizes), model.embed_dim, "auto", args.max_memory).kind
    for n in sizes:
        folder = args.work / f"drawn-{n}"
        report[f"write {n}"] = write_collection(folder, mix_i, n, run_meta)
        print(f"wrote {folder}: {report[f'write {n}']}", flush=True)
        if "build" not in args.skip:
            report[f"index {n}"] = r = build(folder, args.kind, args.max_memory, args.max_query_ms, args.procs,
                                                   args.recall)
            kinds[n] = r["card"]["kind"]
            print(f"index {n}: {json.dumps({k: v for k, v in r.items() if k != 'card'})}", flush=True)
            print(f"card {n}: {json.dumps(r['card'])}", flush=True)
        write_report(args.json, report)
    if "real" not in args.skip and kinds:
        report["index real"] = build(real, next(iter(kinds.values())), args.max_memory, args.max_query_ms, 1,
                                     args.recall)
        print(f"card real: {json.dumps(report['index real']['card'])}", flush=True)
    if "exact" not in args.skip:
        report["exact"] = exact_batch(args.work / f"drawn-{min(sizes)}", mix_c)
        print("exact:", json.dumps({k: v for k, v in report["exact"].items() if "_s" in k or "speedup" in k}))
    if "serve" not in args.skip:
        report["serve"] = serve(args.work / f"drawn-{max(sizes)}", args.seconds)
        print("serve:", json.dumps(report["serve"]), flush=True)
    report["targets"] = checks(report, sizes)
    print(render_targets(report["targets"]))
    write_report(args.json, report)


def checks(report: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    for n in sizes:
        r = report.get(f"index {n}")
        if r is None:
            continue
        big = n >= 10_000_000
        out.append(target(f"{n:,}: index build wall", r["wall_s"] / 60, "<=", 30 if big else 3, "min"))
        out.append(target(f"{n:,}: peak RSS", r["peak_rss_bytes"] / 1e9, "<=", 4.0, "GB"))
        out.append(target(f"{n:,}: recall@10", r["card"]["recall"]["@10"], ">=", 0.90))
        out.append(target(f"{n:,}: one query", r["card"]["query_ms"]["single"]["median"], "<=", 20, "ms"))
    if "serve" in report:
        s = report["serve"]["8 clients"]
        out += [target("serve p50, 8 clients", s["p50_ms"], "<=", 50, "ms"),
                target("serve p99, 8 clients", s["p99_ms"], "<=", 200, "ms")]
    if "exact" in report:
        out.append(target("exact batch speed-up per query", report["exact"]["batch_speedup_per_query"], ">=", 20))
    return out


if __name__ == "__main__":
    main()
