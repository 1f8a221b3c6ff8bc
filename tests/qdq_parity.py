"""Comparing integer codes of two float32 implementations of one quantizer (PyTorch and
onnxruntime): equal except within float32 rounding of a rounding boundary."""

from __future__ import annotations

import torch

TIE = 1e-2
"""How close to a rounding boundary (in units of the step) a value must lie for two correct
float32 implementations to round it differently: their sums of products differ by a few ulps,
far below 1/100 of a step."""


def codes_up_to_ties(q, x: torch.Tensor, other: torch.Tensor, label="") -> tuple[torch.Tensor, int]:
    """Check ``other`` (another implementation's integer codes of ``x`` under quantizer ``q``)
    against ``q``'s own: they differ only where ``x / step`` lies within :data:`TIE` of a
    rounding boundary, and then by exactly one. Returns ``(other * step, number differing)``,
    the input fed on as the other implementation saw it."""
    own, scale = q.int_codes(x)
    other = other.reshape(own.shape)
    value = (x / scale).clamp(*q.code_range)
    near_tie = ((value - value.floor()) - 0.5).abs() < TIE
    differ = own.long() != other
    assert bool((differ <= near_tie).all()), (label, "codes differ away from a tie")
    assert bool(((own.long() - other).abs() <= 1).all()), label
    return other.to(scale.dtype) * scale, int(differ.sum())
