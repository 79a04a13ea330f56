"""ONNX export: the export formulation equals the trained modules, and onnxruntime reproduces torch to 1e-4."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from vsectl.cli import app
from vsectl.config import load_recipe
from vsectl.models.exportable import EXPORTABLE_POOLERS, ExportPool, ImageTower, LengthBiGRU, TextTower, sinusoid_table
from vsectl.models.image_encoders import GridEncoder, RegionEncoder
from vsectl.models.pooling import (
    GPO,
    MLPGPO,
    GeMPool,
    InterpGPO,
    MaxKPool,
    MaxPool,
    MeanPool,
    PerDimGPO,
    TransformerGPO,
    positional_encoding,
)
from vsectl.models.text_encoders import BiGRUTextEncoder, TransformerTextEncoder

REPO = Path(__file__).resolve().parent.parent
POOLERS = {  # tiny instances of every exportable pooler, over 10-d features (leaf modules take plain arguments)
    "gpo": lambda: GPO(d_pe=8, d_hidden=6), "gpo_perdim": lambda: PerDimGPO(dim=10, d_pe=8, d_hidden=6),
    "gpo_mlp": lambda: MLPGPO(d_pe=8, d_hidden=6), "gpo_interp": lambda: InterpGPO(n_knots=5),
    "mean": MeanPool, "max": MaxPool, "maxk": lambda: MaxKPool(k=3), "gem": GeMPool,
}
TINY = REPO / "recipes" / "tiny.yaml"
runner = CliRunner()
TOL = dict(atol=1e-5, rtol=0)  # torch vs torch: the formulations differ only in summation order


def batch_lengths(batch: int, width: int, gen: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[-1] = width
    return lengths


def test_length_bigru_equals_one_gru_run_per_sequence_cut_to_its_length():
    gen = torch.Generator().manual_seed(1)
    gru = nn.GRU(6, 5, batch_first=True, bidirectional=True).eval()
    x = torch.randn(4, 9, 6, generator=gen)
    lengths = torch.tensor([9, 1, 4, 7])
    with torch.no_grad():
        got = LengthBiGRU(gru)(x, lengths)
        for b, n in enumerate(lengths.tolist()):
            ref, _ = gru(x[b : b + 1, :n])                                 # the unpadded sequence on its own
            ref = (ref[..., :5] + ref[..., 5:]) / 2
            torch.testing.assert_close(got[b, :n], ref[0], **TOL)
            assert torch.all(got[b, n:] == 0)


def test_sinusoid_table_equals_the_gpo_positional_encoding():
    torch.testing.assert_close(sinusoid_table(11, 8, torch.device("cpu")), positional_encoding(11, 8), **TOL)


@pytest.mark.parametrize("name", EXPORTABLE_POOLERS)
def test_export_pool_equals_the_trained_pooler_at_every_set_size(name):
    assert set(POOLERS) == set(EXPORTABLE_POOLERS)
    gen = torch.Generator().manual_seed(2)
    pool = POOLERS[name]().eval()
    for param in pool.parameters():  # away from the initial values, so a wrong θ shows
        param.data.add_(0.3 * torch.randn(param.shape, generator=gen))
    for width in (1, 2, 5, 13):
        feats = torch.randn(3, width, 10, generator=gen)
        lengths = batch_lengths(3, width, gen)
        padded = torch.cat([feats, torch.randn(3, 4, 10, generator=gen)], dim=1)  # wider than max(lengths)
        with torch.no_grad():
            expected, _ = pool(feats, lengths)
            torch.testing.assert_close(ExportPool(pool)(padded, lengths), expected.float(), **TOL)


def test_unexportable_pooler_is_one_clear_error():
    from vsectl.errors import ConfigError

    with pytest.raises(ConfigError, match="exportable poolers: gpo"):
        ExportPool(TransformerGPO(d_pe=8, d_hidden=8, heads=2))


def tiny_bert_body(vocab: int = 30) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False)


def onnx_roundtrip(module: nn.Module, example: tuple, path: Path, names: tuple[str, str]):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from vsectl.export import _export_graph, _session, require_onnx

    _, ort = require_onnx()
    _export_graph(module, example, path, names, "width")
    return _session(ort, path)


@pytest.mark.parametrize("kind", ["region_gpo", "grid_gpo_perdim", "region_kmax"])
def test_image_tower_onnx_matches_torch_on_several_set_sizes(kind, tmp_path):
    gen = torch.Generator().manual_seed(3)
    encoder_cls, pool = {"region_gpo": (RegionEncoder, GPO(d_pe=8, d_hidden=8)),
                         "grid_gpo_perdim": (GridEncoder, PerDimGPO(dim=16, d_pe=8, d_hidden=8)),
                         "region_kmax": (RegionEncoder, MaxKPool(k=2))}[kind]
    encoder = encoder_cls(12, 16, pool, **({"mlp_hidden": 10} if encoder_cls is RegionEncoder else {}))
    encoder.eval()
    if encoder_cls is RegionEncoder:  # BatchNorm statistics away from 0/1
        encoder.mlp.bn.running_mean.normal_(generator=gen)
        encoder.mlp.bn.running_var.uniform_(0.5, 2.0, generator=gen)
    session = onnx_roundtrip(ImageTower(encoder), (torch.randn(2, 3, 12), torch.tensor([3, 2])),
                             tmp_path / "image.onnx", ("features", "lengths"))
    for width in (1, 4, 37, 100):
        for batch in (1, 5):
            feats, lengths = torch.randn(batch, width, 12, generator=gen), batch_lengths(batch, width, gen)
            got = session.run(None, {"features": feats.numpy(), "lengths": lengths.numpy()})[0]
            with torch.no_grad():
                expected, _ = encoder(feats, lengths)
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["bigru", "transformers"])
def test_text_tower_onnx_matches_torch_on_several_caption_lengths(kind, tmp_path):
    gen = torch.Generator().manual_seed(4)
    pool = GPO(d_pe=8, d_hidden=8)
    if kind == "bigru":
        encoder = BiGRUTextEncoder(30, 8, 16, pool)
    else:
        encoder = TransformerTextEncoder(tiny_bert_body(), 16, pool)
    encoder.eval()
    session = onnx_roundtrip(TextTower(encoder), (torch.randint(1, 30, (2, 4)), torch.tensor([4, 2])),
                             tmp_path / "text.onnx", ("tokens", "lengths"))
    for width in (1, 3, 17, 50):
        for batch in (1, 4):
            tokens, lengths = torch.randint(1, 30, (batch, width), generator=gen), batch_lengths(batch, width, gen)
            got = session.run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()})[0]
            with torch.no_grad():
                expected, _ = encoder(tokens, lengths)
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_run(toy_root, tmp_path_factory) -> Path:
    from vsectl.training import train

    overrides = [f"data.root={toy_root}", "train.epochs=1", "name=export_tiny"]
    return train(load_recipe(TINY, overrides), tmp_path_factory.mktemp("runs"), device="cpu")


def test_export_cli_writes_both_towers_and_a_manifest_with_parity(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", str(tiny_run), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "client.py", "export.json", "image.onnx", "text.onnx", "vocab.json"]  # toy precomp features: no backbone
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["embed_dim"] == 64 and manifest["image"]["inputs"]["features"] == ["batch", "set_size", 32]
    assert 0 <= manifest["parity"]["max_abs_diff"]["image"] <= 1e-4
    assert 0 <= manifest["parity"]["max_abs_diff"]["text"] <= 1e-4
    again = runner.invoke(app, ["export", str(tiny_run), "--out", str(out)])  # an earlier export is replaced whole
    assert again.exit_code == 0, again.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_export_json_is_alone_on_stdout_and_q_keeps_stderr_quiet(tiny_run, tmp_path):
    """`export --json` used to print the parity table on stderr as well, and `-q` did not hide it."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(tmp_path / "a") and result.stderr == ""
    quiet = runner.invoke(app, ["-q", "export", str(tiny_run), "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and quiet.stdout.strip() == str(tmp_path / "b") and "ONNX export" not in quiet.stderr
    loud = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "c")])
    assert "ONNX export" in loud.stderr  # the table is still there by default


