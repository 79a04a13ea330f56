"""Ranking with several correct candidates per query, in both directions (`positives.rank_ground_truth`, the path of
`metrics.evaluate_images` for such ground truth), against loops and brute forces written here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsectl.scoring import positives
from vsectl.scoring.metrics import evaluate_images, tie_ranked_metrics
from vsectl.scoring.positives import GroundTruth, rank_ground_truth
from vsectl.scoring.protocols import evaluate_protocol
from vsectl.scoring.ranking import rank_counts
from vsectl.scoring.tie_rules import TIE_RULES


def random_ground_truth(n_img: int, n_cap: int, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Each caption is correct for 1-3 images and each image for 1-4 captions, the two relations independent."""
    rng = np.random.default_rng(seed)
    i2t = [(i, int(c)) for i in range(n_img) for c in rng.choice(n_cap, rng.integers(1, 5), replace=False)]
    t2i = [(c, int(i)) for c in range(n_cap) for i in rng.choice(n_img, rng.integers(1, 4), replace=False)]
    return i2t, t2i


def loop_reference(sims: np.ndarray, positives: dict[int, set[int]]) -> dict[str, list]:
    """Per query row of `sims`: wrong candidates above the best correct one, tied with it, correct ones tied with it."""
    out: dict[str, list] = {"rank": [], "ties": [], "own": []}
    for q in range(sims.shape[0]):
        best = max(sims[q, c] for c in positives[q])
        wrong = [c for c in range(sims.shape[1]) if c not in positives[q]]
        out["rank"].append(sum(sims[q, c] > best for c in wrong))
        out["ties"].append(sum(sims[q, c] == best for c in wrong))
        out["own"].append(sum(sims[q, c] == best for c in positives[q]))
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
    counts, precision = rank_ground_truth([(img, cap)], gt, chunk_size=chunk_size, tie_rule="optimistic")
    sims = (img @ cap.T).numpy()
    for name, matrix, pairs in (("i2t", sims, i2t), ("t2i", sims.T, t2i)):
        positives: dict[int, set[int]] = {}
        for q, c in pairs:
            positives.setdefault(q, set()).add(c)
        ref = loop_reference(matrix, positives)
        got = {"i2t": (counts.i2t, counts.i2t_ties, counts.i2t_own_ties),
               "t2i": (counts.t2i, counts.t2i_ties, counts.t2i_own_ties)}[name]
        assert [t.tolist() for t in got] == [ref["rank"], ref["ties"], ref["own"]], name
        assert (precision[f"{name}_r_precision"], precision[f"{name}_map_at_r"]) == pytest.approx(
            loop_precision(matrix, positives)), name


def tie_orders(scores: list[float], correct: set[int], rule: str) -> list[list[bool]]:
    """Correct-or-not down a ranking sorted by score, for every order of the tied candidates that `rule` allows, all
    equally likely: correct ones first (optimistic) or last (pessimistic) in each tie group, or every placement of a
    group's m correct ones among its E slots (expected: each of the C(E, m) patterns is as likely as the others)."""
    groups = []
    for v in sorted(set(scores), reverse=True):
        size = sum(s == v for s in scores)
        m = sum(scores[c] == v for c in correct)
        if rule == "optimistic":
            groups.append([[True] * m + [False] * (size - m)])
        elif rule == "pessimistic":
            groups.append([[False] * (size - m) + [True] * m])
        else:
            groups.append([[slot in chosen for slot in range(size)]
                           for chosen in map(set, itertools.combinations(range(size), m))])
    return [list(itertools.chain(*combo)) for combo in itertools.product(*groups)]


