"""Drawing: one emoji to a square RGB PNG with Pillow (colour bitmaps, OpenType layout for the ZWJ sequences)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vsectl.errors import DataError
from vsectl.io import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image, ImageFont

RENDER_VERSION = 1  # bump when the drawing changes, so finished datasets are drawn again
FONT_SIZE = 109  # the one size of Noto Color Emoji's bitmaps (CBDT strikes are 136 × 128 px at 109 ppem)
MARGIN = 0.1  # share of the glyph box left blank on each side
MAX_ADVANCE = 1.5  # a layout wider than this many first-glyph advances drew the sequence as several pictures
MISSING_PROBE = "\U000F0000"  # a private-use code point no emoji font maps: what the font draws for a missing glyph


def load_font(path: str | Path, size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    """The font with OpenType layout (libraqm), which forms the ZWJ sequences, flags and keycaps."""
    try:
        from PIL import ImageFont, features
    except ImportError:
        raise DataError("drawing emoji needs Pillow; install the extra: pip install 'vsectl[images]'") from None

    if not features.check("raqm"):
        raise DataError("this Pillow has no libraqm layout, so emoji sequences cannot be drawn; install a Pillow "
                        "wheel from PyPI (it bundles libraqm) or the system's libraqm")
    try:
        return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.RAQM)
    except OSError as e:
        raise DataError(f"cannot open the font {path} at size {size} ({e})") from e


def _draw(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    side = round(max(right - left, bottom - top, 1) * (1 + 2 * MARGIN))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    xy = ((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top)
    ImageDraw.Draw(layer).text(xy, text, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    if layer.getchannel("A").getbbox() is None:
        return None
    flat = Image.new("RGB", layer.size, (255, 255, 255))
    flat.paste(layer, (0, 0), layer)  # composite on white before resampling, so edges blend with white
    return flat


class EmojiRenderer:
    """Draws emoji with one font; `render` says why an emoji cannot be drawn as one picture."""

    def __init__(self, font_path: str | Path, size: int, font_size: int = FONT_SIZE) -> None:
        self.font = load_font(font_path, font_size)
        self.size = size
        missing = _draw(self.font, MISSING_PROBE)
        self._missing = missing.tobytes() if missing is not None else None

    def render(self, text: str) -> tuple[Image.Image | None, str]:
        """The emoji as a `size`×`size` RGB image, or (None, reason).

        Reasons: "several_glyphs" (the font has no single glyph for the sequence, so the layout is wider than
        `MAX_ADVANCE` advances of its first character), "blank" (nothing drawn), "missing_glyph" (the font's
        missing-glyph box).
        """
        from PIL import Image

        if self.font.getlength(text) > MAX_ADVANCE * max(1.0, self.font.getlength(text[0])):
            return None, "several_glyphs"
        flat = _draw(self.font, text)
        if flat is None:
            return None, "blank"
        if self._missing is not None and flat.tobytes() == self._missing:
            return None, "missing_glyph"
        return flat.resize((self.size, self.size), Image.Resampling.LANCZOS), "ok"


def pixel_sha256(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels (two renders are pixel-identical iff these match)."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def save_png(image: Image.Image, path: Path) -> str:
    """Write a PNG atomically (temporary name, then rename), readable as the umask allows; returns its sha256."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def font_facts() -> dict[str, Any]:
    """Versions of what draws the glyphs (Pillow, FreeType, libraqm), for the manifest."""
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, "freetype": features.version("freetype2"), "raqm": features.version("raqm")}
