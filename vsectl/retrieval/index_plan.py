"""Which index to build: a faiss layout and its parameters chosen from the collection's size and the memory budget.

Every kind is described by what it costs per vector; `plan_index` takes the most accurate kind that fits the budget:

    flat      exact scan of the embeddings file (no extra memory, N·E·4 bytes read per query)
    hnsw      faiss HNSW graph over the full vectors: N·(4E + 8M) bytes, fast queries, slow to build on few cores
    ivf       faiss IVF over the full vectors: N·(4E + 8) bytes, each query scans nprobe/nlist of them
    ivf-sq8   IVF over 8-bit scalar codes: N·(E + 8) bytes
    ivf-pq    IVF over product-quantised codes: N·(m + 8) bytes, 2m sub-quantizers of 4 bits each in faiss' fast-scan
              layout (scanned in SIMD registers: at 10M × 512 and nprobe 128 one query took 6.2 ms against 18.0 ms
              with 8-bit codes of the same size, docs/scaling.md); the candidates are re-scored exactly
              from the embeddings file, so the hits and scores are exact ones, only which candidates are found is
              approximate

The number of lists is 2^round(log2 √N): k-means training costs n_train·nlist·E per iteration with n_train ≈ 39·nlist,
so the usual 4–16·√N lists would take most of an hour to train for 10M vectors on two cores; fewer, longer lists cost
query time instead, which `nprobe` tuning (in the index card) then measures. Above `HNSW_QUANTIZER_LISTS` lists the
coarse assignment of each added vector goes through an HNSW graph over the centroids instead of all of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from vsectl.errors import ConfigError

PLAN_KINDS = ("flat", "hnsw", "ivf", "ivf-sq8", "ivf-pq")
KIND_CHOICES = ("auto", *PLAN_KINDS)
ID_BYTES = 8  # faiss stores one int64 id per vector in each inverted list
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
HNSW_MAX_M = 512  # beyond this the graph alone outgrows any memory (faiss stores 2·M neighbours per vector)
HNSW_MAX_EF = 1 << 16  # beam widths: far past any useful recall, and inside faiss's int
HNSW_AUTO_MAX = 250_000  # auto leaves hnsw out above this: its build runs ~0.5-2 ms per vector per core here
FLAT_AUTO_MAX = 50_000  # auto keeps exact search up to here: one query scans ≤ 100 MB at 512-d, a few ms
TRAIN_PER_LIST = 39  # k-means sample per list (faiss warns below 39)
MAX_TRAIN = 1 << 20  # training sample rows at most (4 GiB-budget safe at 1,024-d)
MIN_LISTS = 1
MAX_LISTS = 1 << 16
HNSW_QUANTIZER_LISTS = 4096  # from here on the coarse quantizer is an HNSW graph over the centroids
PQ_BYTES = (128, 64, 32, 16, 8, 4)  # code sizes tried for ivf-pq, largest (most accurate) first
PQ_BITS = 4  # bits per sub-quantizer: two per byte, the fast-scan layout
PQ_MIN_DIMS = 2  # each sub-quantizer covers at least this many dimensions
PQ_MIN_VECTORS = 256  # enough training rows for every 16-centroid codebook (faiss warns below 39 per centroid)
FAST_SCAN_BLOCK = 32  # fast-scan lists are stored in blocks of 32 codes (the last one padded)
REFINE = 20  # ivf-pq finds k·REFINE candidates and re-scores them exactly from the embeddings file: at 10M × 512
# and nprobe 64, 100 candidates for k = 10 gave recall@10 0.906, 200 gave 0.924 (the 100 more rows cost ~0.1 ms)
INDEX_SHARE = 0.75  # the index may take this share of --max-memory; the rest is for training and added blocks
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str | int | float | None) -> int | None:
    """'4GB', '4 GiB', '512MB', '2e9' → bytes; None stays None.

    Raises:
        ConfigError: not a size.
    """
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 4GB, 512MB or 2GiB")
    value = float(match.group(1)) * UNITS[match.group(2)]
    if value <= 0:
        raise ConfigError(f"a memory budget must be positive, got {text!r}")
    return int(value)


def n_lists(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest √n, at most n / TRAIN_PER_LIST (enough training rows)."""
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(MIN_LISTS, min(MAX_LISTS, target, n // TRAIN_PER_LIST)))


def pq_choices(dim: int) -> list[int]:
    """Code sizes m (bytes per vector) usable at this dimension: its 8m/PQ_BITS sub-quantizers divide it, each
    sub-vector ≥ PQ_MIN_DIMS."""
    per_byte = 8 // PQ_BITS
    return [m for m in PQ_BYTES if dim % (per_byte * m) == 0 and dim // (per_byte * m) >= PQ_MIN_DIMS]


@dataclass
class IndexPlan:
    """A chosen index: the faiss factory string, its parameters and what it costs.

    Attributes:
        kind: one of PLAN_KINDS.
        factory: faiss index_factory string ("" for flat).
        params: nlist / nprobe / pq_bytes / refine, or M / ef_construction / ef_search.
        ram_bytes: the opened index's own memory (the embeddings file is mapped, not counted).
        n_train: rows of the k-means sample (0: no training).
        reason: why this kind, in one sentence.
    """

    kind: str
    factory: str
    params: dict[str, Any] = field(default_factory=dict)
    ram_bytes: int = 0
    n_train: int = 0
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantizer(nlist: int) -> str:
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"


def kind_plan(kind: str, n: int, dim: int, *, nlist: int | None = None, nprobe: int | None = None,
              pq_bytes: int | None = None, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int = HNSW_EF_SEARCH) -> IndexPlan:
    """The plan of one named kind at this size (parameters not given are chosen as the module docstring says)."""
    if kind == "flat":
        return IndexPlan("flat", "", {}, 0, 0, "exact search over the embeddings file")
    if kind == "hnsw":
        bounds = (("--m", m, 2, HNSW_MAX_M), ("--ef-construction", ef_construction, 1, HNSW_MAX_EF),
                  ("--ef-search", ef_search, 1, HNSW_MAX_EF))
        for name, value, low, high in bounds:
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        ram = n * (4 * dim + 8 * m + 12)  # level-0 links (2M int32), upper levels, vectors
        return IndexPlan("hnsw", f"HNSW{m},Flat", {"M": m, "ef_construction": ef_construction,
                                                   "ef_search": ef_search}, ram, 0, "graph over the full vectors")
    if kind not in PLAN_KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; use {', '.join(KIND_CHOICES)}")
    nlist = n_lists(n) if nlist is None else nlist
    if not 1 <= nlist <= n:
        raise ConfigError(f"nlist must be in [1, {n}] for {n} vectors, got {nlist}")
    if nprobe is not None and not 1 <= nprobe <= nlist:
        raise ConfigError(f"nprobe must be in [1, nlist = {nlist}], got {nprobe}")
    params: dict[str, Any] = {"nlist": nlist, "nprobe": min(nlist, max(1, nlist // 16)) if nprobe is None else nprobe}
    centroids = nlist * dim * 4
    if kind == "ivf":
        code, codec = 4 * dim, "Flat"
    elif kind == "ivf-sq8":
        code, codec = dim, "SQ8"
    else:
        choices = pq_choices(dim)
        if not choices:
            raise ConfigError(f"ivf-pq needs a dimension divisible by one of {PQ_BYTES}; these vectors are {dim}-d")
        if n < PQ_MIN_VECTORS:
            raise ConfigError(f"ivf-pq needs at least {PQ_MIN_VECTORS} vectors to train its codebooks, these are {n}; "
                              "use --kind ivf, hnsw or flat")
        pq_bytes = choices[0] if pq_bytes is None else pq_bytes
        if pq_bytes not in choices:
            raise ConfigError(f"pq bytes must be one of {', '.join(map(str, choices))} at {dim}-d, got {pq_bytes}")
        code, codec = pq_bytes, f"PQ{pq_bytes * 8 // PQ_BITS}x{PQ_BITS}fs"
        params.update(pq_bytes=pq_bytes, refine=REFINE)
        centroids += nlist * FAST_SCAN_BLOCK * pq_bytes  # each list's last block, half padding on average
    n_train = min(n, MAX_TRAIN, max(nlist * TRAIN_PER_LIST, 256 * TRAIN_PER_LIST if kind == "ivf-pq" else 0))
    return IndexPlan(kind, f"{_quantizer(nlist)},{codec}", params, n * (code + ID_BYTES) + centroids, n_train,
                     f"{nlist} lists of {code}-byte codes")


def plan_index(n: int, dim: int, kind: str = "auto", max_memory: str | int | None = None,
               **overrides: Any) -> IndexPlan:
    """Choose the index for n vectors of `dim` under a memory budget.

    Args:
        n: vectors to index (≥ 1).
        dim: their dimension.
        kind: "auto" or one of PLAN_KINDS (then only checked against the budget).
        max_memory: the budget for the opened index ("4GB"); None: no limit.
        **overrides: nlist, nprobe, pq_bytes, m, ef_construction, ef_search for `kind_plan`.

    Returns:
        The plan; `reason` says why it was chosen.

    Raises:
        ConfigError: a kind that does not fit the budget, or no kind fits.
    """
    budget = parse_bytes(max_memory)
    limit = None if budget is None else int(budget * INDEX_SHARE)
    if kind != "auto":
        plan = kind_plan(kind, n, dim, **overrides)
        if limit is not None and plan.ram_bytes > limit:
            raise ConfigError(f"a {kind} index of {n} {dim}-d vectors needs about {plan.ram_bytes / 1e9:.2f} GB, "
                              f"over {INDEX_SHARE:.0%} of --max-memory {max_memory}; use --kind auto or raise it")
        return plan
    candidates: list[IndexPlan] = []
    if n <= FLAT_AUTO_MAX:
        candidates.append(kind_plan("flat", n, dim))
    if n <= HNSW_AUTO_MAX:
        candidates.append(kind_plan("hnsw", n, dim, **_only(overrides, "m", "ef_construction", "ef_search")))
    if n >= TRAIN_PER_LIST:
        ivf = _only(overrides, "nlist", "nprobe")
        candidates += [kind_plan("ivf", n, dim, **ivf), kind_plan("ivf-sq8", n, dim, **ivf)]
        candidates += [kind_plan("ivf-pq", n, dim, pq_bytes=b, **ivf) for b in pq_choices(dim)
                       if overrides.get("pq_bytes") in (None, b) and n >= PQ_MIN_VECTORS]
    for plan in candidates:
        if limit is None or plan.ram_bytes <= limit:
            size = "(no memory budget given)" if limit is None else f"that fits {INDEX_SHARE:.0%} of {max_memory}"
            plan.reason = f"{plan.kind} ({plan.reason}): the most accurate kind {size} for {n:,} vectors"
            return plan
    raise ConfigError(f"no index of {n} {dim}-d vectors fits --max-memory {max_memory} (the smallest needs about "
                      f"{min(p.ram_bytes for p in candidates) / 1e9:.2f} GB); raise the budget")


def _only(overrides: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k in names and v is not None}
