"""Importing the official VSE∞ *grid* checkpoints (precomp_enc_type=backbone) into vsectl's `encoder: backbone`.

No released grid checkpoint fits in the repository (89 M image parameters), so the test builds one: random tensors of
exactly the official image encoder's keys and shapes (tests/fixtures/grid_detector_img_enc_keys.json: the detector
ResNet-101 as backbone.resnet.* with its base/top views, image_encoder.fc and the GPO gpool), the fc made 2048 → 32 to
match the text side of the small official BERT fixture, whose text encoder and pickled options it reuses.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line
from typer.testing import CliRunner

from vsectl.builders import load_run
from vsectl.cli import app
from vsectl.config import RunConfig, load_recipe
from vsectl.errors import CheckpointError
from vsectl.importers.official import import_official
from vsectl.importers.official_opt import build_config
from vsectl.importers.safe_load import load_torch_pickle
from vsectl.models.vse import VSEModel

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_KEYS = FIXTURES / "grid_detector_img_enc_keys.json"  # every key and shape of the official grid image encoder
BERT = FIXTURES / "official_vse_infty" / "master" / "model_best.pth"
BERT_DIR = FIXTURES / "official_vse_infty" / "master" / "bert"
REPO = Path(__file__).resolve().parent.parent
EMBED = 32  # the BERT fixture's embed_size
VIEWS = {"backbone.base.0.": "conv1.", "backbone.base.1.": "bn1.", "backbone.base.4.": "layer1.",
         "backbone.base.5.": "layer2.", "backbone.base.6.": "layer3.", "backbone.top.0.": "layer4."}
CAFFE_MEANS_BGR = (102.9801, 115.9465, 122.7717)


def _official_layout() -> dict[str, list[int]]:
    return json.loads(OFFICIAL_KEYS.read_text())["img_enc"]


def _random_image_state(seed: int = 0, only: str = "") -> OrderedDict[str, torch.Tensor]:
    """Official grid image encoder keys with random tensors that keep a 101-layer forward finite.

    The base/top views hold the very same tensors as backbone.resnet.* (as nn.Sequential views register them).
    """
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    layout = {k: v for k, v in _official_layout().items() if k.startswith(only)}
    for key, shape in layout.items():
        if key.startswith(tuple(VIEWS)):
            continue
        if not shape:                                                   # num_batches_tracked
            value = torch.tensor(7)
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean") or key.endswith("bias"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:                                           # conv: He scale
            value = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif ".bn" in key or ".downsample.1." in key or key.endswith("bn1.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)            # BN scale
        else:                                                           # fc, GRU, scorer
            value = torch.randn(shape, generator=g) / math.sqrt(shape[-1])
        if key == "image_encoder.fc.weight":
            value = torch.randn(EMBED, shape[1], generator=g) / math.sqrt(shape[1])
        if key == "image_encoder.fc.bias":
            value = 0.1 * torch.randn(EMBED, generator=g)
        state[key] = value
    for key in layout:
        for view, name in VIEWS.items():
            if key.startswith(view):
                state[key] = state["backbone.resnet." + name + key[len(view):]]
    return OrderedDict((k, state[k]) for k in layout)                   # the official order


def _grid_checkpoint(path: Path, image: dict[str, torch.Tensor] | None = None, **opt: object) -> Path:
    """The BERT fixture with a grid image side and the grid options of the official scripts (train_grid.sh)."""
    ckpt = load_torch_pickle(BERT)
    ckpt["model"][0] = image if image is not None else _random_image_state()
    for name, value in {"precomp_enc_type": "backbone", "backbone_source": "detector", "img_dim": 2048,
                        "input_scale_factor": 2.0, "embedding_warmup_epochs": 1, "backbone_warmup_epochs": 0,
                        "backbone_lr_factor": 0.01, "data_name": "f30k", "backbone_path":
                        "data/weights/original_updown_backbone.pth", **opt}.items():
        setattr(ckpt["opt"], name, value)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], RunConfig, VSEModel]:
    """One import for the module (a full-size ResNet-101: seconds), loaded back as eval loads any run."""
    root = tmp_path_factory.mktemp("grid")
    src = _grid_checkpoint(root / "model_best.pth")
    run = root / "runs" / "grid"
    import_official(src, run, text_model=str(BERT_DIR))
    cfg, model, _ = load_run(run)
    return run, load_torch_pickle(src)["model"][0], cfg, model


# ----------------------------------------------------------------------------------------------------------------------
# slow references, written out here from the official definitions


def _gru_direction(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor, b_hh: torch.Tensor,
                   reverse: bool) -> torch.Tensor:
    """One GRU direction over (K, d) with PyTorch's gate order (reset, update, new); returns (K, H)."""
    hidden = w_hh.shape[1]
    h = torch.zeros(hidden, dtype=torch.float64)
    out = [None] * x.shape[0]
    for t in (reversed(range(x.shape[0])) if reverse else range(x.shape[0])):
        gi, gh = w_ih @ x[t] + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:hidden] + gh[:hidden])
        z = torch.sigmoid(gi[hidden:2 * hidden] + gh[hidden:2 * hidden])
        n = torch.tanh(gi[2 * hidden:] + r * gh[2 * hidden:])
        h = (1 - z) * n + z * h
        out[t] = h
    return torch.stack(out)


