"""Several positives per query (vsectl.scoring.multi_positive, vsectl.scoring.top_lists,
vsectl.scoring.positives.evaluate_sets): R@K, R-Precision and mAP@R under each tie rule against a brute force over every
order of the tied items."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vsectl.scoring.coco_protocols import coco5k_sets
from vsectl.scoring.multi_positive import PositiveSets, positive_stats, query_metrics, truncated_ties
from vsectl.scoring.positives import evaluate_sets
from vsectl.scoring.protocols import evaluate_protocol
from vsectl.scoring.tie_rules import TIE_RULES
from vsectl.scoring.top_lists import full_lists, top_lists


def label_orders(scores: list[float], positives: set[int]) -> list[list[bool]]:
    """Every positive/other pattern of a ranking that sorts the candidates by score with tied ones in a uniformly
    random order: within a tie group of E items holding m positives each of the C(E, m) placements is equally likely."""
    patterns = []
    for v in sorted(set(scores), reverse=True):
        group = [i for i, s in enumerate(scores) if s == v]
        m = sum(i in positives for i in group)
        patterns.append([[slot in chosen for slot in range(len(group))]
                         for chosen in map(set, itertools.combinations(range(len(group)), m))])
    return [list(itertools.chain(*combo)) for combo in itertools.product(*patterns)]


def brute_force(scores: list[float], positives: set[int], r: int, ks: list[int], rule: str) -> dict[str, float]:
    """The metrics of one query averaged over the orders the rule allows (one order for the deterministic rules)."""
    if rule == "expected":
        candidates = label_orders(scores, positives)
    else:  # positives first (optimistic) or last (pessimistic) among tied items
        sign = -1 if rule == "optimistic" else 1
        ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], sign * (i in positives)))
        candidates = [[i in positives for i in ranking]]
    totals = {f"r@{k}": 0.0 for k in ks} | {"r_precision": 0.0, "map_at_r": 0.0}
    for hits in candidates:
        for k in ks:
            totals[f"r@{k}"] += float(any(hits[:k]))
        totals["r_precision"] += sum(hits[:r]) / r
        totals["map_at_r"] += sum(sum(hits[: p + 1]) / (p + 1) for p in range(min(r, len(hits))) if hits[p]) / r
    return {name: value / len(candidates) for name, value in totals.items()}


def tied_problem(seed: int, n_queries: int, n_cand: int, levels: int = 4) -> tuple[torch.Tensor, PositiveSets]:
    """Integer scores from a few levels (many exact ties) and random positive sets, some with absent positives."""
    rng = np.random.default_rng(seed)
    scores = torch.from_numpy(rng.integers(0, levels, size=(n_queries, n_cand)).astype(np.float64))
    positives, relevant = {}, {}
    for q in range(n_queries):
        if rng.random() < 0.2:
            continue  # a query that is not evaluated
        present = rng.choice(n_cand, size=int(rng.integers(0, 4)), replace=False).tolist()
        positives[q] = present
        relevant[q] = len(present) + int(rng.integers(0 if present else 1, 3))
    return scores, PositiveSets.from_lists(positives, relevant)


@pytest.mark.parametrize("rule", TIE_RULES)
def test_query_metrics_match_brute_force_over_tie_orders(rule):
    ks = [1, 2, 4]
    for seed in range(4):
        scores, sets = tied_problem(seed, n_queries=12, n_cand=7)
        values, indices = torch.sort(scores, dim=1, descending=True)
        stats = positive_stats(values[sets.queries], indices[sets.queries], sets, 7)
        got = query_metrics(stats, sets, ks, rule)
        for pos, q in enumerate(sets.queries.tolist()):
            lo, hi = sets.offsets[pos], sets.offsets[pos + 1]
            ref = brute_force(scores[q].tolist(), set(sets.targets[lo:hi].tolist()), int(sets.n_relevant[pos]), ks,
                              rule)
            for name, value in ref.items():
                assert got[name][pos].item() == pytest.approx(value, abs=1e-12), (seed, q, name)


def test_truncated_ties_flags_a_tie_group_cut_by_the_list():
    values = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0], [5.0, 4.0, 4.0, 3.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert truncated_ties(values, depth=3, complete=False).tolist() == [True, False, True]
    assert truncated_ties(values, depth=2, complete=False).tolist() == [False, False, True]
    assert not truncated_ties(values, depth=3, complete=True).any()


def brute_sets(sims: torch.Tensor, sets: PositiveSets, ks: list[int], rule: str) -> dict[str, float]:
    """Mean over queries of the brute-force metrics, as percentages."""
    rows = []
    for pos, q in enumerate(sets.queries.tolist()):
        lo, hi = sets.offsets[pos], sets.offsets[pos + 1]
        rows.append(brute_force(sims[q].tolist(), set(sets.targets[lo:hi].tolist()), int(sets.n_relevant[pos]), ks,
                                rule))
    return {name: 100 * sum(r[name] for r in rows) / len(rows) for name in rows[0]}


@pytest.mark.parametrize("rule", ["optimistic", "pessimistic"])
@pytest.mark.parametrize(("chunk_size", "deep"), [(1, 1000), (7, 1000), (30, 1000), (64, 1000), (7, 1)])
def test_one_pass_lists_match_brute_force_with_ties_past_the_list_depth(rule, chunk_size, deep, monkeypatch):
    """Integer embeddings make large tie groups: several cross the end of the top lists and are ranked again in full;
    chunk sizes that do not divide the 30 images give the same numbers."""
    g = torch.Generator().manual_seed(3)
    img = torch.randint(-1, 2, (30, 3), generator=g).double()
    cap = torch.randint(-1, 2, (70, 3), generator=g).double()
    sims = img @ cap.T

    def draw(n: int, most: int) -> list[int]:
        return torch.randperm(n, generator=g)[: int(torch.randint(1, most, (1,), generator=g))].tolist()

    i2t, t2i = {q: draw(70, 4) for q in range(30)}, {q: draw(30, 3) for q in range(70)}
    from vsectl.scoring import positives

    monkeypatch.setattr(positives, "LIST_DEPTH_LIMIT", deep)  # 1: every set deeper than it is ranked in full
    sets = {"x": (PositiveSets.from_lists(i2t), PositiveSets.from_lists(t2i))}
    wanted = {"x": ["map_at_r", "r_precision", "r@1", "r@5"]}
    out = evaluate_sets([(img, cap)], sets, wanted, rule, chunk_size=chunk_size)
    for d, (name, scores) in enumerate((("i2t", sims), ("t2i", sims.T))):
        ref = brute_sets(scores, sets["x"][d], [1, 5], rule)
        for metric, value in ref.items():
            assert out["metrics"]["x"][f"{name}_{metric.replace('@', '')}"] == pytest.approx(value, abs=1e-9)
    lists = top_lists([(img, cap)], 5, 5, chunk_size)
    assert lists[1].values.shape == (70, 13) and truncated_ties(lists[1].values, 5, False).any()  # the full path ran


def test_expected_rule_on_ties_past_the_list_depth():
    g = torch.Generator().manual_seed(5)
    img = torch.randint(0, 2, (12, 2), generator=g).double()
    cap = torch.randint(0, 2, (40, 2), generator=g).double()
    i2t = {q: [q, q + 12, q + 24] for q in range(12)}
    sets = {"x": (PositiveSets.from_lists(i2t), PositiveSets.from_lists({k: [k % 12] for k in range(40)}))}
    out = evaluate_sets([(img, cap)], sets, {"x": ["map_at_r", "r_precision", "r@1"]}, "expected", chunk_size=5)
    sims = img @ cap.T
    ref = brute_sets(sims, sets["x"][0], [1], "expected")
    assert out["metrics"]["x"]["i2t_map_at_r"] == pytest.approx(ref["map_at_r"], abs=1e-9)
    assert out["metrics"]["x"]["i2t_r_precision"] == pytest.approx(ref["r_precision"], abs=1e-9)
    assert out["metrics"]["x"]["i2t_r1"] == pytest.approx(ref["r@1"], abs=1e-9)


@pytest.mark.parametrize("rule", TIE_RULES)
def test_own_ground_truth_recalls_equal_the_single_positive_protocol(rule):
    """The split's own captions as positives give vsectl's whole-split R@K under every tie rule (ties included)."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(-2, 3, (40, 4), generator=g).float()
    cap2img = np.repeat(np.arange(40), 5)
    cap = img[torch.from_numpy(cap2img)] + torch.randint(-1, 2, (200, 4), generator=g).float()
    cap[7] = cap[12]  # an identical caption on another image
    out = evaluate_sets([(img, cap)], {"coco5k": coco5k_sets(cap2img)}, {"coco5k": ["r@1", "r@5", "r@10"]}, rule,
                        chunk_size=9)
    ref = evaluate_protocol([img], [cap], torch.from_numpy(cap2img), "f30k", tie_rule=rule)["metrics"]
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert out["metrics"]["coco5k"][f"{d}_r{k}"] == pytest.approx(ref[f"{d}_r{k}"], abs=1e-9)
    assert out["ties"]["coco5k"]["i2t"] > 0


