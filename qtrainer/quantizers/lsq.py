"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), ALGORITHMS.md section 1.

Forward: ``v_bar = round(clip(v / s, -Q_N, Q_P))``, ``v_hat = v_bar * s``.
Gradients (STE on round only), with ``g`` the gradient scale applied to ``s`` only:

- ``d v_hat / d v = 1`` if ``-Q_N < v/s < Q_P`` else 0;
- ``d v_hat / d s = round(v/s) - v/s`` inside, ``-Q_N`` at or below, ``Q_P`` at or above.

The gradients are computed in closed form by :class:`LSQFunction` (one saved input, fp32 sums)
rather than by the detach trick, which materializes several temporaries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops as _ops
from .base import Quantizer, check_bits, check_choice

GRAD_SCALES = ("numel", "per_sample", "none")
INITS = ("lsq", "minmax", "mse", "percentile")


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: signed codes are ``-2^(b-1) .. 2^(b-1)-1``, unsigned ``0 .. 2^b-1``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` down to the broadcast ``shape`` of a step-size tensor (``[1]`` or ``[C,1,..]``)."""
    if t.dim() != len(shape):
        return t.sum().reshape(shape)
    dims = [i for i, n in enumerate(shape) if n == 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


class LSQFunction(torch.autograd.Function):
    """LSQ fake quantization with an optional additive noise term (used by noise tempering).

    Args (forward): ``x`` fp32 tensor; ``s`` fp32 step size broadcastable to ``x``; ``q_n``,
    ``q_p`` the level bounds; ``g`` the gradient scale for ``s``; ``noise`` None or a tensor
    shaped like ``x``; ``lam`` its weight; ``noise_kind`` ``"error"`` (``y = q + lam*xi*e`` with
    ``e = q - clip(x, -Q_N s, Q_P s)``) or ``"uniform_step"`` (``y = q + lam*s*u``).
    """

    @staticmethod
    def forward(ctx, x, s, q_n, q_p, g, noise=None, lam=0.0, noise_kind="error"):
        xs = x / s
        clipped = torch.clamp(xs, -q_n, q_p)
        q = torch.round(clipped) * s
        if noise is not None:
            if noise_kind == "error":
                q = q + lam * noise * (q - clipped * s)
            else:
                q = q + lam * s * noise
        ctx.save_for_backward(x, s, noise)
        ctx.q = (q_n, q_p, g, lam, noise_kind)
        return q

    @staticmethod
    def backward(ctx, grad):
        x, s, noise = ctx.saved_tensors
        q_n, q_p, g, lam, noise_kind = ctx.q
        xs = x / s
        inside = (xs > -q_n) & (xs < q_p)
        grad = grad.float()
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            frac = torch.round(xs) - xs
            term = torch.where(inside, frac, torch.where(xs <= -q_n, -float(q_n), float(q_p)))
            if noise is not None:
                term = term + (lam * noise * frac * inside if noise_kind == "error" else lam * noise)
            grad_s = _sum_to(grad * term, s.shape) * g
        return grad_x, grad_s, None, None, None, None, None, None


class LSQQuantizer(Quantizer):
    """Learned step size quantizer for one weight tensor or one activation site.

    Args:
        bits: bit-width, 2..16.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        grad_scale: ``numel`` (``g = 1/sqrt(numel(v) * Q_P)``, batch dimension included, the
            paper's code), ``per_sample`` (``numel`` divided by the batch size; for activations)
            or ``none`` (``g = 1``).
        per_channel: one step size per output channel (dim 0) instead of one per tensor.
        channels: number of channels, required when ``per_channel``.
        init: ``lsq`` (``s0 = 2 mean|v| / sqrt(Q_P)``, the paper), ``minmax`` (``s0`` maps the
            largest magnitude seen onto the last code), ``mse`` (the ``s0`` of lowest
            quantization MSE ``mean((Q(v) - v)^2)`` over a grid of fractions of the minmax step
            plus the lsq and minmax steps themselves, so never worse than either) or
            ``percentile`` (``s0 = P(|v|) / Q_P``, ``P`` the ``init_percentile`` percentile).
            ``mse`` and ``percentile`` fall back to ``lsq`` where ``Q_P * g > 0.1`` (a small
            tensor at many bits, such as an 8-bit first/last layer's weights: there one clipped
            element's gradient drives a tight step negative; activations, whose ``g`` counts
            the batch, and 2-4-bit weights get the fitted step).
        init_percentile: the percentile (0, 100] of ``|v|`` for ``init="percentile"``.
    """

    def __init__(self, bits: int = 4, signed: bool = True, grad_scale: str = "numel",
                 per_channel: bool = False, channels: int | None = None, init: str = "lsq",
                 init_percentile: float = 99.9):
        super().__init__(signed)
        self._bits = check_bits("bits", bits)
        self.grad_scale = check_choice("grad_scale", grad_scale, GRAD_SCALES)
        self.init = check_choice("init", init, INITS)
        if isinstance(init_percentile, bool) or not isinstance(init_percentile, (int, float)) \
                or not 0.0 < float(init_percentile) <= 100.0:
            raise ValueError(f"init_percentile={init_percentile!r} must be a number in (0, 100]")
        self.init_percentile = float(init_percentile)
        self.per_channel = bool(per_channel)
        if self.per_channel and not (isinstance(channels, int) and channels > 0):
            raise ValueError(f"channels={channels!r}: per_channel=True needs a positive channel count")
        self.step = nn.Parameter(torch.ones(channels if self.per_channel else 1))

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def levels(self) -> tuple[int, int]:
        return lsq_levels(self._bits, self.signed)

    @property
    def code_range(self) -> tuple[int, int]:
        q_n, q_p = self.levels
        return -q_n, q_p

    @property
    def step_size(self) -> torch.Tensor:
        return self.step

    def _step_view(self, x: torch.Tensor) -> torch.Tensor:
        """The step size shaped to broadcast against ``x`` (per channel: along dim 0)."""
        s = self.step.float()
        return s.view(-1, *([1] * (x.dim() - 1))) if self.per_channel else s

    def grad_scale_value(self, x: torch.Tensor) -> float:
        """``g`` for a tensor shaped like ``x``."""
        if self.grad_scale == "none":
            return 1.0
        n = x.numel()
        if self.per_channel:
            n //= x.shape[0]
        elif self.grad_scale == "per_sample" and x.dim() > 1:
            n //= x.shape[0]
        return 1.0 / math.sqrt(max(n, 1) * self.levels[1])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        q_n, q_p = self.levels

        def _least_mse_step(flat, s_max, s_lsq):
            """Per row of ``flat``, the step of least quantization MSE among ``s_max * f`` for
            a coarse grid of ``f`` in (0, 1], a finer grid around the best of those, and the
            steps ``s_max`` (minmax) and ``s_lsq`` (the paper's). Searched on at most 2^16
            elements per row (an even stride through the tensor: the error curve of a large
            activation batch is estimated closely enough, at a fraction of the cost)."""
            if flat.shape[1] > 1 << 16:
                flat = flat[:, :: math.ceil(flat.shape[1] / (1 << 16))]

            def mse(s):
                s = s.clamp(min=1e-8)[:, None]
                return (torch.round(torch.clamp(flat / s, -q_n, q_p)) * s - flat).square().mean(1)

            best_s, best = s_max.clone(), mse(s_max)
            coarse = 64
            grid = [s_lsq, *(s_max * (i / coarse) for i in range(1, coarse))]
            for refine in (False, True):
                if refine:
                    center = best_s / s_max.clamp(min=1e-8)
                    grid = [s_max * (center + j / (8 * coarse)).clamp(min=1 / (4 * coarse))
                            for j in range(-8, 9)]
                for s in grid:
                    err = mse(s)
                    better = err < best
                    best_s = torch.where(better, s, best_s)
                    best = torch.where(better, err, best)
            return best_s

        flat = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        # A tight, data-fitted step is unstable where one clipped element moves the step a lot:
        # its gradient on s is Q_P * g (g the gradient scale). Above 0.1 (small high-bit
        # tensors, e.g. ResNet-20's 8-bit first/last layer weights: ~0.45-0.55) the mse and
        # percentile inits keep the paper's step, which clips nothing there (a least-MSE step
        # for the 8-bit fc weights was driven below 0 within 40 steps at lr 0.01).
        fitted = self.init in ("mse", "percentile") and q_p * self.grad_scale_value(x) <= 0.1
        if self.init == "lsq" or (self.init in ("mse", "percentile") and not fitted):
            s0 = 2 * flat.abs().mean(dim=1) / math.sqrt(q_p)
        elif self.init == "percentile":
            n = flat.shape[1]  # nearest rank: the smallest |v| with >= pct% of |v| at or below
            k = min(max(math.ceil(self.init_percentile * n / 100 - 1e-9), 1), n)
            s0 = flat.abs().kthvalue(k, dim=1).values / q_p
        else:
            hi = flat.amax(dim=1).clamp(min=0) / q_p
            s0 = torch.maximum(hi, (-flat.amin(dim=1)).clamp(min=0) / q_n) if self.signed else hi
            if self.init == "mse":
                s0 = _least_mse_step(flat, s0, 2 * flat.abs().mean(dim=1) / math.sqrt(q_p))
        self.step.copy_(s0.clamp(min=1e-8).to(self.step))
        self._mark_initialized()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if _ops.fused_enabled(x):  # fused kernels (CUDA), see quantizers/ops.py
            y = _ops.fake_quant(self, x)
            if y is not None:
                return y
        q_n, q_p = self.levels
        return LSQFunction.apply(x, self._step_view(x), q_n, q_p, self.grad_scale_value(x))

    @torch.no_grad()
    def int_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q_n, q_p = self.levels
        s = self._step_view(x)
        return torch.round(torch.clamp(x.float() / s, -q_n, q_p)), s
