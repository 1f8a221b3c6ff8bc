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
