"""Reading recipe YAML safely, and the bounds every recipe value keeps.

Every YAML file vsectl reads (recipes, saved run configs, grid, patterns and benchmark recipes) goes through
`load_yaml_file` / `load_yaml_text`: `yaml.safe_load` builds no objects, but a 1 KB file of nested aliases ("billion
laughs") still expands to billions of values once anything walks it, and deep nesting overflows the parser's stack.
So a file is refused beyond MAX_BYTES, beyond MAX_DEPTH levels of nesting, and when its values, counted as if every
alias were written out, exceed MAX_VALUES; a file that is not UTF-8 is refused too. Each refusal is one ConfigError.

`check_values` holds the bounds of a loaded config's values (finite numbers, sizes a machine can allocate, strings a
file system takes) and `check_name` the rule for a run name, which becomes a folder name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from vsectl.errors import ConfigError

MAX_BYTES = 1 << 20           # a recipe is a few KB; a megabyte is far past any real one
MAX_DEPTH = 64                # nesting levels (a recipe has four)
MAX_VALUES = 100_000          # scalars, lists and mappings, aliases counted as often as they are used
MAX_STRING = 4096             # characters in any string value: the longest path Linux takes (PATH_MAX)
MAX_NAME = 128                # characters in a run name
MAX_INT = 2**31 - 1           # counts, sizes and steps: a C int, what torch, numpy and faiss take
MAX_SEED = 2**32 - 1          # numpy's seed range
MAX_WIDTH = 1 << 16           # any model.* integer (a layer width, a set size): beyond it nothing fits in memory
NAME = re.compile(r"\w[\w.+=@,-]*")
POSITIVE_FLOATS = ("train.lr", "train.lr_decay_factor")
NON_NEGATIVE_FLOATS = ("loss.margin", "train.weight_decay", "train.grad_clip")


def shown(value: Any, limit: int = 60) -> str:
    """A short repr of a value for a one-line message (a 10 MB string must not become a 10 MB line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _depth_of_events(text: str, what: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{what} nests deeper than {MAX_DEPTH} levels; a recipe has a few sections")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Values under `node` as if every alias were written out (shared nodes counted once per use; a cycle: infinite)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        return math.inf  # type: ignore[return-value] - a node that contains itself expands without end
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo, open_nodes) + _expanded_size(v, memo, open_nodes)
                       for k, v in node.value)
    else:
        size = 1
    open_nodes.discard(key)
    memo[key] = size
    return size


def load_yaml_text(text: str, what: str = "recipe") -> Any:
    """Parse YAML text within the bounds above (see the module docstring); `what` names it in messages."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{what} is {len(text) / 1e6:.1f} MB; a recipe is at most {MAX_BYTES >> 20} MB")
    try:
        _depth_of_events(text, what)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}, set()) > MAX_VALUES:
            raise ConfigError(f"{what} expands to more than {MAX_VALUES:,} values through YAML aliases (&name / "
                              "*name); write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {str(err).splitlines()[0]}") from None


def load_yaml_file(path: str | Path, what: str = "recipe") -> Any:
    """Read and parse a YAML file within the bounds above; refuses a file that is too large or not UTF-8."""
    path = Path(path)
    label = f"{what} {path}"
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{label} is {size / 1e6:.1f} MB; a recipe is at most {MAX_BYTES >> 20} MB")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{label} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    return load_yaml_text(text, label)


def check_name(name: str) -> None:
    """A run name is one folder name: letters, digits and _ . + = @ , - , not starting with . or -."""
    if not isinstance(name, str) or len(name) > MAX_NAME or not NAME.fullmatch(name):
        raise ConfigError(f"name {shown(name)} cannot name a run folder; use up to {MAX_NAME} letters, digits and "
                          "_ . + = @ , - (not starting with . or -), e.g. --set name=my_run")


def check_values(flat: dict[str, Any]) -> None:
    """Bounds of a config's values, given as dotted key → value (see the module docstring)."""
    for key, value in flat.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if isinstance(value, int):
            if key == "seed" and not 0 <= value <= MAX_SEED:
                raise ConfigError(f"seed = {value} is out of range; a seed lies within 0..{MAX_SEED}")
            if key.startswith("model.") and abs(value) > MAX_WIDTH:
                raise ConfigError(f"{key} = {value} is too large; a size in the model is at most {MAX_WIDTH}")
            if abs(value) > MAX_INT:
                raise ConfigError(f"{key} = {value} is out of range; it must lie within ±{MAX_INT}")
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ConfigError(f"{key} is {len(value):,} characters long; a value is at most {MAX_STRING}")
    for key in POSITIVE_FLOATS:
        if key in flat and flat[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {flat[key]}")
    for key in NON_NEGATIVE_FLOATS:
        if key in flat and flat[key] < 0:
            raise ConfigError(f"{key} must be ≥ 0, got {flat[key]}")
