"""Backbones: real EfficientNet-Lite0 wiring on real photos, tiny random transformers towers, strict offline loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vsectl.data.images import normalize, resize_square, to_uint8_tensor
from vsectl.errors import ConfigError
from vsectl.models.backbones import (
    BACKBONES,
    CLIP_MEAN,
    HALF_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cnn_grid,
    create_backbone,
)

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def tiny_towers(root: Path) -> dict[str, Path]:
    """Random transformers models built from tiny configs and saved to folders (nothing is downloaded)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        ResNetConfig,
        ResNetModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

    tower = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                 patch_size=8)
    folders = {name: root / name for name in ("resnet", "vit", "clip", "siglip")}
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 24], depths=[1, 1, 1, 1],
                             layer_type="basic")).save_pretrained(folders["resnet"])
    ViTModel(ViTConfig(**tower), add_pooling_layer=False).save_pretrained(folders["vit"])
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=40,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # A full CLIP checkpoint (text tower included), as published ones are; its processor asks for 48 px and own stats.
    CLIPModel(CLIPConfig(text_config=text, vision_config=tower, projection_dim=8)).save_pretrained(folders["clip"])
    (folders["clip"] / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": 48, "width": 48}, "size": {"shortest_edge": 48},
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    SiglipVisionModel(SiglipVisionConfig(**tower)).save_pretrained(folders["siglip"])
    return folders


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_towers(tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet-lite0")


def photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image sample photo as a (1, 3, size, size) uint8 batch, preprocessed like extraction does."""
    from PIL import Image
    from skimage import data

    return to_uint8_tensor(resize_square(Image.fromarray(getattr(data, name)()), size))[None]


def test_efficientnet_lite0_classifies_real_photos(lite0) -> None:
    x = normalize(torch.cat([photo("chelsea", 224), photo("coffee", 224)]), lite0.mean, lite0.std)
    with torch.inference_mode():
        top = lite0.classify(x).argmax(-1).tolist()
    assert top[0] in CAT_CLASSES
    assert top[1] in COFFEE_CLASSES


def test_efficientnet_lite0_yields_a_set_per_grid_cell(lite0) -> None:
    small = create_backbone("efficientnet-lite0", size=128)
    with torch.inference_mode():
        feats = lite0(normalize(photo("chelsea", 224), lite0.mean, lite0.std))
        feats_small = small(normalize(photo("chelsea", 128), small.mean, small.std))
    assert feats.shape == (1, 49, 1280) and lite0.grid_shape() == (7, 7)
    assert feats_small.shape == (1, 16, 1280) and small.grid_shape() == (4, 4)
    assert lite0.weights_sha256() == {
        "efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}
    assert lite0.mean == pytest.approx((127 / 255,) * 3) and lite0.std == pytest.approx((128 / 255,) * 3)


@pytest.mark.parametrize("size", [64, 100])
def test_resnet_set_is_the_c5_grid(towers: dict[str, Path], size: int) -> None:
    backbone = create_backbone("resnet", weights=towers["resnet"], size=size)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        feats = backbone(x)
        fmap = backbone.model(pixel_values=x).last_hidden_state  # (2, 24, h, w)
    h, w = cnn_grid(size)
    assert fmap.shape == (2, 24, h, w) and backbone.grid_shape() == (h, w)
    torch.testing.assert_close(feats, fmap.flatten(2).transpose(1, 2))  # cell (r, c) is row r·w + c
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_resnet_default_size_is_the_papers_512(towers: dict[str, Path]) -> None:
    backbone = create_backbone("resnet", weights=towers["resnet"])
    assert backbone.size == 512 and backbone.grid_shape() == (16, 16)


@pytest.mark.parametrize(("name", "drops_cls", "mean"), [("vit", True, HALF_MEAN), ("siglip", False, HALF_MEAN)])
def test_vision_towers_yield_patch_tokens(towers: dict[str, Path], name: str, drops_cls: bool, mean: tuple) -> None:
    backbone = create_backbone(name, weights=towers[name])
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        feats = backbone(x)
        hidden = backbone.model(pixel_values=x).last_hidden_state
    assert backbone.size == 32 and feats.shape == (2, 16, 16) and backbone.grid_shape() == (4, 4)
    torch.testing.assert_close(feats, hidden[:, 1:] if drops_cls else hidden)
    assert backbone.mean == mean and ("CLS token dropped" in backbone.tokens) == drops_cls


def test_clip_tower_reads_normalisation_and_size_from_its_folder(towers: dict[str, Path]) -> None:
    backbone = create_backbone("clip", weights=towers["clip"])
    assert backbone.mean == (0.1, 0.2, 0.3) and backbone.std == (0.4, 0.5, 0.6) and backbone.mean != CLIP_MEAN
    assert backbone.size == 48  # the processor's crop, not the config's 32: position embeddings are interpolated
    with torch.inference_mode():
        feats = backbone(torch.randn(1, 3, 48, 48))
    assert feats.shape == (1, 36, 16) and "CLS token dropped" in backbone.tokens


def test_hub_id_resolves_from_the_hugging_face_cache(towers: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--tiny--vit"
    commit = "0" * 40
    shutil.copytree(towers["vit"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backbone = create_backbone("vit", weights="tiny/vit")
    assert backbone.weights_id == "tiny/vit" and backbone.feat_dim == 16


def test_missing_weights_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError) as info:
        create_backbone("resnet", weights="microsoft/resnet-152")
    assert str(info.value) == (
        f"resnet weights 'microsoft/resnet-152' is not a local folder and not in the Hugging Face cache "
        f"({tmp_path / 'empty-cache'}); give a local model folder as the weights, fill that cache on a machine with "
        "network (`hf download microsoft/resnet-152`, then copy the folder), or set VSECTL_ALLOW_DOWNLOADS=1 to "
        "download it now")
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("efficientnet-lite0", weights=tmp_path / "nope.pth")


def test_a_backbone_hub_id_downloads_only_when_the_user_allows_it(towers: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch) -> None:
    """VSECTL_ALLOW_DOWNLOADS=1 covers image backbones as it covers text models; offline, one line names it."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    calls = []

    def fake_snapshot(repo_id, local_files_only=False, cache_dir=None, allow_patterns=None):  # noqa: ANN001, ANN202
        calls.append((repo_id, local_files_only, allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not in the cache")
        return str(towers["vit"])  # what a download into the cache would leave there

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.delenv("VSECTL_ALLOW_DOWNLOADS", raising=False)
    with pytest.raises(ConfigError, match="or set VSECTL_ALLOW_DOWNLOADS=1 to download it now"):
        create_backbone("vit", weights="tiny/vit")
    assert [c[1] for c in calls] == [True]  # looked in the cache only
    monkeypatch.setenv("VSECTL_ALLOW_DOWNLOADS", "1")
    backbone = create_backbone("vit", weights="tiny/vit")
    assert backbone.feat_dim == 16 and calls[-1][0] == "tiny/vit" and calls[-1][1] is False
    assert "*.safetensors" in calls[-1][2] and not any("h5" in p or "msgpack" in p for p in calls[-1][2])


def test_weights_of_another_network_are_refused(towers: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="do not fit ResNetModel"):
        create_backbone("resnet", weights=towers["vit"])
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="do not fit the network"):
        create_backbone("efficientnet-lite0", weights=tmp_path / "other.pth")


def test_unknown_backbone_suggests_a_name() -> None:
    assert BACKBONES.names() == ["clip", "detector", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2",
                                "resnet", "siglip", "vit", "wsl"]
    with pytest.raises(ConfigError, match="did you mean 'resnet'"):
        create_backbone("resnett")
