"""Tests for vsectl.scoring.metrics: ranks and recalls against per-query loop references (spec §10, EVAL-1/2/3)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsectl.scoring import ranking
from vsectl.scoring.metrics import METRIC_KEYS, recall_metrics, subset
from vsectl.scoring.protocols import PROTOCOLS, evaluate_protocol
from vsectl.scoring.ranking import rank_retrieval


def loop_ranks(sims: torch.Tensor, cap2img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive EVAL-1/EVAL-3 reference: one Python loop per query over a full (N, C) similarity matrix."""
    s, c2i = sims.tolist(), cap2img.tolist()
    n_img, n_cap = len(s), len(c2i)
    i2t = []
    for i in range(n_img):
        best = max(s[i][j] for j in range(n_cap) if c2i[j] == i)
        i2t.append(sum(1 for j in range(n_cap) if s[i][j] > best))
    t2i = [sum(1 for i in range(n_img) if i != c2i[j] and s[i][j] > s[c2i[j]][j]) for j in range(n_cap)]
    return torch.tensor(i2t), torch.tensor(t2i)


def loop_metrics(i2t: list[int], t2i: list[int]) -> dict[str, float]:
    """Naive EVAL-2 reference computed query by query."""
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = sum(ranks) / len(ranks) + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def random_split(
    counts: list[int], dim: int = 8, seed: int = 0, shuffle: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm image and caption embeddings with ``counts[i]`` captions for image i, captions optionally shuffled."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(len(counts), dim, generator=g), dim=-1)
    cap2img = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if shuffle:
        cap2img = cap2img[torch.randperm(cap2img.numel(), generator=g)]
    cap = F.normalize(img[cap2img] + 0.8 * torch.randn(cap2img.numel(), dim, generator=g), dim=-1)
    return img, cap, cap2img


def test_i2t_ranks_match_loop_reference():
    """EVAL-1/EVAL-3: an image's rank is the number of captions above its best GT caption."""
    img, cap, cap2img = random_split([5] * 7)
    i2t, _ = rank_retrieval([(img, cap)], cap2img, chunk_size=3)
    torch.testing.assert_close(i2t, loop_ranks(img @ cap.T, cap2img)[0])


def test_t2i_ranks_match_loop_reference():
    """EVAL-1/EVAL-3: a caption's rank is the number of images above its GT image."""
    img, cap, cap2img = random_split([5] * 7)
    _, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=3)
    torch.testing.assert_close(t2i, loop_ranks(img @ cap.T, cap2img)[1])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 11, 50])
def test_ranks_do_not_depend_on_chunk_size(chunk_size, shuffle):
    """EVAL-1: chunk sizes that do not divide N (and N, and > N) give the loop reference's ranks, with captions
    grouped by image or shuffled."""
    img, cap, cap2img = random_split([3, 5, 4, 6, 5, 2, 5, 4, 3, 5, 1], seed=1, shuffle=shuffle)
    i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=chunk_size)
    ref_i2t, ref_t2i = loop_ranks(img @ cap.T, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)


def test_unequal_caption_counts_match_loop_reference():
    """EVAL-1: any number of captions per image (1, 3, 20, ...), in shuffled order."""
    img, cap, cap2img = random_split([1, 3, 20, 2, 1, 7], seed=2)
    i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=4)
    ref_i2t, ref_t2i = loop_ranks(img @ cap.T, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 2, 6])
def test_exact_ties_count_only_strictly_greater(chunk_size, grouped):
    """EVAL-3: integer embeddings make every summation order exact; tied candidates, including a duplicate of the GT
    image placed before it (the deferred-count path) and after it, never count."""
    img = torch.tensor([[1.0, 0, 2], [3, 1, 0], [0, 2, 1], [3, 1, 0], [1, 1, 1], [3, 1, 0]])  # 1, 3, 5 identical
    cap = torch.tensor([[2.0, 1, 0], [0, 1, 2], [1, 0, 2], [2, 1, 0], [1, 1, 1], [0, 2, 1], [1, 0, 0]])
    cap2img = torch.tensor([3, 2, 0, 1, 4, 2, 5])
    if grouped:  # captions sorted by image take the suffix path for captions still waiting for their GT row
        order = torch.argsort(cap2img, stable=True)
        cap, cap2img = cap[order], cap2img[order]
    i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=chunk_size)
    # the caption [2, 1, 0] scores 7 with images 1, 3, 5 (all tied with its GT image 3) and at most 4 elsewhere
    assert t2i[(cap2img == 3).nonzero().item()].item() == 0
    ref_i2t, ref_t2i = loop_ranks(img @ cap.T, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)


