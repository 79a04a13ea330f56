"""Extraction engines (vsectl.extract.engines): each agrees with today's eager path, and `auto` keeps the fastest
engine measured here among those that agree, never one that deviates."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_extract import TinyBackbone, make_raw, run
from typer.testing import CliRunner

from vsectl.data.images import normalize
from vsectl.data.store import read_store_attrs
from vsectl.errors import ConfigError
from vsectl.extract import engines
from vsectl.extract.engines import ENGINES, TOLERANCE, Choice, EagerEngine, OnnxEngine, choose_engine, deviation
from vsectl.models.backbones import create_backbone

CPU = torch.device("cpu")


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_features(backbone: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Today's path written out: float normalisation, NCHW float64 forward (the slow, obviously-right one)."""
    net = backbone.double()
    try:
        with torch.no_grad():
            out = net(normalize(x, backbone.mean, backbone.std).double())
    finally:
        backbone.float()
    return out.float().numpy()


def test_every_engine_is_registered_under_its_name() -> None:
    assert set(ENGINES.names()) == {"eager", "onnx", "compile"}
    assert all(ENGINES.get(n).name == n for n in ENGINES.names())


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_engine_matches_the_float64_reference(channels_last: bool) -> None:
    tiny, x = TinyBackbone(), images(3, 16)
    got = EagerEngine(tiny, CPU, "fp32", channels_last).run(x)
    assert got.shape == (3, 16, 8) and deviation(got, reference_features(tiny, x)) < 1e-6


def test_onnx_engine_agrees_with_eager_on_efficientnet() -> None:
    backbone = create_backbone("efficientnet-lite0", size=64)
    x = images(3, 64, seed=1)
    onnx = OnnxEngine(backbone, CPU, "fp32", False).run(x)
    eager = EagerEngine(backbone, CPU, "fp32", True).run(x)
    assert onnx.shape == eager.shape == (3, 4, 1280)
    assert deviation(onnx, eager) <= TOLERANCE
    assert deviation(onnx, reference_features(backbone, x)) <= TOLERANCE


def test_onnx_engine_serves_only_the_cpu_at_fp32() -> None:
    assert OnnxEngine.supports(CPU, "fp32") is None
    assert "fp32" in OnnxEngine.supports(CPU, "bf16")
    assert "CPU" in OnnxEngine.supports(torch.device("cuda"), "fp32")
    with pytest.raises(ConfigError, match="engine 'onnx' runs at fp32 only"):
        choose_engine(TinyBackbone(), engine="onnx", device=CPU, precision="bf16", channels_last=True, n_images=1)
    with pytest.raises(ConfigError, match="unknown extraction engine 'fast'"):
        choose_engine(TinyBackbone(), engine="fast", device=CPU, precision="fp32", channels_last=True, n_images=1)


def test_auto_keeps_eager_for_small_jobs() -> None:
    choice = choose_engine(TinyBackbone(), device=CPU, precision="fp32", channels_last=True,
                           n_images=engines.AUTO_MIN_IMAGES - 1)
    assert choice.engine.name == "eager" and "fewer than" in choice.reason and not choice.timings


class Perturbed(EagerEngine):
    """A 'fast' engine whose features are off by more than the tolerance."""

    name = "perturbed"

    def run(self, images: torch.Tensor) -> np.ndarray:
        out = super().run(images)
        return out + 1e-2 * np.abs(out).max()


class Instant(EagerEngine):
    """An engine that agrees with eager and is measured faster (it answers from a cache of the same features)."""

    name = "instant"

    def run(self, images: torch.Tensor) -> np.ndarray:
        key = images.numpy().tobytes()
        if getattr(self, "_key", None) != key:
            self._key, self._out = key, super().run(images)
        return self._out


def test_auto_takes_the_fastest_agreeing_engine_and_never_a_deviating_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ENGINES, "_items", {"eager": EagerEngine, "perturbed": Perturbed, "instant": Instant})
    rates = {"eager": 10.0, "perturbed": 1000.0, "instant": 100.0}
    monkeypatch.setattr(engines, "calibrate", lambda built, x: (
        {n: rates[n] for n in built}, {n: deviation(e.run(x), built["eager"].run(x)) for n, e in built.items()}))
    choice = choose_engine(TinyBackbone(), device=CPU, precision="fp32", channels_last=True, n_images=10**6)
    assert choice.engine.name == "instant"
    assert choice.deviation["perturbed"] > TOLERANCE >= choice.deviation["instant"]
    assert set(choice.timings) == {"eager", "perturbed", "instant"}


