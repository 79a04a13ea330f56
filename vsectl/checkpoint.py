"""Checkpoints without pickles: safetensors for every tensor (model, optimizer, RNG), JSON for the rest.

A checkpoint is a folder written under a temporary name and swapped in by rename, so a crash never leaves a
half-written checkpoint in place:

    checkpoints/last/  model.safetensors  optimizer.safetensors  rng.safetensors  trainer_state.json

A frozen part of the model (a frozen transformers text body) is stored once per run, in a file beside the checkpoints
(the runs of a sweep share one, in the sweep's text_cache/ folder); each checkpoint's model file names it by its
relative path and sha256 in the `frozen` metadata entry, and loading merges it back.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vsectl.errors import CheckpointError
from vsectl.io import atomic_path, json_text, sha256_file, umask_mode
from vsectl.tensorfile import save_file  # same tensors and metadata → same bytes (safetensors' own order varies)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
FROZEN_KEY = "frozen"  # model-file metadata: JSON {"file": path relative to the checkpoint, "sha256", "prefixes"}
FROZEN_FILE = "text_model/frozen_body.safetensors"  # stored once per run; checkpoints name it with its sha256


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a CPU copy of each tensor avoids both
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# optimizer and RNG state as tensors + JSON


def optimizer_to_tensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, NumPy and torch (CPU and CUDA) generator states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state(legacy=True)
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


# ----------------------------------------------------------------------------------------------------------------------
# save / load


def _write_checkpoint_files(
    tmp: Path, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], metadata: dict[str, str],
    optimizer_state: dict | None, rng: bool,
) -> None:
    state = dict(trainer_state)
    save_file(_plain(model_state), str(tmp / MODEL_FILE), metadata=metadata)
    if optimizer_state is not None:
        tensors, meta = optimizer_to_tensors(optimizer_state)
        save_file(_plain(tensors), str(tmp / OPTIMIZER_FILE))
        state["optimizer"] = meta
    if rng:
        tensors, meta = capture_rng()
        save_file(_plain(tensors), str(tmp / RNG_FILE))
        state["rng"] = meta
    (tmp / STATE_FILE).write_text(json_text(state))  # strict JSON: no best yet is null, not -Infinity
    for f in tmp.iterdir():
        os.chmod(f, umask_mode())  # safetensors writes 0600; lab-mates should read the weights as any other output
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def save_checkpoint(
    path: Path,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    metadata: dict[str, str],
    optimizer_state: dict | None = None,
    rng: bool = True,
) -> Path:
    """Write a checkpoint folder atomically (temporary folder, fsync, rename swap).

    Args:
        path: the checkpoint folder, e.g. run/checkpoints/last.
        model_state: the model's state dict.
        trainer_state: JSON-able dict (epoch, global_step, best_rsum, ...).
        metadata: strings stored in the model file's header (config YAML, vsectl version).
        optimizer_state: `optimizer.state_dict()`, or None.
        rng: also save the generator states.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, model_state, trainer_state, metadata, optimizer_state, rng)
    except BaseException:  # disk full, Ctrl-C: drop the partial folder; the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".old-{path.name}-{os.getpid()}"
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def recover(path: Path) -> Path:
    """Return a complete checkpoint folder: `path`, or the previous one kept aside by an interrupted swap."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    olds = sorted(path.parent.glob(f".old-{path.name}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds:
        if (old / STATE_FILE).is_file():
            os.rename(old, path)
            return path
    raise CheckpointError(f"no complete checkpoint at {path}")


def remove_partial(folder: Path) -> int:
    """Delete temporary folders left by checkpoint writes that were killed before their rename; return the count."""
    removed = 0
    for tmp in Path(folder).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
        removed += 1
    return removed


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a checkpoint's model file (config YAML, version)."""
    model_file = Path(path) / MODEL_FILE if Path(path).is_dir() else Path(path)
    try:
        with safe_open(str(model_file), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, Exception) as err:  # safetensors raises its own error type for corrupt headers
        raise CheckpointError(f"cannot read checkpoint {model_file}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# a frozen part, stored once per run


def split_frozen(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable, frozen) halves of a state dict: keys under any of `prefixes` are frozen."""
    frozen = {k: v for k, v in state.items() if prefixes and k.startswith(prefixes)}
    return {k: v for k, v in state.items() if k not in frozen}, frozen


def save_frozen(path: Path, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...], checkpoints: Path) -> str:
    """Write the frozen tensors once (atomically; an existing file is kept) and return the metadata entry that
    checkpoints under `checkpoints/<name>/` store to find it again."""
    path = Path(path)
    if not path.is_file():
        with atomic_path(path) as tmp:
            save_file(_plain(tensors), str(tmp))
    relative = os.path.relpath(path, Path(checkpoints) / "last")
    return json.dumps({"file": relative, "sha256": sha256_file(path), "prefixes": list(prefixes)})


def _merge_frozen(ckpt: Path, model: dict[str, torch.Tensor], entry: str, device: str) -> dict[str, torch.Tensor]:
    ref = json.loads(entry)
    path = (ckpt / ref["file"]).resolve()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} keeps its frozen weights in {path}, which is missing; copy the "
                              "whole run directory, not only the checkpoint folder (the runs of a sweep share that "
                              "file in the sweep's text_cache/ folder: copy it beside their runs/ folder too)")
    if sha256_file(path) != ref["sha256"]:
        raise CheckpointError(f"{path} does not hold the frozen weights checkpoint {ckpt} was saved with (sha256 "
                              "differs); restore that file from the original run")
    return {**load_file(str(path), device=device), **model}


def parse_trainer_state(text: str) -> Any:
    """trainer_state.json as a dict; best_rsum null (-Infinity in files of older versions) is -inf: no best yet."""
    state = json.loads(text)  # Python's reader still takes the -Infinity older versions wrote
    if isinstance(state, dict) and "best_rsum" in state and state["best_rsum"] is None:
        state["best_rsum"] = -math.inf
    return state


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint folder.

    Returns:
        {'model': state dict, 'trainer_state': dict, 'optimizer': state dict or None, 'rng': (tensors, meta) or None}.
    """
    path = recover(Path(path))
    device = str(map_location)
    try:
        model = load_file(str(path / MODEL_FILE), device=device)
        frozen = read_metadata(path).get(FROZEN_KEY)
        if frozen:
            model = _merge_frozen(path, model, frozen, device)
        state = parse_trainer_state((path / STATE_FILE).read_text())
        optimizer = None
        if "optimizer" in state and (path / OPTIMIZER_FILE).is_file():
            optimizer = optimizer_from_tensors(load_file(str(path / OPTIMIZER_FILE), device=device), state["optimizer"])
        rng = None
        if "rng" in state and (path / RNG_FILE).is_file():
            rng = (load_file(str(path / RNG_FILE)), state["rng"])
        check_finite_weights(path, model)
    except CheckpointError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from None
    except Exception as err:  # safetensors' SafetensorError for truncated files
        raise CheckpointError(f"checkpoint {path} is unreadable: {err}") from None
    return {"model": model, "trainer_state": state, "optimizer": optimizer, "rng": rng}


def check_finite_weights(where: Path | str, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf: a model with them ranks nothing, and training from them cannot recover."""
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{where}: weight {key} holds NaN or inf values; this checkpoint cannot be used "
                                  "(resume from or evaluate another one)")


TRAINER_STATE_KEYS = {"epoch": int, "global_step": int, "best_rsum": (int, float), "best_epoch": int}
LOWEST = {"best_epoch": -1}  # -1: no epoch was best yet; the other counts start at 0


def check_trainer_state(path: Path, state: Any) -> None:
    """The fields a resume reads from trainer_state.json, present and of their types (else one line, not a KeyError)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE} is damaged (not a JSON object); resume from another checkpoint "
                              "or start the run again")
    for key, kind in TRAINER_STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < LOWEST.get(key, 0)):
            what = f"{key} is missing" if key not in state else f"{key} is {str(value)[:40]!r}"
            raise CheckpointError(f"{path / STATE_FILE} is damaged ({what}); resume from another checkpoint or "
                                  "start the run again")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load with one readable error for a checkpoint of another configuration."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise CheckpointError("checkpoint does not match the model configuration: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def frozen_path(run_dir: Path, shared: Path | None, frozen_state: dict[str, torch.Tensor]) -> Path:
    """Where a frozen text body is stored: in the run (`FROZEN_FILE`), or, for the runs of a sweep (a `shared` state
    cache folder), once in that folder under a name that digests its tensors, so cells and seeds that freeze the same
    body share one file instead of a copy each (90 MB for MiniLM, 440 MB for BERT-base)."""
    from vsectl.text_cache import tensors_digest

    if shared is None:
        return run_dir / FROZEN_FILE
    return shared / f"frozen-body-{tensors_digest(frozen_state)[:16]}.safetensors"
