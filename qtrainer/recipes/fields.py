"""Building blocks of the typed recipe: fields that carry their checker, and the generic parser
of one section (unknown keys rejected with a close match, defaults filled, every value checked).

Units: bit-widths are integer bits; epochs are passes over the training set; learning rates and
weight decays are the values handed to the torch optimizer; factors are dimensionless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, field, fields
from typing import Any

from .checks import Int
from .errors import RecipeError, did_you_mean, show

BITS = Int(2, 16)
"""Bit-widths a quantizer may use anywhere in a recipe."""

MAX_EPOCHS = 100_000


def checked_field(check: Any, default: Any = MISSING, *, factory: Any = MISSING) -> Any:
    return field(default=default, default_factory=factory, metadata={"check": check})


def join_path(path: str, key: object) -> str:
    text = key if isinstance(key, str) and key else show(key)
    return f"{path}.{text}" if path else text


def reject_unknown(raw: Mapping, allowed: list[str], path: str, note: Any = None) -> None:
    """Raise for the first key of ``raw`` not in ``allowed``; ``note(key)`` may add a hint."""
    for key in raw:
        if isinstance(key, str) and key in allowed:
            continue
        where = f"'{path}'" if path else "the top level"
        extra = note(key) if note else ""
        raise RecipeError(
            join_path(path, key),
            f"unknown key '{join_path(path, key)}'{did_you_mean(key, allowed)}{extra} "
            f"(allowed keys in {where}: {', '.join(allowed)})",
        )


def expect_mapping(raw: object, path: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise RecipeError(path, f"{path}: expected a mapping, got {show(raw)} ({type(raw).__name__})")
    return raw


def parse_section(cls: type, raw: object, path: str, defaults: Mapping | None = None,
                   note: Any = None, skip: tuple[str, ...] = ()) -> Any:
    raw = expect_mapping(raw, path)
    names = [f.name for f in fields(cls)]
    reject_unknown({k: v for k, v in raw.items() if k not in skip}, [*skip, *names], path, note)
    values = {}
    for f in fields(cls):
        key_path = join_path(path, f.name)
        check = f.metadata["check"]
        if f.name in raw:
            values[f.name] = check(raw[f.name], key_path)
        elif defaults and f.name in defaults:
            values[f.name] = defaults[f.name]
        elif f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            raise RecipeError(key_path, f"missing required key '{key_path}' ({check.allowed})")
    return cls(**values)


__all__ = ["BITS", "MAX_EPOCHS", "checked_field", "expect_mapping", "join_path", "parse_section",
           "reject_unknown"]