def test_calibration_measures_every_engine_against_the_first() -> None:
    tiny = TinyBackbone()
    built = {"eager": EagerEngine(tiny, CPU, "fp32", True), "perturbed": Perturbed(tiny, CPU, "fp32", True)}
    rates, dev = engines.calibrate(built, images(2, 16), reps=1)
    assert set(rates) == set(built) and all(r > 0 for r in rates.values())
    assert dev["eager"] == 0.0 and dev["perturbed"] == pytest.approx(1e-2, rel=1e-3)


def test_an_engine_that_cannot_be_built_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(EagerEngine):
        name = "broken"

        def __init__(self, *args: object) -> None:
            raise RuntimeError("exporter cannot take this network")

    monkeypatch.setattr(ENGINES, "_items", {"eager": EagerEngine, "broken": Broken})
    choice = choose_engine(TinyBackbone(), device=CPU, precision="fp32", channels_last=True, n_images=10**6)
    assert choice.engine.name == "eager" and "broken (RuntimeError: exporter cannot" in choice.reason


def test_engine_is_recorded_and_does_not_change_the_fingerprint(tmp_path: Path) -> None:
    raw = make_raw(tmp_path / "raw")
    tiny = TinyBackbone()
    [store] = run(tiny, raw, tmp_path / "a", engine="onnx")
    attrs = read_store_attrs(store)
    assert attrs["engine"] == "onnx" and attrs["engine_requested"] == "onnx"
    [eager_store] = run(tiny, raw, tmp_path / "b", engine="eager")
    eager_attrs = read_store_attrs(eager_store)
    assert eager_attrs["fingerprint"] == attrs["fingerprint"]
    assert deviation(stored_rows(store), stored_rows(eager_store)) <= TOLERANCE


def stored_rows(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features/rows"][()]


def test_cli_refuses_an_unknown_engine_in_one_line(tmp_path: Path) -> None:
    from vsectl.cli import app

    raw = make_raw(tmp_path / "raw")
    result = CliRunner().invoke(app, ["extract", "--backbone", "efficientnet-lite0", "--data", str(raw), "--out",
                                      str(tmp_path / "out"), "--engine", "turbo"])
    assert result.exit_code == 2
    assert "unknown extraction engine 'turbo'" in result.output and "Traceback" not in result.output


def test_cli_refuses_an_engine_that_cannot_serve_before_any_work(tmp_path: Path) -> None:
    from vsectl.cli import app

    raw = make_raw(tmp_path / "raw")
    result = CliRunner().invoke(app, ["extract", "--backbone", "efficientnet-lite0", "--data", str(raw), "--out",
                                      str(tmp_path / "out"), "--engine", "onnx", "--precision", "bf16"])
    assert result.exit_code == 2
    assert "extraction engine 'onnx' runs at fp32 only; use --engine eager or auto" in result.output
    assert not (tmp_path / "out").exists()  # refused before a shard folder was made


def test_choice_describes_itself_for_the_store() -> None:
    choice = Choice(EagerEngine(TinyBackbone(), CPU, "fp32", True), "auto", "why", {"eager": 1.0}, {"eager": 0.0})
    assert choice.describe() == {"engine": "eager", "engine_requested": "auto", "engine_reason": "why",
                                 "engine_images_per_s": {"eager": 1.0}, "engine_deviation": {"eager": 0.0}}


def test_without_onnxruntime_auto_says_why_it_keeps_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise ConfigError("the onnx engine needs onnx and onnxruntime: pip install 'vsectl[onnx]'")

    monkeypatch.setattr(engines, "_require_onnxruntime", missing)
    choice = choose_engine(TinyBackbone(), device=CPU, precision="fp32", channels_last=True, n_images=10**6)
    assert choice.engine.name == "eager"
    assert choice.reason == ("no other engine serves this: onnx onnxruntime is not installed "
                             "(pip install 'vsectl[onnx]')")


def test_auto_measures_once_per_backbone_and_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = engines.calibrate
    monkeypatch.setattr(engines, "calibrate", lambda built, x: calls.append(1) or real(built, x, reps=1))
    tiny = TinyBackbone()
    first = choose_engine(tiny, device=CPU, precision="fp32", channels_last=True, n_images=10**6)
    again = choose_engine(tiny, device=CPU, precision="fp32", channels_last=True, n_images=10)  # a later, small split
    assert again is first and len(calls) == 1
    other = choose_engine(tiny, device=CPU, precision="fp32", channels_last=False, n_images=10**6)
    assert other is not first and len(calls) == 2
