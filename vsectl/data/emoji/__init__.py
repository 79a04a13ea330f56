"""The emoji dataset: Noto Color Emoji pictures captioned with Unicode CLDR's English names and keywords.

`prepare_emoji` writes a raw dataset folder (layout in `vsectl.data.raw`) from three Debian packages. One role per
file, in pipeline order: `sources.py` (the packages), `catalog.py` (emoji-test.txt and the CLDR annotations),
`cleaning.py` (which emoji, captions, split groups), `render.py` (drawing), `pipeline.py` (the driver).
"""

from vsectl.data.emoji.catalog import Annotation, EmojiEntry, load_catalog, parse_annotations, parse_emoji_test
from vsectl.data.emoji.cleaning import (
    DEFAULT_EXCLUDE,
    EmojiItem,
    EmojiRules,
    build_captions,
    drop_shared_captions,
    group_key,
    select_emoji,
)
from vsectl.data.emoji.pipeline import LICENSE_TEXT, PIPELINE_VERSION, draw_items, prepare_emoji
from vsectl.data.emoji.render import FONT_SIZE, RENDER_VERSION, EmojiRenderer, load_font, pixel_sha256
from vsectl.data.emoji.sources import PACKAGES, default_cache, fetch_deb, resolve_sources

__all__ = [
    "DEFAULT_EXCLUDE", "FONT_SIZE", "LICENSE_TEXT", "PACKAGES", "PIPELINE_VERSION", "RENDER_VERSION", "Annotation",
    "EmojiEntry", "EmojiItem", "EmojiRenderer", "EmojiRules", "build_captions", "default_cache", "draw_items",
    "drop_shared_captions", "fetch_deb", "group_key", "load_catalog", "load_font", "parse_annotations",
    "parse_emoji_test", "pixel_sha256", "prepare_emoji", "resolve_sources", "select_emoji",
]
