"""BiGRU word vocabulary: built SCAN-style (count ≥ 4, specials, `<mask>` last) or read from SCAN's JSON (TXT-1)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from vsectl.data.tokenize import word_tokenize
from vsectl.errors import DataError
from vsectl.io import atomic_write_json

log = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
MASK_TOKEN = "<mask>"
MIN_COUNT = 4  # SCAN's threshold


class Vocab:
    """Word ↔ id mapping with `<pad>`=0, `<start>`=1, `<end>`=2, `<unk>`=3 and `<mask>` as the last id.

    Args:
        idx2word: words in id order; must start with the four specials. `<mask>` is appended if missing.
    """

    PAD = 0
    START = 1
    END = 2
    UNK = 3

    def __init__(self, idx2word: list[str]) -> None:
        if tuple(idx2word[: len(SPECIALS)]) != SPECIALS:
            raise DataError(f"vocabulary must start with {list(SPECIALS)}, found {idx2word[: len(SPECIALS)]}")
        self.idx2word: list[str] = list(idx2word)
        if MASK_TOKEN not in self.idx2word:
            self.idx2word.append(MASK_TOKEN)
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            dup = [w for w, c in Counter(self.idx2word).items() if c > 1][:5]
            raise DataError(f"vocabulary lists words more than once: {dup}")
        self.mask_id = self.word2idx[MASK_TOKEN]

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.UNK)

    def save(self, path: str | Path) -> None:
        """Write SCAN's JSON format (idx2word as a dict of str(id) → word), `<mask>` included."""
        atomic_write_json(
            Path(path),
            {
                "word2idx": self.word2idx,
                "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
                "idx": len(self.idx2word),
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read our JSON or SCAN's released vocab JSON (idx2word as a list or a str(id) → word dict)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"vocabulary file {path} does not exist; build one with build_vocab or point to SCAN's")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            raw = data["idx2word"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not a vocabulary JSON with 'idx2word' ({e!r})") from e
        if isinstance(raw, dict):
            try:
                by_id = {int(k): w for k, w in raw.items()}
            except ValueError as e:
                raise DataError(f"{path}: idx2word keys must be integer strings ({e})") from e
            if sorted(by_id) != list(range(len(by_id))):
                raise DataError(f"{path}: idx2word ids are not contiguous from 0")
            idx2word = [by_id[i] for i in range(len(by_id))]
        else:
            idx2word = list(raw)
        word2idx = data.get("word2idx")
        if word2idx is not None and any(word2idx.get(w) != i for i, w in enumerate(idx2word)):
            raise DataError(f"{path}: word2idx and idx2word disagree; the file is corrupt")
        return cls(idx2word)


def build_vocab(captions: Iterable[str], min_count: int = MIN_COUNT) -> Vocab:
    """Build the vocabulary SCAN-style (TXT-1).

    Args:
        captions: raw captions (the lead passes train + dev).
        min_count: keep words seen at least this often.

    Returns:
        specials, then kept words in order of first occurrence, then `<mask>`.
    """
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word_tokenize(caption))
    reserved = set(SPECIALS) | {MASK_TOKEN}
    words = [w for w, c in counts.items() if c >= min_count and w not in reserved]
    vocab = Vocab([*SPECIALS, *words, MASK_TOKEN])
    log.info(
        "vocabulary: %d words kept of %d distinct (count >= %d), %d ids", len(words), len(counts), min_count, len(vocab)
    )
    return vocab


def warn_unknown_only(vocab: Vocab, captions: Sequence[str], where: str) -> int:
    """Count (and log a warning for) captions with no in-vocabulary word; they stay, as a row of `<unk>` tokens.

    Such a caption is still a valid query (it ranks like any other), so it is kept rather than dropped.
    """
    unknown = [c for c in captions if all(vocab(w) == Vocab.UNK for w in word_tokenize(c))]
    if unknown:
        log.warning("%s: %d of %d captions have no word in the vocabulary (kept as <unk> tokens), e.g. %r",
                    where, len(unknown), len(captions), unknown[0][:80])
    return len(unknown)
