"""Reference client of a `vsectl export` folder: text, image files and feature sets to embeddings, with onnxruntime.

`vsectl export` copies this file into the export folder as `client.py`; it imports nothing of vsectl, so it runs
wherever numpy and onnxruntime do (plus `tokenizers` for a transformers text model, `nltk` for a BiGRU one, Pillow
for image files). It prepares inputs exactly as vsectl does, and the export's tests check that its embeddings equal
vsectl's `encode_text` / `encode_images`:

    from client import Client
    client = Client("exports/demo")
    texts = client.encode_text(["a red apple", "a bicycle"])     # (2, E) float32, unit rows
    images = client.encode_images(["apple.png"])                   # needs image_pixels.onnx (see export.json)
    scores = images @ texts.T                                      # cosine similarities

or, from a shell: `python client.py exports/demo "a red apple" [--image FILE ...]` prints one JSON line per input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "export.json"
WHITE = (255, 255, 255)


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists → (B, T) int64 padded with `pad_id` to the longest, and (B,) int64 lengths."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    tokens = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    return tokens, lengths


class Client:
    """The towers of one export folder.

    Args:
        folder: the folder `vsectl export` wrote (export.json, the .onnx files, the text files).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        self._sessions: dict[str, Any] = {}
        text = self.manifest["text"]
        self.pad_id = int(text["pad_id"])
        self.max_tokens = text.get("max_tokens")
        if text["kind"] == "tokenizer":
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.folder / text["tokenizer"]))
            self._words = None
        else:
            from nltk.tokenize import NLTKWordTokenizer

            vocab = json.loads((self.folder / text["path"]).read_text(encoding="utf-8"))
            self._vocab = vocab["word2idx"]
            self._words = NLTKWordTokenizer()

    def _run(self, tower: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if tower not in self._sessions:
            info = self.manifest.get(tower)
            if not info:
                raise ValueError(f"{self.folder} has no {tower} tower: {self.manifest.get('notes', {}).get(tower, '')}")
            self._sessions[tower] = _session(self.folder / info["file"])
        return self._sessions[tower].run(None, inputs)[0]

    # ------------------------------------------------------------------------------------------------ text

    def token_ids(self, text: str, check: bool = True) -> list[int]:
        """The ids vsectl gives a caption: WordPiece with [CLS]/[SEP], or <start> + words + <end> for a BiGRU.

        With `check`, a text longer than the text model reads is refused (ValueError), as vsectl refuses it."""
        if self._words is None:
            ids = list(self._tokenizer.encode(text).ids)
        else:
            ids = [1] + [self._vocab.get(w, 3) for w in self._words.tokenize(text.lower())] + [2]  # <start>, <unk>
        if check and self.max_tokens is not None and len(ids) > self.max_tokens:
            raise ValueError(f"{text[:40]!r} is {len(ids)} tokens long; the text model reads at most {self.max_tokens}")
        return ids

    def encode_text(self, texts: list[str] | str, batch_size: int = 64) -> np.ndarray:
        """(N, E) float32 unit embeddings of N texts."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [np.zeros((0, self.manifest["embed_dim"]), dtype=np.float32)]
        for a in range(0, len(texts), batch_size):
            tokens, lengths = _pad([self.token_ids(t) for t in texts[a : a + batch_size]], self.pad_id)
            out.append(self._run("text", {"tokens": tokens, "lengths": lengths}))
        return np.concatenate(out)

    # ------------------------------------------------------------------------------------------------ images

    def pixels(self, path: str | Path) -> np.ndarray:
        """(3, S, S) uint8 of an image file, prepared as vsectl extracts: RGB (alpha composited on white), resized to
        S×S bilinear without keeping the aspect ratio (JPEGs drafted to at least S first)."""
        from PIL import Image

        size = int(self.manifest["image_pixels"]["size"])
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("RGBA", "LA", "PA", "RGBa"):
                rgba = im.convert("RGBA")
                flat = Image.new("RGB", rgba.size, WHITE)
                flat.paste(rgba, mask=rgba.getchannel("A"))
                im = flat
            elif im.mode in ("I;16", "I"):
                arr = np.asarray(im, dtype=np.float64)
                peak = 65535.0 if im.mode == "I;16" else max(float(arr.max()), 1.0)
                im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()

    def encode_images(self, paths: list[str | Path], batch_size: int = 16) -> np.ndarray:
        """(N, E) float32 unit embeddings of N image files, through the tower with the backbone inside."""
        out = [np.zeros((0, self.manifest["embed_dim"]), dtype=np.float32)]
        for a in range(0, len(paths), batch_size):
            batch = np.stack([self.pixels(p) for p in paths[a : a + batch_size]])
            out.append(self._run("image_pixels", {"images": batch}))
        return np.concatenate(out)

    def encode_feature_sets(self, sets: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """(N, E) float32 unit embeddings of N (n_i, D) feature sets (e.g. rows of a vsectl store)."""
        out = [np.zeros((0, self.manifest["embed_dim"]), dtype=np.float32)]
        for a in range(0, len(sets), batch_size):
            chunk = [np.asarray(s, dtype=np.float32) for s in sets[a : a + batch_size]]
            lengths = np.array([len(s) for s in chunk], dtype=np.int64)
            feats = np.zeros((len(chunk), int(lengths.max()), chunk[0].shape[1]), dtype=np.float32)
            for b, s in enumerate(chunk):
                feats[b, : len(s)] = s
            out.append(self._run("image", {"features": feats, "lengths": lengths}))
        return np.concatenate(out)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python client.py EXPORT_FOLDER [TEXT ...] [--image FILE ...]", file=sys.stderr)
        return 2
    client = Client(argv[0])
    texts = [a for i, a in enumerate(argv[1:], 1) if a != "--image" and argv[i - 1] != "--image"]
    images = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--image"]
    for text, row in zip(texts, client.encode_text(texts) if texts else [], strict=True):
        print(json.dumps({"text": text, "embedding": [round(float(v), 6) for v in row]}))
    for path, row in zip(images, client.encode_images(images) if images else [], strict=True):
        print(json.dumps({"image": path, "embedding": [round(float(v), 6) for v in row]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
