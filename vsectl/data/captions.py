"""Caption files, Karpathy split JSON, tokenisation and text size augmentation (spec §3, §6, TXT-1, TXT-5)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vsectl.data.tokenize import word_tokenize
from vsectl.errors import DataError

if TYPE_CHECKING:
    from vsectl.data.vocab import Vocab

log = logging.getLogger(__name__)

# Size augmentation (spec §3): an element is selected with p = 0.2; of the selected, 50% are masked, 10% randomised,
# 40% deleted. One uniform draw u per element decides: u < 0.1 mask, u < 0.12 random, u < 0.2 delete.
SELECT_P = 0.2
MASK_P = SELECT_P * 0.5
RANDOM_P = SELECT_P * 0.6  # cumulative: mask + random
KEEP = 0
MASK = 1
RANDOM = 2
DELETE = 3

KARPATHY_SPLITS = {
    "train": ("train", "restval"),
    "restval": ("restval",),
    "val": ("val",),
    "dev": ("val",),
    "test": ("test",),
    "testall": ("test",),
}
KARPATHY_ID_KEYS = ("filename", "cocoid", "imgid", "id")


def augment_actions(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the size-augmentation action of `n` elements.

    Returns:
        (n,) int array of KEEP / MASK / RANDOM / DELETE, with probabilities 0.8 / 0.1 / 0.02 / 0.08.
    """
    u = rng.random(n)
    actions = np.full(n, DELETE, dtype=np.int64)
    actions[u >= SELECT_P] = KEEP
    actions[u < RANDOM_P] = RANDOM
    actions[u < MASK_P] = MASK
    return actions


def load_karpathy(path: str | Path, split: str) -> list[dict[str, Any]]:
    """Read the images of one split from a Karpathy-style JSON.

    Args:
        path: `dataset_<coco|flickr30k>.json` with {"images": [{"filename", "imgid"/"cocoid"/"id", "split",
            "sentences": [{"raw"}, ...]}]}.
        split: "train" (includes "restval"), "dev"/"val", "test" or "testall" (both Karpathy "test"), "restval".

    Returns:
        One dict per image, in file order: "id" (cocoid, else imgid, else id, else filename, as a string), "filename",
        "captions" (list of stripped raw sentences) and "keys" (each present id field → its value as a string).
    """
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise DataError(f"unknown Karpathy split {split!r}; use one of {sorted(KARPATHY_SPLITS)}")
    if not path.is_file():
        raise DataError(f"caption JSON {path} does not exist; point data.captions_json at a Karpathy dataset_*.json")
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a Karpathy-style JSON with an 'images' list ({e!r})") from e
    wanted = KARPATHY_SPLITS[split]
    out = []
    for entry in images:
        if entry.get("split") not in wanted:
            continue
        keys = {k: str(entry[k]) for k in KARPATHY_ID_KEYS if entry.get(k) is not None}
        if not keys:
            raise DataError(f"{path}: an image entry has none of the id fields {KARPATHY_ID_KEYS}")
        image_id = next(keys[k] for k in ("cocoid", "imgid", "id", "filename") if k in keys)
        captions = []
        for j, sent in enumerate(entry.get("sentences", [])):
            raw = sent.get("raw")
            text = (raw if raw is not None else " ".join(sent.get("tokens", []))).strip()
            if not text:
                raise DataError(f"{path}: sentence {j} of image {image_id} is empty; remove it or fix the JSON")
            captions.append(text)
        out.append({"id": image_id, "filename": entry.get("filename", ""), "captions": captions, "keys": keys})
    if not out:
        raise DataError(f"{path} has no images in split {split!r} (looked for split fields {list(wanted)})")
    return out


