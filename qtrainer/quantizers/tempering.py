"""Noise tempering (Wang et al., arXiv 2212.05603) as read in ALGORITHMS.md section 3.

An LSQ quantizer whose training output adds tempered, error-aware noise:

- ``noise="error"``: ``y = q + lambda * xi * e`` with ``e = q - clip(v, -Q_N s, Q_P s)`` (not
  detached: the noise term sends ``g * lambda * xi * (round(v/s) - v/s)`` to ``s`` inside the
  range) and ``xi`` i.i.d. zero mean, unit variance (``uniform``: ``U(-sqrt 3, sqrt 3)``, or
  ``gaussian``);
- ``noise="uniform_step"``: ``y = q + lambda * s * u``, ``u ~ U(-1/2, 1/2)`` (error-unaware
  ablation; ``s`` gets ``g * lambda * u``).

``lambda`` is set from outside (:meth:`set_lambda`, typically by the callback's schedule); the
quantizer never reads a global step. With ``lambda = 0`` or in hard mode it is exactly LSQ.
"""

from __future__ import annotations

import math

import torch

from . import ops as _ops
from .base import check_choice
from .lsq import LSQFunction, LSQQuantizer

NOISES = ("error", "uniform_step")
NOISE_DISTS = ("uniform", "gaussian")


class TemperingQuantizer(LSQQuantizer):
    """LSQ plus exponentially tempered quantization-error-aware noise during training.

    Args: those of :class:`LSQQuantizer`, plus ``noise`` (``error`` | ``uniform_step``),
    ``noise_dist`` (``uniform`` | ``gaussian``, for ``error``) and ``lambda_`` (the initial noise
    weight, normally overwritten by the schedule before the first step).
    """

    def __init__(self, bits: int = 4, signed: bool = True, grad_scale: str = "numel",
                 per_channel: bool = False, channels: int | None = None, init: str = "lsq",
                 noise: str = "error", noise_dist: str = "uniform", lambda_: float = 1.0):
        super().__init__(bits, signed, grad_scale, per_channel, channels, init)
        self.noise = check_choice("noise", noise, NOISES)
        self.noise_dist = check_choice("noise_dist", noise_dist, NOISE_DISTS)
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

    def sample_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``xi`` (zero mean, unit variance) or ``u ~ U(-1/2, 1/2)``, shaped like ``x``, fp32."""
        if self.noise == "error" and self.noise_dist == "gaussian":
            return torch.randn(x.shape, generator=self.generator, device=x.device)
        u = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=torch.float32)
        if self.noise == "uniform_step":
            return u - 0.5
        return (u * 2 - 1) * math.sqrt(3.0)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if _ops.fused_enabled(x):  # fused kernels (CUDA), see quantizers/ops.py
            y = _ops.fake_quant(self, x)
            if y is not None:
                return y
        if not self.noisy or self.lambda_ == 0.0:
            return super().quantize(x)
        q_n, q_p = self.levels
        return LSQFunction.apply(x, self._step_view(x), q_n, q_p, self.grad_scale_value(x),
                                 self.sample_noise(x), self.lambda_, self.noise)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise={self.noise}, lambda={self.lambda_:.4g}"