def test_i2t_tie_with_best_gt_caption_does_not_count():
    """EVAL-3: a caption of another image that ties the best GT caption does not raise the image's rank."""
    img = torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    cap = torch.tensor([[1.0, 1.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])  # captions 0 and 3 are identical
    cap2img = torch.tensor([0, 0, 1, 1])
    i2t, _ = rank_retrieval([(img, cap)], cap2img, chunk_size=1)
    assert i2t.tolist() == [0, 0]


def test_collapsed_embeddings_rank_everything_first(caplog):
    """EVAL-3: when every similarity ties (a collapsed model) all ranks are 0, even once the stored band overflows
    and columns are recounted."""
    img, cap = torch.ones(6, 4), torch.ones(12, 4)
    cap2img = torch.arange(12) % 6
    with caplog.at_level(logging.DEBUG, logger="vsectl.scoring.ranking"):
        i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=1)
    assert i2t.tolist() == [0] * 6 and t2i.tolist() == [0] * 12
    assert "recounting" in caplog.text


def test_recount_fallback_matches_loop_reference(monkeypatch, caplog):
    """EVAL-3: with a zero-width band most columns take the exact whole-column recount, which must agree too."""
    monkeypatch.setattr(ranking, "GT_BAND_SCALE", 0.0)
    img, cap, cap2img = random_split([4, 2, 5, 3, 1, 5, 2], dim=16, seed=3)
    with caplog.at_level(logging.DEBUG, logger="vsectl.scoring.ranking"):
        i2t, t2i = rank_retrieval([(img, cap)], cap2img, chunk_size=2)
    ref_i2t, ref_t2i = loop_ranks(img @ cap.T, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)
    assert "recounting" in caplog.text


def test_ensemble_equals_ranking_the_mean_similarity():
    """Spec §10.4: two models rank like the equal-weight average of their similarity matrices."""
    img_a, cap_a, cap2img = random_split([5] * 6, dim=8, seed=4, shuffle=False)
    g = torch.Generator().manual_seed(5)
    img_b = F.normalize(torch.randn(6, 12, generator=g), dim=-1)
    cap_b = F.normalize(img_b[cap2img] + torch.randn(30, 12, generator=g), dim=-1)
    i2t, t2i = rank_retrieval([(img_a, cap_a), (img_b, cap_b)], cap2img, chunk_size=4)
    ref_i2t, ref_t2i = loop_ranks((img_a @ cap_a.T + img_b @ cap_b.T) / 2, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)


def test_bf16_embeddings_are_ranked_in_fp32():
    """Spec §10.3: bf16 inputs rank like the fp32 values they hold."""
    img, cap, cap2img = random_split([5] * 6, seed=6)
    img16, cap16 = img.bfloat16(), cap.bfloat16()
    i2t, t2i = rank_retrieval([(img16, cap16)], cap2img, chunk_size=4)
    assert i2t.dtype == t2i.dtype == torch.int64
    ref_i2t, ref_t2i = loop_ranks(img16.float() @ cap16.float().T, cap2img)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)


def test_image_without_caption_raises():
    """EVAL-1: every image needs a GT caption."""
    img, cap = torch.randn(3, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="no caption"):
        rank_retrieval([(img, cap)], torch.tensor([0, 0, 2, 2]))