def brute_metrics(sims: np.ndarray, positives: dict[int, set[int]], name: str, rule: str) -> dict[str, float]:
    """One direction's metrics as `evaluate_images` names them, averaged over every order `tie_orders` allows: R@K and
    the expected 0-based rank of the first correct candidate (medr = floor(median) + 1, meanr = mean + 1), R-Precision
    and mAP@R with R = the query's number of correct candidates; also how many queries have a wrong candidate tied
    with their best correct one."""
    first, hits, r_prec, map_r, tied = [], {k: [] for k in (1, 5, 10)}, [], [], 0
    for q in range(sims.shape[0]):
        orders = tie_orders(sims[q].tolist(), positives[q], rule)
        places = [labels.index(True) for labels in orders]
        first.append(np.mean(places))
        for k in hits:
            hits[k].append(np.mean([p < k for p in places]))
        r = len(positives[q])
        r_prec.append(np.mean([sum(labels[:r]) / r for labels in orders]))
        map_r.append(np.mean([sum(sum(labels[: i + 1]) / (i + 1) for i in range(r) if labels[i]) / r
                              for labels in orders]))
        best = max(sims[q, c] for c in positives[q])
        tied += any(sims[q, c] == best for c in range(sims.shape[1]) if c not in positives[q])
    out = {f"{name}_r{k}": 100 * float(np.mean(v)) for k, v in hits.items()}
    out |= {f"{name}_medr": math.floor(np.median(first)) + 1, f"{name}_meanr": float(np.mean(first)) + 1,
            f"{name}_r_precision": 100 * float(np.mean(r_prec)), f"{name}_map_at_r": 100 * float(np.mean(map_r)),
            f"{name}_queries_with_ties": tied}
    return out


@pytest.mark.parametrize("rule", TIE_RULES)
@pytest.mark.parametrize(("chunk_size", "recall_depth", "deep_limit"), [(64, 30, 1024), (5, 1, 1024), (3, 1, 0)])
def test_every_tie_rule_matches_a_brute_force_over_tie_orders(rule: str, chunk_size: int, recall_depth: int,
                                                               deep_limit: int, monkeypatch) -> None:
    """Integer embeddings make large tie groups. Lists of every candidate (`recall_depth` 30) settle every query; short
    ones (1: 9 places of 24 or 26) leave best correct candidates outside the lists and tie groups cut by them: image
    queries are then counted from the pass's blocks, caption queries again against every image; `deep_limit` 0 ranks
    every query in full from the start."""
    monkeypatch.setattr(positives, "RECALL_DEPTH", recall_depth)
    monkeypatch.setattr(positives, "LIST_DEPTH_LIMIT", deep_limit)
    recounted, counted = [], []
    full_scores, count_best = positives.full_scores, positives._count_best
    monkeypatch.setattr(positives, "full_scores", lambda *a, **k: recounted.append(a[1]) or full_scores(*a, **k))
    monkeypatch.setattr(positives, "_count_best", lambda *a: counted.append(a[0].shape[0]) or count_best(*a))
    g = torch.Generator().manual_seed(4)
    img = torch.randint(-1, 2, (24, 3), generator=g).float()
    cap = torch.randint(-1, 2, (26, 3), generator=g).float()
    rng = np.random.default_rng(2)
    i2t = [(i, int(c)) for i in range(24) for c in rng.choice(26, rng.integers(1, 3), replace=False)]
    t2i = [(c, int(i)) for c in range(26) for i in rng.choice(24, rng.integers(1, 3), replace=False)]
    result = evaluate_images([img], [cap], GroundTruth.from_pairs(24, 26, i2t, t2i), None, chunk_size, rule)
    sims = (img @ cap.T).numpy()
    for name, matrix, pairs in (("i2t", sims, i2t), ("t2i", sims.T, t2i)):
        correct: dict[int, set[int]] = {}
        for q, c in pairs:
            correct.setdefault(q, set()).add(c)
        ref = brute_metrics(matrix, correct, name, rule)
        assert result["ties"][f"{name}_queries_with_ties"] == ref.pop(f"{name}_queries_with_ties") > 0
        for key, value in ref.items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-9), (name, key)
    short = recall_depth == 1 and deep_limit > 0
    assert (recounted, len(counted) > len(recounted)) == ((["t2i"], True) if short else ([], False))


def test_one_positive_each_gives_the_single_positive_counts() -> None:
    """Given as pairs, Karpathy-style ground truth ranks to exactly what the single-positive path gives."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    cap = F.normalize(torch.randn(14, 5, generator=g), dim=-1)
    cap2img = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 5, 1, 3, 0])
    gt = GroundTruth.from_pairs(6, 14, [(int(i), c) for c, i in enumerate(cap2img)],
                                [(c, int(i)) for c, i in enumerate(cap2img)])
    multi, _ = rank_ground_truth([(img, cap)], gt, chunk_size=4)
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
