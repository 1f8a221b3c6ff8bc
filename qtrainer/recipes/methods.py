"""The ``method:`` section of a recipe, built from the registered quantization methods.

Every method registered in :mod:`qtrainer.quantizers.registry` (the built-ins ``lsq``, ``nipq``
and ``tempering`` through the same entry points as a third-party plug-in) declares its
parameters as :class:`qtrainer.quantizers.Param` data. :func:`method_section` turns a method's
declarations into a frozen dataclass whose fields carry the recipe checkers, so a plug-in's
parameters are validated, defaulted, documented and hashed exactly
like the built-ins'. The meaning of each built-in parameter is in docs/algorithms.md.
"""

from __future__ import annotations

import math
from dataclasses import fields, make_dataclass
from functools import lru_cache
from typing import Any

from .checks import Bool, Float, Int, OneOf, Text
from .errors import RecipeError
from .fields import checked_field, expect_mapping, parse_section

Method = Any
"""A parsed ``method:`` section: an instance of a :func:`method_section` class (``.name`` is
the method's name, one attribute per declared parameter)."""

_INT_LIMIT = 2**63 - 1


def _checker(param) -> Any:
    """The recipe checker of one :class:`~qtrainer.quantizers.Param` declaration."""
    if param.choices:
        return OneOf(tuple(param.choices))
    if param.type == "bool":
        return Bool()
    if param.type == "int":
        lo = -_INT_LIMIT if param.low is None else math.ceil(param.low + param.low_open)
        hi = _INT_LIMIT if param.high is None else math.floor(param.high - param.high_open)
        return Int(lo, hi)
    if param.type == "float":
        lo = -math.inf if param.low is None else float(param.low)
        hi = math.inf if param.high is None else float(param.high)
        return Float(lo, hi, lo_open=param.low_open, hi_open=param.high_open)
    return Text()


@lru_cache(maxsize=None)
def _section_class(quantizer_cls: type) -> type:
    params = quantizer_cls.params
    doc = "\n".join([f"The ``method:`` section of method ``{quantizer_cls.method_name}`` "
                     f"({quantizer_cls.__module__}.{quantizer_cls.__qualname__}).", "",
                     "Attributes:"] + [f"    {p.name}: {p.doc}" for p in params])
    return make_dataclass(
        f"{quantizer_cls.__name__.removesuffix('Quantizer')}Method",
        [(p.name, Any, checked_field(_checker(p), p.default)) for p in params],
        frozen=True, kw_only=True,
        namespace={"name": quantizer_cls.method_name, "__doc__": doc,
                   "quantizer_args": tuple(p.name for p in params if p.target == "quantizer")})


def method_section(name: str) -> type:
    """The dataclass of method ``name``'s recipe section (``ValueError`` for an unknown name).
    One class per registered quantizer class, so ``isinstance`` checks are stable."""
    from ..quantizers.registry import get_method

    return _section_class(get_method(name))


def method_kwargs(method: Method) -> dict[str, Any]:
    """The method's parameters that are quantizer constructor arguments (not schedule ones)."""
    return {key: getattr(method, key) for key in method.quantizer_args}


def parse_method(raw: object) -> Method:
    """Parse and check a ``method:`` mapping: ``name`` (a registered method) and its
    parameters, unknown keys rejected with a close match (and the method they belong to)."""
    from ..quantizers.registry import method_names

    names = method_names()
    raw = expect_mapping(raw, "method")
    if "name" not in raw:
        raise RecipeError("method.name", "missing required key 'method.name' (one of "
                                         f"{', '.join(repr(n) for n in names)})")
    name = OneOf(names)(raw["name"], "method.name")
    cls = method_section(name)

    def owner(key: object) -> str:
        others = [m for m in names
                  if m != name and key in {f.name for f in fields(method_section(m))}]
        return f" for method '{name}' (it is a parameter of {' and '.join(others)})" if others else ""

    return parse_section(cls, raw, "method", note=owner, skip=("name",))


__all__ = ["Method", "method_kwargs", "method_section", "parse_method"]
