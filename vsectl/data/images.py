"""Raw-image preprocessing for extraction: decode, RGB, resize, to uint8 tensor, normalise (spec §5.3, test time).

Pillow is an optional extra (`pip install 'vsectl[images]'`) and is imported only when an image is read. Workers return
uint8 tensors (4× less to move than float); `normalize` runs on the extraction device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsectl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

WHITE = (255, 255, 255)  # transparent pixels are composited on white (clip art and icons are drawn on white)


class UnreadableImage(DataError):
    """An image file that is missing, corrupt or not an image; extraction skips and counts it."""


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading images needs Pillow; install the extra: pip install 'vsectl[images]'") from None
    return Image


def load_rgb(path: str | Path, draft_size: int | None = None) -> Any:
    """Decode an image file into an RGB PIL image.

    Grayscale is replicated to three channels; images with alpha (RGBA, LA, palette with transparency) are composited on
    white.

    Args:
        path: the image file.
        draft_size: when given, JPEG decoding may downscale by a power of two while keeping both sides ≥ this size
            (PIL `draft`), which is much faster for large photos and is followed by the resize anyway.

    Returns:
        A loaded PIL image in mode "RGB".

    Raises:
        UnreadableImage: the file is missing, truncated or not an image.
    """
    Image = _pil()
    try:
        with Image.open(path) as im:
            if draft_size is not None and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()  # decode now, so a truncated file fails here and not later in a worker's resize
            return _to_rgb(im, Image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL signals bad files as OSError (UnidentifiedImageError, truncated data), ValueError or SyntaxError
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from None


def _to_rgb(im: Any, Image: Any) -> Any:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I"):
        # 16/32-bit grayscale: PIL's convert("RGB") clips instead of scaling, so rescale to 8 bits first
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode == "I;16" else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")  # L → RGB replicates the channel; CMYK, YCbCr, F convert as PIL defines


def resize_square(im: Any, size: int) -> Any:
    """Resize to exactly size×size, bilinear, aspect ratio not preserved (spec §5.3 test time: no crop)."""
    Image = _pil()
    if im.size == (size, size):
        return im
    return im.resize((size, size), Image.BILINEAR)


def to_uint8_tensor(im: Any) -> torch.Tensor:
    """(3, H, W) uint8 tensor from an RGB PIL image."""
    arr = np.asarray(im, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def preprocess(path: str | Path, size: int) -> torch.Tensor:
    """Decode, convert to RGB and resize one image file.

    Returns:
        (3, size, size) uint8 tensor.

    Raises:
        UnreadableImage: see `load_rgb`.
    """
    return to_uint8_tensor(resize_square(load_rgb(path, draft_size=size), size))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale uint8 images to [0, 1], then subtract `mean` and divide by `std` per channel.

    Args:
        images: (B, 3, H, W) uint8 (any device).
        mean: three channel means on the [0, 1] scale.
        std: three channel standard deviations on the [0, 1] scale.

    Returns:
        (B, 3, H, W) float32 on the same device.
    """
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


class ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images of a list of files, for a DataLoader; unreadable files are flagged, not raised.

    Args:
        paths: image files.
        size: output side in pixels.

    Items are `(index, image (3, size, size) uint8, ok, reason)`; an unreadable file gives zeros, ok=False and the
    reason, so the main process can count and report it.
    """

    def __init__(self, paths: Sequence[str | Path], size: int) -> None:
        self.paths = [str(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        try:
            return i, preprocess(self.paths[i], self.size), True, ""
        except UnreadableImage as e:
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, str(e)
