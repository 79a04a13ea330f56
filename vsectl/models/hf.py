"""Hugging Face helpers shared by image backbones and text encoders: offline folder lookup, quiet strict loads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vsectl.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


BACKBONE_FILES = ("*.json", "*.txt", "*.safetensors")  # config, image processor and weights: not TF/Flax copies
FALLBACK_WEIGHTS = ("*.bin",)  # repositories without safetensors


def not_found_message(backbone: str, weights: str) -> str:
    """The offline refusal of a backbone hub id: the line a text model's gets, naming the same opt-in."""
    from vsectl.models.hub import ALLOW_DOWNLOADS_ENV, hub_cache

    return (f"{backbone} weights '{weights}' is not a local folder and not in the Hugging Face cache ({hub_cache()}); "
            f"give a local model folder as the weights, fill that cache on a machine with network (`hf download "
            f"{weights}`, then copy the folder), or set {ALLOW_DOWNLOADS_ENV}=1 to download it now")


def download_hf_folder(weights: str) -> Path:
    """Fetch a hub id into the Hugging Face cache (only with `VSECTL_ALLOW_DOWNLOADS=1`): config, processor and
    safetensors weights, or the .bin weights of a repository that has no safetensors."""
    from huggingface_hub import snapshot_download

    from vsectl.models.hub import hub_cache

    try:
        folder = Path(snapshot_download(weights, cache_dir=str(hub_cache()), allow_patterns=list(BACKBONE_FILES)))
        if not weight_files(folder):
            folder = Path(snapshot_download(weights, cache_dir=str(hub_cache()),
                                            allow_patterns=[*BACKBONE_FILES, *FALLBACK_WEIGHTS]))
    except Exception as e:  # no network, an unknown id, a gated repository: one line, whatever the cause
        raise ConfigError(f"could not download '{weights}' from the Hugging Face hub: {str(e).splitlines()[0]}") \
            from None
    return folder


def resolve_hf_folder(backbone: str, weights: str | Path) -> Path:
    """Find a transformers model folder: a local folder, or a hub id in the Hugging Face cache (offline); a hub id
    not in the cache is downloaded only when the user allowed it (`VSECTL_ALLOW_DOWNLOADS=1`, as for text models).

    Raises:
        ConfigError: neither exists; the message says what was looked for and how to supply it.
    """
    path = Path(weights).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{backbone} weights folder {path} has no config.json; pass a save_pretrained folder")
        return path.resolve()
    if path.exists():
        raise ConfigError(f"{backbone} weights {path} is a file; pass the model folder (config.json + weights)")
    from huggingface_hub import snapshot_download

    from vsectl.models.hub import downloads_allowed, hub_cache

    try:
        folder = snapshot_download(str(weights), local_files_only=True, cache_dir=str(hub_cache()))
    except Exception:  # invalid repo ids, missing cache entries and offline errors all mean "not available here"
        if downloads_allowed():
            return download_hf_folder(str(weights))
        raise ConfigError(not_found_message(backbone, str(weights))) from None
    return Path(folder)


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from a folder: safetensors if any, else the other formats."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return safetensors or files


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars; the checks below turn what matters into errors."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_model(model_cls: type, folder: Path, backbone: str, **kwargs: Any) -> nn.Module:
    """`from_pretrained` in float32, refusing checkpoints that leave parameters uninitialised (strict loading)."""
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{backbone} weights in {folder} could not be loaded: {str(e).splitlines()[0]}") from None
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ConfigError(
            f"{backbone} weights in {folder} do not fit {model_cls.__name__}: {len(missing)} missing "
            f"{sorted(missing)[:2]}, {len(mismatched)} of the wrong shape; pass a {backbone} checkpoint"
        )
    # Unexpected keys are fine: a classifier head, or the text tower of a full CLIP/SigLIP checkpoint.
    return model
