"""Vocabulary (TXT-1), word tokenisation, Karpathy JSON and text size augmentation (spec §3, TXT-5)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vsectl.data.captions import (
    DELETE,
    KEEP,
    MASK,
    RANDOM,
    HFTextProcessor,
    VocabTextProcessor,
    augment_actions,
    load_karpathy,
)
from vsectl.data.tokenize import word_tokenize
from vsectl.data.vocab import SPECIALS, Vocab, build_vocab
from vsectl.errors import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTION = "A dog on the beach."
CAPTION_WORDS = ["a", "dog", "on", "the", "beach", "."]
N_DRAWS = 10_000
N_DRAWS_BERT = 6_000  # the HF tokenizer call costs ~0.1 ms


# --- tokenisation and vocabulary (TXT-1) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        (CAPTION, CAPTION_WORDS),
        ("Two MEN, one isn't smiling!", ["two", "men", ",", "one", "is", "n't", "smiling", "!"]),
        ("a man's hat", ["a", "man", "'s", "hat"]),
    ],
)
def test_word_tokenize_lowercases_with_treebank_rules_txt1(text: str, tokens: list[str]) -> None:
    assert word_tokenize(text) == tokens


def test_build_vocab_keeps_count_at_least_4_in_first_occurrence_order_txt1() -> None:
    captions = ["A dog runs.", "a cat runs", "a dog sleeps.", "A dog runs", "the cat", "a dog.", "cat runs."]
    # counts: a 5, dog 4, runs 4, . 4, cat 3, sleeps 1, the 1; first occurrences: a, dog, runs, .
    vocab = build_vocab(captions)
    assert vocab.idx2word == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", ".", "<mask>"]
    assert (vocab.PAD, vocab.START, vocab.END, vocab.UNK, vocab.mask_id) == (0, 1, 2, 3, 8)
    assert vocab("cat") == vocab.UNK and vocab("runs") == 6 and len(vocab) == 9


def test_vocab_save_load_round_trip(tmp_path: Path) -> None:
    vocab = build_vocab(["a dog"] * 4)
    vocab.save(tmp_path / "v.json")
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["idx"] == len(vocab) and data["idx2word"]["4"] == "a"  # SCAN's format
    assert Vocab.load(tmp_path / "v.json").idx2word == vocab.idx2word


@pytest.mark.parametrize("form", ["dict", "list"])
def test_vocab_loads_scan_json_and_appends_mask_txt1(tmp_path: Path, form: str) -> None:
    words = [*SPECIALS, "a", "dog"]
    idx2word = {str(i): w for i, w in enumerate(words)} if form == "dict" else words
    (tmp_path / "scan.json").write_text(
        json.dumps({"word2idx": {w: i for i, w in enumerate(words)}, "idx2word": idx2word, "idx": 6})
    )
    vocab = Vocab.load(tmp_path / "scan.json")
    assert vocab.idx2word == [*words, "<mask>"] and vocab.mask_id == 6 and vocab("dog") == 5


def test_vocab_load_rejects_missing_file_and_wrong_specials(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Vocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"idx2word": ["a", "<pad>"], "idx": 2}))
    with pytest.raises(DataError, match="must start with"):
        Vocab.load(tmp_path / "bad.json")


# --- Karpathy JSON ---------------------------------------------------------------------------------------------------


def test_load_karpathy_train_includes_restval_and_dev_maps_to_val(tmp_path: Path) -> None:
    images = [
        {"filename": f"{k}.jpg", "imgid": k, "split": s, "sentences": [{"raw": f" cap {k} "}]}
        for k, s in enumerate(["train", "restval", "val", "test"])
    ]
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": images}))
    assert [e["id"] for e in load_karpathy(path, "train")] == ["0", "1"]
    dev = load_karpathy(path, "dev")
    assert dev == [{"id": "2", "filename": "2.jpg", "captions": ["cap 2"], "keys": {"filename": "2.jpg", "imgid": "2"}}]


def test_load_karpathy_bad_json_raises(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text("{not json")
    with pytest.raises(DataError, match="not a Karpathy-style JSON"):
        load_karpathy(tmp_path / "k.json", "train")


# --- size augmentation (§3) -----------------------------------------------------------------------------------------


def test_augment_actions_have_exact_rates() -> None:
    actions = augment_actions(1_000_000, np.random.default_rng(0))
    rates = [np.mean(actions == a) for a in (KEEP, MASK, RANDOM, DELETE)]
    np.testing.assert_allclose(rates, [0.8, 0.1, 0.02, 0.08], atol=0.002)


@pytest.fixture
def big_vocab() -> Vocab:
    # Many filler words make a random id almost never collide with a caption token, so each action is identifiable.
    return Vocab([*SPECIALS, *CAPTION_WORDS, *(f"w{k}" for k in range(5000))])


def test_bigru_augmentation_rates_per_token_include_start_and_end(big_vocab: Vocab) -> None:
    text = VocabTextProcessor(big_vocab, augment=True)
    original = text.encode(CAPTION, None)
    rng = np.random.default_rng(0)
    outputs = [text.encode(CAPTION, rng) for _ in range(N_DRAWS)]
    n_tokens = N_DRAWS * len(original)
    masked = sum(o.count(big_vocab.mask_id) for o in outputs) / n_tokens
    randomised = sum(t not in original and t != big_vocab.mask_id for o in outputs for t in o) / n_tokens
    deleted = 1 - sum(len(o) for o in outputs) / n_tokens
    np.testing.assert_allclose([masked, randomised, deleted], [0.10, 0.02, 0.08], atol=0.003)
    start_touched = np.mean([o[0] != big_vocab.START for o in outputs])
    end_touched = np.mean([o[-1] != big_vocab.END for o in outputs])
    np.testing.assert_allclose([start_touched, end_touched], [0.2, 0.2], atol=0.01)


def test_bigru_encode_without_rng_or_augment_is_plain(big_vocab: Vocab) -> None:
    expected = [1, *range(4, 10), 2]
    assert VocabTextProcessor(big_vocab, augment=True).encode(CAPTION, None) == expected
    assert VocabTextProcessor(big_vocab, augment=False).encode(CAPTION, np.random.default_rng(0)) == expected
    assert VocabTextProcessor(big_vocab, augment=False).encode("a zebra", None) == [1, 4, big_vocab.UNK, 2]


def test_bigru_augmentation_never_returns_empty(big_vocab: Vocab) -> None:
    text, rng = VocabTextProcessor(big_vocab, augment=True), np.random.default_rng(0)
    assert all(len(text.encode("", rng)) >= 1 for _ in range(2000))


@pytest.fixture
def tiny_bert(tmp_path: Path) -> Any:
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CAPTION_WORDS, "surf", "##ing", "##board"]
    fillers = [f"filler{k}" for k in range(3000)]
    (tmp_path / "vocab.txt").write_text("\n".join(words + fillers) + "\n")
    return BertTokenizerFast.from_pretrained(str(tmp_path))


def test_bert_augmentation_rates_per_word_txt5(tiny_bert: Any) -> None:
    text = HFTextProcessor(tiny_bert, augment=True)
    original = text.encode(CAPTION, None)
    assert len(original) == len(CAPTION_WORDS) + 2 and text.pad_id == 0
    rng = np.random.default_rng(0)
    outputs = [text.encode(CAPTION, rng) for _ in range(N_DRAWS_BERT)]
    assert all(o[0] == tiny_bert.cls_token_id and o[-1] == tiny_bert.sep_token_id for o in outputs)
    n_words = N_DRAWS_BERT * len(CAPTION_WORDS)
    masked = sum(o.count(tiny_bert.mask_token_id) for o in outputs) / n_words
    randomised = sum(t not in original and t != tiny_bert.mask_token_id for o in outputs for t in o) / n_words
    deleted = 1 - sum(len(o) - 2 for o in outputs) / n_words
    np.testing.assert_allclose([masked, randomised, deleted], [0.10, 0.02, 0.08], atol=0.004)


def test_bert_multi_subtoken_word_is_augmented_whole_txt5(tiny_bert: Any) -> None:
    text = HFTextProcessor(tiny_bert, augment=True)
    surfing, surfboard = (text.encode(w, None)[1:-1] for w in ("surfing", "surfboard"))
    assert len(surfing) == len(surfboard) == 2
    mask = tiny_bert.mask_token_id
    special = {mask, *surfing, *surfboard}
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(1000):
        body = text.encode("surfing surfboard", rng)[1:-1]
        assert len(body) in (2, 4)  # a word keeps or loses both sub-tokens; never both words deleted
        seen.add("deleted" if len(body) == 2 else "both")
        for chunk in (body[:2], body[2:]):
            if chunk == [mask, mask]:
                seen.add("masked")
            elif chunk in (surfing, surfboard):
                seen.add("kept")
            elif chunk:  # randomised: both sub-tokens replaced (a collision with these 4 ids is ~1e-3 likely)
                assert not set(chunk) & special, chunk
                seen.add("random")
    assert seen == {"masked", "kept", "random", "deleted", "both"}


def test_bert_encode_without_rng_matches_tokenizer(tiny_bert: Any) -> None:
    text = HFTextProcessor(tiny_bert, augment=True)
    assert text.encode("a surfing dog", None) == tiny_bert("a surfing dog")["input_ids"]


def test_slow_tokenizer_is_rejected() -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        HFTextProcessor(Slow(), augment=True)
