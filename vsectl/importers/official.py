"""Import the paper's released VSE∞ checkpoints (`model_best.pth` of woodfrog/vse_infty) as ordinary vsectl runs.

An official checkpoint is a torch pickle of {'epoch', 'model': [image encoder state, text encoder state],
'best_rsum', 'opt': argparse.Namespace, 'Eiters'}. It is read with the restricted unpickler (`safe_load`), its options
become a config (`official_opt`), its weights are renamed to vsectl's layout by the table below and loaded strictly,
and the run directory is written under a temporary name and renamed into place, so a failed import leaves nothing.

    runs/NAME/  config.yaml  vocab.json | text_model/  provenance.json  checkpoints/best/{model.safetensors, ...}
                [backbone.safetensors: grid checkpoints, the trained backbone the config builds the model from]
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import vsectl
from vsectl.builders import TEXT_MODEL_DIR, VOCAB_FILE, build_model, load_text
from vsectl.checkpoint import check_finite_weights, load_model_state, save_checkpoint
from vsectl.config import RunConfig, config_to_yaml, save_config
from vsectl.data.vocab import Vocab
from vsectl.errors import CheckpointError, ConfigError
from vsectl.folders import staged_folder
from vsectl.importers.official_grid import (
    BACKBONE_FILE,
    GRID_HEAD_KEYS,
    head_sizes_view,
    map_grid_backbone,
    split_grid_image,
)
from vsectl.importers.official_opt import (
    build_config,
    check_fields,
    is_grid,
    opt_record,
    plain_options,
    protocol_for,
)
from vsectl.importers.safe_load import load_torch_pickle
from vsectl.io import atomic_write_json, sha256_file
from vsectl.locks import folder_lock
from vsectl.optim import create_run_optimizer
from vsectl.recipe_yaml import check_name, shown

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
HASH_CHUNK = 1 << 20

# (official key prefix, vsectl key prefix); a prefix of None drops the key, for the reason given.
IMAGE_KEYS: list[tuple[str, str | None, str]] = [
    ("fc.", "image.fc.", ""),
    ("mlp.layers.0.", "image.mlp.fc1.", ""),
    ("mlp.layers.1.", "image.mlp.fc2.", ""),
    ("mlp.bns.0.", "image.mlp.bn.", ""),
    ("mlp.bns.1.", None, "a BatchNorm1d over the MLP output that the official forward never applies"),
    ("gpool.gru.", "image.pool.gru.", ""),
    ("gpool.linear.", "image.pool.scorer.", ""),
]
BIGRU_KEYS: list[tuple[str, str | None, str]] = [
    ("embed.", "text.embed.", ""),
    ("rnn.", "text.rnn.", ""),
    ("gpool.gru.", "text.pool.gru.", ""),
    ("gpool.linear.", "text.pool.scorer.", ""),
]
BERT_KEYS: list[tuple[str, str | None, str]] = [
    ("bert.pooler.", None, "BERT's pooler head; the official text encoder uses the token states only"),
    ("bert.embeddings.position_ids", None, "a constant index buffer that older transformers versions saved"),
    ("bert.embeddings.token_type_ids", None, "a constant zero buffer that some transformers versions saved"),
    ("bert.", "text.body.", ""),
    ("linear.", "text.proj.", ""),
    ("gpool.gru.", "text.pool.gru.", ""),
    ("gpool.linear.", "text.pool.scorer.", ""),
]


@dataclass
class OfficialCheckpoint:
    """The parts of an official checkpoint, already checked for shape."""

    image: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    opt: dict[str, Any]
    branch: str                   # "bigru" or "bert", read from the text weights
    epoch: int | None
    best_rsum: float | None
    eiters: int | None


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `module.` prefix nn.DataParallel adds when every key carries it."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def read_official(path: Path) -> OfficialCheckpoint:
    """Read and check the layout of an official checkpoint (nothing in it runs)."""
    obj = load_torch_pickle(path)
    if not isinstance(obj, dict) or "model" not in obj or "opt" not in obj:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not an official VSE∞ checkpoint (expected 'model' and 'opt', found {keys})")
    parts, opt = obj["model"], obj["opt"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, dict) for p in parts):
        raise CheckpointError(f"{path}: 'model' must be [image encoder state, text encoder state]")
    image, text = (_strip_module(dict(p)) for p in parts)
    for side, state in (("image", image), ("text", text)):
        bad = next((k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
        if bad is not None:
            raise CheckpointError(f"{path}: {side} encoder entry {shown(bad)} is not a tensor")
    opt = vars(opt) if hasattr(opt, "__dict__") else opt
    if not isinstance(opt, dict):
        raise CheckpointError(f"{path}: 'opt' is neither an argparse Namespace nor a dict")
    opt = plain_options(opt, str(path))
    if any(k.startswith("bert.") for k in text):
        branch = "bert"
    elif "embed.weight" in text:
        branch = "bigru"
    else:
        raise CheckpointError(f"{path}: cannot place text key {next(iter(text), '(none)')!r}: the text encoder is "
                              "neither the official BiGRU (embed.*, rnn.*) nor BERT (bert.*)")

    def number(key: str, kind: type) -> Any:
        value = obj.get(key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return OfficialCheckpoint(image=image, text=text, opt=dict(opt), branch=branch, epoch=number("epoch", int),
                              best_rsum=number("best_rsum", float), eiters=number("Eiters", int))


def map_keys(
    state: dict[str, torch.Tensor], rules: list[tuple[str, str | None, str]], side: str, source: Path
) -> tuple[dict[str, torch.Tensor], list[dict[str, str]]]:
    """Rename official keys to vsectl's by the first matching prefix; fail on the first key no rule places."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[dict[str, str]] = []
    for key, value in state.items():
        rule = next((r for r in rules if key.startswith(r[0])), None)
        if rule is None:
            grid_side = key.startswith(("backbone.", "image_encoder."))
            grid = " (a grid model's image side, but the options say precomp_enc_type=basic)" if grid_side else ""
            raise CheckpointError(f"{source}: cannot place {side} encoder key '{key}'{grid}; vsectl has no weight "
                                  "it corresponds to")
        prefix, target, why = rule
        if target is None:
            if key == "bert.embeddings.position_ids" and not torch.equal(value.flatten(), torch.arange(value.numel())):
                raise CheckpointError(f"{source}: cannot place text encoder key '{key}': it is not 0, 1, 2, …")
            dropped.append({"key": f"{side}:{key}", "why": why})
            continue
        out[target + key[len(prefix):]] = value
    return out, dropped