def test_full_lists_rank_every_candidate_in_blocks():
    g = torch.Generator().manual_seed(0)
    img, cap = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    queries = torch.tensor([4, 0, 7, 2])
    got = list(full_lists([(img, cap)], "t2i", queries, block=12))  # 6 candidates: 2 queries per block
    assert [p.tolist() for p, _ in got] == [[0, 1], [2, 3]]
    values = torch.cat([lists.values for _, lists in got])
    torch.testing.assert_close(values, torch.sort(cap[queries] @ img.T, dim=1, descending=True).values)


def test_lists_refuse_nan_embeddings():
    img, cap = torch.randn(3, 2), torch.randn(5, 2)
    img[1, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        top_lists([(img, cap)], 2, 2)


def test_both_membership_lookups_agree(monkeypatch):
    """The padded table (few positives per query) and the sorted-key lookup (many) find the same positives."""
    from vsectl.scoring import multi_positive

    scores, sets = tied_problem(7, n_queries=30, n_cand=9)
    values, indices = torch.sort(scores, dim=1, descending=True)
    table = multi_positive.membership(indices[sets.queries], sets, 9)
    monkeypatch.setattr(multi_positive, "MEMBERSHIP_BLOCK", 0)
    keys = multi_positive.membership(indices[sets.queries], sets, 9)
    assert torch.equal(table, keys) and table.any()
