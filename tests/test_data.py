"""Feature sources, the HDF5 store, split loading, datasets, sampler, collate and the toy set (spec §3, §4, §9)."""

from __future__ import annotations

import functools
import json
import pickle
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vsectl.data import sources
from vsectl.data.datasets import (
    CaptionDataset,
    EpochBatchSampler,
    ImageSetDataset,
    PairDataset,
    collate_images,
    collate_pairs,
    collate_tokens,
)
from vsectl.data.features import FeatureSource, H5Features, NpyFeatures
from vsectl.data.sources import Split, check_finite, load_split
from vsectl.data.store import StoreWriter, read_store_attrs, read_store_captions, write_store
from vsectl.data.tokenize import word_tokenize
from vsectl.data.toy import CONCEPTS, make_toy_dataset
from vsectl.data.vocab import Vocab
from vsectl.errors import DataError

D = 4


class ArrayFeatures(FeatureSource):
    """In-memory reference source: image i's rows are `sets[i]`."""

    def __init__(self, sets: list[np.ndarray]) -> None:
        self.sets = sets

    @property
    def feat_dim(self) -> int:
        return self.sets[0].shape[1]

    def __len__(self) -> int:
        return len(self.sets)

    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.sets], dtype=np.int64)

    def get(self, i: int) -> np.ndarray:
        return self.sets[i].astype(np.float32).copy()


class IdentityText:
    """Encodes a caption as its integers; never augments."""

    pad_id = 0
    vocab_size = 100

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        return [int(t) for t in caption.split()]


def write_precomp(folder: Path, split: str, n_images: int, per_caption: bool, k: int = 3) -> np.ndarray:
    """Write SCAN precomp files; image n's rows are all equal to n. Returns the (rows, k, D) array."""
    folder.mkdir(parents=True, exist_ok=True)
    stride = 5 if per_caption else 1
    image_of_row = np.arange(n_images * stride) // stride
    arr = np.broadcast_to(image_of_row[:, None, None], (len(image_of_row), k, D)).astype(np.float32)
    np.save(folder / f"{split}_ims.npy", arr)
    caps = [f"caption {c} of image {c // 5}" for c in range(5 * n_images)]
    (folder / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    (folder / f"{split}_ids.txt").write_text("\n".join(str(100 + n) for n in image_of_row) + "\n")
    return arr


def varied_sets(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(1, 6)), D)).astype(np.float32) for _ in range(n)]


def toy_split(n_images: int = 4, captions_per_image: int = 5) -> Split:
    sets = [np.arange(6 * D, dtype=np.float32).reshape(6, D) + 1000 * n for n in range(n_images)]
    n_caps = n_images * captions_per_image
    return Split(
        "train",
        ArrayFeatures(sets),
        [f"{c + 1} {c + 2} {c + 3}" for c in range(n_caps)],
        np.arange(n_caps, dtype=np.int64) // captions_per_image,
        [str(n) for n in range(n_images)],
    )


# --- precomp loading (DATA-5, DATA-6) -------------------------------------------------------------------------------


