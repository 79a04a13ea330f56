"""Export a trained run's towers to ONNX and check them against torch with onnxruntime.

The folder written holds `image.onnx` (features (B, K, D) float32 + lengths (B,) int64 → (B, E) unit vectors),
`image_pixels.onnx` where the run's backbone is known (images (B, 3, S, S) uint8 RGB → (B, E): the backbone inside),
`text.onnx` (token ids (B, T) int64 + lengths (B,) int64 → (B, E)), the run's text-processing files (the BiGRU
vocabulary, or the transformers tokenizer files without padding and without the model weights), `client.py` (a
reference client, `vsectl.onnx_client`) and `export.json`, which describes the inputs and the parity measured.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vsectl.errors import ConfigError, VsectlError
from vsectl.folders import check_target, staged_folder
from vsectl.locks import folder_lock

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


OUT_HINT = "choose a new or empty --out folder, or pass --force to replace only the export's own files and keep " \
           "the others"


def _earlier_export(folder: Path) -> set[str]:
    """The entries of an export written before vsectl listed them (`.vsectl-owned.json`): what its manifest names."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS or "vsectl" not in manifest:
        return set()
    named = {MANIFEST}
    for part in manifest.values():
        if isinstance(part, dict):
            named |= {str(part[k]) for k in ("file", "path") if isinstance(part.get(k), str)}
    return {name for name in named if name and "/" not in name and name not in (".", "..")}


def export_onnx(run: Path, out: Path, *, fmt: str = "onnx", which: str = "best", seed: int = 0,
                force: bool = False) -> dict[str, Any]:
    """Write the image and text towers of `run` as ONNX files into `out` and check them with onnxruntime.

    Args:
        run: run directory or checkpoint folder.
        out: output folder (new, empty, or an earlier export, which is replaced whole).
        force: write into a folder that holds other files too: the export's files are replaced, the others kept.
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
    from vsectl.export_parts import check_client, export_pixels, pixel_tower, write_client, write_text_files
    from vsectl.io import atomic_write_json, sha256_file
    from vsectl.models.exportable import ImageTower, TextTower

    out = Path(out)
    check_target(out, OUT_HINT, _earlier_export, force)  # before the model loads; checked again under the lock
    run_dir, ckpt = resolve_checkpoint(Path(run), which)
    cfg, model, text = load_run(Path(run), which=which, device="cpu")
    from vsectl.kinds import IMAGE_KINDS, ImageInput

    # a run that trained its backbone takes images only
    from_features = IMAGE_KINDS.get(cfg.model.image.encoder).reads is ImageInput.FEATURES
    towers = {**({"image": ImageTower(model.image).eval()} if from_features else {}),
              "text": TextTower(model.text).eval()}
    feat_dim = cfg.model.image.feat_dim
    vocab = text.vocab_size or int(model.text.body.config.vocab_size)
    max_tokens = None if text.vocab is not None else getattr(model.text.body.config, "max_position_embeddings", None)
    pixels, pixel_size, pixel_note = pixel_tower(cfg, model, run_dir)
    low = 1 if text.vocab is None else 4  # BiGRU ids below 4 are the specials; transformers ids may be anything

    def image_input(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
        return torch.randn(batch, width, feat_dim, generator=gen)

    def text_input(gen: torch.Generator, batch: int, width: int) -> torch.Tensor:
        return torch.randint(low, vocab, (batch, width), generator=gen)

    specs = {"image": (("features", "lengths"), "set_size", image_input, CHECK_SET_SIZES),
             "text": (("tokens", "lengths"), "length", text_input, CHECK_TEXT_LENGTHS)}
    specs = {name: spec for name, spec in specs.items() if name in towers}
    with folder_lock(out), staged_folder(out, OUT_HINT, legacy=_earlier_export, force=force) as tmp:
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
        if pixels is not None:
            log.info("exporting the image tower from pixels (%d px, backbone inside)", pixel_size)
            parity["image_pixels"] = export_pixels(pixels, pixel_size, tmp / "image_pixels.onnx",
                                                   lambda p: _session(onnxruntime, p), OPSET, seed)
            if parity["image_pixels"] > PARITY_TOLERANCE:
                raise ExportError(f"the ONNX image tower from pixels differs from torch by "
                                  f"{parity['image_pixels']:.2e} (> {PARITY_TOLERANCE:g}); nothing was written")
        else:
            log.info("no image tower from pixels: %s", pixel_note)
        text_files = write_text_files(run_dir, tmp)
        manifest = {
            "format": "onnx", "opset": OPSET, "vsectl": __version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "run": str(run_dir), "checkpoint": str(ckpt),
            "model_sha256": sha256_file(ckpt / "model.safetensors"), "embed_dim": cfg.model.embed_dim,
            "image": {"file": "image.onnx", "inputs": {"features": ["batch", "set_size", feat_dim],
                      "lengths": ["batch"]}, "encoder": cfg.model.image.encoder, "pool": cfg.model.image.pool.name}
            if from_features else None,
            "text": {"file": "text.onnx", "inputs": {"tokens": ["batch", "length"], "lengths": ["batch"]},
                     "encoder": cfg.model.text.encoder, "pool": cfg.model.text.pool.name, "pad_id": text.pad_id,
                     **text_files, "max_tokens": max_tokens},
            "image_pixels": {"file": "image_pixels.onnx", "size": pixel_size, "inputs": {
                "images": ["batch", 3, pixel_size, pixel_size]}, "note": "uint8 RGB, resized to size×size "
                "(bilinear, aspect not kept); normalisation and the backbone are inside"} if pixels is not None
            else None,
            "notes": {**({"image_pixels": pixel_note} if pixels is None else {}),
                      **({} if from_features else {"image": "the run trains its own backbone: it takes images "
                                                            "(image_pixels.onnx), not feature sets"})},
            "client": write_client(tmp),
            "output": {"embedding": ["batch", cfg.model.embed_dim], "note": "L2-normalised float32"},
            "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE, "set_sizes": list(CHECK_SET_SIZES),
                       "text_lengths": list(CHECK_TEXT_LENGTHS), "seed": seed},
        }
        atomic_write_json(tmp / MANIFEST, manifest, indent=2, ensure_ascii=False, newline=False)
        manifest["parity"]["client_text"] = check_client(tmp, Path(run), which)  # the obvious client, end to end
        if manifest["parity"]["client_text"]["max_abs_diff"] > manifest["parity"]["client_text"]["tolerance"]:
            raise ExportError(f"the reference client's text embeddings differ from vsectl's by "
                              f"{manifest['parity']['client_text']['max_abs_diff']:.2e}; nothing was written")
        atomic_write_json(tmp / MANIFEST, manifest, indent=2, ensure_ascii=False, newline=False)
    manifest["out"] = str(out)
    return manifest
