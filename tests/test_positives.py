"""Ranking with several correct candidates per query, in both directions, against loops written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsectl.metrics import evaluate_images, tie_ranked_metrics
from vsectl.positives import GroundTruth, precision_metrics, rank_positives
from vsectl.protocols import evaluate_protocol
from vsectl.ranking import rank_counts


def random_ground_truth(n_img: int, n_cap: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Each caption is correct for 1-3 images and each image for 1-4 captions, the two relations independent."""
    rng = np.random.default_rng(seed)
    i2t = [(i, int(c)) for i in range(n_img) for c in rng.choice(n_cap, rng.integers(1, 5), replace=False)]
    t2i = [(c, int(i)) for c in range(n_cap) for i in rng.choice(n_img, rng.integers(1, 4), replace=False)]
    return i2t, t2i


def loop_reference(sims: np.ndarray, positives: dict[int, set[int]]) -> dict[str, list]:
    """Per query row of `sims`: wrong candidates above the best correct one, tied with it, correct ones tied with it,
    and every correct candidate's count of candidates strictly above it."""
    out: dict[str, list] = {"rank": [], "ties": [], "own": [], "positions": []}
    for q in range(sims.shape[0]):
        best = max(sims[q, c] for c in positives[q])
        wrong = [c for c in range(sims.shape[1]) if c not in positives[q]]
        out["rank"].append(sum(sims[q, c] > best for c in wrong))
        out["ties"].append(sum(sims[q, c] == best for c in wrong))
        out["own"].append(sum(sims[q, c] == best for c in positives[q]))
        out["positions"] += [sum(sims[q, k] > sims[q, c] for k in range(sims.shape[1])) for c in sorted(positives[q])]
    return out


def loop_precision(sims: np.ndarray, positives: dict[int, set[int]]) -> tuple[float, float]:
    """R-Precision and mAP@R (in %) by sorting each row, correct candidates first among equal scores."""
    r_prec, map_r = [], []
    for q in range(sims.shape[0]):
        order = sorted(range(sims.shape[1]), key=lambda c: (-sims[q, c], c not in positives[q]))
        r = len(positives[q])
        rel = [c in positives[q] for c in order[:r]]
        r_prec.append(sum(rel) / r)
        map_r.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    return 100 * float(np.mean(r_prec)), 100 * float(np.mean(map_r))


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_several_positives_match_the_loops_in_both_directions(chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(7, 6, generator=g), dim=-1)
    cap = F.normalize(torch.randn(11, 6, generator=g), dim=-1)
    cap[4] = cap[2]                                                   # exact ties in both directions
    img[5] = img[1]
    i2t, t2i = random_ground_truth(7, 11, seed=1)
    gt = GroundTruth.from_pairs(7, 11, i2t, t2i)
    ranked = rank_positives([(img, cap)], gt, chunk_size=chunk_size)
    sims = (img @ cap.T).numpy()
    for name, matrix, pairs, positions in (("i2t", sims, i2t, ranked.i2t_positions),
                                           ("t2i", sims.T, t2i, ranked.t2i_positions)):
        positives: dict[int, set[int]] = {}
        for q, c in pairs:
            positives.setdefault(q, set()).add(c)
        ref = loop_reference(matrix, positives)
        counts = ranked.counts
        got = {"i2t": (counts.i2t, counts.i2t_ties, counts.i2t_own_ties),
               "t2i": (counts.t2i, counts.t2i_ties, counts.t2i_own_ties)}[name]
        assert [t.tolist() for t in got] == [ref["rank"], ref["ties"], ref["own"]], name
        assert positions.tolist() == ref["positions"], name
        ptr = gt.i2t_ptr if name == "i2t" else gt.t2i_ptr
        got_p = precision_metrics(ptr, positions)
        assert (got_p["r_precision"], got_p["map_at_r"]) == pytest.approx(loop_precision(matrix, positives)), name


def test_one_positive_each_gives_the_single_positive_counts() -> None:
    """Given as pairs, Karpathy-style ground truth ranks to exactly what the single-positive path gives."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    cap = F.normalize(torch.randn(14, 5, generator=g), dim=-1)
    cap2img = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 1, 3, 0])
    gt = GroundTruth.from_pairs(6, 14, [(int(i), c) for c, i in enumerate(cap2img)],
                                [(c, int(i)) for c, i in enumerate(cap2img)])
    multi = rank_positives([(img, cap)], gt, chunk_size=4).counts
    single = rank_counts([(img, cap)], cap2img, chunk_size=4)
    for rule in ("optimistic", "pessimistic", "expected"):
        assert tie_ranked_metrics(multi, rule) == pytest.approx(tie_ranked_metrics(single, rule))
    assert multi.t2i.tolist() == single.t2i.tolist() and multi.i2t.tolist() == single.i2t.tolist()


def test_a_protocol_reports_precision_metrics_for_several_positives() -> None:
    g = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    cap = F.normalize(torch.randn(9, 4, generator=g), dim=-1)
    i2t, t2i = random_ground_truth(5, 9, seed=2)
    gt = GroundTruth.from_pairs(5, 9, i2t, t2i)
    result = evaluate_protocol([img], [cap], gt, "f30k")
    assert {"i2t_map_at_r", "t2i_r_precision", "rsum"} <= set(result["metrics"])
    with pytest.raises(ValueError, match="whole split"):
        evaluate_images([img], [cap], gt, torch.arange(3), chunk_size=2)


def test_ground_truth_refuses_a_query_without_a_correct_candidate() -> None:
    with pytest.raises(ValueError, match="no correct candidate"):
        GroundTruth.from_pairs(3, 2, [(0, 0), (1, 1)], [(0, 0), (1, 2)])
