"""Export a trained run's two towers to ONNX and check them against torch with onnxruntime.

The folder written holds `image.onnx` (features (B, K, D) float32 + lengths (B,) int64 → (B, E) unit vectors),
`text.onnx` (token ids (B, T) int64 + lengths (B,) int64 → (B, E)), the run's text-processing files (the BiGRU
vocabulary or the transformers tokenizer) and `export.json`, which describes the inputs and the parity measured.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vsectl.errors import ConfigError, VsectlError

log = logging.getLogger(__name__)

OPSET = 17                      # ONNX opset; GRU, TopK with a dynamic k and LayerNormalization are all there
PARITY_TOLERANCE = 1e-4         # largest |onnxruntime − torch| accepted on unit-norm embeddings
CHECK_SET_SIZES = (1, 7, 36, 100)
CHECK_TEXT_LENGTHS = (1, 5, 32)
CHECK_BATCH = 3
MANIFEST = "export.json"
FORMATS = ("onnx",)


class ExportError(VsectlError):
    """The exported graph does not reproduce the torch model (nothing is written)."""


def require_onnx() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or raise one line naming the extra."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install 'vsectl[onnx]'") from None
    return onnx, onnxruntime


def _export_graph(module: nn.Module, example: tuple[torch.Tensor, torch.Tensor], path: Path,
                  names: tuple[str, str], axis_name: str) -> None:
    """Trace `module` into an ONNX file with dynamic batch and set/sequence axes."""
    module.eval()  # the exporter restores the mode it found, so the towers must be in eval mode before
    dynamic = {names[0]: {0: "batch", 1: axis_name}, names[1]: {0: "batch"}, "embedding": {0: "batch"}}
    with warnings.catch_warnings():
        # the TorchScript exporter warns about its deprecation and about GRUs traced at one batch size; the parity
        # check below runs other batch sizes, set sizes and lengths, so a wrong trace cannot pass unnoticed
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=list(names), output_names=["embedding"],
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def _random_lengths(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[0] = width  # the widest member sets the padded width, as a collate does
    return lengths


def check_parity(session: Any, module: nn.Module, make_input: Any, sizes: tuple[int, ...],
                 names: tuple[str, str], seed: int = 0) -> float:
    """Largest |onnxruntime − torch| over random batches of each size (mixed lengths within a batch).

    `module` is the trained encoder itself (packed GRUs, cut to max(lengths)), not the export formulation.
    """
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for width in sizes:
        for batch in (1, CHECK_BATCH):
            data = make_input(gen, batch, width)
            lengths = _random_lengths(gen, batch, width)
            with torch.no_grad():
                expected = module(data, lengths)
            expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
            got = session.run(None, {names[0]: data.numpy(), names[1]: lengths.numpy()})[0]
            worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def _session(onnxruntime: Any, path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _copy_text_files(run_dir: Path, tmp: Path) -> dict[str, str]:
    from vsectl.builders import TEXT_MODEL_DIR, VOCAB_FILE

    if (run_dir / VOCAB_FILE).is_file():
        shutil.copy2(run_dir / VOCAB_FILE, tmp / VOCAB_FILE)
        return {"kind": "vocab", "path": VOCAB_FILE}
    shutil.copytree(run_dir / TEXT_MODEL_DIR, tmp / TEXT_MODEL_DIR)
    return {"kind": "tokenizer", "path": TEXT_MODEL_DIR}


def _prepare_out(out: Path) -> Path:
    """Refuse a non-empty folder that is not an earlier export; return a private temporary folder beside `out`."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ConfigError(f"{out} exists and is not an ONNX export folder; choose a new or empty --out folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the export follows the user's umask like any other output
    return tmp


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_onnx(run: Path, out: Path, *, fmt: str = "onnx", which: str = "best", seed: int = 0) -> dict[str, Any]:
    """Write the image and text towers of `run` as ONNX files into `out` and check them with onnxruntime.

    Args:
        run: run directory or checkpoint folder.
        out: output folder (new, empty, or an earlier export, which is replaced whole).
        fmt: the export format; only "onnx".
        which: "best" or "last" checkpoint.
        seed: seed of the random parity inputs.

    Returns:
        the manifest written to `out/export.json` (paths, inputs, parity per tower).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; formats: {', '.join(FORMATS)}")
    _, onnxruntime = require_onnx()
    from vsectl import __version__
    from vsectl.builders import load_run, resolve_checkpoint
    from vsectl.io import atomic_write_json, sha256_file
    from vsectl.models.exportable import ImageTower, TextTower

    out = Path(out)
    run_dir, ckpt = resolve_checkpoint(Path(run), which)
    cfg, model, text = load_run(Path(run), which=which, device="cpu")
    towers = {"image": ImageTower(model.image).eval(), "text": TextTower(model.text).eval()}
    feat_dim = cfg.model.image.feat_dim
    vocab = text.vocab_size or int(model.text.body.config.vocab_size)
    low = 1 if text.vocab is None else 4  # BiGRU ids below 4 are the specials; transformers ids may be anything

    def image_input(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
        return torch.randn(batch, width, feat_dim, generator=gen)

    def text_input(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
        return torch.randint(low, vocab, (batch, width), generator=gen)

    specs = {"image": (("features", "lengths"), "set_size", image_input, CHECK_SET_SIZES),
             "text": (("tokens", "lengths"), "length", text_input, CHECK_TEXT_LENGTHS)}
    tmp = _prepare_out(out)
    try:
        parity: dict[str, float] = {}
        gen = torch.Generator().manual_seed(seed)
        for name, (names, axis, make_input, sizes) in specs.items():
            path = tmp / f"{name}.onnx"
            example = (make_input(gen, 2, 3), torch.tensor([3, 2]))
            log.info("exporting the %s tower", name)
            _export_graph(towers[name], example, path, names, axis)
            parity[name] = check_parity(_session(onnxruntime, path), getattr(model, name), make_input, sizes, names,
                                        seed=seed)
            if parity[name] > PARITY_TOLERANCE:
                raise ExportError(f"the ONNX {name} tower differs from torch by {parity[name]:.2e} "
                                  f"(> {PARITY_TOLERANCE:g}); nothing was written — please report this model")
        manifest = {
            "format": "onnx", "opset": OPSET, "vsectl": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "run": str(run_dir), "checkpoint": str(ckpt),
            "model_sha256": sha256_file(ckpt / "model.safetensors"), "embed_dim": cfg.model.embed_dim,
            "image": {"file": "image.onnx", "inputs": {"features": ["batch", "set_size", feat_dim],
                      "lengths": ["batch"]}, "encoder": cfg.model.image.encoder, "pool": cfg.model.image.pool.name},
            "text": {"file": "text.onnx", "inputs": {"tokens": ["batch", "length"], "lengths": ["batch"]},
                     "encoder": cfg.model.text.encoder, "pool": cfg.model.text.pool.name, "pad_id": text.pad_id,
                     **_copy_text_files(run_dir, tmp)},
            "output": {"embedding": ["batch", cfg.model.embed_dim], "note": "L2-normalised float32"},
            "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE, "set_sizes": list(CHECK_SET_SIZES),
                       "text_lengths": list(CHECK_TEXT_LENGTHS), "seed": seed},
        }
        atomic_write_json(tmp / MANIFEST, manifest, indent=2, ensure_ascii=False, newline=False)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["out"] = str(out)
    return manifest
