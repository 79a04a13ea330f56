"""Bad input, one case each: one clear `error:` line, exit code 2, no traceback, and nothing already there damaged.

The table in docs/bad_inputs.md lists the same cases with the message each gets. Every case runs the real CLI
in-process; files that exist before the call (a finished run, a dataset) are hashed before and after.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cli_checks import hint_options, one_error_line
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.data.toy import make_toy_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny.yaml"
FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--device", "cpu"]


@dataclass
class World:
    """What the cases start from: a toy dataset in each layout and a finished tiny run (shared, never modified)."""

    tmp: Path
    toy: Path  # precomp layout
    store: Path  # HDF5 store layout
    run: Path  # a finished tiny run on `toy`
    other: Path  # the same with a 32-d joint space
    raw: Path  # a raw image dataset (two PNGs)


@dataclass
class Case:
    id: str
    argv: Callable[[World, Path], list[str]]  # (world, this case's scratch folder) → CLI arguments
    expect: str  # a substring of the error line
    protected: Callable[[World, Path], list[Path]] = field(default=lambda w, t: [])  # files that must not change


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def train(recipe: Path | str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(recipe), "--out", str(out), "--set", f"data.root={data}", *FAST, *extra]


def toy_with(w: World, t: Path, edit: Callable[[Path], None]) -> Path:
    root = copy_tree(w.toy, t / "toy")
    edit(root)
    return root


def set_features(root: Path, image: int, value: float) -> None:
    ims = np.load(root / "train_ims.npy", mmap_mode="r+")
    ims[image, 0, 0] = value
    ims.flush()


def drop_last_line(path: Path) -> None:
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")


def blank_line(path: Path, n: int) -> None:
    lines = path.read_text().splitlines()
    lines[n] = ""
    path.write_text("\n".join(lines) + "\n")


def store_with(w: World, t: Path, edit: Callable[[Path], None]) -> Path:
    root = copy_tree(w.store, t / "store")
    edit(root / "train.h5")
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_copy(w: World, t: Path, edit: Callable[[Path], None]) -> Path:
    run = copy_tree(w.run, t / "run")
    edit(run)
    return run


def resume_with_foreign_checkpoint(w: World, t: Path) -> list[str]:
    """A copy of the run whose last checkpoint was replaced by one of a 32-d model, then resumed with its recipe."""
    argv = resume(w, t, "--set", "train.epochs=2")
    last = t / w.run.name / "checkpoints" / "last"
    shutil.rmtree(last)
    shutil.copytree(w.other / "checkpoints" / "last", last)
    return argv


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def resume(w: World, t: Path, *extra: str) -> list[str]:
    """Resume a copy of the finished run (in t) with `extra` options."""
    copy_tree(w.run, t / w.run.name)
    return ["train", str(TINY), "--out", str(t), "--set", f"name={w.run.name}", "--set", f"data.root={w.toy}",
            "--resume", *FAST, *extra]


def collection(t: Path, splits: tuple[str, ...] = ("test",), dim: int = 32) -> Path:
    """Images with features and no captions (what `vsectl embed` serves), as stores under t/collection."""
    from vsectl.data.store import StoreWriter

    rng = np.random.default_rng(0)
    for split in splits:
        with StoreWriter(t / "collection" / f"{split}.h5", feat_dim=dim) as writer:
            for k in range(14):
                writer.add_image(f"im{k}", rng.standard_normal((4, dim)).astype(np.float32))
    return t / "collection"


def run_files(w: World, t: Path) -> list[Path]:
    return sorted(p for p in (t / "run").rglob("*") if p.is_file()) if (t / "run").exists() else []


CASES = [
    Case("recipe file missing", lambda w, t: train(t / "nope.yaml", w.toy, t), "nope.yaml"),
    Case("recipe file empty", lambda w, t: train(write(t / "e.yaml", ""), w.toy, t), "empty"),
    Case("recipe not YAML", lambda w, t: train(write(t / "y.yaml", "train: [1, 2\n"), w.toy, t), "YAML"),
    Case("recipe unknown key", lambda w, t: train(write(t / "k.yaml", TINY.read_text().replace("epochs:", "epochz:")),
                                                  w.toy, t), "did you mean 'train.epochs'"),
    Case("recipe wrong type", lambda w, t: train(TINY, w.toy, t, "--set", "train.epochs=ten"), "train.epochs"),
    Case("--set without =", lambda w, t: train(TINY, w.toy, t, "--set", "train.epochs"), "key.path=value"),
    Case("unknown pooler", lambda w, t: train(TINY, w.toy, t, "--set", "model.image.pool.name=median"), "gpo"),
    Case("an option the pooler does not take", lambda w, t: train(TINY, w.toy, t, "--set", "model.image.pool.k=5"),
         "pooler 'gpo' takes name, d_pe, d_hidden, temperature"),
    Case("data folder missing", lambda w, t: train(TINY, t / "nowhere", t), "does not exist"),
    Case("split file missing", lambda w, t: train(TINY, t, t / "out"), "holds no feature files"),
    Case("empty feature file", lambda w, t: train(TINY, toy_with(w, t, lambda r: (r / "train_ims.npy").write_bytes(
        b"")), t / "out"), "train_ims.npy"),
    Case("wrong feature dimension", lambda w, t: train(TINY, w.toy, t, "--set", "model.image.feat_dim=48"),
         "features are 32-d but model.image.feat_dim is 48"),
    Case("NaN features", lambda w, t: train(TINY, toy_with(w, t, lambda r: set_features(r, 0, np.nan)), t / "out"),
         "NaN or inf"),
    Case("inf features", lambda w, t: train(TINY, toy_with(w, t, lambda r: set_features(r, -1, np.inf)), t / "out"),
         "NaN or inf"),
    Case("caption lines disagree with features", lambda w, t: train(TINY, toy_with(
        w, t, lambda r: drop_last_line(r / "train_caps.txt")), t / "out"), "captions"),
    Case("empty caption", lambda w, t: train(TINY, toy_with(w, t, lambda r: blank_line(r / "train_caps.txt", 3)),
                                             t / "out"), "line 4 is an empty caption"),
    Case("HDF5 store truncated", lambda w, t: train(TINY, store_with(w, t, truncate), t / "out"), "train.h5"),
    Case("HDF5 store is not HDF5", lambda w, t: train(TINY, store_with(w, t, lambda p: p.write_bytes(b"\x00" * 999)),
                                                      t / "out"), "train.h5"),
    Case("HDF5 store empty file", lambda w, t: train(TINY, store_with(w, t, lambda p: p.write_bytes(b"")), t / "out"),
         "train.h5"),
    Case("checkpoint from another model configuration", lambda w, t: resume_with_foreign_checkpoint(w, t),
         "checkpoint", lambda w, t: sorted(p for p in (t / w.run.name).rglob("*") if p.is_file())),
    Case("run folder without a checkpoint", lambda w, t: ["eval", str(run_copy(
        w, t, lambda r: shutil.rmtree(r / "checkpoints"))), "--device", "cpu"], "checkpoint", run_files),
    Case("run folder missing", lambda w, t: ["eval", str(t / "no-run"), "--device", "cpu"], "no-run"),
    Case("resume with another configuration", lambda w, t: resume(w, t, "--set", "model.embed_dim=32"),
         "model.embed_dim", lambda w, t: sorted(p for p in (t / w.run.name).rglob("*") if p.is_file())),
    Case("output folder not writable", lambda w, t: train(TINY, w.toy, write(t / "a-file", "x") / "runs"),
         "a-file", lambda w, t: [t / "a-file"]),
    Case("unknown evaluation protocol", lambda w, t: ["eval", str(w.run), "--protocol", "coco10k"], "coco10k"),
    Case("COCO protocols on a split that is not COCO testall", lambda w, t: [
        "eval", str(w.run), "--protocol", "all", "--split", "test", "--device", "cpu"], "use --protocol f30k"),
    Case("coco5k on a 10-image split", lambda w, t: ["eval", str(w.run), "--protocol", "coco5k", "--split", "test",
                                                      "--device", "cpu"], "needs the 5,000-image testall split"),
    Case("eval on a data root that does not exist", lambda w, t: ["eval", str(w.run), "--data-root",
                                                                   str(t / "nowhere"), "--device", "cpu"],
         "set data.root (--data-root FOLDER)"),
    Case("eval on features of another width", lambda w, t: [
        "eval", str(w.run), "--data-root", str(make_toy_dataset(t / "wide", n_train=4, n_dev=4, n_test=10, seed=0,
                                                                  feat_dim=16)), "--device", "cpu"],
         "features are 16-d, but the run was trained on 32-d features; give --data-root a folder of 32-d features"),
    Case("eval on a raw dataset", lambda w, t: ["eval", str(w.run), "--data-root", str(w.raw), "--device", "cpu"],
         "then use --data-root"),
    Case("eval on images without captions", lambda w, t: ["eval", str(w.run), "--data-root", str(collection(t)),
                                                           "--device", "cpu"], "it is a search collection"),
    Case("train on images without captions", lambda w, t: train(TINY, collection(t, ("train", "dev")), t / "out"),
         "it is a search collection"),
    Case("toy data not made yet", lambda w, t: train(TINY, t / "data" / "toy", t / "out"),
         "create the toy data with: vsectl data toy --out"),
    Case("raw dataset given as data.root", lambda w, t: train(TINY, w.raw, t / "out"), "run vsectl extract first"),
    Case("checkpoint name that a run does not keep", lambda w, t: ["eval", str(w.run), "--checkpoint", "latest"],
         "a run keeps best and last"),
    Case("abbreviated backbone name", lambda w, t: ["extract", "--backbone", "effnet", "--data", str(w.raw), "--out",
                                                    str(t / "f")], "did you mean 'efficientnet-lite0'?"),
    Case("a file given as the run", lambda w, t: ["eval", str(write(t / "model_best.pth", "x"))],
         "is a file, not a vsectl run"),
    Case("text model hub id not in the cache", lambda w, t: train(TINY, w.toy, t / "out", "--set",
                                                                  "model.text.encoder=transformers", "--set",
                                                                  "model.text.pretrained=no-org/no-model"),
         "not in the Hugging Face cache"),
    Case("unknown backbone", lambda w, t: ["extract", "--backbone", "alexnet", "--data", str(w.raw), "--out",
                                           str(t / "f")], "alexnet"),
    Case("raw dataset missing", lambda w, t: ["extract", "--backbone", "efficientnet-lite0", "--data",
                                              str(t / "raw"), "--out", str(t / "f")], "does not exist"),
    Case("caption JSON not JSON", lambda w, t: ["data", "prepare", "karpathy", "--json", str(write(
        t / "d.json", "{not json")), "--images", str(w.raw / "images"), "--out", str(t / "o")], "not valid JSON"),
    Case("precomp captions disagree with features", lambda w, t: ["data", "import-precomp", str(toy_with(
        w, t, lambda r: drop_last_line(r / "dev_caps.txt"))), "--out", str(t / "o")], "dev_caps.txt"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from PIL import Image

    tmp = tmp_path_factory.mktemp("world")
    toy = make_toy_dataset(tmp / "toy", n_train=40, n_dev=10, n_test=10, seed=0)
    store = make_toy_dataset(tmp / "store", n_train=40, n_dev=10, n_test=10, seed=0, fmt="store")
    for name, extra in (("done", []), ("other", ["--set", "model.embed_dim=32"])):
        result = CliRunner().invoke(app, ["-q", *train(TINY, toy, tmp / "runs", "--set", f"name={name}", *extra)])
        assert result.exit_code == 0, result.output
    raw = tmp / "raw"
    (raw / "images").mkdir(parents=True)
    for k in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * k, dtype=np.uint8)).save(raw / "images" / f"{k}.png")
    entries = [{"filename": f"{k}.png", "split": "train", "sentences": [{"raw": "a grey square"}]} for k in range(2)]
    (raw / "dataset.json").write_text(json.dumps({"images": entries}))
    (raw / "manifest.json").write_text(json.dumps({"format": "vsectl-raw", "version": 1, "image_root": "images"}))
    return World(tmp, toy, store, tmp / "runs" / "done", tmp / "runs" / "other", raw)


def digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def world_files(w: World) -> list[Path]:
    return sorted(p for root in (w.toy, w.store, w.run, w.other, w.raw) for p in root.rglob("*") if p.is_file())


def test_at_least_twenty_cases() -> None:
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(case: Case, world: World, tmp_path: Path) -> None:
    before_world = digest(world_files(world))
    argv = case.argv(world, tmp_path)
    protected = case.protected(world, tmp_path)
    before = digest(protected)
    result = CliRunner().invoke(app, ["-q", *argv])
    line = one_error_line(result)
    print(f"\n{case.id}\t{line}")  # the docs table (docs/bad_inputs.md) quotes these
    assert case.expect in line, line
    assert hint_options(line, argv, app) == []  # a hint names only options its command has
    assert digest(protected) == before  # nothing that was there is damaged
    assert digest(world_files(world)) == before_world


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_one(world: World, tmp_path: Path, monkeypatch) -> None:
    import vsectl.checkpoint

    argv = resume(world, tmp_path, "--set", "train.epochs=2")
    run = tmp_path / world.run.name
    before = digest(sorted(p for p in run.rglob("*") if p.is_file()))

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)

    monkeypatch.setattr(vsectl.checkpoint, "save_file", full)
    line = one_error_line(CliRunner().invoke(app, ["-q", *argv]))
    assert "no space left on the device while writing" in line
    kept = ("metrics.jsonl", "config.yaml", "env.json")  # the epoch that ran is logged; config.yaml now says
    # train.epochs=2 and env.json records that resolved length (run_length)
    after = digest(sorted(p for p in run.rglob("*") if p.is_file() and p.name not in kept))
    assert after == {k: v for k, v in before.items() if not k.endswith(kept)}
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written checkpoint is removed


def test_a_real_svg_that_hangs_the_renderer_is_skipped_and_counted(tmp_path: Path) -> None:
    """Nested <use> 8 levels deep, 8 wide: 16.7 M circles; cairosvg takes far longer than the 2 s allowed."""
    from vsectl.data import openclipart as oc

    src = tmp_path / "svg"
    src.mkdir()
    ns = ('xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
          'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/" '
          'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"')

    def meta(title: str) -> str:
        return (f'<metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title><dc:subject><rdf:Bag>'
                f"<rdf:li>{title.split()[-1]}</rdf:li></rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata>")

    levels = "".join(f'<g id="a{k}">' + f'<use xlink:href="#a{k - 1}"/>' * 8 + "</g>" for k in range(1, 9))
    (src / "bomb.svg").write_text(f'<svg {ns} width="100" height="100">{meta("Happy zebra")}<defs>'
                                  f'<g id="a0"><circle cx="5" cy="5" r="4" fill="red"/></g>{levels}</defs>'
                                  '<use xlink:href="#a8"/></svg>')
    animals = ["cat", "dog", "horse", "cow", "sheep", "goat", "duck", "goose"]
    for k, animal in enumerate(animals):
        (src / f"{animal}.svg").write_text(f'<svg {ns} width="10" height="10">{meta(f"Happy {animal}")}'
                                           f'<circle cx="5" cy="5" r="{1 + k % 4}" fill="#{k}0{k}"/></svg>')
    out = oc.prepare_openclipart(tmp_path / "out", from_dir=src, size=16, workers=2, timeout=2.0, min_test=2,
                                 dev_fraction=0.2)
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    assert manifest["counts"]["render_timed_out"] == 1 and manifest["counts"]["rendered"] == len(animals)
    assert not (Path(out) / "images" / "bomb.png").exists()


def test_a_caption_of_unknown_words_only_is_kept_counted_and_ranked(world: World, tmp_path: Path) -> None:
    toy = toy_with(world, tmp_path, lambda r: blank_line(r / "test_caps.txt", 0))
    lines = (toy / "test_caps.txt").read_text().splitlines()
    lines[0] = "zzxq qqzy vvwk"  # no word of it is in the run's vocabulary
    (toy / "test_caps.txt").write_text("\n".join(lines) + "\n")
    run = run_copy(world, tmp_path, lambda r: None)
    result = CliRunner().invoke(app, ["eval", str(run), "--data-root", str(toy), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert "1 of 50 captions have no word in the vocabulary" in " ".join(result.stderr.split())
    assert json.loads(result.stdout)["f30k"]["n_captions"] == 50  # kept: it is still a query
