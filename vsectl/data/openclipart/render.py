"""Rendering: SVG → PNG in a pool of worker processes, each file within a time limit; the resumable render state."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl.data.openclipart.cleaning import Item
from vsectl.io import atomic_path, atomic_write_json, sha256_file

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)


RENDER_VERSION = 3  # bump when the rendering code changes, so cached PNGs are rendered again
STATE_JSON = ".render-state.json"  # per-PNG source hash and size, so a rerun skips finished renders
RENDER_RETRY_FACTOR = 4.0  # a render past the limit gets one more try with this many times the limit
STATE_EVERY = 100  # renders between state saves: a kill loses at most this much work
# The limit counts the worker's CPU time, not the wall clock: on a machine busy with other work a render waits for a
# core and takes longer on the clock, not more CPU, so the data set must not depend on the load (one 10 s render took
# 80 s of wall time on 2 shared cores and fell out of the demo). A worker that is stuck without using CPU is still
# cut off after WALL_BACKSTOP times the limit on the clock.
WALL_BACKSTOP = 30.0
POLL_S = 0.25  # how often busy workers' CPU time is read


def render_png(src: str, dst: str, size: int) -> None:
    """Render an SVG to a `size`×`size` RGB PNG: aspect ratio kept, centred, transparency composited on white."""
    import cairosvg
    from PIL import Image

    im = Image.open(io.BytesIO(cairosvg.svg2png(url=src, output_width=size))).convert("RGBA")
    flat = Image.new("RGB", im.size, (255, 255, 255))
    flat.paste(im, (0, 0), im)  # composite before any resampling, so edges blend with white, not black
    if flat.height > size:  # taller than wide: shrink to fit (half the files; cheaper than a second render)
        flat = flat.resize((max(1, round(flat.width * size / flat.height)), size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - flat.width) // 2, (size - flat.height) // 2))
    if all(lo == hi for lo, hi in canvas.getextrema()):
        raise ValueError("blank render (nothing drawn)")
    with atomic_path(Path(dst)) as tmp:
        canvas.save(tmp, format="PNG")


RenderFn = Callable[[str, str, int], None]


def _render_worker(conn: Connection, render_fn: RenderFn) -> None:
    while True:
        task = conn.recv()
        if task is None:
            return
        key, src, dst, size = task
        try:
            render_fn(src, dst, size)
            conn.send((key, "ok", ""))
        except Exception as e:  # noqa: BLE001 - any failure of one file is reported, the run goes on
            conn.send((key, "failed", f"{type(e).__name__}: {e}"[:200]))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc); None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15: utime, stime
    except (OSError, ValueError, IndexError):
        return None


class _Slot:
    """One worker process and the task it is running."""

    def __init__(self, ctx: Any, render_fn: RenderFn) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_render_worker, args=(child, render_fn), daemon=True)
        self.proc.start()
        child.close()
        self.task: tuple[str, str, str, int] | None = None
        self.started = 0.0

    def give(self, task: tuple[str, str, str, int]) -> None:
        self.task, self.started = task, time.monotonic()
        self.cpu_start = cpu_seconds(self.proc.pid)
        self.conn.send(task)

    def over(self, limit: float) -> bool:
        """Whether the current task has used `limit` CPU seconds (the clock where CPU time cannot be read), or
        WALL_BACKSTOP × limit on the clock."""
        wall = time.monotonic() - self.started
        cpu = cpu_seconds(self.proc.pid) if self.cpu_start is not None else None
        used = wall if cpu is None else cpu - self.cpu_start
        return used >= limit or wall >= WALL_BACKSTOP * limit

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def render_all(
    tasks: list[tuple[str, str, str, int]], workers: int, timeout: float, render_fn: RenderFn = render_png
) -> Iterator[tuple[str, str, str]]:
    """Render (key, src, dst, size) tasks in `workers` processes, each file within `timeout` CPU seconds.

    A render that uses more CPU time than the limit (see WALL_BACKSTOP) has its process killed and replaced. Forked
    workers inherit `render_fn`, so it need not be importable by name.

    Yields:
        (key, status, message) in completion order; status is "ok", "failed" or "timeout".
    """
    if not tasks:
        return
    if render_fn is render_png:  # import once here: forked workers inherit it instead of paying it inside the limit
        import cairosvg  # noqa: F401
        import PIL.Image  # noqa: F401
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pending = deque(tasks)
    slots = [_Slot(ctx, render_fn) for _ in range(max(1, min(workers, len(pending))))]
    try:
        for slot in slots:
            if pending:
                slot.give(pending.popleft())
        while any(s.task is not None for s in slots):
            busy = [s for s in slots if s.task is not None]
            ready = wait([s.conn for s in busy], timeout=min(POLL_S, timeout))
            for k, slot in enumerate(slots):
                if slot.task is None:
                    continue
                key, _, dst, _ = slot.task
                if slot.conn in ready:
                    try:
                        result = slot.conn.recv()
                    except EOFError:  # the worker died (e.g. a crash inside cairo)
                        result = (key, "failed", f"worker exited with code {slot.proc.exitcode}")
                        slot.kill()
                        slot = slots[k] = _Slot(ctx, render_fn)
                elif slot.over(timeout):
                    slot.kill()
                    for stale in Path(dst).parent.glob(f".{Path(dst).name}.*.tmp"):  # atomic_path's name
                        stale.unlink(missing_ok=True)
                    result = (key, "timeout", f"no result within {timeout:g} s of CPU time")
                    slot = slots[k] = _Slot(ctx, render_fn)
                else:
                    continue
                slot.task = None
                if pending:
                    slot.give(pending.popleft())
                yield result
    finally:
        for slot in slots:
            if slot.proc.is_alive():
                slot.kill()


def _load_state(path: Path, size: int) -> dict[str, dict[str, str]]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    same = state.get("size") == size and state.get("render_version") == RENDER_VERSION
    return state.get("files", {}) if same else {}


def render_items(
    items: list[Item],
    images: Path,
    size: int,
    workers: int,
    timeout: float,
    render_fn: RenderFn,
    progress: Progress,
) -> dict[str, int]:
    """Render every item to `images/<filename>`, skipping PNGs whose source hash and size match the saved state.

    Sets nothing on failed items; the caller keeps items whose PNG exists. Returns counts of the render stage.
    """
    images.mkdir(parents=True, exist_ok=True)
    state_path = images.parent / STATE_JSON
    state = _load_state(state_path, size)
    tasks, reused, known_bad = [], 0, 0
    for it in items:
        done = state.get(it.filename, {})
        if done.get("source_sha256") == it.record.sha256:
            if done.get("status") == "ok" and (images / it.filename).is_file():
                reused += 1
                continue
            retried = done.get("status") == "failed" or (done.get("retry_timeout") == timeout * RENDER_RETRY_FACTOR
                                                         and done.get("limit") == "cpu")  # wall-clock ones: again
            if done.get("status") == "duplicate" or (done.get("status") in ("failed", "timeout")
                                                      and done.get("timeout") == timeout and retried):
                known_bad += 1  # failures, and renders identical to another image's, are not retried
                continue
        tasks.append((it.filename, str(it.record.path), str(images / it.filename), size))
    sha_of = {it.filename: it.record.sha256 for it in items}
    status = Counter({"ok": 0, "failed": 0, "timeout": 0})
    retry_limit = timeout * RENDER_RETRY_FACTOR
    for limit in (timeout, retry_limit):  # a busy machine makes renders slow, not different: retry once, longer
        results = render_all(tasks, workers=workers, timeout=limit, render_fn=render_fn)
        slow = []
        for n, (key, outcome, message) in enumerate(progress.track(
                results, total=len(tasks), description="render" if limit == timeout else "render (retry)"), 1):
            if outcome == "timeout" and limit == timeout:
                slow.append(key)
                continue
            status[outcome] += 1
            state[key] = {"source_sha256": sha_of[key], "status": outcome, "timeout": timeout}
            if outcome == "timeout":  # given its second chance (in CPU time): not retried by later runs
                state[key].update(retry_timeout=retry_limit, limit="cpu")
            if outcome != "ok":
                log.debug("render %s: %s (%s)", key, outcome, message)  # counted below; each reason is in the state
                state[key]["message"] = message
            progress.update(ok=status["ok"], failed=status["failed"] + status["timeout"])
            if n % STATE_EVERY == 0:
                atomic_write_json(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state},
                                  indent=None, ensure_ascii=False)
        if not slow:
            break
        log.info("%d renders ran past %g s; retrying them once with %g s", len(slow), timeout, retry_limit)
        tasks = [t for t in tasks if t[0] in set(slow)]
    atomic_write_json(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state},
                      indent=None, ensure_ascii=False)
    bad = {s: sum(1 for it in items if state.get(it.filename, {}).get("status") == s) for s in ("failed", "timeout")}
    log.info("rendered %d, reused %d, failed %d, timed out %d", status["ok"], reused, bad["failed"], bad["timeout"])
    if bad["failed"] or bad["timeout"]:
        log.warning("%d SVGs could not be rendered and are left out (reasons in %s; --verbose lists them)",
                    bad["failed"] + bad["timeout"], state_path)
    return {"rendered_now": status["ok"], "render_reused": reused, "render_failed": bad["failed"],
            "render_timed_out": bad["timeout"], "render_skipped_known": known_bad}


def drop_duplicate_renders(items: list[Item], out: Path, size: int) -> tuple[list[Item], dict[str, str], int]:
    """Keep the first item of each distinct PNG (different SVG bytes can draw the same pixels).

    Later copies are marked "duplicate" in the render state, so reruns neither render nor keep them.

    Returns:
        (items with a unique, existing PNG; their PNG sha256 by filename; number of duplicates).
    """
    state_path = out / STATE_JSON
    state = _load_state(state_path, size)
    png_sha: dict[str, str] = {}
    first_of: dict[str, str] = {}
    kept = []
    for it in items:
        done = state.get(it.filename, {})
        if done.get("status") != "ok" or not (out / "images" / it.filename).is_file():
            continue
        digest = sha256_file(out / "images" / it.filename)
        first = first_of.setdefault(digest, it.filename)
        if first != it.filename:
            state[it.filename] = {**done, "status": "duplicate", "of": first}
            continue
        png_sha[it.filename] = digest
        kept.append(it)
    atomic_write_json(state_path, {"render_version": RENDER_VERSION, "size": size, "files": state},
                      indent=None, ensure_ascii=False)
    duplicates = sum(1 for it in items if state.get(it.filename, {}).get("status") == "duplicate")
    return kept, png_sha, duplicates
