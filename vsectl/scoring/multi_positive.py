"""Retrieval with several positives per query: R@K, R-Precision and mAP@R under each tie rule.

The metrics of ECCV Caption, CxC and plausible-match R-Precision need, for every positive of a query, where it lands in
the ranking. They are computed from ranked top lists (`vsectl.scoring.top_lists`): each positive's count of candidates
scoring strictly higher (G), of candidates scoring exactly the same (E, itself included), of positives strictly higher
(c), of positives tied with it (m) and its place among those (t). Pure torch on precomputed scores; no per-query loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vsectl.scoring.tie_rules import TIE_RULES

MEMBERSHIP_BLOCK = 1 << 25  # (list entries × widest positive set) compared at once before keys are looked up instead


@dataclass(frozen=True)
class PositiveSets:
    """Ground truth of one direction with any number of positives per query (CSR layout).

    Attributes:
        queries: (Q,) distinct int64 query indices that are evaluated (the others are not scored).
        offsets: (Q + 1,) int64; the positives of query q are targets[offsets[q]:offsets[q + 1]].
        targets: (P,) int64 candidate indices, distinct within a query.
        n_relevant: (Q,) int64 R of each query: its number of positives, including any that are not among the
            candidates (they count in R and can never be retrieved).
    """

    queries: torch.Tensor
    offsets: torch.Tensor
    targets: torch.Tensor
    n_relevant: torch.Tensor

    @classmethod
    def from_lists(cls, positives: Mapping[int, Sequence[int]], n_relevant: Mapping[int, int] | None = None
                   ) -> PositiveSets:
        """Build from {query index: candidate indices}; `n_relevant` gives R where positives lie outside the candidates.

        Raises:
            ValueError: for a query without positives, a repeated positive, or an R below the positives given.
        """
        queries = sorted(positives)
        counts = [len(positives[q]) for q in queries]
        targets = [int(t) for q in queries for t in positives[q]]
        r = [int(n_relevant[q]) if n_relevant is not None else n for q, n in zip(queries, counts, strict=True)]
        for q, n, rel in zip(queries, counts, r, strict=True):
            if rel < 1:
                raise ValueError(f"query {q} has no positive")
            if len(set(positives[q])) != n or rel < n:
                raise ValueError(f"query {q}: positives must be distinct and at most R = {rel}")
        return cls(queries=torch.tensor(queries, dtype=torch.int64),
                   offsets=torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64),
                   targets=torch.tensor(targets, dtype=torch.int64), n_relevant=torch.tensor(r, dtype=torch.int64))

    @property
    def n_queries(self) -> int:
        return int(self.queries.numel())

    def max_relevant(self) -> int:
        return int(self.n_relevant.max()) if self.n_queries else 0

    def owners(self) -> torch.Tensor:
        """(P,) the position (0..Q-1, not the query index) of the query each positive belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_queries), self.offsets.diff())

    def select(self, positions: torch.Tensor) -> PositiveSets:
        """The sets of the queries at `positions` (ascending positions into `queries`)."""
        counts = self.offsets.diff()[positions]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        take = torch.arange(int(offsets[-1])) + torch.repeat_interleave(self.offsets[positions] - offsets[:-1], counts)
        return PositiveSets(queries=self.queries[positions], offsets=offsets, targets=self.targets[take],
                            n_relevant=self.n_relevant[positions])


@dataclass(frozen=True)
class PositiveStats:
    """Where the positives found in ranked lists stand; one entry per positive found (all int64, shape (P',)).

    Attributes:
        owner: the position of its query in `PositiveSets.queries`.
        greater: G, candidates scoring strictly higher (positives included).
        equal: E, candidates scoring exactly the same, itself included.
        tied_pos: m, positives among those E.
        pos_above: c, positives scoring strictly higher.
        index_in_tie: t, its place among the m tied positives (0..m-1, in an arbitrary fixed order).
    """

    owner: torch.Tensor
    greater: torch.Tensor
    equal: torch.Tensor
    tied_pos: torch.Tensor
    pos_above: torch.Tensor
    index_in_tie: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[PositiveStats]) -> PositiveStats:
        return PositiveStats(*(torch.cat([getattr(p, f) for p in parts]) for f in PositiveStats.__dataclass_fields__))


