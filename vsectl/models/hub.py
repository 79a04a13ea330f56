"""Hugging Face hub ids, offline first: a hub id is looked up in the local cache and never downloaded unless asked.

Downloads are opt-in with the environment variable `VSECTL_ALLOW_DOWNLOADS=1`; without it a model that is not in the
cache fails at once, with one line that names the cache folder to fill.
"""

from __future__ import annotations

import os
from pathlib import Path

from vsectl.errors import ConfigError

ALLOW_DOWNLOADS_ENV = "VSECTL_ALLOW_DOWNLOADS"


def downloads_allowed() -> bool:
    """True when the user opted in to downloading models from the hub (`VSECTL_ALLOW_DOWNLOADS=1`)."""
    return os.environ.get(ALLOW_DOWNLOADS_ENV, "").strip().lower() in ("1", "true", "yes")


def hub_cache() -> Path:
    """The Hugging Face cache folder in effect now: $HF_HUB_CACHE if set now, else huggingface_hub's own setting
    (from $HF_HUB_CACHE or $HF_HOME when it was imported; ~/.cache/huggingface/hub by default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def not_cached_message(what: str, name: str) -> str:
    return (f"{what} '{name}' is not a local folder and not in the Hugging Face cache ({hub_cache()}); fill that cache "
            f"on a machine with network (`hf download {name}`, then copy the folder), point to a local model folder, "
            f"or set {ALLOW_DOWNLOADS_ENV}=1 to download it now")


def cached_model_folder(name: str, what: str = "model") -> Path:
    """The snapshot folder of hub id `name` in the local cache, without touching the network.

    Raises:
        ConfigError: the id is not cached (or is not a valid id); the message names the cache folder and the opt-in.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=str(hub_cache())))
    except Exception:  # invalid ids, missing cache entries and offline errors all mean "not available here"
        raise ConfigError(not_cached_message(what, name)) from None
