"""NIPQ's final bit-widths chosen to meet the mixed-precision target (``mixed_precision.freeze:
target``).

NIPQ freezes each learned bit-width at ``round(b_c)`` when the hard phase starts. The resource
loss steers the continuous ``b_c`` toward the target, but the rounded average lands where the
last step left it: one bit of a layer that holds 36% of the weights (ResNet-9's last convs)
moves the average by 0.36 bits, so rounding alone misses a target by tenths of a bit. With
``freeze: target`` the frozen bits are the integers nearest to the learned ``b_c`` whose
average (or GBOPs) meets the target: starting from ``round(b_c)``, single-bit moves that bring
the deviation from the target closer to zero are taken one at a time, each time the move of
least cost per unit of deviation removed, where a move's cost is the growth of
``(b - b_c)^2`` (a layer's distance from its learned bit-width, whatever its size: large
layers and near-ties of the rounding go first, a small first layer last), until the
deviation is within :data:`TOLERANCE` of the target or no move reduces it. Weights and activations are fitted
separately for an ``avg_bits`` target, together for ``gbops``.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantizers import NIPQQuantizer
from .quantizers.nipq import bits_logit
from .resources import FP_BITS, quantized_layers

TOLERANCE = 0.01
"""Stop once the resource is within this fraction of the target (0.03 bits at 3 bits)."""


class _Site:
    """One quantizer's contribution: ``weight * bits`` to the resource (weights: element
    count; inputs: per-example element count; for GBOPs the layer's MACs times the other
    side's bits, divided by 1e9). Learned bit-widths can move within ``[lo, hi]``."""

    def __init__(self, quantizer, weight: float):
        self.q, self.weight = quantizer, weight
        self.learned = isinstance(quantizer, NIPQQuantizer) and quantizer.learn_bits
        if self.learned:
            self.c = quantizer.continuous_bits().item()
            self.lo, self.hi = quantizer.b_min, quantizer.b_max
            self.bits = int(min(max(round(self.c), self.lo), self.hi))
        else:
            self.bits = FP_BITS if quantizer is None else int(quantizer.bits)


def _groups(model: nn.Module, target: str) -> list[list[tuple[_Site, ...]]]:
    """The sites of each independent problem; a GBOPs term is a (weight, input) pair."""
    layers = [m for _, m in quantized_layers(model)]
    if target == "avg_bits":
        weights = [(_Site(m.weight_quantizer, m.weight.numel()),) for m in layers
                   if m.weight_quantizer is not None]
        inputs = [(_Site(m.input_quantizer, m.act_numel),) for m in layers
                  if m.input_quantizer is not None]
        return [weights, inputs]
    if target == "gbops":
        pairs = []
        for m in layers:
            w, a = _Site(m.weight_quantizer, m.macs / 1e9), _Site(m.input_quantizer, m.macs / 1e9)
            pairs.append((w, a))
        return [pairs]
    raise ValueError(f"target={target!r} is not allowed; allowed: avg_bits, gbops")


def _value(terms: list[tuple[_Site, ...]], target: str) -> float:
    if target == "avg_bits":
        total = sum(s.weight for (s,) in terms)
        return sum(s.weight * s.bits for (s,) in terms) / max(total, 1e-12)
    return sum(w.weight * w.bits * a.bits for w, a in terms)


def _fit(terms: list[tuple[_Site, ...]], target: str, value: float) -> None:
    sites = [s for term in terms for s in term if s.learned]
    while True:
        deviation = _value(terms, target) / value - 1.0
        if abs(deviation) <= TOLERANCE:
            return
        step = -1 if deviation > 0 else 1
        best = None
        for s in sites:
            new = s.bits + step
            if not s.lo <= new <= s.hi:
                continue
            old = s.bits
            s.bits = new
            moved = _value(terms, target) / value - 1.0
            s.bits = old
            gain = abs(deviation) - abs(moved)
            if gain <= 1e-12:
                continue
            score = ((new - s.c) ** 2 - (old - s.c) ** 2) / gain
            if best is None or score < best[0] - 1e-12:
                best = (score, s, new)
        if best is None:
            return
        best[1].bits = best[2]


@torch.no_grad()
def fit_bits_to_target(model: nn.Module, target: str, value: float) -> dict[str, int]:
    """Set every learned NIPQ bit-width of ``model`` to an integer (``b_c`` exactly at it, so
    that ``freeze_bits`` keeps it) such that the model's average bits per weight and per input
    element (``avg_bits``; fixed-bit layers counted as they are) or its GBOPs (``gbops``) meet
    ``value``; see the module docstring. Returns the chosen bits by quantizer name."""
    names = {id(q): n for n, q in model.named_modules() if isinstance(q, NIPQQuantizer)}
    chosen = {}
    for terms in _groups(model, target):
        _fit(terms, target, value)
        for term in terms:
            for s in term:
                if s.learned:
                    q = s.q
                    q.theta_b.fill_(bits_logit(s.bits, q.b_min, q.b_max))
                    chosen[names[id(q)]] = s.bits
    return chosen


@torch.no_grad()
def freeze_learned_bits(model: nn.Module, target: str = "none", value: float | None = None) -> None:
    """Freeze every learned NIPQ bit-width for the hard phase: at the integers of
    :func:`fit_bits_to_target` for ``target`` (``avg_bits`` or ``gbops``) and ``value``, or at
    ``round(b_c)`` with ``target="none"`` (the official rule)."""
    if target != "none":
        fit_bits_to_target(model, target, value)
    for q in model.modules():
        if isinstance(q, NIPQQuantizer) and q.learn_bits:
            q.freeze_bits()


__all__ = ["TOLERANCE", "fit_bits_to_target", "freeze_learned_bits"]
