"""The one exception every recipe problem raises, and the helpers that word its messages."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

ROOT = "<root>"
"""``key_path`` of problems that concern a whole document or source, not one key in it."""


class RecipeError(ValueError):
    """A recipe is invalid, cannot be found, or cannot be read.

    Attributes:
        key_path: dotted path of the offending key (``"method.grad_scale"``), ``"name"`` for a
            recipe name that cannot be resolved or clashes, ``"extends"`` for a broken ``extends``
            chain, or ``"<root>"`` for a problem with a whole document (empty file, broken YAML,
            top level not a mapping). Never empty.
        detail: the message without the source prefix.
        source: the file or registry source the recipe came from, when known.
    """

    def __init__(self, key_path: str, detail: str, *, source: str | None = None):
        self.key_path = key_path or ROOT
        self.detail = detail
        self.source = source
        super().__init__(f"{source}: {detail}" if source else detail)

    def with_source(self, source: str) -> RecipeError:
        """The same error, attributed to ``source`` (kept if one is already set)."""
        if self.source is not None:
            return self
        return RecipeError(self.key_path, self.detail, source=source)


def show(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (huge ints, odd objects)."""
    try:
        text = repr(value)
    except Exception:  # e.g. ValueError for ints above sys.get_int_max_str_digits()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""`` when none is close."""
    if not isinstance(word, str):
        return ""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""