def test_non_finite_embeddings_raise():
    """Spec §10.3: a NaN or inf in any embedding is refused rather than ranked."""
    img, cap, cap2img = random_split([2, 2, 2])
    for bad in (float("nan"), float("inf")):
        broken = cap.clone()
        broken[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            rank_retrieval([(img, broken)], cap2img, chunk_size=1)


def test_medr_floors_the_median_of_an_even_count():
    """EVAL-2: medr = floor(median) + 1, where an even count averages its middle pair (1 and 4 -> 2.5 -> 3)."""
    out = recall_metrics(torch.tensor([0, 1, 4, 9]), torch.tensor([0, 2, 3, 7]))
    assert out["i2t_medr"] == 3.0  # median 2.5
    assert out["t2i_medr"] == 3.0  # median 2.5


def test_medr_of_an_odd_count_is_middle_rank_plus_one():
    """EVAL-2: 0-based ranks, so the middle rank 6 gives medr 7."""
    out = recall_metrics(torch.tensor([12, 0, 6]), torch.tensor([3, 3, 0, 100, 9]))
    assert out["i2t_medr"] == 7.0
    assert out["t2i_medr"] == 4.0


def test_recalls_and_meanr_match_per_query_counts():
    """EVAL-2: R@K = 100 * fraction of ranks < K, meanr = mean rank + 1, against counts done query by query."""
    i2t = [0, 0, 1, 4, 5, 9, 10, 30, 2]
    t2i = [0, 3, 7, 11, 0, 0, 6]
    out = recall_metrics(torch.tensor(i2t), np.array(t2i))
    expected = loop_metrics(i2t, t2i)
    assert list(out) == list(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert out[key] == pytest.approx(expected[key], abs=1e-12), key
        assert type(out[key]) is float


def test_rsum_is_the_sum_of_the_six_recalls():
    """EVAL-2: rsum adds i2t and t2i R@1, R@5 and R@10."""
    out = recall_metrics(torch.tensor([0, 3, 8, 20]), torch.tensor([1, 0, 6, 4, 12]))
    recalls = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert out["rsum"] == pytest.approx(sum(recalls))
    assert out["rsum"] == pytest.approx(25 + 50 + 75 + 20 + 60 + 80)


def test_subset_reindexes_captions_to_the_selected_images():
    """Spec §10.1: a protocol subset keeps the captions of its images, re-indexed to local image positions."""
    cap2img = torch.tensor([2, 0, 1, 2, 3, 0])
    cap_idx, local = subset(cap2img, torch.tensor([2, 3]))
    assert cap_idx.tolist() == [0, 3, 4]
    assert local.tolist() == [0, 0, 1]


def test_coco1k_is_the_mean_over_contiguous_folds(monkeypatch):
    """Spec §10.1: coco1k ranks 5 contiguous folds of images with their captions and averages every metric."""
    monkeypatch.setattr(PROTOCOLS.get("coco1k"), "images", 15)
    monkeypatch.setattr(PROTOCOLS.get("coco1k"), "block", 3)
    counts = [1, 2, 3, 2, 1, 4, 3, 2, 1, 1, 5, 2, 3, 2, 1]
    img, cap, cap2img = random_split(counts, seed=7)
    result = evaluate_protocol([img], [cap], cap2img, "coco1k", chunk_size=2)

    folds = []
    for f in range(5):
        images = list(range(3 * f, 3 * f + 3))
        caps = [j for j in range(cap2img.numel()) if cap2img[j].item() in images]
        local = torch.tensor([images.index(cap2img[j].item()) for j in caps])
        ref_i2t, ref_t2i = loop_ranks(img[images] @ cap[caps].T, local)
        folds.append(loop_metrics(ref_i2t.tolist(), ref_t2i.tolist()))
    assert result["protocol"] == "coco1k" and len(result["folds"]) == 5
    for key in METRIC_KEYS:
        assert result["metrics"][key] == pytest.approx(np.mean([fold[key] for fold in folds]), abs=1e-9), key
        for got, want in zip(result["folds"], folds, strict=True):
            assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_coco5k_rejects_a_split_without_5000_images():
    """Spec §10.1: COCO protocols need the 5,000-image testall split."""
    img, cap, cap2img = random_split([5] * 4)
    for protocol in ("coco5k", "coco1k"):
        with pytest.raises(ValueError, match="5000"):
            evaluate_protocol([img], [cap], cap2img, protocol)


def test_dev1k_ranks_only_the_first_images(monkeypatch):
    """Spec §10.1: dev1k keeps the first DEV_IMAGES images and only their captions."""
    monkeypatch.setattr(PROTOCOLS.get("dev1k"), "block", 4)
    img, cap, cap2img = random_split([2, 3, 1, 2, 5, 4], seed=8)
    result = evaluate_protocol([img], [cap], cap2img, "dev1k", chunk_size=3)
    caps = [j for j in range(cap2img.numel()) if cap2img[j].item() < 4]
    ref_i2t, ref_t2i = loop_ranks(img[:4] @ cap[caps].T, cap2img[caps])
    assert (result["n_images"], result["n_captions"]) == (4, 8)
    assert result["metrics"] == pytest.approx(loop_metrics(ref_i2t.tolist(), ref_t2i.tolist()))


def test_f30k_ranks_the_whole_split():
    """Spec §10.1: f30k is one run over every given image and caption."""
    img, cap, cap2img = random_split([5] * 5, seed=9)
    result = evaluate_protocol([img], [cap], cap2img, "f30k")
    ref_i2t, ref_t2i = loop_ranks(img @ cap.T, cap2img)
    assert (result["n_images"], result["n_captions"]) == (5, 25)
    assert result["metrics"] == pytest.approx(loop_metrics(ref_i2t.tolist(), ref_t2i.tolist()))


def test_unknown_protocol_lists_the_known_ones():
    """Spec §10.1: a misspelt protocol names the valid ones."""
    img, cap, cap2img = random_split([1, 1])
    with pytest.raises(ValueError, match="f30k, coco1k, coco5k, dev1k"):
        evaluate_protocol([img], [cap], cap2img, "coco_1k")
