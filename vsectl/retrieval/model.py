"""A trained run as an encoder: `load(run)` gives text and image towers that return unit vectors as numpy arrays."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.builders import load_run, resolve_checkpoint
from vsectl.checkpoint import MODEL_FILE, recover
from vsectl.data.datasets import collate_tokens
from vsectl.errors import ConfigError, DataError
from vsectl.io import sha256_file
from vsectl.kinds import IMAGE_KINDS, ImageInput
from vsectl.retrieval.recipe import FeatureRecipe, feature_recipe
from vsectl.runtime import resolve_device

log = logging.getLogger(__name__)

TEXT_BATCH = 128  # captions per forward pass (the evaluation's batch, so embeddings match it bit for bit)
IMAGE_BATCH = 128  # feature sets per forward pass of the image tower
BACKBONE_BATCH = 32  # images per backbone forward pass (extract's default)
FINGERPRINT_CHARS = 16  # hex digits of the checkpoint's sha256 kept as its fingerprint


def run_fingerprint(run: str | Path, checkpoint: str = "best") -> str:
    """The fingerprint of a run's checkpoint: the first 16 hex digits of the sha256 of its model.safetensors.

    Embeddings record it; a model whose weights differ (another run, another checkpoint) has another fingerprint.
    """
    _, ckpt = resolve_checkpoint(Path(run), checkpoint)
    model_file = recover(ckpt) / MODEL_FILE
    stat = model_file.stat()
    return _cached_fingerprint(str(model_file.resolve()), stat.st_mtime_ns, stat.st_size)


def _pad_sets(sets: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([s.shape[0] for s in sets], dtype=torch.int64)  # (B,)
    out = torch.zeros(len(sets), int(lengths.max()), sets[0].shape[1], dtype=torch.float32)  # (B, K_max, D)
    for b, s in enumerate(sets):
        out[b, : s.shape[0]] = torch.as_tensor(s, dtype=torch.float32)
    return out, lengths


class RetrievalModel:
    """The two towers of a trained run, in eval mode on one device, returning numpy unit vectors.

    Build it with `load(run)`. Encoding is fp32 and deterministic: the same inputs in the same batches give the same
    bits as `vsectl eval`.

    Attributes:
        run_dir: the run directory.
        checkpoint: "best", "last" or the checkpoint folder given.
        fingerprint: the checkpoint's fingerprint (`run_fingerprint`); embeddings made by this model record it.
        embed_dim: E.
        feat_dim: D, the width of the image features the image tower takes.
        recipe: the run's feature recipe (backbone, size, normalisation), or None when its features were not made by
            `vsectl extract` (then only feature sets can be encoded, not image files).
        device: the torch device.
        config: the run's RunConfig.
    """

    def __init__(self, run_dir: Path, checkpoint: str, config: Any, net: Any, text: Any, device: torch.device,
                 fingerprint: str, recipe: FeatureRecipe | None) -> None:
        self.run_dir, self.checkpoint, self.config = run_dir, checkpoint, config
        self.net, self.text, self.device = net, text, device
        self.fingerprint, self.recipe = fingerprint, recipe
        self.embed_dim = int(config.model.embed_dim)
        self.feat_dim = int(config.model.image.feat_dim)
        self._processor = text.processor(augment=False)
        self._backbone: Any = None
        self._engine: Any = None  # the extraction engine chosen for pixel_items (vsectl.extract.engines.Choice)

    def __repr__(self) -> str:
        return f"RetrievalModel({str(self.run_dir)!r}, checkpoint={self.checkpoint!r}, fingerprint={self.fingerprint})"

    # ------------------------------------------------------------------------------------------------ text

    def tokenize(self, texts: Sequence[str], first: int = 0) -> list[list[int]]:
        """Token ids of each text, as evaluation makes them (no augmentation).

        Raises:
            ConfigError: a text has more tokens than the run's transformers text model has positions.
        """
        ids = [self._processor.encode(t, None) for t in texts]
        limit = getattr(getattr(self.text.body, "config", None), "max_position_embeddings", None)
        for k, t in enumerate(ids):
            if limit is not None and len(t) > limit:
                raise ConfigError(f"query {first + k + 1} is {len(t)} tokens long; this run's text model reads at most "
                                  f"{limit}: shorten it")
        return ids

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> np.ndarray:
        """Embed texts.

        Args:
            texts: N strings, each with at least one non-blank character.
            batch_size: texts per forward pass.

        Returns:
            (N, E) float32, rows of unit length.

        Raises:
            ConfigError: a text is empty or blank.
        """
        if isinstance(texts, str):
            texts = [texts]
        for k, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ConfigError(f"query {k + 1} is empty; give some words to search for")
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        pad = self.text.pad_id
        for a in range(0, len(texts), batch_size):
            ids = [torch.tensor(t, dtype=torch.int64) for t in self.tokenize(texts[a : a + batch_size], a)]
            batch = collate_tokens([(t, k) for k, t in enumerate(ids)], pad_id=pad)
            emb, _ = self.net.encode_text(batch["tokens"].to(self.device), batch["token_lengths"].to(self.device))
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    # ------------------------------------------------------------------------------------------------ images

    @torch.no_grad()
    def encode_feature_sets(self, sets: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
                            batch_size: int = IMAGE_BATCH) -> np.ndarray:
        """Embed image feature sets with the image tower (GPO included).

        Args:
            sets: a (B, K, D) array or tensor (every set of size K), or a sequence of (n_i, D) sets of any sizes.
            batch_size: sets per forward pass.

        Returns:
            (B, E) float32 unit rows.
        """
        if isinstance(sets, (np.ndarray, torch.Tensor)) and sets.ndim == 3:
            sets = list(sets)
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for a in range(0, len(sets), batch_size):
            chunk = sets[a : a + batch_size]
            for s in chunk:
                if s.ndim != 2 or s.shape[1] != self.feat_dim or s.shape[0] == 0:
                    raise DataError(f"a feature set has shape {tuple(s.shape)}; this run takes (n ≥ 1, "
                                    f"{self.feat_dim}) sets")
            out.append(self.encode_padded(*_pad_sets(chunk)))
        return np.concatenate(out)

    @torch.no_grad()
    def encode_padded(self, feats: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
        """Embed one batch of padded feature sets: (B, K, D) float32 (rows past each length zero), (B,) → (B, E)."""
        emb, _ = self.net.encode_image(feats.to(self.device), lengths.to(self.device))
        return emb.float().cpu().numpy()

    @property
    def end_to_end(self) -> bool:
        """The run trained its own backbone (its image kind reads pixels): its tower takes pixels, not sets."""
        return IMAGE_KINDS.get(self.config.model.image.encoder).reads is ImageInput.PIXELS

    def provenance(self) -> dict[str, Any] | None:
        """How this model turns image files into embeddings, as recorded in an embeddings folder's meta.json."""
        if self.end_to_end:
            bb = self.net.image.backbone
            return {"backbone": bb.name, "end_to_end": True, "input_size": bb.size, "mean": list(bb.mean),
                    "std": list(bb.std)}
        return self.recipe.provenance() if self.recipe is not None else None

    def check_images(self, videos: bool = False) -> None:
        """Fail now, in one line, when image (or, with `videos`, video) files cannot be embedded by this model."""
        if not self.end_to_end:
            self.backbone  # noqa: B018
        made_from_videos = self.recipe is not None and self.recipe.sampling is not None
        if videos != made_from_videos:
            what, how = (("video files", "video files (--videos DIR, or --data with a video dataset)")
                         if made_from_videos else ("images", "images (--images DIR or --data)"))
            raise ConfigError(f"run {self.run_dir} was trained on features of {what}; embed {how} with it")

    @torch.no_grad()
    def encode_items(self, items: Sequence[np.ndarray], batch_size: int = IMAGE_BATCH) -> np.ndarray:
        """Embed what `image_features` yields: feature sets, or (3, S, S) uint8 images for an end-to-end run."""
        if not self.end_to_end:
            return self.encode_feature_sets(items, batch_size)
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for a in range(0, len(items), batch_size):
            pixels = torch.from_numpy(np.stack(items[a : a + batch_size]))  # (B, 3, S, S) uint8
            emb, _ = self.net.encode_image(pixels.to(self.device), None)
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    @property
    def image_size(self) -> int:
        """The side, in pixels, that image files are resized to before the backbone."""
        return self.net.image.backbone.size if self.end_to_end else self.backbone.size

    def pixel_items(self, images: torch.Tensor, n_images: int = 0) -> list[np.ndarray]:
        """(b, 3, S, S) uint8 decoded images → what `encode_items` takes: the replayed backbone's feature sets
        (rounded through the recipe's store dtype, as `image_features` gives them), or the images themselves for an
        end-to-end run.

        Args:
            images: one batch of decoded images.
            n_images: about how many images the whole job will run (the first call chooses the extraction engine
                for the job, as `vsectl extract` does: timing the candidates pays only on long jobs).
        """
        if self.end_to_end:
            return list(images.numpy())
        if self._engine is None:
            from vsectl.extract.engines import choose_engine

            recipe = self.recipe
            self._engine = choose_engine(self.backbone, device=self.device, precision=recipe.precision,
                                         channels_last=recipe.channels_last, n_images=n_images)
        feats = self._engine.engine.run(images)  # (b, N, C)
        dtype = np.float16 if self.recipe.dtype == "float16" else np.float32
        return list(feats.astype(dtype).astype(np.float32))

    def _pixels(self, paths: Sequence[str | Path], workers: int, batches: Sequence[Sequence[int]] | None,
                progress: Any) -> Iterator[tuple[int, np.ndarray | None, str]]:
        from vsectl.data.images import ImageFiles

        size = self.net.image.backbone.size
        loader = torch.utils.data.DataLoader(ImageFiles(paths, size), batch_sampler=batches or [
            list(range(a, min(a + BACKBONE_BATCH, len(paths)))) for a in range(0, len(paths), BACKBONE_BATCH)],
            num_workers=workers)
        started, done = time.perf_counter(), 0
        for index, images, ok, reasons in loader:
            for i, image, good, reason in zip(index.tolist(), images, ok.tolist(), reasons, strict=True):
                yield i, (image.numpy() if good else None), reason
            done += len(index)
            if progress is not None:
                progress.update(images_per_s=done / max(time.perf_counter() - started, 1e-9))

    @property
    def backbone(self) -> Any:
        """The run's backbone, rebuilt from its feature recipe on first use (on this model's device).

        Raises:
            ConfigError: the run has no recipe, or it cannot be reproduced here (weights missing or different).
        """
        if self._backbone is None:
            if self.recipe is None:
                raise ConfigError(
                    f"run {self.run_dir} was trained on features without a recorded backbone (data.root "
                    f"{self.config.data.root} holds no store made by `vsectl extract`); embed extracted features "
                    "with --features instead of image files")
            self._backbone = self.recipe.build_backbone()
        return self._backbone

    def image_features(self, paths: Sequence[str | Path], *, workers: int = 0, batches: Sequence[Sequence[int]] | None
                       = None, progress: Any = None) -> Iterator[tuple[int, np.ndarray | None, str]]:
        """Run the replayed backbone over image files: yields (index, (N, C) float32 set or None, reason if None).

        Sets are rounded through the store dtype of the recipe, so they equal what `vsectl extract` stored (within the
        extraction engines' tolerance, `vsectl.extract.engines.TOLERANCE`, when `auto` picks another engine than the
        store was made with). For an end-to-end run (`end_to_end`) the items are (3, S, S) uint8 images for
        `encode_items` instead.
        """
        if self.end_to_end:
            yield from self._pixels(paths, workers, batches, progress)
            return
        from vsectl.extract import extract_images, extract_videos

        recipe = self.recipe
        backbone = self.backbone
        dtype = np.float16 if recipe.dtype == "float16" else np.float32
        if recipe.sampling is not None:  # trained on video files: each path is a video, sampled as at extraction
            for i, feats, reason, _ in extract_videos(backbone, paths, recipe.sampling, batch_size=BACKBONE_BATCH,
                                                      workers=workers, device=self.device, precision=recipe.precision,
                                                      channels_last=recipe.channels_last, progress=progress):
                yield i, (None if feats is None else feats.astype(dtype).astype(np.float32)), reason
            return
        for i, feats, reason in extract_images(backbone, paths, batches=batches, batch_size=BACKBONE_BATCH,
                                               workers=workers, device=self.device, precision=recipe.precision,
                                               channels_last=recipe.channels_last, progress=progress):
            yield i, (None if feats is None else feats.astype(dtype).astype(np.float32)), reason

    def encode_images(self, images: Sequence[str | Path | np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
                      batch_size: int = IMAGE_BATCH) -> np.ndarray:
        """Embed images given as files (the run's backbone is replayed) or as feature sets.

        Args:
            images: image file paths; or a (B, K, D) array/tensor or a sequence of (n_i, D) feature sets.
            batch_size: sets per forward pass of the image tower.

        Returns:
            (B, E) float32 unit rows.

        Raises:
            ConfigError: files were given but the run's feature recipe cannot be replayed.
            DataError: a file cannot be read as an image.
        """
        if isinstance(images, (str, Path)):
            images = [images]
        if len(images) and isinstance(images[0], (str, Path)):
            sets: list[np.ndarray] = []
            for _, feats, reason in self.image_features([Path(p) for p in images]):
                if feats is None:
                    raise DataError(f"cannot read image {reason}")
                sets.append(feats)
            return self.encode_items(sets, batch_size)
        if self.end_to_end:
            raise ConfigError(f"run {self.run_dir} trains its own backbone: give image files, not feature sets")
        return self.encode_feature_sets(images, batch_size)


@functools.lru_cache(maxsize=4)
def _cached_fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))[:FINGERPRINT_CHARS]


