"""The video demo set: the openclipart drawings made into short clips (pans, zooms, sequences) with their captions.

Each clip is rendered frame by frame with Pillow from a prepared openclipart raw dataset and encoded by PyAV as it is
drawn (no clip is held in memory): even-numbered clips as H.264 in .mp4, odd ones as VP9 in .webm. A clip's drawings
all come from one split of the source, so no drawing (or title group) crosses splits. Resumable: finished clips are
kept when the settings match; the manifest is written last.
"""

from __future__ import annotations

import fractions
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vsectl.data.raw import DATASET_JSON, MANIFEST_JSON, RAW_FORMAT, RAW_VERSION, load_raw_dataset
from vsectl.data.tokenize import word_tokenize
from vsectl.data.video_files import MODALITY, _av
from vsectl.errors import DataError
from vsectl.io import atomic_write_json, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from vsectl.runtime import Progress

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when clips or captions change, so a prepared set is rebuilt
KINDS = ("pan", "zoom", "sequence2", "sequence3")  # clip k has kind KINDS[k % 4]
CODECS = (("libx264", ".mp4", {"preset": "veryfast", "crf": "23"}),
          ("libvpx-vp9", ".webm", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}))
LICENSE_TEXT = """\
The clips and captions in this folder are derived from the Open Clip Art Library drawings (public domain, as
packaged by Debian in `openclipart-svg`) by `vsectl data prepare video-demo`. They are likewise dedicated to the
public domain; no rights are reserved.
"""


@dataclass(frozen=True)
class DemoSettings:
    """How the demo clips are made (recorded in the manifest; a change rebuilds the set).

    Attributes:
        size: frame side in pixels.
        fps: frames per second.
        seconds: length of a pan or zoom clip; a sequence shows each drawing for seconds / 2.
        max_per_split: at most this many clips per split (None: one clip per source drawing).
        seed: which drawings make up the sequences, and the pan and zoom directions.
    """

    size: int = 128
    fps: int = 8
    seconds: float = 3.0
    max_per_split: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 2 or self.fps < 1 or self.seconds <= 0:
            raise DataError("--size must be an even number ≥ 16, --fps ≥ 1 and --seconds > 0")
        if self.max_per_split is not None and self.max_per_split < 1:
            raise DataError("--max-per-split must be at least 1")


def _short(caption: str) -> str:
    return caption.rstrip(" .").lower()


