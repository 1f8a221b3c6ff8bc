"""Quantizer modules (pure torch): LSQ, NIPQ and noise tempering as method plug-ins, the
registry of methods and a factory by name.

Depends on nothing in qtrainer outside this package.
"""

from __future__ import annotations

from .base import Param, Quantizer, check_bits, check_choice, round_ste
from .lsq import LSQQuantizer, lsq_levels
from .nipq import NIPQQuantizer, nipq_levels
from .registry import (METHODS, describe_methods, get_method, method_names,
                       register_method)
from .tempering import TemperingQuantizer


def make_quantizer(method: str, bits: int, signed: bool, role: str, channels: int | None = None,
                   shape: tuple[int, ...] | None = None, **params) -> Quantizer:
    """Build the quantizer of the registered ``method`` for a weight tensor (``role="weight"``,
    ``channels`` = output channels, ``shape`` = the weight's shape, needed by group
    granularity) or an activation site (``role="input"``). ``params`` are the method's
    constructor arguments (its ``Param`` declarations with ``target="quantizer"``)."""
    return get_method(method).build(bits, signed, role, channels, shape, **params)


__all__ = [
    "LSQQuantizer", "METHODS", "NIPQQuantizer", "Param", "Quantizer", "TemperingQuantizer",
    "check_bits", "check_choice", "describe_methods", "get_method", "lsq_levels",
    "make_quantizer", "method_names", "nipq_levels", "register_method", "round_ste",
]
