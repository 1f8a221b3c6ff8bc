"""Schedules the callback steps once per optimizer step (kept out of the quantizers)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ExponentialDecay:
    """Noise tempering's ``lambda_t = lambda_0 * exp(-k * t / T)``.

    ``t`` is the optimizer step (0-based) and ``T`` the total number of steps of the run;
    ``k = 5`` ends near 0.7% of ``lambda_0``.
    """

    lambda_0: float
    k: float
    total_steps: int

    def __call__(self, step: int) -> float:
        return self.lambda_0 * math.exp(-self.k * step / max(self.total_steps, 1))


@dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate factor per optimizer step (a ``LambdaLR`` lambda).

    Linear warm-up over ``warmup_steps`` from ``warmup_start`` to 1, then ``cosine`` decay to
    ``floor`` at ``total_steps`` (or ``constant`` 1). Past ``total_steps`` the factor stays at
    its final value.
    """

    total_steps: int
    warmup_steps: int = 0
    warmup_start: float = 0.1
    floor: float = 0.0
    name: str = "cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        if self.name == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class CosineRamp:
    """A value per optimizer step that moves from ``start`` to ``final`` along half a cosine
    between step ``begin`` and ``total_steps``; ``before`` ahead of ``begin``, ``final`` after
    ``total_steps``. Oscillation dampening: 0 -> lambda_d from step 0; freezing threshold: 0
    (nothing frozen) until ``begin``, then 0.1 -> 0.01 (Nagel et al.'s defaults)."""

    start: float
    final: float
    total_steps: int
    begin: int = 0
    before: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.begin:
            return self.before
        progress = min((step - self.begin) / max(self.total_steps - self.begin, 1), 1.0)
        return self.final + (self.start - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