def _pan_frames(im: Any, size: int, n: int, leftwards: bool) -> Iterator[Any]:
    from PIL import Image

    side = int(size * 0.6)
    small = im.resize((side, side), Image.BILINEAR)
    for t in np.linspace(0.0, 1.0, n):
        x = round((1 - t if leftwards else t) * (size - side))
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(small, (x, (size - side) // 2))
        yield canvas


def _zoom_frames(im: Any, size: int, n: int, inwards: bool) -> Iterator[Any]:
    from PIL import Image

    w, h = im.size
    for t in np.linspace(0.0, 1.0, n):
        scale = 1.0 - 0.6 * (t if inwards else 1 - t)  # the visible share of the drawing, 1 → 0.4
        cw, ch = w * scale, h * scale
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        yield im.resize((size, size), Image.BILINEAR, box=box)


def _sequence_frames(ims: list[Any], size: int, per_item: int) -> Iterator[Any]:
    from PIL import Image

    for im in ims:
        frame = im.resize((size, size), Image.BILINEAR)
        for _ in range(per_item):
            yield frame


def clip_plan(k: int, lead: dict[str, Any], pool: list[dict[str, Any]], rng: np.random.Generator,
              settings: DemoSettings) -> tuple[str, list[dict[str, Any]], list[str], dict[str, Any]]:
    """Clip k of a split: (kind, its drawings in order, captions, render args)."""
    kind = KINDS[k % len(KINDS)]
    n = round(settings.seconds * settings.fps)
    caps = [_short(c) for c in lead["captions"][:2] if c.strip()]
    if kind == "pan":
        leftwards = bool(rng.integers(2))
        way = "right to left" if leftwards else "left to right"
        return kind, [lead], [f"{c}, moving from {way}" for c in caps], {"n": n, "leftwards": leftwards}
    if kind == "zoom":
        inwards = bool(rng.integers(2))
        return kind, [lead], [f"zooming {'in on' if inwards else 'out from'} {c}" for c in caps], \
            {"n": n, "inwards": inwards}
    count = 2 if kind == "sequence2" else 3
    others = [pool[j] for j in rng.choice(len(pool), size=min(len(pool), 6), replace=False)]
    others = [o for o in others if _short(o["captions"][0]) != _short(lead["captions"][0])][: count - 1]
    items = [lead, *others]
    names = [_short(it["captions"][0]) for it in items]
    captions = [", then ".join(names), "first " + ", next ".join(names)]
    return kind, items, captions, {"per_item": max(1, round(settings.seconds * settings.fps / 2))}


def render_clip(path: Path, kind: str, items: list[dict[str, Any]], args: dict[str, Any], settings: DemoSettings,
                codec: tuple[str, str, dict[str, str]]) -> int:
    """Draw and encode one clip to `path` (atomically); returns its frame count."""
    from vsectl.data.images import load_rgb

    av = _av()
    ims = [load_rgb(it["path"]) for it in items]  # an unreadable drawing is one line (UnreadableImage)
    if kind == "pan":
        frames = _pan_frames(ims[0], settings.size, args["n"], args["leftwards"])
    elif kind == "zoom":
        frames = _zoom_frames(ims[0], settings.size, args["n"], args["inwards"])
    else:
        frames = _sequence_frames(ims, settings.size, args["per_item"])
    tmp = path.with_name(path.name + ".partial" + path.suffix)
    n = 0
    try:
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream(codec[0], rate=settings.fps, options=codec[2])
            stream.width = stream.height = settings.size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = fractions.Fraction(1, settings.fps)
            for frame in frames:
                vf = av.VideoFrame.from_image(frame)
                vf.pts, n = n, n + 1
                container.mux(stream.encode(vf))
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _split_clips(images: list[dict[str, Any]], split: str, settings: DemoSettings, seed_offset: int
                 ) -> list[tuple[str, str, list[dict[str, Any]], list[str], dict[str, Any]]]:
    rng = np.random.default_rng([settings.seed, seed_offset])
    pool = [im for im in images if im["split"] == split and im["captions"]]
    leads = pool[: settings.max_per_split] if settings.max_per_split else pool
    out = []
    for k, lead in enumerate(leads):
        kind, items, captions, args = clip_plan(k, lead, pool, rng, settings)
        out.append((f"{split}{k:05d}", kind, items, captions, args))
    return out


def _provenance(counts: dict[str, Any], settings: DemoSettings, source: str) -> str:
    return "\n".join([
        "# Provenance: video demo set", "",
        f"Built by `vsectl data prepare video-demo` from the openclipart raw dataset {source}.",
        "Each clip shows drawings of one split: a pan (left to right or back), a zoom (in or out), or a sequence of",
        f"two or three drawings; {settings.size}x{settings.size} px at {settings.fps} fps, {settings.seconds:g} s per "
        "pan or zoom and half that per drawing of a sequence; even clips H.264 (.mp4), odd clips VP9 (.webm).",
        "Captions are the drawings' cleaned titles in templates ('..., moving from left to right', 'zooming in on",
        "...', 'a, then b').", "",
        "Counts: " + ", ".join(f"{s} {v['videos']} clips / {v['captions']} captions" for s, v in counts.items()), ""])


def prepare_video_demo(source: str | Path, out: str | Path, settings: DemoSettings | None = None,
                       progress: Progress | None = None) -> Path:
    """Build the demo clips from a prepared openclipart raw dataset `source` into the raw video dataset `out`.

    Returns:
        `out`.
    """
    from vsectl import __version__
    from vsectl.runtime import NullProgress

    settings, progress, out = settings or DemoSettings(), progress or NullProgress(), Path(out)
    raw = load_raw_dataset(source)
    if raw.manifest.get("modality", "image") != "image" or not raw.images:
        raise DataError(f"{raw.root} is not an image dataset; give the folder `vsectl data prepare openclipart` made")
    params = {"demo_version": DEMO_VERSION, **asdict(settings),
              "source_dataset_sha256": sha256_file(raw.root / DATASET_JSON)}
    videos = out / "videos"
    state = out / "params.json"
    if state.is_file() and state.read_text(encoding="utf-8") != _json(params):
        log.warning("%s was built with other settings; rebuilding it", out)
        shutil.rmtree(videos, ignore_errors=True)
        (out / MANIFEST_JSON).unlink(missing_ok=True)
    videos.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state, _json(params))
    start = time.monotonic()
    plans = [c for k, s in enumerate(("train", "dev", "test")) for c in _split_clips(raw.images, s, settings, k)]
    entries, counts = [], {s: {"videos": 0, "captions": 0} for s in ("train", "val", "test")}
    for k, (vid, kind, items, captions, args) in enumerate(progress.track(plans, total=len(plans),
                                                                          description="render clips")):
        codec = CODECS[k % len(CODECS)]
        path = videos / f"{vid}{codec[1]}"
        if not path.is_file():
            render_clip(path, kind, items, args, settings, codec)
        split = "val" if vid.startswith("dev") else vid.rstrip("0123456789")
        counts[split]["videos"] += 1
        counts[split]["captions"] += len(captions)
        entries.append({"filename": path.name, "id": vid, "split": split, "kind": kind, "codec": codec[0],
                        "sources": [it["id"] for it in items],
                        "sentences": [{"raw": c, "tokens": word_tokenize(c)} for c in captions]})
    if not entries:
        raise DataError(f"{raw.root} has no captioned images to make clips from")
    dataset_sha = atomic_write_json(out / DATASET_JSON, {"dataset": "video_demo", "images": entries}, indent=None,
                                    ensure_ascii=False)
    atomic_write_text(out / "LICENSE.txt", LICENSE_TEXT)
    atomic_write_text(out / "PROVENANCE.md", _provenance(counts, settings, str(raw.root)))
    atomic_write_json(out / MANIFEST_JSON, {
        "format": RAW_FORMAT, "version": RAW_VERSION, "dataset": "video_demo", "image_root": "videos",
        "modality": MODALITY, "vsectl_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - start, 1), "source": {"dataset": str(raw.root)}, "params": params,
        "counts": {"splits": counts}, "checksums": {DATASET_JSON: dataset_sha}}, indent=1, ensure_ascii=False,
        newline=False)
    log.info("video demo: %s", ", ".join(f"{s} {v['videos']} clips" for s, v in counts.items()))
    return out


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