def test_an_export_removes_the_stale_temporaries_of_its_target_and_nothing_else(tiny_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import subprocess

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # its pid: reused, not a writer
    try:
        stale = tmp_path / f".onnx.vsectl-tmp-{sleeper.pid}-0badcafe"  # what a SIGKILL mid-export leaves
        kept = [".onnx.vsectl-tmp-notes", ".onnx.backup", f".other.vsectl-tmp-{sleeper.pid}-0badcafe"]
        for folder in [stale, *(tmp_path / name for name in kept)]:
            folder.mkdir()
            (folder / "text.onnx").write_bytes(b"half")
        result = runner.invoke(app, ["-q", "export", str(tiny_run), "--out", str(tmp_path / "onnx")])
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "onnx"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_export_of_a_transformers_run_carries_its_tokenizer(toy_root, tiny_bert_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from vsectl.export import export_onnx
    from vsectl.training import train

    overrides = [f"data.root={toy_root}", "train.epochs=1", "name=bert", "model.text.encoder=transformers",
                 f"model.text.pretrained={tiny_bert_dir}"]
    run = train(load_recipe(TINY, overrides), tmp_path / "runs", device="cpu")
    manifest = export_onnx(run, tmp_path / "onnx")
    assert manifest["text"]["kind"] == "tokenizer" and (tmp_path / "onnx" / "text_model" / "tokenizer.json").is_file()
    assert manifest["parity"]["max_abs_diff"]["text"] <= 1e-4 and manifest["text"]["pad_id"] == 0


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite"], "unknown export format 'tflite'"),
    (["--out", "{busy}"], "holds files vsectl did not write (notes.txt)"),
])
def test_export_user_mistakes_are_one_line_and_exit_2(tiny_run, tmp_path, args, message):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    args = [a.replace("{busy}", str(busy)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x")]
    result = runner.invoke(app, ["export", str(tiny_run), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert (busy / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()


def test_missing_onnx_extra_is_named_in_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    result = runner.invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "pip install 'vsectl[onnx]'" in result.output
    assert not (tmp_path / "x").exists()


def test_a_run_with_an_unexportable_pooler_is_refused_before_anything_is_written(toy_root, tmp_path):
    from vsectl.training import train

    overrides = [f"data.root={toy_root}", "train.epochs=1", "name=tf", "model.image.pool.name=gpo_transformer",
                 "model.image.pool.d_hidden=8", "model.image.pool.transformer_heads=2", "data.batch_size=64"]
    run = train(load_recipe(TINY, overrides), tmp_path / "runs", device="cpu")
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "TransformerGPO cannot be exported to ONNX" in result.output
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------------------------------
# what a client needs: a tokenizer without padding, no duplicated weights, a reference client, a tower from pixels


@pytest.fixture(scope="module")
def padded_bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT (128 positions) whose tokenizer.json pads every text to 128 tokens, as all-MiniLM-L6-v2's does."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("padded_bert")
    words = ["a", "small", "red", "apple", "lies", "on", "the", "wooden", "table", "next", "to", "two", "green",
             "pears", "and", "knife", "dog", "##s", "."]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.backend_tokenizer.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tokenizer.backend_tokenizer.enable_truncation(max_length=128)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "tokenizer.json").read_text())["padding"]["strategy"] == {"Fixed": 128}
    config = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, pad_token_id=0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def frozen_bert_export(toy_root, padded_bert_dir, tmp_path_factory) -> dict:
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from vsectl.export import export_onnx
    from vsectl.training import train

    root = tmp_path_factory.mktemp("frozen_export")
    overrides = [f"data.root={toy_root}", "train.epochs=1", "train.max_steps_per_epoch=3", "name=frozen",
                 "model.text.encoder=transformers", f"model.text.pretrained={padded_bert_dir}",
                 "model.text.freeze_body=true"]
    run = train(load_recipe(TINY, overrides), root / "runs", device="cpu")
    manifest = export_onnx(run, root / "onnx")
    return {"run": run, "out": root / "onnx", "manifest": manifest}


QUERY_WORDS = "a small red apple lies on the wooden table next to two green pears and a knife".split()


def queries_of(lengths: tuple[int, ...]) -> list[str]:
    return [" ".join(QUERY_WORDS[i % len(QUERY_WORDS)] for i in range(n)) for n in lengths]


def test_the_obvious_tokenizer_call_gives_the_embeddings_of_encode_text(frozen_bert_export):
    """Tokenizer.encode(q).ids with lengths = len(ids): the exported tokenizer must not pad (it padded to 128)."""
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer

    import vsectl

    out = frozen_bert_export["out"]
    tokenizer = Tokenizer.from_file(str(out / "text_model" / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(out / "text.onnx"), providers=["CPUExecutionProvider"])
    model = vsectl.load(frozen_bert_export["run"], device="cpu")
    for query in queries_of((1, 3, 12, 40, 98)):
        ids = tokenizer.encode(query).ids
        assert len(ids) == len(model.tokenize([query])[0]) and ids[-1] != 0  # no padding
        got = session.run(None, {"tokens": np.array([ids]), "lengths": np.array([len(ids)])})[0]
        np.testing.assert_allclose(got, model.encode_text([query]), atol=1e-5, rtol=0)


def test_the_reference_client_equals_encode_text_for_queries_of_1_to_100_tokens(frozen_bert_export):
    import numpy as np

    import vsectl
    from vsectl.export_parts import load_client

    client = load_client(frozen_bert_export["out"])  # the client.py in the export folder, not vsectl's module
    model = vsectl.load(frozen_bert_export["run"], device="cpu")
    queries = queries_of((1, 2, 7, 20, 50, 98))  # with [CLS] and [SEP]: 3 to 100 tokens
    assert [len(client.token_ids(q)) for q in queries] == [3, 4, 9, 22, 52, 100]
    np.testing.assert_allclose(client.encode_text(queries), model.encode_text(queries), atol=1e-5, rtol=0)
    parity = frozen_bert_export["manifest"]["parity"]["client_text"]
    assert parity["max_abs_diff"] <= 1e-5 and max(parity["tokens"]) >= 90


def test_a_frozen_text_body_is_not_copied_beside_text_onnx(frozen_bert_export):
    out = frozen_bert_export["out"]
    assert (frozen_bert_export["run"] / "text_model" / "frozen_body.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth")]
    kept = sorted(p.name for p in (frozen_bert_export["run"] / "text_model").iterdir() if p.suffix != ".safetensors")
    assert sorted(p.name for p in (out / "text_model").iterdir()) == kept and "tokenizer.json" in kept


def test_a_feature_run_exports_a_tower_from_pixels_that_equals_vsectl_on_image_files(clipart_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import numpy as np

    import vsectl
    from vsectl.export import export_onnx
    from vsectl.export_parts import load_client

    manifest = export_onnx(clipart_run["run"], tmp_path / "onnx")
    assert manifest["image_pixels"]["size"] == 64 and manifest["parity"]["max_abs_diff"]["image_pixels"] <= 1e-4
    paths = sorted((clipart_run["raw"] / "images").iterdir())[:6]
    client = load_client(tmp_path / "onnx")
    model = vsectl.load(clipart_run["run"], device="cpu")
    np.testing.assert_allclose(client.encode_images(paths), model.encode_images(paths), atol=1e-4, rtol=0)


def test_a_run_that_trained_its_backbone_exports_it_inside_the_pixel_tower(clipart_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    import numpy as np

    import vsectl
    from vsectl.export import export_onnx
    from vsectl.export_parts import load_client
    from vsectl.training import train

    overrides = [f"data.root={clipart_run['raw']}", "name=e2e", "data.batch_size=16", "data.val_images=16",
                 "model.embed_dim=32", "model.image.encoder=backbone", "model.image.feat_dim=12",
                 "model.image.backbone.name=resnet", f"model.image.backbone.weights={clipart_run['weights']}",
                 "model.image.backbone.size=64", "train.epochs=1", "train.max_steps_per_epoch=2"]
    run = train(load_recipe(TINY, overrides), tmp_path / "runs", device="cpu")
    manifest = export_onnx(run, tmp_path / "onnx")
    assert manifest["image_pixels"]["size"] == 64
    paths = sorted((clipart_run["raw"] / "images").iterdir())[:4]
    np.testing.assert_allclose(load_client(tmp_path / "onnx").encode_images(paths),
                               vsectl.load(run, device="cpu").encode_images(paths), atol=1e-4, rtol=0)