def membership(indices: torch.Tensor, sets: PositiveSets, n_candidates: int) -> torch.Tensor:
    """(Q, L) bool: whether each listed candidate is a positive of its row's query.

    Few positives per query (the usual case) compare against a padded (Q, P_max) table; many are looked up in the
    sorted (query, candidate) keys instead.
    """
    q, length = indices.shape
    counts = sets.offsets.diff()
    widest = int(counts.max()) if counts.numel() else 0
    if widest == 0:
        return torch.zeros(q, length, dtype=torch.bool)
    owners = sets.owners()
    if q * length * widest <= MEMBERSHIP_BLOCK:
        table = torch.full((q, widest), -1, dtype=torch.int64)
        table[owners, torch.arange(owners.numel()) - sets.offsets[owners]] = sets.targets
        return (indices[:, :, None] == table[:, None, :]).any(2)
    keys = torch.sort(owners * n_candidates + sets.targets).values  # (P,)
    listed = torch.arange(q)[:, None] * n_candidates + indices  # (Q, L)
    return keys[torch.searchsorted(keys, listed).clamp_(max=keys.numel() - 1)] == listed


def positive_stats(values: torch.Tensor, indices: torch.Tensor, sets: PositiveSets, n_candidates: int
                   ) -> PositiveStats:
    """Locate each query's positives in its ranked list.

    Args:
        values: (Q, L) scores sorted in descending order per row, for the queries of `sets` in their order.
        indices: (Q, L) candidate index of each score.
        sets: the positives (queries in the same order as the rows).
        n_candidates: candidates per query (for the membership keys).

    Every candidate scoring higher than a listed one must be listed (a top-L list, or the whole ranking); a tie group
    cut by the end of the list gives too small an E, which callers rule out where it matters (`truncated_ties`).
    Rows without an exact tie (the usual case) take a shortcut: every group is one entry.
    """
    q, length = values.shape
    is_pos = membership(indices, sets, n_candidates)  # (Q, L)
    inclusive = is_pos.long().cumsum(1)
    before = inclusive - is_pos.long()  # positives strictly before each entry
    tied_rows = (values[:, 1:] == values[:, :-1]).any(1) if length > 1 else torch.zeros(q, dtype=torch.bool)
    r, c = (is_pos & ~tied_rows[:, None]).nonzero(as_tuple=True)
    ones = torch.ones_like(r)
    parts = [PositiveStats(owner=r, greater=c, equal=ones, tied_pos=ones, pos_above=before[r, c],
                           index_in_tie=torch.zeros_like(r))]
    rows = tied_rows.nonzero().squeeze(1)
    if rows.numel():
        parts.append(_tied_stats(values[rows], is_pos[rows], inclusive[rows], before[rows], rows))
    return PositiveStats.cat(parts)


def _tied_stats(values: torch.Tensor, is_pos: torch.Tensor, inclusive: torch.Tensor, before: torch.Tensor,
                rows: torch.Tensor) -> PositiveStats:
    """`positive_stats` of rows with exact ties: tie groups from runs of equal values (`rows`: their row numbers)."""
    q, length = values.shape
    col = torch.arange(length).expand(q, length)
    new_group = torch.ones_like(is_pos)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    start = torch.cummax(torch.where(new_group, col, 0), dim=1).values  # (Q, L) first index of each entry's tie group
    last_group = torch.ones_like(is_pos)
    last_group[:, :-1] = new_group[:, 1:]
    end = torch.cummin(torch.where(last_group, col, length).flip(1), dim=1).values.flip(1)  # (Q, L) last index
    above = before.gather(1, start)  # positives in earlier groups
    tied = inclusive.gather(1, end) - above
    r, c = is_pos.nonzero(as_tuple=True)
    return PositiveStats(owner=rows[r], greater=start[r, c], equal=(end - start + 1)[r, c], tied_pos=tied[r, c],
                         pos_above=above[r, c], index_in_tie=(before - above)[r, c])


def truncated_ties(values: torch.Tensor, depth: int, complete: bool) -> torch.Tensor:
    """(Q,) bool: rows whose last tie group may go on past the list and starts before `depth`.

    Such a row may hide a positive (or tied candidates) that counts within the first `depth` places; it must be ranked
    again in full. A list holding every candidate (`complete`) is never cut.
    """
    if complete:
        return torch.zeros(values.shape[0], dtype=torch.bool)
    if values.shape[1] <= depth:  # too short to know anything about the first `depth` places
        return torch.ones(values.shape[0], dtype=torch.bool)
    return values[:, depth - 1] == values[:, -1]


def _positions(stats: PositiveStats, rule: str) -> torch.Tensor:
    """0-based place of each positive under a deterministic rule (optimistic: before its tied negatives)."""
    if rule == "optimistic":
        return stats.greater + stats.index_in_tie
    return stats.greater + stats.equal - stats.tied_pos + stats.index_in_tie


