"""Importing the official VSE∞ checkpoints: safe loading, exact embeddings and tokens, ordinary runs, clear refusals.

The fixtures (tests/fixtures/official_vse_infty, see its README) were built, trained for 4 steps and saved by the
official code itself; io.npz holds its inputs and its own `forward_emb` outputs in eval mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.builders import load_run
from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.errors import CheckpointError
from vsectl.importers.official import import_official
from vsectl.importers.official_opt import IGNORED, MAPPED, build_config
from vsectl.importers.safe_load import load_torch_pickle

FIX = Path(__file__).parent / "fixtures" / "official_vse_infty"
BIGRU = FIX / "bigru" / "model_best.pth"
BERT = FIX / "master" / "model_best.pth"
VOCAB = FIX / "bigru" / "vocab" / "f30k_precomp_vocab.json"
BERT_DIR = FIX / "master" / "bert"
REPO = Path(__file__).resolve().parent.parent


def _import(kind: str, out: Path) -> Path:
    if kind == "bigru":
        import_official(BIGRU, out, vocab=VOCAB)
    else:
        import_official(BERT, out, text_model=str(BERT_DIR))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imported")
    return {kind: _import(kind, root / kind) for kind in ("bigru", "bert")}


def _official(kind: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIX / ("bigru" if kind == "bigru" else "master") / "io.npz"))


def _captions(kind: str) -> list[str]:
    folder = FIX / ("bigru" if kind == "bigru" else "master")
    return (folder / "captions.txt").read_text(encoding="utf-8").splitlines()


def _error_line(argv: list[str]) -> str:
    return one_error_line(CliRunner().invoke(app, ["-q", *argv]))


def _resave(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - edit(ckpt dict) changes it in place
    ckpt = load_torch_pickle(src)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------------
# exactness against the official code's own outputs


@pytest.mark.parametrize("kind", ["bigru", "bert"])
def test_imported_model_gives_the_official_embeddings(kind: str, runs: dict[str, Path]) -> None:
    io = _official(kind)
    _, model, _ = load_run(runs[kind])
    with torch.no_grad():
        img, _ = model.encode_image(torch.from_numpy(io["images"]), torch.from_numpy(io["image_lengths"]))
        cap, _ = model.encode_text(torch.from_numpy(io["captions"]), torch.from_numpy(io["caption_lengths"]))
    assert (img - torch.from_numpy(io["img_emb"])).abs().max() <= 1e-5
    assert (cap - torch.from_numpy(io["cap_emb"])).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["bigru", "bert"])
def test_vsectl_tokenisation_gives_the_official_token_ids(kind: str, runs: dict[str, Path]) -> None:
    io = _official(kind)
    _, _, text = load_run(runs[kind])
    processor = text.processor(augment=False)
    for caption, row, n in zip(_captions(kind), io["captions"], io["caption_lengths"], strict=True):
        assert processor.encode(caption) == row[:n].tolist(), caption


def test_bert_width_comes_from_the_bert_config_not_768(runs: dict[str, Path]) -> None:
    _, model, _ = load_run(runs["bert"])
    assert model.text.proj.in_features == json.loads((BERT_DIR / "config.json").read_text())["hidden_size"] == 48


def test_dataparallel_module_prefixes_are_stripped(tmp_path: Path) -> None:
    def prefix(ckpt: dict) -> None:
        ckpt["model"] = [OrderedDict((f"module.{k}", v) for k, v in part.items()) for part in ckpt["model"]]

    src = _resave(BIGRU, tmp_path / "dp.pth", prefix)
    _, model, _ = load_run(import_official(src, tmp_path / "run", vocab=VOCAB)["run"])
    io = _official("bigru")
    with torch.no_grad():
        img, _ = model.encode_image(torch.from_numpy(io["images"]), torch.from_numpy(io["image_lengths"]))
    assert (img - torch.from_numpy(io["img_emb"])).abs().max() <= 1e-5


def test_a_checkpoint_in_the_legacy_torch_format_imports_the_same(tmp_path: Path) -> None:
    """Files saved by torch < 1.6 (as the paper's released models may be) are not zip archives."""
    ckpt = load_torch_pickle(BIGRU)
    torch.save(ckpt, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    _, model, _ = load_run(import_official(tmp_path / "legacy.pth", tmp_path / "run", vocab=VOCAB)["run"])
    io = _official("bigru")
    with torch.no_grad():
        cap, _ = model.encode_text(torch.from_numpy(io["captions"]), torch.from_numpy(io["caption_lengths"]))
    assert (cap - torch.from_numpy(io["cap_emb"])).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# an imported run is an ordinary run


def test_an_imported_run_evaluates_like_any_run(tmp_path: Path) -> None:
    from vsectl.data.toy import make_toy_dataset

    data = make_toy_dataset(tmp_path / "toy", n_train=5, n_dev=5, n_test=12, feat_dim=24, n_regions=12, seed=3)
    run = _import("bigru", tmp_path / "run")  # a fresh import: eval writes into the run
    result = CliRunner().invoke(app, ["-q", "eval", str(run), "--protocol", "f30k", "--data-root", str(data),
                                      "--device", "cpu", "--json", "--ties", "optimistic"])  # strict, as the loops
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads(result.stdout)["f30k"]["metrics"]

    # reference: encode one item at a time, rank with loops (a caption's image is its line number // 5)
    _, model, text = load_run(run)
    feats = np.load(data / "test_ims.npy")
    captions = (data / "test_caps.txt").read_text().splitlines()
    processor = text.processor(augment=False)
    with torch.no_grad():
        img = torch.cat([model.encode_image(torch.from_numpy(f[None]), torch.tensor([f.shape[0]]))[0] for f in feats])
        cap = torch.cat([model.encode_text(torch.tensor([ids]), torch.tensor([len(ids)]))[0]
                         for ids in (processor.encode(c) for c in captions)])
    sims = (img @ cap.T).tolist()
    n = len(feats)
    i2t = [min(sum(s > sims[i][j] for s in sims[i]) for j in range(5 * i, 5 * i + 5)) for i in range(n)]
    t2i = [sum(sims[k][j] > sims[j // 5][j] for k in range(n)) for j in range(5 * n)]
    for k in (1, 5, 10):
        assert metrics[f"i2t_r{k}"] == pytest.approx(100 * sum(r < k for r in i2t) / n)
        assert metrics[f"t2i_r{k}"] == pytest.approx(100 * sum(r < k for r in t2i) / (5 * n))


def test_the_run_directory_holds_config_weights_text_side_and_provenance(runs: dict[str, Path]) -> None:
    for kind, text_side in (("bigru", "vocab.json"), ("bert", "text_model/config.json")):
        run = runs[kind]
        for name in ("config.yaml", "provenance.json", "checkpoints/best/model.safetensors", text_side):
            assert (run / name).is_file(), (kind, name)
        assert not list(run.glob("**/*.pth")) and not list(run.glob("**/*.pt"))  # no pickle travels into the run
        mode = (run / "config.yaml").stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), oct(mode)  # readable as the user's umask allows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_vocabulary_gets_the_official_mask_token_last(runs: dict[str, Path]) -> None:
    official = json.loads(VOCAB.read_text())
    ours = json.loads((runs["bigru"] / "vocab.json").read_text())
    n = len(official["word2idx"])
    assert [ours["idx2word"][str(i)] for i in range(n)] == [official["idx2word"][str(i)] for i in range(n)]
    assert ours["idx2word"][str(n)] == "<mask>" and ours["idx"] == n + 1


@pytest.mark.parametrize("kind", ["bigru", "bert"])
def test_provenance_names_the_source_hash_and_every_option(kind: str, runs: dict[str, Path]) -> None:
    record = json.loads((runs[kind] / "provenance.json").read_text())
    src = BIGRU if kind == "bigru" else BERT
    assert record["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    opt = vars(load_torch_pickle(src)["opt"])
    for name, value in opt.items():
        entry = record["opt"][name]
        assert entry["value"] == value
        assert entry.get("maps_to") or entry.get("ignored"), name


# ----------------------------------------------------------------------------------------------------------------------
# safety: nothing in a checkpoint runs


class _Payload:
    """Unpickling this would run `touch MARKER` (or write the file through builtins.open)."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):  # noqa: ANN204
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["system", "open"])
@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_a_malicious_pickle_is_refused_in_one_line_and_nothing_runs(how: str, container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = {"epoch": 1, "model": [OrderedDict(), OrderedDict()], "opt": _Payload(marker, how)}
    path = tmp_path / "model_best.pth"
    if container == "torch_zip":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    line = _error_line(["import", "official", str(path), "--out", str(tmp_path / "run"), "--vocab", str(VOCAB)])
    assert "nothing in it was run" in line and "refusing" in line, line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pth"]


def test_the_allow_list_is_torch_weights_only_plus_namespace() -> None:
    from vsectl.importers import safe_load

    assert safe_load.ALLOWED_CLASSES == (argparse.Namespace,)
    ckpt = load_torch_pickle(BIGRU)
    assert isinstance(ckpt["opt"], argparse.Namespace) and isinstance(ckpt["model"][0], OrderedDict)


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints that cannot be mapped: one line naming the first thing


def test_an_unknown_option_fails_naming_it(tmp_path: Path) -> None:
    src = _resave(BIGRU, tmp_path / "x.pth", lambda c: setattr(c["opt"], "cross_attn", "t2i"))
    line = _error_line(["import", "official", str(src), "--out", str(tmp_path / "run"), "--vocab", str(VOCAB)])
    assert "cannot place official option cross_attn='t2i'" in line, line
    assert not (tmp_path / "run").exists()


def test_an_unknown_weight_fails_naming_it(tmp_path: Path) -> None:
    src = _resave(BIGRU, tmp_path / "x.pth", lambda c: c["model"][1].__setitem__("attn.weight", torch.zeros(2)))
    line = _error_line(["import", "official", str(src), "--out", str(tmp_path / "run"), "--vocab", str(VOCAB)])
    assert "cannot place text encoder key 'attn.weight'" in line, line


def test_an_option_vsectl_cannot_honour_fails_naming_it(tmp_path: Path) -> None:
    src = _resave(BERT, tmp_path / "x.pth", lambda c: setattr(c["opt"], "no_txtnorm", True))
    line = _error_line(["import", "official", str(src), "--out", str(tmp_path / "run"), "--text-model", str(BERT_DIR)])
    assert "cannot place official option no_txtnorm=True" in line, line


def test_a_vocabulary_of_another_size_fails_and_leaves_nothing(tmp_path: Path) -> None:
    vocab = json.loads(VOCAB.read_text())
    vocab["word2idx"]["xylophone"] = vocab["idx"]
    vocab["idx2word"][str(vocab["idx"])] = "xylophone"
    vocab["idx"] += 1
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    line = _error_line(["import", "official", str(BIGRU), "--out", str(tmp_path / "runs" / "r"),
                        "--vocab", str(tmp_path / "v.json")])
    assert "55 words with <mask>, but the checkpoint's word table has 54 rows" in line, line
    assert not list((tmp_path / "runs").iterdir())  # the half-written run folder is gone


def test_a_bert_of_another_width_fails(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    folder.mkdir()
    config = json.loads((BERT_DIR / "config.json").read_text())
    config.update(hidden_size=64)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_bytes((BERT_DIR / "vocab.txt").read_bytes())
    line = _error_line(["import", "official", str(BERT), "--out", str(tmp_path / "run"), "--text-model", str(folder)])
    assert "is 64 wide but the checkpoint's BERT is 48 wide" in line, line


def test_missing_text_files_are_asked_for(tmp_path: Path) -> None:
    assert "--vocab PATH/f30k_precomp_vocab.json" in _error_line(
        ["import", "official", str(BIGRU), "--out", str(tmp_path / "a")])
    assert "give --text-model" in _error_line(["import", "official", str(BERT), "--out", str(tmp_path / "b")])
    line = _error_line(["import", "official", str(BERT), "--out", str(tmp_path / "c"), "--text-model", "no/such-bert"])
    assert "vsectl never downloads" in line


def test_an_existing_run_is_never_overwritten(runs: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        import_official(BIGRU, runs["bigru"], vocab=VOCAB)


# ----------------------------------------------------------------------------------------------------------------------
# the paper recipes train as the official runs did


def _script_opt(**extra: object) -> dict:
    """The options of the official region training scripts (train_region.sh): 25 epochs, LR 5e-4 stepped at 15."""
    return {"data_name": "f30k_precomp", "margin": 0.2, "num_epochs": 25, "batch_size": 128, "word_dim": 300,
            "embed_size": 1024, "grad_clip": 2.0, "learning_rate": 5e-4, "lr_update": 15, "optim": "adam",
            "log_step": 200, "img_dim": 2048, "precomp_enc_type": "basic", "vse_mean_warmup_epochs": 1, **extra}


@pytest.mark.parametrize("recipe,branch", [("f30k_butd", "bigru"), ("coco_butd", "bigru"),
                                           ("f30k_butd_bert", "bert"), ("coco_butd_bert", "bert")])
def test_paper_recipes_match_what_the_official_runs_used(recipe: str, branch: str) -> None:
    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    extra = {"num_layers": 1, "drop": True} if branch == "bigru" else {}
    official = build_config(_script_opt(**extra), branch, recipe, {"image": (32, 32), "text": (32, 32)}, 512,
                            "script", "bert-base-uncased")
    assert cfg.train.optimizer == official.train.optimizer == "adamw"
    for key in ("lr", "lr_decay_epoch", "lr_decay_factor", "weight_decay", "grad_clip", "epochs"):
        assert getattr(cfg.train, key) == getattr(official.train, key), key
    assert cfg.train.weight_decay == (0.01 if branch == "bigru" else 1e-4)
    if branch == "bert":
        assert cfg.train.lr_mult.text_body == official.train.lr_mult.text_body == 0.1
    assert cfg.loss == official.loss
    assert cfg.data.batch_size == official.data.batch_size
    assert cfg.model.embed_dim == official.model.embed_dim and cfg.model.image == official.model.image
    assert cfg.model.text.pool == official.model.text.pool
    assert cfg.model.text.size_augment == official.model.text.size_augment


def test_every_official_option_is_either_mapped_or_ignored_with_a_reason() -> None:
    for path in (BIGRU, BERT):
        for name in vars(load_torch_pickle(path)["opt"]):
            assert name in MAPPED or IGNORED.get(name), name
    assert not set(MAPPED) & set(IGNORED)


def test_the_options_page_lists_every_option_the_importer_knows() -> None:
    page = (REPO / "docs" / "official_checkpoints.md").read_text()
    for name in (*MAPPED, *IGNORED):
        assert f"| `{name}` |" in page, name


@pytest.mark.parametrize("content,reason", [(b"not a checkpoint", "Unsupported operand"),
                                            (b"PK\x03\x04garbage", "not a ZIP archive"),
                                            (b"", "empty or cut short")])
def test_a_file_that_is_not_a_checkpoint_gets_one_line_without_unsafe_advice(content: bytes, reason: str,
                                                                              tmp_path: Path) -> None:
    (tmp_path / "m.pth").write_bytes(content)
    line = _error_line(["import", "official", str(tmp_path / "m.pth"), "--out", str(tmp_path / "r")])
    assert "is not a readable torch checkpoint" in line and reason in line, line
    assert "weights_only" not in line  # torch's own message suggests weights_only=False: never pass that on


def test_training_continues_from_the_imported_weights_with_resume(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vsectl.data.toy import make_toy_dataset

    data = make_toy_dataset(tmp_path / "toy", n_train=30, n_dev=5, n_test=5, feat_dim=24, n_regions=12, seed=4)
    run = tmp_path / "runs" / "ft"
    import_official(BIGRU, run, vocab=VOCAB, data_root=data)
    imported = load_file(str(run / "checkpoints" / "best" / "model.safetensors"))
    config = run / "config.yaml"  # a 2-core test machine: no loader workers (a property of the machine, not the model)
    config.write_text(config.read_text().replace("num_workers: 4", "num_workers: 0"))
    epoch = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())["epoch"]
    result = CliRunner().invoke(app, ["-q", "train", str(run / "config.yaml"), "--out", str(run.parent), "--resume",
                                      "--device", "cpu", "--set", f"train.epochs={epoch + 1}"])
    assert result.exit_code == 0, (result.output, result.exception)
    state = json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == epoch + 1 and state["global_step"] > 17  # the official Eiters (17), then more steps
    trained = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    weights = [k for k in imported if imported[k].is_floating_point() and ".running_" not in k]
    moved = max(float((trained[k] - imported[k]).abs().max()) for k in weights)
    assert 0 < moved < 0.02  # one AdamW step at LR 5e-4 from the imported weights, not a fresh start
    assert json.loads((run / "vocab.json").read_text()) == json.loads(
        (_import("bigru", tmp_path / "again") / "vocab.json").read_text())  # the official vocabulary is kept


@pytest.mark.parametrize("command", [["import"], ["import", "official"]])
def test_help_works_for_the_import_commands(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
