"""How a frozen backbone runs during extraction: the engines, and the measured choice among them.

Every engine turns a (b, 3, S, S) uint8 batch into (b, N, C) float32 features that equal the `eager` engine's (today's
torch path) within `TOLERANCE`; `choose_engine` builds the candidates that fit the device and precision, checks that
agreement on a calibration batch and keeps the fastest, so the choice follows what this CPU measures rather than
its name. Engines:

- `eager`: torch, optionally channels-last, under the precision's autocast (the reference; every device).
- `onnx`: the backbone, normalisation folded in, exported to ONNX in memory and run by onnxruntime's CPU provider
  (fp32 on a CPU; the `onnx` extra). Build cost: one export, ≈6 s for EfficientNet-Lite0 and ResNet-50.
- `compile`: torch.compile (inductor) of the eager module with frozen weights. Not an `auto` candidate on a CPU: its
  build took 164 s for EfficientNet-Lite0 on 2 shared cores and its speed-up (1.8×) was below onnxruntime's (3.5×)
  on the one CPU measured (BENCHMARKS.md).
"""

from __future__ import annotations

import io
import logging
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vsectl.data.images import normalize
from vsectl.errors import ConfigError
from vsectl.models.backbones import Backbone
from vsectl.registry import Registry
from vsectl.runtime import Precision

log = logging.getLogger(__name__)

TOLERANCE = 1e-4          # max |engine − eager| ÷ max |eager| on the calibration batch; fp16 storage rounds at 4.9e-4
AUTO_MIN_IMAGES = 256     # below this many images `auto` keeps `eager`: an ONNX build (≈6 s) would not pay back
CALIBRATION_BATCH = 8     # images per timed calibration call
CALIBRATION_REPS = 3      # timed calls per candidate, interleaved; the fastest counts
ENGINE_CHOICES = ("auto", "eager", "onnx", "compile")
ONNX_OPSET = 17

ENGINES: Registry[type[Engine]] = Registry("extraction engine")
# auto's measured choice per backbone object and (device, precision, layout): one calibration per command, not per split
_CHOSEN: weakref.WeakKeyDictionary[Backbone, dict[tuple[str, str, bool], Choice]] = weakref.WeakKeyDictionary()


class _Normalised(nn.Module):
    """uint8 images → the backbone's normalised input → its feature sets; what the ONNX graph holds."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(backbone.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images.float() / 255.0 - self.mean) / self.std)  # same arithmetic as `normalize`


class Engine:
    """A backbone made ready to run on one device at one precision.

    Subclasses say which devices and precisions they serve (`supports`), whether `auto` may try them, and implement
    `run`: (b, 3, S, S) uint8 CPU tensor → (b, N, C) float32 numpy features.
    """

    name: ClassVar[str] = ""
    auto_candidate: ClassVar[bool] = True

    def __init__(self, backbone: Backbone, device: torch.device, precision: str, channels_last: bool) -> None:
        self.backbone, self.device, self.channels_last = backbone, device, channels_last
        self.precision = Precision(precision, device)

    @classmethod
    def supports(cls, device: torch.device, precision: str) -> str | None:
        """None when this engine can run on `device` at `precision`, else why not (one phrase)."""
        return None

    def run(self, images: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}


@ENGINES.register("eager")
class EagerEngine(Engine):
    """Today's path: torch modules, channels-last if asked, autocast for bf16/fp16."""

    name = "eager"

    def __init__(self, backbone: Backbone, device: torch.device, precision: str, channels_last: bool) -> None:
        super().__init__(backbone, device, precision, channels_last)
        # Set the layout both ways: the same backbone may have been run channels-last before.
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        backbone.to(device=device, memory_format=fmt)

    def forward_tensor(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)  # (b, 3, S, S) uint8
        x = normalize(x, self.backbone.mean, self.backbone.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # inference_mode only around the forward: a mode entered in a generator would leak into the caller
        with torch.inference_mode(), self.precision.autocast():
            return self.backbone(x)  # (b, N, C)

    def run(self, images: torch.Tensor) -> np.ndarray:
        return self.forward_tensor(images).float().cpu().numpy()


def _require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError:
        raise ConfigError("the onnx engine needs onnx and onnxruntime: pip install 'vsectl[onnx]'") from None
    return onnxruntime


def export_backbone_onnx(backbone: Backbone, size: int) -> bytes:
    """The backbone with its uint8 normalisation as an ONNX model (bytes), batch axis dynamic, input side `size`."""
    module = _Normalised(backbone).eval()
    backbone.to(memory_format=torch.contiguous_format)
    buf = io.BytesIO()
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    return buf.getvalue()


@ENGINES.register("onnx")
class OnnxEngine(Engine):
    """onnxruntime's CPU provider over the exported backbone (fp32), as many intra-op threads as torch uses."""

    name = "onnx"

    def __init__(self, backbone: Backbone, device: torch.device, precision: str, channels_last: bool) -> None:
        super().__init__(backbone, device, precision, channels_last)
        ort = _require_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(export_backbone_onnx(backbone, backbone.size), options,
                                            providers=["CPUExecutionProvider"])
        self.ort_version = ort.__version__

    @classmethod
    def supports(cls, device: torch.device, precision: str) -> str | None:
        if device.type != "cpu":
            return "runs on the CPU only"
        if precision != "fp32":
            return "runs at fp32 only"
        try:
            _require_onnxruntime()
        except ConfigError:
            return "onnxruntime is not installed (pip install 'vsectl[onnx]')"
        return None

    def run(self, images: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {"images": images.contiguous().numpy()})[0]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "onnxruntime": self.ort_version}


