"""The native GPO sort (vsectl.native.sortsets) against a slow per-column reference and against torch.sort."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vsectl import native
from vsectl.models.pooling.base import sort_features, torch_sort_features
from vsectl.native import sortsets


def reference_sort(feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column by column with Python's sorted(): the values, and the source row of each (ties: lowest row first)."""
    batch, _, dim = feats.shape
    kout = int(lengths.max())
    out = torch.zeros(batch, kout, dim, dtype=torch.float64)
    src = torch.full((batch, kout, dim), -1, dtype=torch.int64)
    for b in range(batch):
        n = int(lengths[b])
        for d in range(dim):
            column = [(float(feats[b, k, d]), k) for k in range(n)]
            for rank, (value, k) in enumerate(sorted(column, key=lambda vk: (-vk[0], vk[1]))):
                out[b, rank, d] = value
                src[b, rank, d] = k
    return out, src


def reference_grad(grad: torch.Tensor, src: torch.Tensor, rows: int) -> torch.Tensor:
    """Each sorted slot's gradient goes back to the row it came from; padded rows get none."""
    batch, kout, dim = grad.shape
    gx = torch.zeros(batch, rows, dim, dtype=torch.float64)
    for b in range(batch):
        for k in range(kout):
            for d in range(dim):
                if src[b, k, d] >= 0:
                    gx[b, src[b, k, d], d] += float(grad[b, k, d])
    return gx


