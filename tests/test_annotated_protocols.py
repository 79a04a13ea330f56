"""ECCV Caption and CxC (vsectl.scoring.annotated_protocols): the COCO id mapping against the eccv-caption package's own
files, every metric against the package's reference code on the full COCO 5K shape, and the refusals."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.errors import ConfigError
from vsectl.scoring.coco_annotations import annotation_dir, split_ids, standard_ids
from vsectl.scoring.protocols import PROTOCOLS, evaluate_protocol, expand

pytest.importorskip("eccv_caption")  # the 'eccv' extra; `make setup` installs it
runner = CliRunner()


@dataclass
class FakeSplit:
    """What a protocol's ground truth reads of a split."""

    cap2img: np.ndarray
    image_ids: list[str]

    @property
    def n_images(self) -> int:
        return len(self.image_ids)


def test_the_standard_order_matches_the_packages_files():
    folder = annotation_dir()
    ids = standard_ids()
    caption_ids = np.load(folder / "coco_test_ids.npy")
    owner = json.loads((folder / "original_caption_to_image.json").read_text())
    assert np.array_equal(ids.caption_ids, caption_ids) and ids.caption_ids.size == 25_000
    for j in range(0, 5000, 7):  # captions 5j..5j+4 belong to image j
        assert {owner[str(c)][0] for c in caption_ids[5 * j: 5 * j + 5]} == {int(ids.image_ids[j])}
    by_image = json.loads((folder / "original_image_to_caption.json").read_text())
    assert sorted(map(int, by_image)) == sorted(ids.image_ids.tolist())


def top(queries: torch.Tensor, candidates: torch.Tensor, k: int) -> np.ndarray:
    """Each query's k best candidates, best first, a block of queries at a time."""
    return torch.cat([(queries[s: s + 2000] @ candidates.T).topk(k, dim=1).indices
                      for s in range(0, queries.shape[0], 2000)]).numpy()