def test_precomp_one_row_per_image_data5(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=4, per_caption=False)
    split = load_split(tmp_path, "train")
    assert (split.n_images, split.n_captions) == (4, 20)
    assert split.features.row_stride == 1
    np.testing.assert_array_equal(split.cap2img, np.arange(20) // 5)
    assert split.image_ids == ["100", "101", "102", "103"]
    assert split.features.get(3).dtype == np.float32 and (split.features.get(3) == 3).all()


def test_precomp_one_row_per_caption_gives_stride_5_data5(tmp_path: Path) -> None:
    write_precomp(tmp_path / "precomp", "train", n_images=4, per_caption=True)
    split = load_split(tmp_path, "train")
    assert split.features.row_stride == 5 and len(split.features) == 4
    assert split.image_ids == ["100", "101", "102", "103"]
    for n in range(4):
        assert (split.features.get(n) == n).all()


def test_precomp_dev_odd_count_stored_per_caption_data5(tmp_path: Path) -> None:
    """Like F30K dev (1,014 images, 5,070 rows): 7 images stored once per caption."""
    write_precomp(tmp_path, "dev", n_images=7, per_caption=True)
    split = load_split(tmp_path, "dev")
    assert (split.n_images, split.n_captions) == (7, 35)
    np.testing.assert_array_equal(split.features.lengths(), np.full(7, 3))
    assert (split.features.get(6) == 6).all()


def test_precomp_wrong_caption_count_raises_data6(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=3, per_caption=False)
    (tmp_path / "train_caps.txt").write_text("\n".join(["a cap"] * 14) + "\n")
    with pytest.raises(DataError, match=r"14 captions.*3 rows"):
        load_split(tmp_path, "train")


def test_precomp_ids_count_mismatch_raises(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=3, per_caption=False)
    (tmp_path / "train_ids.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"2 ids.*3 rows"):
        load_split(tmp_path, "train")


def test_empty_caption_raises_with_line_number(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=2, per_caption=False)
    lines = (tmp_path / "train_caps.txt").read_text().splitlines()
    lines[6] = "  "
    (tmp_path / "train_caps.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 7"):
        load_split(tmp_path, "train")


def test_missing_split_lists_looked_for_files_and_existing_splits(tmp_path: Path) -> None:
    write_precomp(tmp_path / "precomp", "train", n_images=2, per_caption=False)
    write_precomp(tmp_path / "precomp", "dev", n_images=2, per_caption=False)
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "test")
    message = str(err.value)
    assert "test.h5" in message and "test_ims.npy" in message and "splits there: dev, train" in message
    assert load_split(tmp_path, "val").name == "dev"  # `val` is the alias of `dev`


def test_wrong_feature_dim_raises(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=2, per_caption=False)
    with pytest.raises(DataError, match=f"{D}-d features but the model expects 8"):
        load_split(tmp_path, "train", feat_dim=8)


def test_nan_features_raise_on_load_naming_the_image(tmp_path: Path) -> None:
    arr = write_precomp(tmp_path, "train", n_images=3, per_caption=False).copy()
    arr[2, 1, 0] = np.nan
    np.save(tmp_path / "train_ims.npy", arr)
    with pytest.raises(DataError, match=r"image 2 .*NaN"):
        load_split(tmp_path, "train")


def test_check_finite_passes_clean_images() -> None:
    check_finite(ArrayFeatures(varied_sets(3)), range(3))


# --- NpyFeatures / H5Features (DATA-7) ------------------------------------------------------------------------------


def test_npy_features_read_through_memmap_only_data7(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_precomp(tmp_path, "train", n_images=3, per_caption=False)
    calls: list[dict] = []
    real_load = np.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(sources.np, "load", spy)
    src = NpyFeatures(tmp_path / "train_ims.npy")
    assert calls == []  # nothing opened in __init__
    src.get(1)
    assert calls and all(c.get("mmap_mode") == "r" for c in calls)
    assert isinstance(src.array, np.memmap)


def test_npy_features_pickle_without_the_map(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=3, per_caption=False)
    src = NpyFeatures(tmp_path / "train_ims.npy")
    src.get(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._array is None
    np.testing.assert_array_equal(clone.get(2), src.get(2))


def test_h5_features_pickle_before_and_after_use(tmp_path: Path) -> None:
    sets = varied_sets(5)
    path = write_store(tmp_path / "train.h5", ((str(n), s) for n, s in enumerate(sets)), ["x"], [0], feat_dim=D)
    src = H5Features(path)
    before = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(before.get(4), sets[4])
    src.get(0)
    after = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(after.get(3), sets[3])
    src.close()


# --- the HDF5 store -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_store_round_trip(tmp_path: Path, dtype: str) -> None:
    sets = varied_sets(6)
    ids = ["img_ä", "b", "c", "d", "e", "f"]
    captions = ["a dog", "a cat on a mat", "ünïcode", "x", "y", "z", "w"]
    cap2img = [0, 0, 1, 2, 3, 4, 5]
    attrs = {"split": "train", "dims": [D, 2], "note": None, "scale": 0.5}
    path = write_store(tmp_path / "train.h5", zip(ids, sets, strict=True), captions, cap2img, D, dtype, attrs)
    src = H5Features(path)
    np.testing.assert_array_equal(src.lengths(), [len(s) for s in sets])
    tol = 1e-3 if dtype == "float16" else 0.0
    for n, s in enumerate(sets):
        got = src.get(n)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, s, atol=tol, rtol=tol)
    got_caps, got_cap2img, got_ids = read_store_captions(path)
    assert (got_caps, got_cap2img.tolist(), got_ids) == (captions, cap2img, ids)
    assert got_cap2img.dtype == np.int64
    stored = read_store_attrs(path)
    assert stored["format"] == "vsectl-store" and stored["version"] == 1 and stored["feat_dim"] == D
    assert (stored["split"], json.loads(stored["dims"]), json.loads(stored["note"]), stored["scale"]) == (
        "train",
        [D, 2],
        None,
        0.5,
    )
    with h5py.File(path) as f:
        assert f["features/rows"].dtype == np.dtype(dtype) and f["features/rows"].chunks is not None
        assert f["features/offsets"].dtype == np.int64


def test_store_writer_leaves_no_file_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "train.h5"
    with pytest.raises(RuntimeError), StoreWriter(path, D) as writer:
        writer.add_image("a", np.ones((2, D)))
        assert not path.exists()  # rows go to the partial file until a clean exit
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("feats", "pattern"),
    [
        (np.ones((2, D + 1)), "expected"),
        (np.ones((0, D)), "empty"),
        (np.full((2, D), np.inf), "NaN or inf"),
        (np.full((1, D), 1e6), "overflow float16"),
    ],
)
def test_store_writer_rejects_bad_sets(tmp_path: Path, feats: np.ndarray, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern), StoreWriter(tmp_path / "t.h5", D, dtype="float16") as writer:
        writer.add_image("a", feats)


def test_store_writer_flushes_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are appended in blocks, not held until the end."""
    monkeypatch.setattr("vsectl.data.store.FLUSH_CHUNKS", 1)
    monkeypatch.setattr("vsectl.data.store.CHUNK_BYTES", 3 * D * 4)  # 3-row chunks
    sets = varied_sets(10)
    with StoreWriter(tmp_path / "t.h5", D) as writer:
        for n, s in enumerate(sets):
            writer.add_image(str(n), s)
        assert writer._written > 0
    src = H5Features(tmp_path / "t.h5")
    for n, s in enumerate(sets):
        np.testing.assert_array_equal(src.get(n), s)


def test_store_split_loads_with_variable_lengths(tmp_path: Path) -> None:
    sets = varied_sets(3)
    write_store(tmp_path / "test.h5", zip("abc", sets, strict=True), ["p", "q", "r", "s"], [0, 1, 1, 2], D)
    split = load_split(tmp_path, "test")
    assert isinstance(split.features, H5Features)
    assert (split.n_images, split.n_captions, split.image_ids) == (3, 4, ["a", "b", "c"])
    np.testing.assert_array_equal(split.features.lengths(), [len(s) for s in sets])


# --- Karpathy JSON captions -----------------------------------------------------------------------------------------


def karpathy_json(path: Path) -> Path:
    images = [
        {"filename": "COCO_1.jpg", "imgid": 0, "cocoid": 7, "split": "train", "sentences": [{"raw": "a dog "}]},
        {
            "filename": "COCO_2.jpg",
            "imgid": 1,
            "cocoid": 0,
            "split": "restval",
            "sentences": [{"raw": f"cat {j}"} for j in range(6)],
        },
        {
            "filename": "COCO_3.jpg",
            "imgid": 2,
            "cocoid": 9,
            "split": "train",
            "sentences": [{"raw": "bird"}, {"raw": "a bird"}],
        },
        {"filename": "COCO_4.jpg", "imgid": 3, "cocoid": 4, "split": "val", "sentences": [{"raw": "val cap"}]},
    ]
    path.write_text(json.dumps({"images": images}))
    return path


def test_karpathy_captions_with_unequal_counts_match_by_id(tmp_path: Path) -> None:
    """Ids match cocoid (not the colliding imgid 0); train includes restval; counts per image may differ."""
    write_precomp(tmp_path, "train", n_images=3, per_caption=False)
    (tmp_path / "train_ids.txt").write_text("9\n0\n7\n")
    split = load_split(tmp_path, "train", captions_json=karpathy_json(tmp_path / "k.json"))
    assert split.captions == ["bird", "a bird", *[f"cat {j}" for j in range(6)], "a dog"]
    np.testing.assert_array_equal(split.cap2img, [0, 0, 1, 1, 1, 1, 1, 1, 2])


def test_karpathy_unmatched_ids_are_listed(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=2, per_caption=False)
    (tmp_path / "train_ids.txt").write_text("7\n12345\n")
    with pytest.raises(DataError, match=re.escape("first unmatched: ['12345']")):
        load_split(tmp_path, "train", captions_json=karpathy_json(tmp_path / "k.json"))


def test_karpathy_matches_store_ids_by_filename(tmp_path: Path) -> None:
    sets = varied_sets(2)
    write_store(tmp_path / "dev.h5", zip(["COCO_4.jpg", "COCO_1.jpg"], sets, strict=True), ["x", "y"], [0, 1], D)
    with pytest.raises(DataError, match=re.escape("COCO_1.jpg")):  # COCO_1 is a train image, not in val
        load_split(tmp_path, "dev", captions_json=karpathy_json(tmp_path / "k.json"))


def test_karpathy_missing_file_raises(tmp_path: Path) -> None:
    write_precomp(tmp_path, "train", n_images=2, per_caption=False)
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path, "train", captions_json=tmp_path / "nope.json")


# --- Split ----------------------------------------------------------------------------------------------------------


class Unreadable(ArrayFeatures):
    def get(self, i: int) -> np.ndarray:
        raise AssertionError("features must not be read")


def test_subset_images_keeps_first_images_without_reading_features() -> None:
    split = toy_split(n_images=4)
    split = Split(split.name, Unreadable(split.features.sets), split.captions, split.cap2img, split.image_ids)
    sub = split.subset_images(2)
    assert (sub.n_images, sub.n_captions, sub.image_ids) == (2, 10, ["0", "1"])
    assert sub.captions == split.captions[:10] and len(sub.features) == 2
    np.testing.assert_array_equal(sub.cap2img, np.arange(10) // 5)


# --- datasets (DATA-1, §3) ------------------------------------------------------------------------------------------


def test_pair_dataset_indexes_per_caption_data1() -> None:
    split = toy_split(n_images=3)
    ds = PairDataset(split, IdentityText(), region_drop=0.0, seed=0)
    assert len(ds) == 15
    feats, ids, i = ds[7]
    assert i == 7 and feats.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(feats, torch.from_numpy(split.features.get(1)))
    assert ids.tolist() == [8, 9, 10]


def test_pair_dataset_is_deterministic_per_seed_epoch_item() -> None:
    split = toy_split(n_images=4)
    a = PairDataset(split, IdentityText(), region_drop=0.5, seed=3)
    b = PairDataset(split, IdentityText(), region_drop=0.5, seed=3)
    forward = [a[i][0] for i in range(len(a))]
    backward = {i: b[i][0] for i in reversed(range(len(b)))}
    for i, f in enumerate(forward):
        torch.testing.assert_close(f, backward[i])
    a.set_epoch(1)
    assert any(a[i][0].shape != f.shape or not torch.equal(a[i][0], f) for i, f in enumerate(forward))


def test_region_drop_keeps_order_and_at_least_one_region() -> None:
    split = toy_split(n_images=4)
    ds = PairDataset(split, IdentityText(), region_drop=0.95, seed=0)
    for i in range(len(ds)):
        feats = ds[i][0]
        assert feats.shape[0] >= 1
        rows = feats[:, 0].tolist()
        assert rows == sorted(rows)  # survivors keep their order (row values increase along the set)


def test_region_drop_rate_is_p() -> None:
    sets = [np.zeros((36, 2), dtype=np.float32)] * 200
    split = Split("train", ArrayFeatures(sets), ["1"] * 200, np.arange(200), [str(n) for n in range(200)])
    ds = PairDataset(split, IdentityText(), region_drop=0.2, seed=0)
    kept = sum(ds[i][0].shape[0] for i in range(len(ds)))
    assert abs(1 - kept / (200 * 36) - 0.2) < 0.01


def test_eval_datasets_return_unique_images_and_plain_captions() -> None:
    split = toy_split(n_images=3)
    images, captions = ImageSetDataset(split), CaptionDataset(split, IdentityText())
    assert (len(images), len(captions)) == (3, 15)
    torch.testing.assert_close(images[2][0], torch.from_numpy(split.features.get(2)))
    assert captions[4][0].tolist() == [5, 6, 7] and captions[4][1] == 4


# --- EpochBatchSampler ----------------------------------------------------------------------------------------------


def test_sampler_is_a_pure_function_of_seed_and_epoch() -> None:
    a = list(EpochBatchSampler(23, 4, drop_last=False, seed=5, epoch=2))
    b = list(EpochBatchSampler(23, 4, drop_last=False, seed=5, epoch=2))
    c = list(EpochBatchSampler(23, 4, drop_last=False, seed=5, epoch=3))
    reference = torch.randperm(23, generator=torch.Generator().manual_seed(5 * 1000003 + 2)).tolist()
    assert a == b != c
    assert [i for batch in a for i in batch] == reference
    assert [len(batch) for batch in a] == [4, 4, 4, 4, 4, 3]


def test_sampler_drop_last_and_start_batch_skip_exactly() -> None:
    full = list(EpochBatchSampler(23, 4, drop_last=True, seed=1, epoch=0))
    sampler = EpochBatchSampler(23, 4, drop_last=True, seed=1, epoch=0, start_batch=2)
    assert len(full) == 5 and len(sampler) == 3 and list(sampler) == full[2:]
    sampler.set_epoch(1)
    assert len(sampler) == 5


def test_sampler_ranks_partition_the_global_batch() -> None:
    full = list(EpochBatchSampler(26, 8, drop_last=False, seed=0))
    parts = [list(EpochBatchSampler(26, 8, drop_last=False, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 4
    for b, batch in enumerate(full):
        assert parts[0][b] + parts[1][b] == batch[: 2 * (len(batch) // 2)]
    with pytest.raises(ValueError, match="multiple of world_size"):
        EpochBatchSampler(26, 6, drop_last=False, seed=0, world_size=4)


# --- collate (DATA-2, DATA-3) ---------------------------------------------------------------------------------------


def test_collate_pairs_pads_with_zeros_and_pad_id_without_sorting() -> None:
    batch = [
        (torch.ones(2, D), torch.tensor([5, 6]), 9),
        (torch.ones(3, D), torch.tensor([7, 8, 9, 4]), 2),
        (torch.ones(1, D), torch.tensor([3]), 4),
    ]
    out = functools.partial(collate_pairs, pad_id=7)(batch)
    assert out["images"].shape == (3, 3, D) and out["tokens"].shape == (3, 4)
    assert out["images"][0, 2].abs().sum() == 0 and out["images"][2, 1:].abs().sum() == 0
    assert out["tokens"][0].tolist() == [5, 6, 7, 7] and out["tokens"][2].tolist() == [3, 7, 7, 7]
    for key, expected in [("image_lengths", [2, 3, 1]), ("token_lengths", [2, 4, 1]), ("index", [9, 2, 4])]:
        assert out[key].dtype == torch.int64 and out[key].tolist() == expected


def test_collate_images_and_tokens() -> None:
    images = collate_images([(torch.ones(1, D), 0), (torch.ones(2, D), 1)])
    tokens = collate_tokens([(torch.tensor([1, 2, 3]), 5), (torch.tensor([1]), 6)])
    assert images["images"].shape == (2, 2, D) and images["image_lengths"].tolist() == [1, 2]
    assert tokens["tokens"].tolist() == [[1, 2, 3], [1, 0, 0]] and tokens["token_lengths"].dtype == torch.int64
    assert tokens["index"].tolist() == [5, 6]


def test_loader_batches_do_not_depend_on_worker_count(tmp_path: Path) -> None:
    """H5 handles open lazily per worker; per-item generators make augmentation worker-independent."""
    make_toy_dataset(tmp_path, n_train=8, n_dev=2, n_test=2, feat_dim=8, fmt="store")
    split = load_split(tmp_path, "train")
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", *CONCEPTS])

    def batches(workers: int) -> list[dict]:
        from vsectl.data.captions import VocabTextProcessor

        ds = PairDataset(split, VocabTextProcessor(vocab, augment=True), region_drop=0.2, seed=1)
        sampler = EpochBatchSampler(len(ds), 8, drop_last=True, seed=1)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_pairs)
        return list(loader)

    for one, two in zip(batches(0), batches(2), strict=True):
        for key in one:
            torch.testing.assert_close(one[key], two[key])


# --- toy dataset ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["precomp", "store"])
def test_toy_dataset_loads_and_captions_name_the_concepts(tmp_path: Path, fmt: str) -> None:
    make_toy_dataset(tmp_path, n_train=20, n_dev=5, n_test=5, feat_dim=8, fmt=fmt)
    assert "not" in (tmp_path / "README.txt").read_text().lower()
    for name, n in [("train", 20), ("dev", 5), ("test", 5)]:
        split = load_split(tmp_path, name, feat_dim=8)
        assert (split.n_images, split.n_captions) == (n, 5 * n)
        lengths = split.features.lengths()
        assert lengths.min() >= 4 and lengths.max() <= 12
        for image in range(n):
            named = [{w for w in word_tokenize(c) if w in CONCEPTS} for c in split.captions[5 * image : 5 * image + 5]]
            assert 2 <= len(named[0]) <= 3 and all(s == named[0] for s in named)
    if fmt == "precomp":
        assert (lengths == 12).all()


def test_toy_dataset_is_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        make_toy_dataset(tmp_path / name, n_train=6, n_dev=2, n_test=2, feat_dim=8, seed=3)
    for file in ("train_ims.npy", "train_caps.txt", "dev_ids.txt"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_npy_features_read_with_pread_equal_the_array_and_catch_truncation(tmp_path, dtype):
    from vsectl.data.features import NpyFeatures

    arr = np.random.default_rng(0).normal(size=(10, 3, 4)).astype(dtype)
    np.save(tmp_path / "x_ims.npy", arr)
    np.save(tmp_path / "f_ims.npy", np.asfortranarray(arr))  # Fortran order falls back to the memmap
    for name in ("x_ims.npy", "f_ims.npy"):
        feats = NpyFeatures(tmp_path / name, row_stride=5)
        assert len(feats) == 2
        for i in range(2):
            got = feats.get(i)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, arr[5 * i].astype(np.float32))
    data = (tmp_path / "x_ims.npy").read_bytes()
    (tmp_path / "t_ims.npy").write_bytes(data[: len(data) - 8])
    with pytest.raises(DataError, match="truncated"):
        NpyFeatures(tmp_path / "t_ims.npy").get(9)