def karpathy_captions_for_ids(json_path: str | Path, split: str, image_ids: list[str]) -> tuple[list[str], np.ndarray]:
    """Captions of the given images from a Karpathy JSON, matched by id (filename, cocoid, imgid or id).

    Args:
        json_path: the Karpathy JSON.
        split: the split to search (see `load_karpathy`).
        image_ids: the N feature-set ids, in image-index order.

    Returns:
        (captions (C strings, any number per image), cap2img (C,) int64).
    """
    entries = load_karpathy(json_path, split)
    # Pick the id field that matches most ids: COCO's cocoid and imgid are both integers and can collide.
    best_key, best_map, best_hits = KARPATHY_ID_KEYS[0], {}, -1
    for key in KARPATHY_ID_KEYS:
        lookup = {e["keys"][key]: e for e in entries if key in e["keys"]}
        hits = sum(i in lookup for i in image_ids)
        if hits > best_hits:
            best_key, best_map, best_hits = key, lookup, hits
    missing = [i for i in image_ids if i not in best_map]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(image_ids)} feature ids are not in {json_path} split {split!r} "
            f"(best match on field {best_key!r}); first unmatched: {missing[:5]}. Check that the ids file and the "
            "JSON belong to the same dataset"
        )
    captions: list[str] = []
    cap2img: list[int] = []
    for n, image_id in enumerate(image_ids):
        sentences = best_map[image_id]["captions"]
        if not sentences:
            raise DataError(f"image {image_id} has no captions in {json_path}; every image needs at least one")
        captions.extend(sentences)
        cap2img.extend([n] * len(sentences))
    return captions, np.asarray(cap2img, dtype=np.int64)


class TextProcessor(Protocol):
    """Turns one caption into token ids, with size augmentation when given a generator."""

    pad_id: int
    vocab_size: int

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """Return the token ids of `caption`; `rng=None` means evaluation (no augmentation)."""
        ...


class VocabTextProcessor:
    """BiGRU text: `<start>` + word tokens + `<end>`, OOV → `<unk>` (TXT-1), with per-token augmentation (§3).

    Args:
        vocab: the word vocabulary (its `<mask>` id is used for masking).
        augment: apply size augmentation when `encode` receives a generator.
    """

    pad_id = 0

    def __init__(self, vocab: Vocab, augment: bool) -> None:
        self.vocab = vocab
        self.augment = augment
        self.vocab_size = len(vocab)

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """Encode one caption.

        Returns:
            (T,) ids, T ≥ 1. Augmentation selects every token, `<start>`/`<end>` included.
        """
        ids = [self.vocab.START] + [self.vocab(w) for w in word_tokenize(caption)] + [self.vocab.END]
        if not (self.augment and rng is not None):
            return ids
        actions = augment_actions(len(ids), rng).tolist()
        random_ids = rng.integers(0, self.vocab_size, size=len(ids)).tolist()  # [0, V), <pad> included as in [OC]
        out = []
        for token, action, random_id in zip(ids, actions, random_ids, strict=True):
            if action == KEEP:
                out.append(token)
            elif action == MASK:
                out.append(self.vocab.mask_id)
            elif action == RANDOM:
                out.append(random_id)
        if not out:  # [V] never emit an empty caption: keep one original token
            out = [ids[int(rng.integers(len(ids)))]]
        return out


class HFTextProcessor:
    """BERT text: WordPiece with `[CLS]`/`[SEP]`, augmentation per basic word (TXT-5, §3).

    Args:
        tokenizer: a transformers *fast* tokenizer (its `word_ids()` groups sub-tokens into basic words).
        augment: apply size augmentation when `encode` receives a generator.
    """

    def __init__(self, tokenizer: Any, augment: bool) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is a slow tokenizer; a fast (tokenizers-backed) one is needed to group "
                "sub-tokens by word: load it with AutoTokenizer.from_pretrained(path, use_fast=True)"
            )
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; text augmentation needs one")
        self.tokenizer = tokenizer
        self.augment = augment
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0
        self.vocab_size = len(tokenizer)
        self.mask_id = int(tokenizer.mask_token_id)

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """Encode one caption, untruncated.

        Returns:
            (T,) ids including `[CLS]`/`[SEP]`, which augmentation never touches. If every word would be deleted,
            one random word is kept whole.
        """
        enc = self.tokenizer(caption, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if not (self.augment and rng is not None):
            return ids
        word_ids = enc.word_ids()
        words = list(dict.fromkeys(w for w in word_ids if w is not None))  # basic words in order
        if not words:
            return ids
        actions = dict(zip(words, augment_actions(len(words), rng).tolist(), strict=True))
        if all(a == DELETE for a in actions.values()):
            actions[words[int(rng.integers(len(words)))]] = KEEP
        random_ids = rng.integers(0, self.vocab_size, size=len(ids)).tolist()
        out = []
        for token, word, random_id in zip(ids, word_ids, random_ids, strict=True):
            action = KEEP if word is None else actions[word]
            if action == KEEP:
                out.append(token)
            elif action == MASK:
                out.append(self.mask_id)
            elif action == RANDOM:
                out.append(random_id)
        return out
