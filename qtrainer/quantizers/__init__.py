"""Quantizer modules (pure torch): LSQ, NIPQ and noise tempering, plus a factory by name."""

from __future__ import annotations

from .base import Quantizer, check_bits, check_choice, round_ste
from .lsq import LSQFunction, LSQQuantizer, lsq_levels
from .nipq import NIPQQuantizer, nipq_levels
from .tempering import TemperingQuantizer

METHODS = {"lsq": LSQQuantizer, "nipq": NIPQQuantizer, "tempering": TemperingQuantizer}


def make_quantizer(method: str, bits: int, signed: bool, role: str, channels: int | None = None,
                   **kwargs) -> Quantizer:
    """Build the quantizer of ``method`` for a weight tensor (``role="weight"``, ``channels`` =
    output channels) or an activation site (``role="input"``). ``kwargs`` are the method's
    constructor arguments; per-sample gradient scaling only applies to activations."""
    cls = METHODS[check_choice("method", method, tuple(METHODS))]
    if cls is NIPQQuantizer:
        return cls(bits=bits, signed=signed, role=role, **kwargs)
    if role == "weight":
        if kwargs.get("grad_scale") == "per_sample":
            kwargs["grad_scale"] = "numel"
        if kwargs.get("per_channel"):
            kwargs["channels"] = channels
    else:
        kwargs.pop("per_channel", None)
    return cls(bits=bits, signed=signed, **kwargs)


__all__ = [
    "METHODS", "LSQFunction", "LSQQuantizer", "NIPQQuantizer", "Quantizer", "TemperingQuantizer",
    "check_bits", "check_choice", "lsq_levels", "make_quantizer", "nipq_levels", "round_ste",
]