def reference_scores(img: torch.Tensor, cap: torch.Tensor, image_ids: np.ndarray, caption_ids: np.ndarray,
                     pm_dir: Path) -> dict:
    """eccv_caption.Metrics on the top-60 caption and top-25 image lists of the same similarities."""
    from eccv_caption import Metrics

    i2t = {int(image_ids[i]): caption_ids[row].tolist() for i, row in enumerate(top(img, cap, 60))}
    t2i = {int(caption_ids[k]): image_ids[row].tolist() for k, row in enumerate(top(cap, img, 25))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = Metrics(extra_file_dir=str(pm_dir))
        out = metrics.compute_all_metrics(i2t, t2i, target_metrics=(
            "eccv_r1", "eccv_map_at_r", "eccv_rprecision", "coco_5k_recalls", "cxc_recalls"), Ks=(1, 5, 10))
        # asked through compute_all_metrics, the package files PMRP under the bare keys 'i2t' and 't2i'
        return {**out, "pmrp": metrics.pmrp({"i2t": i2t, "t2i": t2i}, "all")}


def plausible_files(folder: Path, image_ids: np.ndarray, caption_ids: np.ndarray, seed: int = 0) -> Path:
    """Made-up plausible matches in the package's layout: up to 25 captions per image, up to 20 images per caption
    (the real files are not in the package), on a subset of the queries."""
    rng = np.random.default_rng(seed)
    i2t = {str(i): rng.choice(caption_ids, rng.integers(1, 26), replace=False).tolist() for i in image_ids[::3]}
    t2i = {str(c): rng.choice(image_ids, rng.integers(1, 21), replace=False).tolist() for c in caption_ids[::7]}
    for name, pairs in (("image_to_caption", i2t), ("caption_to_image", t2i)):
        (folder / f"pm_{name}.json").write_text(json.dumps({k: [int(x) for x in v] for k, v in pairs.items()}))
    return folder


def test_every_metric_equals_the_packages_reference_on_the_full_coco_5k_shape(tmp_path):
    """Seeded 5,000 × 25,000 float64 embeddings (no exact ties), captions near their image so ranks spread."""
    g = torch.Generator().manual_seed(0)
    img = torch.randn(5000, 16, generator=g, dtype=torch.float64)
    cap2img = np.arange(25_000) // 5
    cap = img[torch.from_numpy(cap2img)] + 1.2 * torch.randn(25_000, 16, generator=g, dtype=torch.float64)
    ids = standard_ids()
    pm_dir = plausible_files(tmp_path, ids.image_ids, ids.caption_ids)
    split = FakeSplit(cap2img, [str(i) for i in range(5000)])
    got = {}
    for p in expand("extended"):
        p = p.with_annotations(pm_dir=pm_dir)
        got[p.name] = evaluate_protocol([img], [cap], p.ground_truth(split, Path(".")), p)["metrics"]
    ref = reference_scores(img, cap, ids.image_ids, ids.caption_ids, pm_dir)
    pairs = [("eccv", "map_at_r", "eccv_map_at_r"), ("eccv", "r_precision", "eccv_rprecision"),
             ("eccv", "r1", "eccv_r1"), ("cxc", "r1", "cxc_r1"), ("cxc", "r5", "cxc_r5"), ("cxc", "r10", "cxc_r10"),
             ("eccv", "coco5k_r1", "coco_5k_r1"), ("cxc", "coco5k_r5", "coco_5k_r5"),
             ("cxc", "coco5k_r10", "coco_5k_r10"), ("eccv", "pcm_r_precision", "pmrp")]
    for protocol, ours, theirs in pairs:
        for d in ("i2t", "t2i"):
            assert got[protocol][f"{d}_{ours}"] / 100 == pytest.approx(float(ref[theirs][d]), abs=1e-9), (ours, d)
    assert 0.01 < got["eccv"]["i2t_map_at_r"] / 100 and got["cxc"]["i2t_r10"] > 40  # not a vacuous comparison


def test_images_in_another_order_with_their_coco_ids_score_the_same():
    ids = standard_ids()
    perm = np.random.default_rng(0).permutation(5000)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(5000, 8, generator=g, dtype=torch.float64)
    cap = img.repeat_interleave(5, 0) + torch.randn(25_000, 8, generator=g, dtype=torch.float64)
    standard = FakeSplit(np.arange(25_000) // 5, [str(i) for i in ids.image_ids])
    moved_caps = (perm.argsort()[np.arange(25_000) // 5] * 5 + np.arange(25_000) % 5).argsort()  # caption order
    moved = FakeSplit(np.arange(25_000) // 5, [str(i) for i in ids.image_ids[perm]])
    p = PROTOCOLS.get("cxc")
    a = evaluate_protocol([img], [cap], p.ground_truth(standard, Path(".")), p)["metrics"]
    b = evaluate_protocol([img[torch.from_numpy(perm)]], [cap[torch.from_numpy(
        (perm[:, None] * 5 + np.arange(5)).reshape(-1))]], p.ground_truth(moved, Path(".")), p)["metrics"]
    assert moved_caps.size == 25_000
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


def test_a_caption_id_file_that_contradicts_the_split_is_refused(tmp_path):
    ids = standard_ids()
    swapped = ids.caption_ids.copy()
    swapped[[0, 5]] = swapped[[5, 0]]  # caption 0 now names a caption of image 1
    (tmp_path / "ids.txt").write_text("\n".join(map(str, swapped)))
    with pytest.raises(ConfigError, match="caption 0 .* belongs to COCO image"):
        split_ids(5000, np.arange(25_000) // 5, [str(i) for i in ids.image_ids], caption_ids_file=tmp_path / "ids.txt")
    with pytest.raises(ConfigError, match="not in the standard COCO 5K order"):
        split_ids(5000, np.arange(25_000) % 5000, [str(i) for i in range(5000)])


def test_eccv_on_a_split_that_is_not_coco_5k_is_refused_before_encoding(clipart_run):
    result = runner.invoke(app, ["-q", "eval", str(clipart_run["run"]), "--protocol", "eccv", "--split", "test",
                                 "--device", "cpu"])
    assert "needs the 5,000-image testall split" in one_error_line(result)
    result = runner.invoke(app, ["-q", "eval", str(clipart_run["run"]), "--protocol", "f30k", "--pcm", "x",
                                 "--device", "cpu"])
    assert "reads no extra annotation files (pm_dir)" in one_error_line(result)


def test_a_missing_extra_is_named_in_one_line(monkeypatch):
    import vsectl.scoring.coco_annotations as annotations

    monkeypatch.setattr(annotations.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'vsectl\[eccv\]'"):
        PROTOCOLS.get("eccv").ground_truth(FakeSplit(np.arange(25_000) // 5, [str(i) for i in range(5000)]),
                                           Path("."))
