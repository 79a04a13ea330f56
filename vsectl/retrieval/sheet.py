"""Contact sheets: the hit images of one or more searches in a grid, with rank, score and caption under each."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vsectl.errors import ConfigError
from vsectl.io import atomic_path

THUMB = 180  # thumbnail side in pixels
COLUMNS = 5
PAD = 10
TEXT_LINES = 3  # caption lines under a thumbnail (the rest is cut with an ellipsis)
FONT_SIZE = 13
TITLE_SIZE = 18
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
MISSING = (225, 225, 225)
BORDER = (200, 200, 200)


def _pil() -> Any:
    from vsectl.data.images import _pil as pil

    return pil()


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _thumbnail(path: Any, font: Any) -> Any:
    """The image scaled (up or down) to fit THUMB×THUMB, centred on white; a grey "no image" tile without one."""
    from PIL import ImageDraw

    from vsectl.data.images import UnreadableImage, load_rgb

    Image = _pil()
    try:
        im = load_rgb(path) if path else None
    except UnreadableImage:
        im = None
    if im is None:
        tile = Image.new("RGB", (THUMB, THUMB), MISSING)
        ImageDraw.Draw(tile).text((PAD, THUMB // 2 - FONT_SIZE), "no image", fill=MUTED, font=font)
        return tile
    tile = Image.new("RGB", (THUMB, THUMB), BACKGROUND)
    scale = THUMB / max(im.width, im.height)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    tile.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    ImageDraw.Draw(tile).rectangle((0, 0, THUMB - 1, THUMB - 1), outline=BORDER)
    return tile


def _lines(text: str | None, width: int) -> list[str]:
    if not text:
        return []
    lines = textwrap.wrap(text, width=width)
    if len(lines) > TEXT_LINES:
        lines = lines[:TEXT_LINES]
        lines[-1] = lines[-1][: max(0, width - 1)].rstrip() + "…"
    return lines


SOFTWARE = "vsectl contact sheet"  # the PNG's Software text: a sheet vsectl wrote, which a new one may replace


def check_sheet_target(out: str | Path) -> None:
    """Refuse a sheet path that is a folder, or an existing file that is not a contact sheet vsectl wrote."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--sheet {out} is a folder; give a file name, e.g. {out / 'hits.png'}")
    if not out.exists() and not out.is_symlink():
        return
    Image = _pil()
    try:
        with Image.open(out) as im:
            ours = im.format == "PNG" and im.info.get("Software") == SOFTWARE
    except (OSError, ValueError):
        ours = False
    if out.is_symlink() or not ours:
        raise ConfigError(f"--sheet {out} exists and is not a contact sheet vsectl wrote; choose another file name "
                          "(an existing sheet is replaced, any other file is kept)")


def contact_sheet(results: Any | Sequence[Any], out: str | Path, columns: int = COLUMNS,
                  image_file: Callable[[int], Any] | None = None) -> Path:
    """Draw search results as a PNG: per query a title line, then its hits in rows of `columns` thumbnails.

    Under each thumbnail: "#rank  score" and the caption (the hit's caption, or the image's first caption). Images
    whose file is unknown or unreadable get a grey tile. Needs Pillow (the `images` extra).

    Args:
        results: one `SearchResult` or a sequence of them.
        out: the PNG to write (atomically).
        columns: thumbnails per row.
        image_file: image index → its file or bytes (`Embeddings.image_file`, which also reads images inside tar
            shards); without it each hit's recorded path.

    Returns:
        `out`.
    """
    Image = _pil()
    from PIL import ImageDraw

    results = [results] if hasattr(results, "hits") else list(results)
    font, title_font = _font(FONT_SIZE), _font(TITLE_SIZE)
    line_h = FONT_SIZE + 4
    tile_h = THUMB + PAD // 2 + line_h * (1 + TEXT_LINES) + PAD
    title_h = TITLE_SIZE + 2 * PAD
    wrap = max(8, int(THUMB / (FONT_SIZE * 0.55)))  # characters per caption line
    cols = max(1, min(columns, max((len(r.hits) for r in results), default=1)))
    width = PAD + cols * (THUMB + PAD)
    height = sum(title_h + -(-max(1, len(r.hits)) // cols) * tile_h for r in results) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for result in results:
        side = "captions" if result.side == "captions" else "images"
        draw.text((PAD, y), f"“{result.query}” · top {len(result.hits)} {side}", fill=INK, font=title_font)
        y += title_h
        for n, hit in enumerate(result.hits):
            x = PAD + (n % cols) * (THUMB + PAD)
            top = y + (n // cols) * tile_h
            sheet.paste(_thumbnail(image_file(hit.image) if image_file else hit.path, font), (x, top))
            ty = top + THUMB + PAD // 2
            draw.text((x, ty), f"#{hit.rank}  {hit.score:.3f}  {hit.id}"[:wrap], fill=MUTED, font=font)
            for k, line in enumerate(_lines(hit.caption, wrap)):
                draw.text((x, ty + line_h * (k + 1)), line, fill=INK, font=font)
        y += -(-max(1, len(result.hits)) // cols) * tile_h
    out = Path(out)
    check_sheet_target(out)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", SOFTWARE)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG", pnginfo=info)
    return out