@ENGINES.register("compile")
class CompiledEngine(EagerEngine):
    """torch.compile (inductor, frozen weights) of the eager path; compiled on the first batch of each shape."""

    name = "compile"
    auto_candidate = False

    def __init__(self, backbone: Backbone, device: torch.device, precision: str, channels_last: bool) -> None:
        super().__init__(backbone, device, precision, channels_last)
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights are constants: lets inductor fold BN and prepack convolutions
        self.compiled = torch.compile(backbone)

    def forward_tensor(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(self.device, non_blocking=True), self.backbone.mean, self.backbone.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.precision.autocast():
            return self.compiled(x)


# ------------------------------------------------------------------------------------------------ the choice


@dataclass
class Choice:
    """The engine that runs, and how it was chosen (recorded in the store's attrs and the log)."""

    engine: Engine
    requested: str
    reason: str
    timings: dict[str, float] = field(default_factory=dict)  # images/s of each candidate on the calibration batch
    deviation: dict[str, float] = field(default_factory=dict)  # max |Δ| ÷ max |eager| of each candidate

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), "engine_requested": self.requested, "engine_reason": self.reason,
                "engine_images_per_s": self.timings, "engine_deviation": self.deviation}


def deviation(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got − ref| ÷ max |ref|: the agreement measure of `TOLERANCE`."""
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def check_engine(name: str, device: torch.device, precision: str) -> None:
    """Refuse, in one line, an engine name that is unknown or cannot serve this device and precision."""
    if name not in ENGINE_CHOICES:
        raise ConfigError(f"unknown extraction engine '{name}'; use {', '.join(ENGINE_CHOICES)}")
    why = None if name == "auto" else ENGINES.get(name).supports(device, precision)
    if why is not None:
        raise ConfigError(f"extraction engine '{name}' {why}; use --engine eager or auto")


def _build(name: str, backbone: Backbone, device: torch.device, precision: str, channels_last: bool) -> Engine:
    check_engine(name, device, precision)
    return ENGINES.get(name)(backbone, device, precision, channels_last)


def _seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def calibrate(engines: dict[str, Engine], images: torch.Tensor, reps: int = CALIBRATION_REPS
              ) -> tuple[dict[str, float], dict[str, float]]:
    """Images/s of each engine on `images` (fastest of `reps` interleaved calls after a warm-up) and its deviation
    from the first engine's (the reference) features."""
    outputs = {name: e.run(images) for name, e in engines.items()}  # warm-up: thread pools, primitives, compilation
    ref = next(iter(outputs.values()))
    dev = {name: deviation(out, ref) for name, out in outputs.items()}
    best = {name: float("inf") for name in engines}
    for _ in range(reps):
        for name, e in engines.items():
            best[name] = min(best[name], _seconds(lambda e=e: e.run(images)))
    return {name: len(images) / t for name, t in best.items()}, dev


def choose_engine(backbone: Backbone, *, engine: str = "auto", device: torch.device, precision: str,
                  channels_last: bool, n_images: int, seed: int = 0) -> Choice:
    """Build the engine to extract `n_images` images with: the one asked for, or under `auto` the fastest candidate
    measured here whose features agree with `eager`'s within TOLERANCE.

    Raises:
        ConfigError: an unknown engine, or one that cannot run on this device / precision / installation.
    """
    check_engine(engine, device, precision)
    if engine != "auto":
        return Choice(_build(engine, backbone, device, precision, channels_last), engine, "asked for")
    key = (str(device), precision, channels_last)
    if key in _CHOSEN.get(backbone, {}):  # a later split of the same command: measured already
        return _CHOSEN[backbone][key]
    unfit = {n: ENGINES.get(n).supports(device, precision) for n in ENGINES.names()
             if n != "eager" and ENGINES.get(n).auto_candidate}
    candidates = [n for n, why in unfit.items() if why is None]
    if not candidates or n_images < AUTO_MIN_IMAGES:
        why = (f"{n_images} images: fewer than {AUTO_MIN_IMAGES}, where a build would not pay" if candidates else
               "no other engine serves this: " + "; ".join(f"{n} {w}" for n, w in unfit.items()))
        log.info("extraction engine eager: %s", why)
        return Choice(EagerEngine(backbone, device, precision, channels_last), engine, why)
    choice = _measure(backbone, candidates, device, precision, channels_last, seed)
    _CHOSEN.setdefault(backbone, {})[key] = choice
    return choice


def _measure(backbone: Backbone, candidates: list[str], device: torch.device, precision: str, channels_last: bool,
             seed: int) -> Choice:
    """Build eager and the candidates, calibrate them, keep the fastest that agrees with eager."""
    built: dict[str, Engine] = {}
    failed = {}
    for name in candidates:
        try:
            built[name] = ENGINES.get(name)(backbone, device, precision, channels_last)
        except Exception as e:  # an exporter or runtime that cannot take this network: measured as unusable
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log.info("extraction engine %s cannot run %s: %s", name, backbone.name, failed[name])
    # eager last: building it sets the module's memory layout, which an export may have changed
    engines: dict[str, Engine] = {"eager": EagerEngine(backbone, device, precision, channels_last), **built}
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (CALIBRATION_BATCH, 3, backbone.size, backbone.size), dtype=torch.uint8,
                           generator=gen)
    rates, dev = calibrate(engines, images)
    fits = {n: r for n, r in rates.items() if dev[n] <= TOLERANCE}
    best = max(fits, key=fits.get)
    reason = (f"fastest measured here ({', '.join(f'{n} {r:.1f}' for n, r in rates.items())} images/s); "
              + ", ".join(f"{n} deviates {d:.1e}" for n, d in dev.items() if n != "eager"))
    if failed:
        reason += "; unavailable: " + ", ".join(f"{n} ({why})" for n, why in failed.items())
    log.info("extraction engine %s: %s", best, reason)
    return Choice(engines[best], "auto", reason, timings=rates, deviation=dev)

