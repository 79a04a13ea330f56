"""The openclipart demo dataset: public-domain SVGs from Debian's `openclipart-svg`, cleaned, captioned and rendered.

`prepare_openclipart` writes a raw dataset folder (layout in `vsectl.data.raw`). One role per file, in pipeline
order: `package.py` (the source), `metadata.py`, `cleaning.py` (titles, keywords, captions), `splits.py`,
`render.py` (the render pool and its state), `pipeline.py` (the driver). Everything public is importable from here.
"""

from vsectl.data.openclipart.cleaning import (
    DEFAULT_EXCLUDE,
    CleanRules,
    Item,
    build_captions,
    clean_keywords,
    clean_records,
    clean_title,
    first_sentence,
    group_key,
)
from vsectl.data.openclipart.metadata import SvgRecord, parse_svg_metadata, scan_svgs
from vsectl.data.openclipart.package import PACKAGE, SVG_SUBDIR, deb_info, default_cache, fetch_deb, resolve_source
from vsectl.data.openclipart.pipeline import LICENSE_TEXT, PIPELINE_VERSION, prepare_openclipart
from vsectl.data.openclipart.render import (
    RENDER_RETRY_FACTOR,
    RENDER_VERSION,
    STATE_JSON,
    RenderFn,
    drop_duplicate_renders,
    render_all,
    render_items,
    render_png,
)
from vsectl.data.openclipart.splits import assign_splits

__all__ = [
    "DEFAULT_EXCLUDE", "LICENSE_TEXT", "PACKAGE", "PIPELINE_VERSION", "RENDER_RETRY_FACTOR", "RENDER_VERSION",
    "STATE_JSON", "SVG_SUBDIR", "CleanRules", "Item", "RenderFn", "SvgRecord", "assign_splits", "build_captions",
    "clean_keywords", "clean_records", "clean_title", "deb_info", "default_cache", "drop_duplicate_renders",
    "fetch_deb", "first_sentence", "group_key", "parse_svg_metadata", "prepare_openclipart", "render_all",
    "render_items", "render_png", "resolve_source", "scan_svgs",
]