def _data_root(root: str, run_dir: Path) -> Path:
    """`data.root` as training saw it: relative to the working directory, else to the folder holding `runs/`."""
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path
    beside = run_dir.resolve().parent.parent / path
    return beside if beside.exists() else path


def load(run: str | Path, checkpoint: str = "best", device: str | torch.device = "auto") -> RetrievalModel:
    """Load a trained run for retrieval.

    Args:
        run: a run directory (e.g. runs/demo) or a checkpoint folder.
        checkpoint: "best" (falls back to "last" when the run kept no best) or "last".
        device: "auto" | "cpu" | "cuda" | "cuda:N".

    Returns:
        The model, in eval mode on `device`.

    Raises:
        CheckpointError: no such run or checkpoint. ConfigError: an unknown device.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    run_dir, ckpt = resolve_checkpoint(Path(run), checkpoint)
    run_dir = run_dir.resolve()
    cfg, net, text = load_run(Path(run), which=checkpoint, device=dev)
    fingerprint = run_fingerprint(ckpt)
    recipe = feature_recipe(_data_root(cfg.data.root, run_dir))
    if recipe is not None and recipe.feat_dim != cfg.model.image.feat_dim:
        log.warning("the store under %s holds %d-d features but the run takes %d-d: its recipe is ignored",
                    cfg.data.root, recipe.feat_dim, cfg.model.image.feat_dim)
        recipe = None
    net.eval()
    return RetrievalModel(run_dir=run_dir, checkpoint=checkpoint, config=cfg, net=net, text=text, device=dev,
                          fingerprint=fingerprint, recipe=recipe)