def first_own_before(t: np.ndarray, m: np.ndarray, r: np.ndarray) -> np.ndarray:
    """P(fewer than r of the t tied competitors come before the first of the m own items), all orders equally likely.

    P(at least r competitors first) = prod_{i<r} (t - i) / (t + m - i) for 0 <= r <= t, and 0 for r > t.
    """
    out = np.zeros(t.shape, dtype=np.float64)
    at_least = np.ones(t.shape, dtype=np.float64)  # P(X >= 0)
    top = int(r.max(initial=0))
    for i in range(top + 1):
        out = np.where(r == i, 1.0 - at_least, out)  # P(X < i) = 1 - P(X >= i)
        at_least = at_least * np.clip(t - i, 0, None) / np.maximum(t + m - i, 1)
    return np.where(r > top, 1.0, np.where(r <= 0, 0.0, out))


def _harmonic(n: torch.Tensor) -> torch.Tensor:
    """H(n) = 1 + 1/2 + ... + 1/n in float64 (H(0) = 0), by the digamma function."""
    return torch.special.digamma(n.double() + 1) + np.euler_gamma


def _expected_terms(stats: PositiveStats, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per positive: P(place < R) and E[precision at its place · (place < R)], over random orders of its tie group.

    Its slot s in the group is uniform over 0..E-1, and given s the other m - 1 tied positives fill s·(m-1)/(E-1) of
    the slots before it on average, so the precision term is (c + 1 + s·b)/(G + 1 + s) with b = (m-1)/(E-1), summed over
    the S = clip(R - G, 0, E) slots that fall within R: b·S + (c + 1 - b·(G + 1))·(H(G + S) - H(G)), divided by E.
    """
    g, e, m, c = (x.double() for x in (stats.greater, stats.equal, stats.tied_pos, stats.pos_above))
    slots = (r.double() - g).clamp(min=0).minimum(e)
    within = slots / e
    b = torch.where(e > 1, (m - 1) / (e - 1).clamp(min=1), torch.zeros_like(e))
    spread = b * slots + (c + 1 - b * (g + 1)) * (_harmonic(g + slots) - _harmonic(g))
    single = torch.where(g < r.double(), (c + 1) / (g + 1), torch.zeros_like(g))  # E = 1: exact, no digamma rounding
    return within, torch.where(e > 1, spread / e, single)


def query_metrics(stats: PositiveStats, sets: PositiveSets, ks: Sequence[int], rule: str) -> dict[str, torch.Tensor]:
    """Per-query R@K (0/1, or a probability under `expected`), R-Precision and mAP@R.

    R-Precision = (positives in the first R places) / R; mAP@R = (1/R) Σ over the first R places holding a positive of
    the precision at that place; R@K = 1 when a positive lies in the first K places. R counts every positive of the
    query, also those absent from the candidates. `expected` is the expectation over random orders of tied items.

    Returns:
        {"r@<k>" for each k, "r_precision", "map_at_r"}: (Q,) float64 each, in the order of `sets.queries`.
    """
    if rule not in TIE_RULES:
        raise ValueError(f"unknown tie rule {rule!r}; use one of {', '.join(TIE_RULES)}")
    n_q = sets.n_queries
    r = sets.n_relevant[stats.owner]
    if rule == "expected":
        within, precision = _expected_terms(stats, r)
    else:
        place = _positions(stats, rule)
        hit = place < r
        within = hit.double()
        precision = torch.where(hit, (stats.pos_above + stats.index_in_tie + 1).double() / (place + 1).double(), 0.0)
    rel = sets.n_relevant.double()
    out = {"r_precision": torch.zeros(n_q, dtype=torch.float64).index_add_(0, stats.owner, within) / rel,
           "map_at_r": torch.zeros(n_q, dtype=torch.float64).index_add_(0, stats.owner, precision) / rel}
    first = (stats.pos_above == 0) & (stats.index_in_tie == 0)  # one per query that has a positive in its list
    owner, g, e, m = (x[first] for x in (stats.owner, stats.greater, stats.equal, stats.tied_pos))
    for k in ks:
        if rule == "expected":
            p = torch.from_numpy(first_own_before((e - m).numpy(), m.numpy(), (k - g).numpy()))
        else:
            best = g if rule == "optimistic" else g + e - m
            p = (best < k).double()
        out[f"r@{k}"] = torch.zeros(n_q, dtype=torch.float64).index_copy_(0, owner, p.double())
    return out