def torch_path(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch_sort_features(feats, lengths)[0]


@pytest.fixture(autouse=True)
def built(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test here needs the kernel (built into a temporary cache): skipped only where the machine has no C
    compiler or the kernel is switched off, failed if it should build and does not (`make test` installs gcc)."""
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path_factory.getbasetemp() / "vsectl_cache"))
    native.reset()
    if native.load("sortsets") is None:
        if not native.enabled():
            pytest.skip("VSECTL_NATIVE=0 is set: the native sort is switched off")
        if native._compiler() is None:
            pytest.skip("no C compiler on this machine: the native sort cannot be built")
        pytest.fail(f"the native sort did not build here: {native.status()}")
    yield
    native.reset()


@pytest.mark.parametrize("shape", [(3, 36, 70), (5, 7, 1), (2, 20, 130), (4, 1, 9), (2, 97, 3)])
def test_values_and_gradient_equal_the_reference(shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    batch, rows, dim = shape
    feats = torch.randn(batch, rows, dim, generator=g)
    lengths = torch.randint(1, rows + 1, (batch,), generator=g)
    lengths[0] = rows
    feats[1:, :][torch.arange(rows)[None, :].expand(batch - 1, -1) >= lengths[1:, None]] = 1e9  # padding unread
    x = feats.clone().requires_grad_()
    ranked = sortsets.sort_sets(x, lengths)
    want, src = reference_sort(feats, lengths)
    assert ranked.shape == want.shape and ranked.is_contiguous()
    assert torch.equal(ranked.double(), want)
    grad = torch.randn(ranked.shape, generator=g)
    ranked.backward(grad)
    assert torch.equal(x.grad.double(), reference_grad(grad, src, rows))


@pytest.mark.parametrize("shape", [(3, 36, 70), (5, 7, 1), (2, 20, 130), (4, 1, 9), (2, 97, 3)])
def test_inference_values_only_network_equals_the_reference(shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(sum(shape) + 1)
    batch, rows, dim = shape
    feats = torch.randn(batch, rows, dim, generator=g)
    lengths = torch.randint(1, rows + 1, (batch,), generator=g)
    lengths[-1] = rows
    feats[torch.arange(rows)[None, :].expand(batch, -1) >= lengths[:, None]] = 1e9     # padding is never read
    with torch.inference_mode():
        ranked = sortsets.sort_sets(feats, lengths)                                   # no source rows kept
    assert torch.equal(ranked.double(), reference_sort(feats, lengths)[0])


def test_same_as_torch_sort_in_sort_features() -> None:
    feats = torch.randn(16, 36, 256)
    lengths = torch.randint(5, 37, (16,))
    x1, x2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    native_ranked, mask = sort_features(x1, lengths)
    assert type(native_ranked.grad_fn).__name__ == "_SortSetsBackward"                # the kernel served it
    torch_ranked = torch_path(x2, lengths)
    assert type(torch_ranked.grad_fn).__name__ != "_SortSetsBackward"
    assert torch.equal(native_ranked, torch_ranked)
    assert mask.shape == (16, int(lengths.max()))
    grad = torch.randn_like(native_ranked)
    native_ranked.backward(grad)
    torch_ranked.backward(grad)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_their_dtype(dtype: torch.dtype) -> None:
    feats = torch.randn(4, 12, 40).to(dtype)
    lengths = torch.tensor([12, 3, 7, 1])
    x1, x2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    a, b = sortsets.sort_sets(x1, lengths), torch_path(x2, lengths)
    assert a.dtype == dtype and torch.equal(a, b)
    grad = torch.randn(a.shape).to(dtype)
    a.backward(grad)
    b.backward(grad)
    assert x1.grad.dtype == dtype and torch.equal(x1.grad, x2.grad)


def test_strided_inputs_and_threads() -> None:
    base = torch.randn(6, 20, 150)
    strided = base.transpose(1, 2).contiguous().transpose(1, 2)[:, :15]   # column stride ≠ 1, row slice
    lengths = torch.tensor([15, 2, 9, 15, 1, 8], dtype=torch.int32)
    want, src = reference_sort(strided, lengths)
    grad = torch.randn(want.shape)
    want_grad = reference_grad(grad, src, 15)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x = strided.clone().requires_grad_()
            ranked = sortsets.sort_sets(x, lengths)
            assert torch.equal(ranked.double(), want)
            ranked.backward(grad)
            assert torch.equal(x.grad.double(), want_grad)
    finally:
        torch.set_num_threads(before)


def test_a_large_set() -> None:
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 1000, 3, generator=g)
    lengths = torch.tensor([1000, 777])
    want = torch.stack([torch.cat([feats[b, : int(n)].sort(dim=0, descending=True).values,
                                   torch.zeros(1000 - int(n), 3)]) for b, n in enumerate(lengths)])
    assert torch.equal(sortsets.sort_sets(feats, lengths), want)


def test_too_many_rows_take_the_torch_path() -> None:
    feats = torch.randn(1, sortsets.MAX_ROWS + 1, 1)
    assert not sortsets.available(feats) and sortsets.available(feats[:, : sortsets.MAX_ROWS])
    ranked, _ = sort_features(feats, torch.tensor([sortsets.MAX_ROWS + 1]))
    assert torch.equal(ranked[0, :, 0], feats[0, :, 0].sort(descending=True).values)


def test_no_gradient_no_source_rows() -> None:
    feats = torch.randn(3, 8, 70)
    lengths = torch.tensor([8, 3, 5])
    with torch.no_grad():
        ranked = sortsets.sort_sets(feats.clone().requires_grad_(), lengths)
    assert torch.equal(ranked.double(), reference_sort(feats, lengths)[0]) and ranked.grad_fn is None


def test_ties_get_a_permutation_of_the_gradient() -> None:
    feats = torch.tensor([[[1.0], [2.0], [2.0], [1.0], [2.0]]])                      # (1, 5, 1), ties
    x = feats.clone().requires_grad_()
    ranked = sortsets.sort_sets(x, torch.tensor([5]))
    assert ranked.flatten().tolist() == [2.0, 2.0, 2.0, 1.0, 1.0]
    ranked.backward(torch.tensor([[[10.0], [20.0], [30.0], [40.0], [50.0]]]))
    grads = x.grad.flatten().tolist()
    assert sorted(grads) == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert sorted(grads[i] for i in (1, 2, 4)) == [10.0, 20.0, 30.0]                 # the 2s got the top ranks


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match=r"one size per set, shape \(2,\)"):
        sortsets.sort_sets(torch.randn(2, 4, 3), torch.tensor([4]))
    with pytest.raises(ValueError, match="set sizes must be in 1..4"):
        sortsets.sort_sets(torch.randn(2, 4, 3), torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="set sizes"):
        sortsets.sort_sets(torch.randn(2, 4, 3), torch.tensor([0, 2]))


def test_gpo_is_the_same_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    from vsectl.models.pooling.gpo import GPO

    pool = GPO(d_pe=8, d_hidden=8)
    feats = torch.randn(8, 10, 32)
    lengths = torch.tensor([10, 9, 3, 1, 10, 5, 6, 7])
    x1, x2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    calls = []
    real = sortsets.sort_sets
    monkeypatch.setattr(sortsets, "sort_sets", lambda f, n: calls.append(1) or real(f, n))
    y1, _ = pool(x1, lengths)
    assert calls                                                                     # GPO sorted natively
    with monkeypatch.context() as m:
        m.setattr(sortsets, "available", lambda feats: False)
        y2, _ = pool(x2, lengths)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)


def test_library_is_cached_by_source_compiler_and_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path))
    native.reset()
    assert native.load("sortsets") is not None
    built = list((tmp_path / "native").glob("sortsets-*.so"))
    assert len(built) == 1 and built[0].stat().st_mode & 0o040                       # readable by the group
    stamp = built[0].stat().st_mtime_ns
    native.reset()
    assert native.load("sortsets") is not None
    assert built[0].stat().st_mtime_ns == stamp                                      # reused, not rebuilt
    assert not [p for p in (tmp_path / "native").iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(("cc", "says"), [("/nonexistent/cc", "no C compiler"), ("false", "build failed")])
def test_without_a_compiler_the_torch_path_is_used_and_said(cc: str, says: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(sortsets, "_warned", False)
    native.reset()
    feats, lengths = torch.randn(3, 5, 4), torch.tensor([5, 2, 4])
    with caplog.at_level(logging.WARNING, logger="vsectl.native.sortsets"):
        ranked, _ = sort_features(feats, lengths)
        sort_features(feats, lengths)
    assert says in native.status()["sortsets"]
    warnings = [r for r in caplog.records if "torch.sort" in r.getMessage()]
    assert len(warnings) == 1 and says in warnings[0].getMessage()
    assert torch.equal(ranked.double(), reference_sort(feats, lengths)[0])
    native.reset()


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSECTL_NATIVE", "0")
    native.reset()
    assert native.load("sortsets") is None and native.status()["sortsets"].startswith("off")
    native.reset()


def test_a_forked_child_sorts_with_threads_of_its_own() -> None:
    """The thread pool made in the parent does not exist in a fork: the child must not wait on it."""
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        feats, lengths = torch.randn(4, 6, 8), torch.tensor([6, 2, 5, 1])
        want = sortsets.sort_sets(feats, lengths)                                   # the parent's pool exists now
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            got = pool.apply_async(_sort_in_child, (feats, lengths)).get(timeout=60)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def _sort_in_child(feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    torch.set_num_threads(2)
    return sortsets.sort_sets(feats, lengths)


def test_a_read_only_cache_builds_into_the_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setenv("VSECTL_CACHE", str(locked))
    monkeypatch.setattr(native, "_writable", lambda folder: False)                  # as a read-only home would be
    monkeypatch.setattr(native, "_temp_cache", lambda: tmp_path / "tmpcache")
    native.reset()
    assert native.load("sortsets") is not None
    assert list((tmp_path / "tmpcache").glob("sortsets-*.so")) and not (locked / "native").exists()
    native.reset()


def test_a_temporary_folder_others_can_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a library from a folder another user can write would run their code."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setattr(native, "_writable", lambda folder: False)
    monkeypatch.setattr(native, "_temp_cache", lambda: shared)
    native.reset()
    assert native.load("sortsets") is None
    assert "not a private folder" in native.status()["sortsets"] and not list(shared.iterdir())


def test_cc_may_carry_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VSECTL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -Wall")
    native.reset()
    assert native.load("sortsets") is not None and native.status()["sortsets"] == "native"