def _gpo_sizes(state: dict[str, torch.Tensor], source: Path, side: str) -> tuple[int, int]:
    w = state.get("gpool.gru.weight_ih_l0")
    if w is None or w.dim() != 2:
        raise CheckpointError(f"{source}: the {side} encoder has no GPO (gpool.gru.weight_ih_l0); only VSE∞ "
                              "checkpoints with GPO pooling import")
    return int(w.shape[1]), int(w.shape[0]) // 3                    # GRU input (d_pe), hidden (3·H gates)


def _text_files(ckpt: OfficialCheckpoint, tmp: Path, source: Path, vocab: Path | None,
                text_model: str | None) -> dict[str, Any]:
    """Write vocab.json or text_model/ into the new run; return what went in, for the provenance record."""
    if ckpt.branch == "bigru":
        if vocab is None:
            name = "coco_precomp_vocab.json" if "coco" in str(ckpt.opt.get("data_name", "")) else \
                "f30k_precomp_vocab.json"
            raise CheckpointError(f"{source} has BiGRU text: give the vocabulary it was trained with, "
                                  f"--vocab PATH/{name} (the official vocab file)")
        words = Vocab.load(vocab)                                    # appends <mask>, as the official code does
        rows = int(ckpt.text["embed.weight"].shape[0])
        expected = ckpt.opt.get("vocab_size", rows)
        if len(words) != rows or expected != rows:
            raise CheckpointError(f"--vocab {vocab} has {len(words)} words with <mask>, but the checkpoint's word "
                                  f"table has {rows} rows (opt vocab_size={expected}); give the vocabulary file the "
                                  "model was trained with")
        words.save(tmp / VOCAB_FILE)
        return {"vocab": {"path": str(Path(vocab).resolve()), "sha256": sha256_file(Path(vocab)),
                          "words_with_mask": len(words)}}
    if not text_model:
        raise CheckpointError(f"{source} has BERT text, whose config and tokenizer the checkpoint does not carry: "
                              "give --text-model FOLDER or a hub id already in the Hugging Face cache "
                              "(bert-base-uncased for the released models); vsectl never downloads")
    config, tokenizer = _load_bert_files(text_model)
    width = int(ckpt.text["linear.weight"].shape[1]) if "linear.weight" in ckpt.text else None
    rows = int(ckpt.text["bert.embeddings.word_embeddings.weight"].shape[0]) \
        if "bert.embeddings.word_embeddings.weight" in ckpt.text else None
    if width is not None and config.hidden_size != width:
        raise CheckpointError(f"--text-model {text_model} is {config.hidden_size} wide but the checkpoint's BERT is "
                              f"{width} wide; give the BERT the model was trained with")
    if rows is not None and config.vocab_size != rows:
        raise CheckpointError(f"--text-model {text_model} has {config.vocab_size} word pieces but the checkpoint's "
                              f"BERT has {rows}; give the BERT the model was trained with")
    if config.pad_token_id not in (None, 0) or tokenizer.pad_token_id not in (None, 0):
        raise CheckpointError(f"--text-model {text_model} pads with id {config.pad_token_id}; the official model "
                              "masks id 0, so the tokenizer must pad with 0")
    config.save_pretrained(tmp / TEXT_MODEL_DIR)
    tokenizer.save_pretrained(tmp / TEXT_MODEL_DIR)
    return {"text_model": {"source": text_model, "model_type": config.model_type, "hidden_size": config.hidden_size,
                           "layers": config.num_hidden_layers}}


