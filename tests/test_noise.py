"""Noisy correspondence (vsectl.noisy.noise, vsectl.noisy.pair_loss): drawing and reading noise indices, what a run
records, resume, the refusals, and the per-pair loss against a double loop."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.data.sources import load_split
from vsectl.errors import ConfigError, DataError
from vsectl.losses import ContrastiveLoss
from vsectl.noisy.noise import draw_noise, read_noise_index
from vsectl.noisy.pair_loss import PairSample, read_pair_losses, separation
from vsectl.training import setup_run, train

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
TINY = REPO / "recipes" / "tiny.yaml"


def uneven_clean(n_images: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(n_images), rng.integers(1, 4, size=n_images))


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.8, 0.99])
def test_drawn_noise_mismatches_exactly_the_ratio_and_keeps_each_images_pair_count(ratio):
    clean = uneven_clean()
    noisy = draw_noise(clean, ratio, seed=3)
    changed = [k for k in range(clean.size) if noisy[k] != clean[k]]
    assert len(changed) == int(ratio * clean.size)
    assert Counter(noisy.tolist()) == Counter(clean.tolist())  # a shuffle among the chosen captions
    assert np.array_equal(noisy, draw_noise(clean, ratio, seed=3))
    assert not np.array_equal(noisy, draw_noise(clean, ratio, seed=4))


def test_noise_that_cannot_mismatch_is_refused():
    with pytest.raises(ConfigError, match="cannot be paired with wrong images"):
        draw_noise(np.arange(10), 0.1, seed=0)  # one chosen caption has nobody to swap with


def test_per_caption_index_files_are_read_as_saved(tmp_path):
    clean = uneven_clean()
    noisy = draw_noise(clean, 0.3, seed=1)
    np.save(tmp_path / "ncr.npy", noisy)
    got, layout = read_noise_index(tmp_path / "ncr.npy", clean, 40)
    assert layout == "per-caption" and np.array_equal(got, noisy)


def test_per_image_index_files_pair_every_caption_with_its_images_replacement(tmp_path):
    clean = uneven_clean()
    per_image = np.random.default_rng(0).permutation(40)
    np.save(tmp_path / "decl.npy", per_image)
    got, layout = read_noise_index(tmp_path / "decl.npy", clean, 40)
    assert layout == "per-image"
    assert got.tolist() == [int(per_image[clean[k]]) for k in range(clean.size)]


def test_row_numbers_of_per_caption_rows_are_divided_by_the_stride(tmp_path):
    clean = np.repeat(np.arange(8), 5)
    rows = np.arange(40)  # a clean index that counts rows stored once per caption
    rows[[0, 7]] = rows[[7, 0]]
    np.save(tmp_path / "rows.npy", rows)
    got, _ = read_noise_index(tmp_path / "rows.npy", clean, 8, row_stride=5)
    assert got.tolist() == [1, *clean[1:7].tolist(), 0, *clean[8:].tolist()]


@pytest.mark.parametrize(("array", "match"), [
    (np.arange(7), "has 7 entries, but the training split has 20 captions"),
    (np.full(20, 12), "entry 0 names image 12, outside the 10 training images"),
    (np.zeros(20, dtype=np.float32), "1-D integer array"),
])
def test_bad_index_files_are_refused_in_one_line(tmp_path, array, match):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=match):
        read_noise_index(tmp_path / "bad.npy", np.repeat(np.arange(10), 2), 10)


@pytest.mark.parametrize(("overrides", "match"), [
    (["data.noise.ratio=1.0"], r"must be in \[0, 1\)"),
    (["data.noise.ratio=0.2", "data.noise.index_file=x.npy"], "exclusive"),
    (["data.noise.ratio=0.2", "data.train_split=test"], "dev and test pairs stay clean"),
    (["data.noise.index_file=x.npy", "data.train_split=dev"], "dev and test pairs stay clean"),
])
def test_noise_settings_that_cannot_be_meant_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(TINY, overrides)


def verify_failure(data: Path, target: Path) -> str:
    """`data verify DATA --noise TARGET` prints its report, then fails with exit code 2 and one error line."""
    result = runner.invoke(app, ["-q", "data", "verify", str(data), "--noise", str(target)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith("error: ") and "Traceback" not in result.output
    return lines[-1]


def noisy_cfg(toy_root: Path, *extra: str):
    return load_recipe(TINY, [f"data.root={toy_root}", "train.deterministic=true", "data.noise.ratio=0.4",
                              "data.noise.log_pairs=20", *extra])


def test_a_noisy_run_trains_on_the_recorded_pairs_and_keeps_dev_clean(toy_root, tmp_path):
    cfg = noisy_cfg(toy_root)
    run = setup_run(cfg, tmp_path, "cpu", resume=False, progress=None)
    clean = load_split(toy_root, "train").cap2img
    record = json.loads((run.run_dir / "noise.json").read_text())
    saved = np.load(run.run_dir / "noise_index.npy")
    assert np.array_equal(run.train_split.cap2img, saved) and np.array_equal(run.noise.clean, clean)
    assert record["n_noisy"] == int((saved != clean).sum()) == int(0.4 * clean.size)
    assert record["fingerprint"] == run.noise.fingerprint and len(record["examples"]) == 20
    assert np.array_equal(run.val_split.cap2img, load_split(toy_root, "dev").subset_images(30).cap2img)


def test_a_noisy_run_logs_pair_losses_verifies_and_refuses_a_changed_index(toy_root, tmp_path):
    cfg = noisy_cfg(toy_root)
    run_dir = train(cfg, out_root=tmp_path, device="cpu")
    records = read_pair_losses(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert sum(records[0]["noisy"]) == 20 and len(records[0]["loss"]) == 40
    assert all(np.isfinite(r["loss"]).all() for r in records)
    assert [s["epoch"] for s in separation(records)] == [0, 1]
    for target in (run_dir, run_dir / "noise_index.npy"):  # the run's record and its index file both check out
        result = runner.invoke(app, ["-q", "data", "verify", str(toy_root), "--noise", str(target), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["noise"]["n_noisy"] == int(0.4 * load_split(toy_root, "train").n_captions)
    result = runner.invoke(app, ["-q", "plot-pair-loss", str(run_dir)])
    assert result.exit_code == 0 and Path(result.stdout.strip()).stat().st_size > 1000
    longer = load_recipe(TINY, [f"data.root={toy_root}", "train.deterministic=true", "data.noise.ratio=0.4",
                                "data.noise.log_pairs=20", "train.epochs=3"])
    train(longer, out_root=tmp_path, device="cpu", resume=True)
    assert [r["epoch"] for r in read_pair_losses(run_dir)] == [0, 1, 2]
    record = json.loads((run_dir / "noise.json").read_text())
    (run_dir / "noise.json").write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    with pytest.raises(DataError, match="records other noisy pairs"):
        train(longer, out_root=tmp_path, device="cpu", resume=True)
    assert "records fingerprint 000000000000" in verify_failure(toy_root, run_dir)
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "config.yaml").write_text((run_dir / "config.yaml").read_text().replace("ratio: 0.4", "ratio: 0.0"))
    assert "trained without data.noise" in verify_failure(toy_root, clean)
    assert "has no pair_losses.jsonl" in one_error_line(runner.invoke(app, ["-q", "plot-pair-loss", str(clean)]))


def test_per_pair_losses_sum_to_the_batch_loss_and_match_a_double_loop():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    cap = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    loss = ContrastiveLoss(margin=0.2)
    s = (img @ cap.T).tolist()
    for hardest in (False, True):
        pool = max if hardest else sum
        ref = [pool([max(0.0, 0.2 + s[i][j] - s[i][i]) for j in range(6) if j != i])
               + pool([max(0.0, 0.2 + s[j][i] - s[i][i]) for j in range(6) if j != i]) for i in range(6)]
        per = loss.per_pair(img, cap, hardest_negative=hardest)
        torch.testing.assert_close(per, torch.tensor(ref), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(per.sum(), loss(img, cap, hardest_negative=hardest))


def test_the_pair_sample_holds_both_kinds_and_separation_is_the_auc():
    noisy = np.zeros(100, dtype=bool)
    noisy[::4] = True
    sample = PairSample.draw(noisy, per_kind=10, seed=0)
    assert sample.noisy.sum() == 10 and (~sample.noisy).sum() == 10
    assert np.array_equal(noisy[sample.captions], sample.noisy)
    rec = {"epoch": 0, "loss": [1.0, 2.0, 3.0, 2.0], "noisy": [False, False, True, True]}
    # noisy losses 3 and 2 against clean 1 and 2: pairs (3>1, 3>2, 2>1, 2=2 counts half) → 3.5 / 4
    assert separation([rec])[0]["auc"] == pytest.approx(3.5 / 4)


@pytest.mark.parametrize(("index", "match"), [
    (None, "does not exist"),
    (np.arange(7), "has 7 entries"),
    (np.full(600, 10_000), "outside the"),
    ("not a npy file", "lacks the .npy header"),
])
def test_a_bad_noise_index_is_refused_before_the_run_folder_is_made(toy_root, tmp_path, index, match):
    path = tmp_path / "index.npy"
    if isinstance(index, str):
        path.write_text(index)
    elif index is not None:
        np.save(path, index)
    out = tmp_path / "runs"
    result = runner.invoke(app, ["-q", "train", str(TINY), "--set", f"data.root={toy_root}", "--set",
                                 f"data.noise.index_file={path}", "--out", str(out), "--device", "cpu"])
    assert match in one_error_line(result)
    assert not (out / "tiny").exists() and not list(out.glob(".*"))  # no run folder, no lock file left