def _reference_head(cells: torch.Tensor, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, K, 2048) cells → the official image_encoder: fc, GPO (τ = 0.1) over all K cells, x / (‖x‖ + 1e-8)."""
    w = {k: v.double() for k, v in raw.items() if k.startswith("image_encoder.")}
    feats = cells.double() @ w["image_encoder.fc.weight"].T + w["image_encoder.fc.bias"]   # (B, K, E)
    k_cells, d_pe = feats.shape[1], w["image_encoder.gpool.gru.weight_ih_l0"].shape[1]
    pe = torch.zeros(k_cells, d_pe, dtype=torch.float64)
    for p in range(k_cells):
        for j in range(d_pe // 2):
            pe[p, 2 * j] = math.sin(p * 10000 ** (-2 * j / d_pe))
            pe[p, 2 * j + 1] = math.cos(p * 10000 ** (-2 * j / d_pe))
    g = "image_encoder.gpool.gru."
    fwd = _gru_direction(pe, w[g + "weight_ih_l0"], w[g + "weight_hh_l0"], w[g + "bias_ih_l0"], w[g + "bias_hh_l0"],
                         reverse=False)
    bwd = _gru_direction(pe, w[g + "weight_ih_l0_reverse"], w[g + "weight_hh_l0_reverse"],
                         w[g + "bias_ih_l0_reverse"], w[g + "bias_hh_l0_reverse"], reverse=True)
    scores = ((fwd + bwd) / 2) @ w["image_encoder.gpool.linear.weight"][0]               # (K,)
    theta = torch.softmax(scores / 0.1, dim=0)
    out = []
    for b in range(feats.shape[0]):
        ranked = feats[b].sort(dim=0, descending=True).values                            # each dimension on its own
        pooled = (theta[:, None] * ranked).sum(0)
        out.append(pooled / (pooled.norm() + 1e-8))
    return torch.stack(out)


def _reference_c5(images: torch.Tensor, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 RGB → the Caffe ResNet-101 of bottom-up attention, written out with torch.nn.functional → (B, N, 2048)."""
    f = torch.nn.functional
    w = {k[len("backbone.resnet."):]: v.double() for k, v in raw.items() if k.startswith("backbone.resnet.")}

    def bn(x: torch.Tensor, name: str) -> torch.Tensor:
        return f.batch_norm(x, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"],
                            w[f"{name}.bias"], training=False, eps=1e-5)

    x = images.double().flip(1) - torch.tensor(CAFFE_MEANS_BGR, dtype=torch.float64).view(1, 3, 1, 1)
    x = f.max_pool2d(f.relu(bn(f.conv2d(x, w["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, ceil_mode=True)
    for layer, depth in enumerate((3, 4, 23, 3), start=1):
        for b in range(depth):
            p = f"layer{layer}.{b}"
            stride = 2 if b == 0 and layer > 1 else 1                    # Caffe: the stride on the first 1×1 conv
            y = f.relu(bn(f.conv2d(x, w[f"{p}.conv1.weight"], stride=stride), f"{p}.bn1"))
            y = f.relu(bn(f.conv2d(y, w[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
            y = bn(f.conv2d(y, w[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = bn(f.conv2d(x, w[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") \
                if b == 0 else x
            x = f.relu(y + short)
    return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# the import


def test_every_official_grid_key_is_placed_or_dropped_for_a_stated_reason(grid_run) -> None:
    run, raw, _, model = grid_run
    record = json.loads((run / "provenance.json").read_text())
    dropped = {d["key"][len("image:"):]: d["why"] for d in record["dropped_keys"] if d["key"].startswith("image:")}
    ours = {k: v for k, v in model.state_dict().items() if k.startswith("image.")}
    placed = set()
    for key, value in raw.items():
        if key in dropped:
            assert dropped[key], key
            if key.startswith(tuple(VIEWS)):                            # a view: the same tensor as the key it names
                view = next(v for v in VIEWS if key.startswith(v))
                assert torch.equal(value, raw["backbone.resnet." + VIEWS[view] + key[len(view):]])
            else:
                assert key.startswith("backbone.resnet.fc."), key        # only the unused classifier goes
            continue
        if key.startswith("backbone.resnet."):
            target = "image.backbone.net." + key[len("backbone.resnet."):]
        else:
            target = {"image_encoder.fc.": "image.fc.", "image_encoder.gpool.gru.": "image.pool.gru.",
                      "image_encoder.gpool.linear.": "image.pool.scorer."}
            prefix = next(p for p in target if key.startswith(p))
            target = target[prefix] + key[len(prefix):]
        assert torch.equal(ours[target], value), key
        placed.add(target)
    assert placed == set(ours)                                           # and the model has nothing unexplained
    assert len(raw) == len(_official_layout()) == len(placed) + len(dropped)
    assert sum(k.startswith(("backbone.base.", "backbone.top.")) for k in dropped) == 624
    assert record["image_side"] == "grid (detector)"


def test_the_imported_head_on_a_fixed_feature_map_equals_the_slow_reference(grid_run, monkeypatch) -> None:
    _, raw, _, model = grid_run
    cells = torch.randn(3, 6, 2048, generator=torch.Generator().manual_seed(1)).abs()  # a 2×3 C5 map, after ReLU
    monkeypatch.setattr(model.image, "cells", lambda images: cells)
    with torch.no_grad():
        emb, _ = model.encode_image(torch.zeros(3, 3, 64, 96, dtype=torch.uint8), None)
    assert emb.shape == (3, EMBED)
    assert (emb.double() - _reference_head(cells, raw)).abs().max() < 1e-5


def test_the_imported_model_embeds_raw_images_like_the_official_forward(grid_run) -> None:
    _, raw, _, model = grid_run
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb, _ = model.encode_image(images, None)
    reference = _reference_head(_reference_c5(images, raw), raw)
    assert torch.isfinite(reference).all()
    assert (emb.double() - reference).abs().max() < 1e-4


def test_an_imported_grid_run_needs_no_file_from_elsewhere(grid_run) -> None:
    run, _, cfg, model = grid_run
    assert cfg.model.image.encoder == "backbone" and cfg.model.image.backbone.name == "detector"
    assert Path(cfg.model.image.backbone.weights) == (run / "backbone.safetensors").resolve()
    assert cfg.model.image.backbone.size == 512 and model.image.backbone.grid_shape() == (16, 16)
    assert (cfg.train.embedding_warmup_epochs, cfg.train.backbone_warmup_epochs) == (1, 0)
    assert cfg.train.loss_scale_warmup and cfg.train.lr_mult.backbone == 0.01 and cfg.train.precision == "fp32"
    assert cfg.data.root == "data/f30k_raw"
    assert not list(run.glob("**/*.pth")) and not list(run.glob("**/*.pt"))  # no pickle travels into the run
    record = json.loads((run / "provenance.json").read_text())
    assert "trained backbone itself" in record["opt"]["backbone_path"]["ignored"]


@pytest.mark.parametrize("source,recipe", [("detector", "f30k_detector_grid_bert"), ("wsl", "f30k_wsl_grid_bert"),
                                           ("detector", "coco_detector_grid_bert"), ("wsl", "coco_wsl_grid_bert")])
def test_grid_recipes_match_what_the_official_grid_runs_used(source: str, recipe: str) -> None:
    data = "coco" if recipe.startswith("coco") else "f30k"
    opt = {"data_name": data, "margin": 0.2, "num_epochs": 25, "batch_size": 128, "embed_size": 1024,
           "grad_clip": 2.0, "learning_rate": 5e-4, "lr_update": 15, "optim": "adam", "img_dim": 2048,
           "precomp_enc_type": "backbone", "backbone_source": source, "vse_mean_warmup_epochs": 1,
           "embedding_warmup_epochs": 1, "backbone_warmup_epochs": 0, "backbone_lr_factor": 0.01,
           "input_scale_factor": 2.0}
    official = build_config(opt, "bert", recipe, {"image": (32, 32), "text": (32, 32)}, 0, "script",
                            "bert-base-uncased")
    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    for key in ("optimizer", "lr", "lr_decay_epoch", "lr_decay_factor", "weight_decay", "grad_clip", "epochs",
                "embedding_warmup_epochs", "backbone_warmup_epochs", "loss_scale_warmup", "lr_mult", "precision"):
        assert getattr(cfg.train, key) == getattr(official.train, key), key
    assert cfg.loss == official.loss and cfg.data.batch_size == official.data.batch_size
    assert cfg.data.root == official.data.root == f"data/{data}_raw"
    assert official.model.image.backbone.weights == "" == cfg.model.image.backbone.weights
    assert cfg.model.image == official.model.image and cfg.model.embed_dim == official.model.embed_dim
    assert cfg.model.text.pool == official.model.text.pool


# ----------------------------------------------------------------------------------------------------------------------
# refusals: one line naming the first thing that does not fit, nothing left behind


def _error_line(argv: list[str]) -> str:
    return one_error_line(CliRunner().invoke(app, ["-q", *argv]))


def _small_grid_image(**extra: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict([("backbone.resnet.conv1.weight", torch.zeros(64, 3, 7, 7)),
                        ("image_encoder.fc.weight", torch.zeros(EMBED, 2048)), *extra.items()])


@pytest.mark.parametrize("image,opt,message", [
    (_small_grid_image(), {"backbone_source": "imagenet_res152"},
     "cannot place official option backbone_source='imagenet_res152'"),
    (_small_grid_image(**{"image_encoder.mlp.layers.0.weight": torch.zeros(2)}), {},
     "cannot place image encoder key 'image_encoder.mlp.layers.0.weight'"),
    (_small_grid_image(**{"attn.weight": torch.zeros(2)}), {}, "cannot place image encoder key 'attn.weight'"),
    (_small_grid_image(**{"backbone.resnet.layer9.0.conv1.weight": torch.zeros(2)}), {},
     "not part of the backbone"),
    (OrderedDict([("image_encoder.fc.weight", torch.zeros(EMBED, 2048))]), {},
     "the grid image encoder has no backbone.* weights"),
])
def test_a_grid_checkpoint_that_does_not_fit_is_one_line_and_leaves_nothing(image, opt, message, tmp_path) -> None:
    head = _random_image_state(only="image_encoder.gpool.")
    src = _grid_checkpoint(tmp_path / "grid.pth", image=OrderedDict([*image.items(), *head.items()]), **opt)
    line = _error_line(["import", "official", str(src), "--out", str(tmp_path / "run"), "--text-model",
                        str(BERT_DIR)])
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.pth"]


def test_grid_keys_in_a_region_checkpoint_are_named(tmp_path) -> None:
    ckpt = load_torch_pickle(BERT)
    ckpt["model"][0]["backbone.resnet.conv1.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="a grid model's image side, but the options say precomp_enc_type=basic"):
        import_official(tmp_path / "x.pth", tmp_path / "run", text_model=str(BERT_DIR))
