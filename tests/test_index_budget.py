"""Indexes under a budget: the kind chosen, the card's recall against a brute-force reference, parts from several
ranks merging to the one-process index, and a killed build resuming from its parts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vsectl.errors import ConfigError
from vsectl.retrieval.index_plan import parse_bytes, plan_index


def test_sizes_read_as_people_write_them():
    assert parse_bytes("4GB") == 4_000_000_000 and parse_bytes("4 GiB") == 4 << 30 and parse_bytes("512mb") == 512e6
    assert parse_bytes(None) is None and parse_bytes("2e9") == 2_000_000_000
    for bad in ("four", "4XB", "-1GB", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_the_budget_picks_the_most_accurate_kind_that_fits():
    assert plan_index(20_000, 512, "auto", "4GB").kind == "flat"
    assert plan_index(200_000, 512, "auto", "4GB").kind == "hnsw"
    assert plan_index(1_000_000, 512, "auto", "4GB").factory == "IVF1024,Flat"
    big = plan_index(10_000_000, 512, "auto", "4GB")
    assert big.kind == "ivf-pq" and big.factory == "IVF4096_HNSW32,PQ256x4fs" and big.ram_bytes <= 0.75 * 4e9
    assert plan_index(10_000_000, 512, "auto", "16GB").kind == "ivf-sq8"
    assert plan_index(100_000_000, 512, "auto", "4GB").params["pq_bytes"] == 16
    with pytest.raises(ConfigError, match="no index of 1000000000 512-d vectors fits"):
        plan_index(1_000_000_000, 512, "auto", "4GB")
    with pytest.raises(ConfigError, match="a hnsw index of 10000000 512-d vectors needs about"):
        plan_index(10_000_000, 512, "hnsw", "4GB")
    with pytest.raises(ConfigError, match="ivf-pq needs at least 256 vectors"):
        plan_index(100, 512, "ivf-pq")
    # lists: the power of two nearest sqrt(n), unless fewer than 39 training rows per list would be left
    assert [plan_index(n, 512, "ivf-pq").params["nlist"] for n in (300, 5_000, 2_000_000)] == [7, 64, 1024]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """3,000 clustered 16-d unit vectors with 600 captions near them, as an embeddings folder."""
    from vsectl.retrieval.embeddings import write_vectors

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    x = centres[rng.integers(40, size=3000)] + 0.6 * rng.standard_normal((3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    caps = x[:600] + 0.3 * rng.standard_normal((600, 16)).astype(np.float32)
    caps /= np.linalg.norm(caps, axis=1, keepdims=True)
    return write_vectors(tmp_path_factory.mktemp("idx") / "emb", [x[:1700], x[1700:]], 3000, 16, captions=caps,
                         cap2img=np.arange(600))


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_a_collection_of_a_few_images_with_captions_gets_its_card(kind, tmp_path):
    """45 images and their captions (a small tar-shard collection): the card asked for 46 hits and crashed."""
    if kind != "flat":
        pytest.importorskip("faiss")
    import vsectl
    from vsectl.retrieval.embeddings import write_vectors

    rng = np.random.default_rng(1)
    x = rng.standard_normal((45, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    caps = x + 0.2 * rng.standard_normal((45, 16)).astype(np.float32)
    caps /= np.linalg.norm(caps, axis=1, keepdims=True)
    emb = write_vectors(tmp_path / "emb", [x], 45, 16, captions=caps, cap2img=np.arange(45))
    index = vsectl.build_index(emb, kind=kind)
    card = json.loads((index / "card.json").read_text())
    assert card["queries"]["source"] == "captions" and card["recall"]["@100"] == 1.0


def brute_force_recall(matrix: np.ndarray, queries: np.ndarray, found: np.ndarray, k: int, own=None) -> float:
    """Per query: score every row, sort, drop the query's own row; the share of the true top k that was found."""
    shares = []
    for q, query in enumerate(queries):
        ranked = sorted(range(len(matrix)), key=lambda i: (-float(matrix[i] @ query), i))
        truth = [i for i in ranked if own is None or i != own[q]][:k]
        got = [int(i) for i in found[q] if own is None or i != own[q]][:k]
        shares.append(len(set(truth) & set(got)) / k)
    return float(np.mean(shares))


def test_the_card_recall_equals_a_brute_force_reference(collection):
    pytest.importorskip("faiss")
    import vsectl
    from vsectl.retrieval.index_card import held_out

    path = vsectl.build_index(collection, "ivf-pq", side="captions", nprobe=2)  # given: not tuned, recall < 1
    card = json.loads((path / "card.json").read_text())
    index = vsectl.open_index(path)
    emb = index.embeddings
    queries, own, source = held_out(emb, "captions", card["queries"]["count"])
    assert source.startswith("captions (each query's own row left out)") and card["params"]["nprobe"] == 2
    found = index.search_raw(queries, 11)[1]
    expected = brute_force_recall(np.asarray(emb.captions), queries, found, 10, own)
    assert card["recall"]["@10"] == pytest.approx(expected, abs=1e-4) and 0.3 < expected < 1.0
    images = vsectl.build_index(collection, "ivf", side="images")  # captions exist: they are the queries
    card = json.loads((images / "card.json").read_text())
    assert card["queries"]["source"] == "captions" and card["rsum"]["exact"] > 0
    assert card["tuning"]["ladder"][-1]["recall@10"] >= 0.95 and card["recall"]["@10"] >= 0.95
    assert card["rsum"]["index"] == pytest.approx(card["rsum"]["exact"], abs=3.0)


