"""Word tokenisation of captions: lower-case, then the nltk Treebank word tokenizer (TXT-1), for captions and vocab."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nltk.tokenize import NLTKWordTokenizer


@functools.lru_cache(maxsize=1)
def _word_tokenizer() -> NLTKWordTokenizer:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """Lower-case `text` and split it with nltk's Treebank word tokenizer (TXT-1).

    `nltk.word_tokenize` needs the `punkt` data; its word-level part gives the same tokens for one-sentence captions.
    """
    return list(_cached_tokenize(text))


@functools.lru_cache(maxsize=4096)  # Treebank regexes cost ~0.1 ms per caption; repeats (eval, vocab) are common
def _cached_tokenize(text: str) -> tuple[str, ...]:
    return tuple(_word_tokenizer().tokenize(text.lower()))
