"""Noise tempering (Wang et al., arXiv 2212.05603) as read in docs/algorithms.md section 3.

An LSQ quantizer whose training output adds tempered, error-aware noise:

- ``noise="error"``: ``y = q + lambda * xi * e`` with ``e = q - clip(v, -Q_N s, Q_P s)`` (not
  detached: the noise term sends ``g * lambda * xi * (round(v/s) - v/s)`` to ``s`` inside the
  range) and ``xi`` i.i.d. zero mean, unit variance (``uniform``: ``U(-sqrt 3, sqrt 3)``, or
  ``gaussian``);
- ``noise="uniform_step"``: ``y = q + lambda * s * u``, ``u ~ U(-1/2, 1/2)`` (error-unaware
  ablation; ``s`` gets ``g * lambda * u``).

``lambda`` is set from outside (:meth:`set_lambda`, typically by the callback's schedule
``lambda_t = lambda_0 * exp(-k t / T)``); the quantizer never reads a global step. With
``lambda = 0`` or in hard mode it is exactly LSQ. The noise is drawn from a seed per forward
and regenerated in backward (``step`` contract of :mod:`qtrainer.quantizers.ops`).
"""

from __future__ import annotations

import math

import torch

from . import ops as _ops
from .base import Param
from .formulas import NOISE_CODES
from .lsq import LSQQuantizer

NOISES = ("error", "uniform_step")
NOISE_DISTS = ("uniform", "gaussian")


class TemperingQuantizer(LSQQuantizer):
    """LSQ plus exponentially tempered quantization-error-aware noise during training.

    Args: those of :class:`LSQQuantizer`, plus ``noise`` (``error`` | ``uniform_step``),
    ``noise_dist`` (``uniform`` | ``gaussian``, for ``error``) and ``lambda_`` (the initial noise
    weight, normally overwritten by the schedule before the first step).
    """

    method_name = "tempering"
    params = LSQQuantizer.params + (
        Param("noise", "str", "error", "error: y = q + lambda_t xi e with e the quantization "
              "error; uniform_step: y = q + lambda_t s u, u ~ U(-1/2, 1/2) (error-unaware).",
              choices=NOISES),
        Param("noise_dist", "str", "uniform", "Distribution of xi (zero mean, unit variance): "
              "uniform is U(-sqrt 3, sqrt 3), gaussian is N(0, 1).", choices=NOISE_DISTS),
        Param("lambda_0", "float", 1.0, "Noise strength at step 0 (dimensionless; 0 turns the "
              "method into LSQ).", low=0.0, high=100.0, target="schedule"),
        Param("k", "float", 5.0, "Decay rate: lambda_t = lambda_0 exp(-k t / T), t the "
              "optimizer step, T the run's total steps.", low=0.0, high=100.0,
              target="schedule"),
    )

    def __init__(self, bits: int = 4, signed: bool = True, grad_scale: str = "numel",
                 per_channel: bool = False, channels: int | None = None, init: str = "lsq",
                 init_percentile: float = 99.9, noise: str = "error",
                 noise_dist: str = "uniform", lambda_: float = 1.0, granularity: str = "tensor",
                 group_size: int = 128, grad_scale_count: str = "per_step",
                 shape: tuple[int, ...] | None = None):
        super().__init__(bits, signed, grad_scale, per_channel, channels, init, init_percentile,
                         granularity, group_size, grad_scale_count, shape)
        self.noise = self.param("noise").check(noise)
        self.noise_dist = self.param("noise_dist").check(noise_dist)
        self.generator: torch.Generator | None = None
        # lambda as a device tensor too: the fused ops read it, so a new value does not
        # recompile under torch.compile
        self.register_buffer("lambda_tensor", torch.zeros(1), persistent=False)
        self.set_lambda(lambda_)

    def set_lambda(self, value: float) -> None:
        """Set the current noise weight ``lambda_t`` (a finite float >= 0)."""
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"lambda={value!r} must be a finite number >= 0")
        self.lambda_ = value
        self.lambda_tensor.fill_(value)

    @property
    def noise_code(self) -> int:
        """The ``step`` contract's noise code of this quantizer's ``noise``/``noise_dist``."""
        return NOISE_CODES["uniform_step" if self.noise == "uniform_step"
                           else "error_" + self.noise_dist]

    def fused_plan(self, x: torch.Tensor) -> _ops.Plan:
        """The ``step`` contract, with noise (a seed drawn now) while training with
        ``lambda > 0``. The noise weight is passed as the device tensor ``lambda_tensor``, so
        compiled code does not read it on the host: a new value neither recompiles nor
        re-records a CUDA graph (eager code skips the noise when ``lambda_`` is 0)."""
        plan = super().fused_plan(x)
        if not self.noisy or (not torch.compiler.is_compiling() and self.lambda_ == 0.0):
            return plan
        lam = self.lambda_tensor.detach().to(device=x.device, dtype=torch.float32).reshape(1)
        return plan._replace(aux=(_ops.draw_seed(x, self.generator), lam),
                             consts=(*plan.consts[:3], self.noise_code))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}, lambda={self.lambda_:.4g}"
