"""Value checkers for recipe fields: each takes any object and a key path, and returns the
normalized value or raises :class:`RecipeError`. They never let another exception escape, whatever
the input (YAML can produce None, bools, huge ints, nan, dates, bytes, nested lists...).

Types are strict: ``True`` is not an int, ``8.0`` is not an int, ``"4"`` is not a number.
An int is accepted where a float is expected (``lr: 1`` means 1.0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import RecipeError, did_you_mean, show


def _kind(value: object) -> str:
    return type(value).__name__


def _bad_type(path: str, value: object, expected: str) -> RecipeError:
    return RecipeError(path, f"{path}: expected {expected}, got {show(value)} ({_kind(value)})")


def _out_of_range(path: str, value: object, allowed: str) -> RecipeError:
    return RecipeError(path, f"{path}: {show(value)} is out of range; allowed: {allowed}")


@dataclass(frozen=True)
class Int:
    """An int (not bool, not float) in ``[lo, hi]``."""

    lo: int
    hi: int

    @property
    def allowed(self) -> str:
        return f"an integer in [{self.lo}, {self.hi}]"

    def __call__(self, value: object, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad_type(path, value, self.allowed)
        if not self.lo <= value <= self.hi:
            raise _out_of_range(path, value, self.allowed)
        return int(value)


@dataclass(frozen=True)
class Float:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``), returned as float."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @property
    def allowed(self) -> str:
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"a number in {left}{self.lo:g}, {self.hi:g}{right}"

    def __call__(self, value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_type(path, value, self.allowed)
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(path, f"{path}: {show(value)} is not finite; allowed: {self.allowed}")
        # Compare before converting: float() of a huge int overflows.
        below = value <= self.lo if self.lo_open else value < self.lo
        above = value >= self.hi if self.hi_open else value > self.hi
        if below or above:
            raise _out_of_range(path, value, self.allowed)
        return float(value)


@dataclass(frozen=True)
class Bool:
    """``true`` or ``false`` (not 0/1, not strings)."""

    allowed = "true or false"

    def __call__(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            raise _bad_type(path, value, self.allowed)
        return value


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(f"'{c}'" for c in self.choices)

    def __call__(self, value: object, path: str) -> str:
        if isinstance(value, str) and value in self.choices:
            return value
        hint = did_you_mean(value, self.choices)
        raise RecipeError(path, f"{path}: invalid value {show(value)}; allowed: {self.allowed}{hint}")


@dataclass(frozen=True)
class Text:
    """A string, optionally matching ``pattern`` (described by ``what``), at most ``max_len`` long."""

    pattern: str | None = None
    what: str = "a string"
    max_len: int = 10_000

    @property
    def allowed(self) -> str:
        return self.what

    def __call__(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            raise _bad_type(path, value, self.allowed)
        if len(value) > self.max_len or (
            self.pattern is not None and re.fullmatch(self.pattern, value) is None
        ):
            raise RecipeError(path, f"{path}: invalid value {show(value)}; allowed: {self.allowed}")
        return value


@dataclass(frozen=True)
class NumberOr:
    """A number checked by ``number`` (an :class:`Int` takes ints only, a :class:`Float` ints
    and floats), or one of the strings ``words``."""

    number: Int | Float
    words: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return f"{self.number.allowed}, or " + " or ".join(f"'{w}'" for w in self.words)

    def __call__(self, value: object, path: str) -> int | float | str:
        if isinstance(value, str):
            if value in self.words:
                return value
            hint = did_you_mean(value, self.words)
            raise RecipeError(path, f"{path}: invalid value {show(value)}; allowed: {self.allowed}{hint}")
        kinds = int if isinstance(self.number, Int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise _bad_type(path, value, self.allowed)
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(path, f"{path}: {show(value)} is not finite; allowed: {self.allowed}")
        try:
            return self.number(value, path)
        except RecipeError:
            raise _out_of_range(path, value, self.allowed) from None


@dataclass(frozen=True)
class Nullable:
    """``null`` or a value accepted by ``inner``."""

    inner: object

    @property
    def allowed(self) -> str:
        return f"null or {self.inner.allowed}"

    def __call__(self, value: object, path: str) -> object:
        return None if value is None else self.inner(value, path)


@dataclass(frozen=True)
class NoneOr(Nullable):
    """``none`` (or ``null``) -> None, else a value accepted by ``inner``."""

    @property
    def allowed(self) -> str:
        return f"'none' (or null) or {self.inner.allowed}"

    def __call__(self, value: object, path: str) -> object:
        if isinstance(value, str) and value != "none":
            raise RecipeError(path, f"{path}: invalid value {show(value)}; allowed: "
                                    f"{self.allowed}{did_you_mean(value, ('none',))}")
        return super().__call__(None if value == "none" else value, path)


@dataclass(frozen=True)
class Patterns:
    """A list of non-empty glob patterns (module names), returned as a tuple."""

    min_len: int = 0

    @property
    def allowed(self) -> str:
        least = f"at least {self.min_len} " if self.min_len else ""
        return f"a list of {least}non-empty glob patterns (strings)"

    def __call__(self, value: object, path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _bad_type(path, value, self.allowed)
        if len(value) < self.min_len:
            raise RecipeError(path, f"{path}: the list is empty; allowed: {self.allowed}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise _bad_type(f"{path}[{i}]", item, "a non-empty glob pattern (string)")
        return tuple(value)


@dataclass(frozen=True)
class FloatPair:
    """A list of exactly two numbers, each checked by ``item`` (Adam's betas)."""

    item: Float

    @property
    def allowed(self) -> str:
        return f"a list of two numbers, each {self.item.allowed}"

    def __call__(self, value: object, path: str) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise _bad_type(path, value, self.allowed)
        return (self.item(value[0], f"{path}[0]"), self.item(value[1], f"{path}[1]"))


@dataclass(frozen=True)
class BitFactors:
    """A mapping weight bit-width -> factor. Keys are ints in ``key.lo..key.hi``; digit strings
    (``"2"``, as JSON or dotted overrides produce them) are accepted and turned into ints."""

    key: Int
    factor: Float

    @property
    def allowed(self) -> str:
        return f"a mapping from bit-width ({self.key.allowed}) to factor ({self.factor.allowed})"

    def __call__(self, value: object, path: str) -> dict[int, float]:
        if not isinstance(value, Mapping):
            raise _bad_type(path, value, self.allowed)
        out: dict[int, float] = {}
        for raw_key, raw_factor in value.items():
            digits = isinstance(raw_key, str) and raw_key.isascii() and raw_key.isdigit()
            key = int(raw_key) if digits and len(raw_key) <= 3 else raw_key
            bits = self.key(key, f"{path}.{raw_key if isinstance(raw_key, str) else show(raw_key)}")
            if bits in out:
                raise RecipeError(f"{path}.{bits}", f"{path}.{bits}: bit-width {bits} is given twice")
            out[bits] = self.factor(raw_factor, f"{path}.{bits}")
        return dict(sorted(out.items()))