def _build(emb_path: Path, world: int, monkeypatch, part_rows: int) -> bytes:
    import faiss

    from vsectl.retrieval import index_build
    from vsectl.retrieval.embeddings import open_embeddings
    from vsectl.retrieval.index_plan import kind_plan
    from vsectl.runtime import NullProgress

    monkeypatch.setattr(index_build, "PART_ROWS", part_rows)
    emb = open_embeddings(emb_path)
    plan = kind_plan("ivf-pq", 3000, 16)
    reader = index_build.RowReader(emb.path / "images.npy")
    partial = emb_path.parent / f"partial-{world}"
    results: dict[int, object] = {}

    def rank(r: int) -> None:
        index_build.prepare(partial, plan, {"rows": 3000}, r)
        results[r] = index_build.build_faiss(plan, reader, partial, rank=r, world=world, seed=0,
                                             progress=NullProgress())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    rank(0)
    for t in threads:
        t.join(60)
    assert all(results[r] is None for r in range(1, world))
    return bytes(faiss.serialize_index(results[0]))


def test_parts_added_by_several_ranks_merge_to_the_one_process_index(collection, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    import shutil

    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    one = _build(emb, 1, monkeypatch, part_rows=700)   # 5 parts, one process
    three = _build(emb, 3, monkeypatch, part_rows=700)  # the same parts over three ranks
    assert one == three
    whole = _build(emb, 1, monkeypatch, part_rows=1 << 20)  # one part: the ids come out the same
    import faiss

    a, b = faiss.deserialize_index(np.frombuffer(one, dtype=np.uint8)), faiss.deserialize_index(
        np.frombuffer(whole, dtype=np.uint8))
    queries = np.asarray(np.load(emb / "images.npy")[:20])
    assert np.array_equal(a.search(queries, 5)[1], b.search(queries, 5)[1])


@pytest.mark.parametrize("factory", ["IVF8,PQ8x4fs", "IVF8,PQ4x8np", "IVF8,SQ8", "IVF8,Flat", "IVF8_HNSW4,PQ8x4fs"])
def test_parts_merged_list_by_list_equal_faiss_own_add(factory, tmp_path):
    """Parts encoded and written by list, then merged list by list, hold what faiss' own `add` of every row makes
    (the reference): the same ids and codes in every list (fast-scan blocks byte for byte), the same count, the
    same hits; a part cut short is refused in one line."""
    faiss = pytest.importorskip("faiss")
    from vsectl.errors import DataError
    from vsectl.retrieval import index_build, index_parts

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2600, 16)).astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    reader = index_build.RowReader(tmp_path / "rows.npy")
    trained = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(x)
    reference = faiss.clone_index(trained)
    reference.add(x)
    rows, files = 700, []
    for p, a in enumerate(range(0, len(x), rows)):
        files.append(tmp_path / f"part-{p}.lists")
        index_parts.write_part(files[-1], *index_parts.encode_rows(trained, reader, a, min(a + rows, len(x))))
    ours = index_parts.merge(trained, files)
    assert ours.ntotal == reference.ntotal == len(x)
    mine, theirs = faiss.extract_index_ivf(ours).invlists, faiss.extract_index_ivf(reference).invlists
    fast = index_parts.is_fast_scan(index_parts.ivf_of(ours))
    assert fast == factory.endswith("fs")
    packer = index_parts.ivf_of(ours).get_CodePacker() if fast else None

    def codes_of(lists, lst: int, n: int, fast: bool) -> np.ndarray:
        """A list's n flat codes: read as stored, or unpacked from its fast-scan blocks one by one."""
        if not fast:
            return faiss.rev_swig_ptr(lists.get_codes(lst), n * lists.code_size).reshape(n, -1).copy()
        blocks, out = lists.get_codes(lst), np.zeros((n, packer.code_size), dtype=np.uint8)
        for j in range(n):
            packer.unpack_1_c(blocks, j, faiss.swig_ptr(out[j]))  # the C call: offsets run across blocks
        return out

    for lst in range(8):
        n = theirs.list_size(lst)
        assert mine.list_size(lst) == n
        if n:
            assert np.array_equal(faiss.rev_swig_ptr(mine.get_ids(lst), n), faiss.rev_swig_ptr(theirs.get_ids(lst), n))
            assert np.array_equal(codes_of(mine, lst, n, fast), codes_of(theirs, lst, n, fast))
            if fast:  # the last block's padding is ours, zeros (faiss' own add leaves whatever memory held)
                blocks = faiss.rev_swig_ptr(mine.get_codes(lst), -(-n // 32) * 32 * 4)
                padded = np.zeros((-(-n // 32) * 32, 4), dtype=np.uint8)
                padded[:n] = codes_of(mine, lst, n, fast)
                assert np.array_equal(blocks, index_parts.pack_blocks(packer, padded[:n]))
    faiss.extract_index_ivf(ours).nprobe = faiss.extract_index_ivf(reference).nprobe = 8
    assert np.array_equal(ours.search(x[:50], 10)[1], reference.search(x[:50], 10)[1])
    files[1].write_bytes(files[1].read_bytes()[:-5])
    with pytest.raises(DataError, match="cut short or damaged"):
        index_parts.merge(faiss.clone_index(trained), files)


def test_a_killed_build_resumes_from_its_finished_parts(collection, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    import shutil

    import vsectl
    from vsectl.retrieval import index_build

    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    monkeypatch.setattr(index_build, "PART_ROWS", 700)
    straight = vsectl.build_index(emb, "ivf-pq", nprobe=4)
    expected = (straight / "index.faiss").read_bytes()
    shutil.rmtree(straight)

    class Killed(Exception):
        pass

    class Progress:
        def track(self, iterable, total, description):
            for n, item in enumerate(iterable):
                if n == 2:
                    raise Killed  # after two parts are written
                yield item

        def update(self, **fields):
            pass

    with pytest.raises(Killed):
        vsectl.build_index(emb, "ivf-pq", nprobe=4, progress=Progress())
    partial = emb / ".index-ivf-pq-images.partial"
    assert sorted(p.name for p in partial.glob("part-*")) == ["part-00000.lists", "part-00001.lists"]
    assert not (emb / "index-ivf-pq-images").exists()
    written = []
    monkeypatch.setattr(index_build, "write_index", lambda index, path, f=index_build.write_index: (
        written.append(path.name), f(index, path))[1])
    monkeypatch.setattr(index_build.index_parts, "write_part", lambda path, *a, f=index_build.index_parts.write_part: (
        written.append(path.name), f(path, *a))[1])
    resumed = vsectl.build_index(emb, "ivf-pq", nprobe=4)
    assert written == ["part-00002.lists", "part-00003.lists", "part-00004.lists", "index.faiss"]  # not redone
    assert (resumed / "index.faiss").read_bytes() == expected and not partial.exists()
    assert sorted(p.name for p in resumed.iterdir() if not p.name.startswith(".")) == ["card.json", "index.faiss",
                                                                                         "index.json"]


def test_tuning_aims_at_the_recall_asked_and_the_ladder_has_halfway_steps(collection, tmp_path):
    """`--recall R`: the chosen nprobe is the smallest ladder value whose recall@10 reaches R (the ladder is measured
    in order up to it); the ladder steps through powers of two and the halfway values between them; a recall outside
    (0, 1] is one line."""
    pytest.importorskip("faiss")
    import shutil

    import vsectl
    from vsectl.errors import ConfigError
    from vsectl.retrieval.index import _ladder

    assert _ladder("ivf", {"nlist": 64}) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert _ladder("ivf", {"nlist": 50}) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 50]
    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="--recall is a recall@10 between 0 and 1"):
            vsectl.build_index(emb, "ivf", recall=bad)
    card = json.loads((vsectl.build_index(emb, "ivf", side="captions", recall=0.6) / "card.json").read_text())
    ladder = card["tuning"]["ladder"]
    assert card["tuning"]["target_recall@10"] == 0.6
    assert all(row["recall@10"] < 0.6 for row in ladder[:-1]) and ladder[-1]["recall@10"] >= 0.6
    assert card["tuning"]["chosen"] == ladder[-1]["value"] == card["params"]["nprobe"] > 1


def test_the_card_gives_the_builds_peak_memory_by_phase(collection, tmp_path):
    pytest.importorskip("faiss")
    import shutil

    import vsectl

    emb = tmp_path / "emb"
    shutil.copytree(collection, emb)
    card = json.loads((vsectl.build_index(emb, "ivf-pq", nprobe=4) / "card.json").read_text())
    phases = card["build_rss_by_phase"]
    assert set(phases) == {"train", "encode", "merge", "measure", "write"}
    for peak in phases.values():  # the kernel's high-water mark and its sampled counters differ by a few pages
        assert 0 < peak["anon"] <= peak["rss"] <= card["build_peak_rss_bytes"] + (4 << 20) and peak["file"] >= 0


def test_phase_memory_sees_what_a_phase_allocates():
    from vsectl.retrieval.index_memory import PhaseMemory, read_status

    if not read_status():
        pytest.skip("no /proc/self/status here")
    memory = PhaseMemory()
    try:
        with memory.phase("small"):
            time.sleep(0.3)
        with memory.phase("big"):
            block = np.ones(300 << 20, dtype=np.uint8)  # 300 MiB, every page touched
            time.sleep(0.5)
            del block
    finally:
        memory.stop()
    peaks = memory.summary()
    assert peaks["big"]["anon"] - peaks["small"]["anon"] >= 250 << 20