def _load_bert_files(text_model: str) -> tuple[Any, Any]:
    """The transformers config and fast tokenizer of `text_model`, from disk or the hub cache only."""
    from transformers import AutoConfig, AutoTokenizer

    from vsectl.models.text_encoders import resolve_pretrained

    where = resolve_pretrained(text_model)
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(where, use_fast=True, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--text-model {text_model} is neither a folder with config.json and tokenizer files "
                              f"nor in the Hugging Face cache ({str(err).splitlines()[0][:120]}); vsectl never "
                              "downloads: copy the folder here, or fetch it once with network access") from None
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"--text-model {text_model} has no fast tokenizer; give a folder with vocab.txt or "
                              "tokenizer.json")
    return config, tokenizer


def import_official(
    path: str | Path, out: str | Path, vocab: str | Path | None = None, text_model: str | None = None,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Turn an official `model_best.pth` into the vsectl run directory `out`.

    Args:
        path: the official checkpoint.
        out: the new run directory (must not exist).
        vocab: BiGRU checkpoints: the official vocabulary JSON the model was trained with.
        text_model: BERT checkpoints: a local folder (or a hub id in the Hugging Face cache) with the BERT config and
            tokenizer; the weights come from the checkpoint.
        data_root: the dataset folder to record as data.root (default: data/coco or data/f30k from its options).

    Returns:
        the provenance record, plus 'run' (the directory) and 'protocol' (the eval protocol of its dataset).
    """
    path, out = Path(path), Path(out)
    if out.exists():
        raise CheckpointError(f"--out {out} already exists; choose a new folder (an import never overwrites a run)")
    try:
        check_name(out.name)  # the folder's name becomes the run's name
    except ConfigError:
        raise CheckpointError(f"--out {shown(out.name)}: a run's folder name takes letters, digits and _ . + = @ , - "
                              "(not starting with . or -); choose another") from None
    ckpt = read_official(path)
    check_fields(ckpt.opt, str(path))  # the first option it cannot place stops it before the weights
    grid = is_grid(ckpt.opt)
    backbone: dict[str, torch.Tensor] | None = None
    if grid:
        backbone_keys, head = split_grid_image(ckpt.image, path)
        sizes = {"image": _gpo_sizes(head_sizes_view(head), path, "image"),
                 "text": _gpo_sizes(ckpt.text, path, "text")}
        hidden = 0
    else:
        sizes = {"image": _gpo_sizes(ckpt.image, path, "image"), "text": _gpo_sizes(ckpt.text, path, "text")}
        mlp = ckpt.image.get("mlp.layers.0.weight")
        if mlp is None:
            raise CheckpointError(f"{path}: the image encoder has no region MLP (mlp.layers.0.weight), and the "
                                  "options say precomp_enc_type=basic (a region model)")
        hidden = int(mlp.shape[0])
    # a grid run builds its backbone from its own copy of the trained weights, so it needs no file from elsewhere
    weights = str(out.resolve() / BACKBONE_FILE) if grid else ""
    cfg = build_config(ckpt.opt, ckpt.branch, out.name, sizes, hidden, str(path), text_model or "", weights)
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    if grid:
        backbone, image_state, dropped = map_grid_backbone(backbone_keys, path, cfg.model.image.backbone.name)
        head_state, dropped_head = map_keys(head, GRID_HEAD_KEYS, "image", path)
        image_state, dropped = {**image_state, **head_state}, dropped + dropped_head
    else:
        image_state, dropped = map_keys(ckpt.image, IMAGE_KEYS, "image", path)
    text_state, dropped_text = map_keys(ckpt.text, BIGRU_KEYS if ckpt.branch == "bigru" else BERT_KEYS, "text", path)
    hint = "choose a new folder (an import never overwrites a run)"
    with folder_lock(out), staged_folder(out, hint) as tmp:  # written aside, renamed into place when complete
        if out.exists():
            raise CheckpointError(f"--out {out} already exists; {hint}")
        record = _write_run(tmp, cfg, ckpt, path, {**image_state, **text_state}, dropped + dropped_text, vocab,
                            text_model, backbone)
    log.info("imported %s (%s, %s text, epoch %s) into %s", path, "grid" if grid else "region", ckpt.branch,
             ckpt.epoch, out)
    return {**record, "run": str(out), "protocol": protocol_for(ckpt.opt.get("data_name", ""))}


def _check_weights(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights that are NaN or inf, or integers where the model has floating point; say when lower-precision
    floats (fp16, bf16) are widened to the model's fp32."""
    check_finite_weights(source, state)
    narrow = []
    for key, value in state.items():
        target = own.get(key)
        if target is None or not target.is_floating_point():
            continue
        if not value.is_floating_point():
            raise CheckpointError(f"{source}: weight {key} holds {value.dtype} values where the model has "
                                  f"{target.dtype} ones; an official checkpoint stores floating-point weights")
        if torch.finfo(value.dtype).bits < torch.finfo(target.dtype).bits:
            narrow.append(key)
    if narrow:
        log.warning("%s stores %d weights in lower precision (e.g. %s as %s); they are widened to %s, so the imported "
                    "model computes at the precision the checkpoint keeps", source, len(narrow), narrow[0],
                    state[narrow[0]].dtype, own[narrow[0]].dtype)


def _write_run(tmp: Path, cfg: RunConfig, ckpt: OfficialCheckpoint, source: Path, state: dict[str, torch.Tensor],
               dropped: list[dict[str, str]], vocab: str | Path | None, text_model: str | None,
               backbone: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    text_info = _text_files(ckpt, tmp, source, Path(vocab) if vocab is not None else None, text_model)
    save_config(cfg, tmp / "config.yaml")
    build_cfg = cfg
    if backbone is not None:  # the config names the run's final folder; until the rename the file sits in tmp
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(tmp / BACKBONE_FILE))
        image = cfg.model.image
        build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, image=dataclasses.replace(
            image, backbone=dataclasses.replace(image.backbone, weights=str(tmp / BACKBONE_FILE)))))
    model = build_model(build_cfg, load_text(cfg, tmp))  # exactly how eval rebuilds the run
    _check_weights(state, model.state_dict(), source)
    try:
        load_model_state(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{source} does not fit the model its options describe: {err}") from None
    trainer_state = {"epoch": ckpt.epoch or 0, "global_step": ckpt.eiters or 0,
                     "best_rsum": ckpt.best_rsum if ckpt.best_rsum is not None else -math.inf,
                     "best_epoch": ckpt.epoch - 1 if ckpt.epoch else -1, "imported_from": "official"}
    meta = {"config": config_to_yaml(cfg), "vsectl_version": vsectl.__version__, "format": "vsectl-checkpoint-1",
            "imported_from": str(source)}
    save_checkpoint(tmp / "checkpoints" / "best", model.state_dict(), trainer_state, meta, rng=False)
    # `last` lets `train --resume` continue from these weights; the official file has no optimizer moments, so the
    # optimizer starts fresh, built as training builds it (its groups must match for the resume to load)
    optimizer = create_run_optimizer(model, cfg.train)
    save_checkpoint(tmp / "checkpoints" / "last", model.state_dict(), trainer_state, meta,
                    optimizer_state=optimizer.state_dict())
    record = {
        "source": {"path": str(source.resolve()), "sha256": sha256_file(source), "bytes": source.stat().st_size,
                   "format": "official VSE∞ checkpoint (woodfrog/vse_infty model_best.pth)"},
        "text_branch": ckpt.branch,
        "image_side": f"grid ({cfg.model.image.backbone.name})" if backbone is not None else "region",
        "official": {"epoch": ckpt.epoch, "best_rsum": ckpt.best_rsum, "Eiters": ckpt.eiters},
        **text_info,
        "opt": opt_record(ckpt.opt, ckpt.branch),
        "dropped_keys": dropped,
        "not_in_the_checkpoint": "optimizer and RNG state (the official code does not save them): checkpoints/last "
                                 "holds a fresh AdamW state, so `train --resume` continues from these weights with "
                                 "new optimizer moments",
        "vsectl_version": vsectl.__version__,
        "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(tmp / PROVENANCE_FILE, record)
    return record
