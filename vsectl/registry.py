"""Small name → class registries: recipes hold names, registries resolve them."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from vsectl.errors import ConfigError

T = TypeVar("T")


NEAR_MISS = 0.8  # difflib ratio above which a suggestion is a typo of that name, not a guess


def _is_abbreviation(short: str, name: str) -> bool:
    """True when `short` is `name` with letters left out, same first letter ('effnet' of 'efficientnet-lite0')."""
    short, name = short.lower(), name.lower()
    if len(short) < 2 or short[0] != name[0]:
        return False
    rest = iter(name)
    return all(ch in rest for ch in short)  # each letter found in order, consuming the iterator


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or an empty string.

    A near-miss spelling wins ('train.lrr' → 'train.lr'); otherwise an abbreviation of a choice wins over a
    loose likeness: 'effnet' means efficientnet-lite0, although 'resnet' is spelled more like it.
    """
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close and difflib.SequenceMatcher(None, name, close[0]).ratio() >= NEAR_MISS:
        return f" (did you mean '{close[0]}'?)"
    abbreviated = sorted(c for c in choices if _is_abbreviation(name, c))
    if abbreviated:  # of several (efficientnet-lite0/1/2), the closest in spelling, then the first
        best = max(abbreviated, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio())
        return f" (did you mean '{best}'?)"
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A dict of named components filled by a decorator.

    Args:
        kind: what the registry holds, used in error messages ("pooler", "text encoder").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items))
            raise ConfigError(f"unknown {self.kind} '{name}'{did_you_mean(name, list(self._items))}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, component) pairs in the order they were registered."""
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items
