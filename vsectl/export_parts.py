"""What an ONNX export holds beside the two feature towers: the text files a client needs (a tokenizer without
padding, no model weights), the image tower from pixels (backbone inside), and the reference client, checked.

The exported tokenizer must give the obvious call the right answer: `Tokenizer.encode(text).ids` with
`lengths = len(ids)`. A tokenizer.json that pads every text to 128 tokens made text.onnx read the pads as words.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                   "vocab.json", "added_tokens.json", "spiece.model", "config.json")  # no weights: text.onnx has them
CLIENT_FILE = "client.py"
CLIENT_TOLERANCE = 1e-5      # largest |client − encode_text| accepted (both are fp32; only summation order differs)
CLIENT_WORDS = (1, 2, 5, 13, 33, 98)  # query lengths in words: 3 to about 100 tokens with the specials
PIXEL_BATCHES = (1, 3)


def write_text_files(run_dir: Path, tmp: Path) -> dict[str, Any]:
    """Copy what a client needs to make token ids: the BiGRU vocabulary, or the tokenizer files (no weights) with
    padding and truncation taken out of tokenizer.json, as vsectl tokenizes (untruncated, one text at a time)."""
    from vsectl.builders import TEXT_MODEL_DIR, VOCAB_FILE

    if (run_dir / VOCAB_FILE).is_file():
        shutil.copy2(run_dir / VOCAB_FILE, tmp / VOCAB_FILE)
        return {"kind": "vocab", "path": VOCAB_FILE}
    (tmp / TEXT_MODEL_DIR).mkdir()
    for name in TOKENIZER_FILES:
        if (run_dir / TEXT_MODEL_DIR / name).is_file():
            shutil.copy2(run_dir / TEXT_MODEL_DIR / name, tmp / TEXT_MODEL_DIR / name)
    spec_path = tmp / TEXT_MODEL_DIR / "tokenizer.json"
    if not spec_path.is_file():
        raise ConfigError(f"{run_dir / TEXT_MODEL_DIR} has no tokenizer.json (a fast tokenizer); it cannot be exported")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    spec["padding"], spec["truncation"] = None, None
    spec_path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return {"kind": "tokenizer", "path": TEXT_MODEL_DIR, "tokenizer": f"{TEXT_MODEL_DIR}/tokenizer.json"}


# ----------------------------------------------------------------------------------------------------------------------
# the image tower from pixels


def pixel_tower(cfg: Any, model: Any, run_dir: Path) -> tuple[torch.nn.Module | None, int | None, str]:
    """The run's image tower with its backbone inside, its input side, and a note (why there is none, when None).

    A run on extracted features gets the backbone its feature recipe names (rounded to the store's dtype, as the
    features it trained on were); a run that trained its own backbone gets that one.
    """
    from vsectl.kinds import IMAGE_KINDS, ImageInput
    from vsectl.models.exportable import BackboneCells, EncoderCells, ImageTower, PixelTower
    from vsectl.retrieval.model import _data_root
    from vsectl.retrieval.recipe import feature_recipe

    if IMAGE_KINDS.get(cfg.model.image.encoder).reads is ImageInput.PIXELS:  # the run trained its own backbone
        return PixelTower(EncoderCells(model.image), ImageTower(model.image)).eval(), model.image.backbone.size, ""
    recipe = feature_recipe(_data_root(cfg.data.root, run_dir))
    if recipe is None:
        return None, None, "the run's features were not made by vsectl extract: no backbone is recorded"
    if recipe.video or recipe.precision != "fp32":
        why = "video frame sets" if recipe.video else f"{recipe.precision} autocast, which ONNX does not replay"
        return None, None, f"the run's features were extracted as {why}"
    try:
        backbone = recipe.build_backbone()
    except ConfigError as e:
        return None, None, str(e)
    round_to = torch.float16 if recipe.dtype == "float16" else None
    return PixelTower(BackboneCells(backbone, round_to), ImageTower(model.image)).eval(), recipe.input_size, ""


def export_pixels(tower: torch.nn.Module, size: int, path: Path, session_of: Any, opset: int,
                  seed: int = 0) -> float:
    """Trace the pixel tower to `path` (dynamic batch) and return the largest |onnxruntime − torch| on random
    images."""
    gen = torch.Generator().manual_seed(seed)
    example = torch.randint(0, 256, (2, 3, size, size), generator=gen, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; parity is checked below
        torch.onnx.export(tower, (example,), str(path), input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    session = session_of(path)
    worst = 0.0
    for batch in PIXEL_BATCHES:
        images = torch.randint(0, 256, (batch, 3, size, size), generator=gen, dtype=torch.uint8)
        with torch.no_grad():
            expected = tower(images).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


# ----------------------------------------------------------------------------------------------------------------------
# the reference client


def write_client(tmp: Path) -> str:
    shutil.copy2(Path(__file__).with_name("onnx_client.py"), tmp / CLIENT_FILE)
    return CLIENT_FILE


def load_client(folder: Path) -> Any:
    """The `Client` class of an export folder's client.py (imported from that file, not from vsectl)."""
    name = f"vsectl_export_client_{abs(hash(str(folder)))}"
    spec = importlib.util.spec_from_file_location(name, folder / CLIENT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Client(folder)


def client_queries(max_tokens: int | None, count: Any) -> list[str]:
    """Queries of 1 to about 100 words that fit the text model (`count` gives a text's token count)."""
    words = "a small red apple lies on the wooden table next to two green pears and a knife".split()
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in CLIENT_WORDS]
    return [t for t in texts if max_tokens is None or count(t) <= max_tokens]


def check_client(folder: Path, run: Path, which: str) -> dict[str, Any]:
    """The client's text embeddings against vsectl's `encode_text` on queries of 1 to about 100 words."""
    from vsectl.retrieval.model import load

    client = load_client(folder)
    reference = load(run, checkpoint=which, device="cpu")
    texts = client_queries(client.max_tokens, lambda t: len(client.token_ids(t, check=False)))
    worst = float(np.abs(client.encode_text(texts) - reference.encode_text(texts)).max())
    return {"max_abs_diff": worst, "tolerance": CLIENT_TOLERANCE, "queries": len(texts),
            "tokens": [len(client.token_ids(t)) for t in texts]}
