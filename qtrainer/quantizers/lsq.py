"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020), docs/algorithms.md section 1.

Forward: ``v_bar = round(clip(v / s, -Q_N, Q_P))``, ``v_hat = v_bar * s``.
Gradients (STE on round only), with ``g`` the gradient scale applied to ``s`` only:

- ``d v_hat / d v = 1`` if ``-Q_N < v/s < Q_P`` else 0;
- ``d v_hat / d s = round(v/s) - v/s`` inside, ``-Q_N`` at or below, ``Q_P`` at or above.

The quantizer runs the fused ops' ``step`` contract (closed-form backward, one saved input,
fp32 sums; :mod:`qtrainer.quantizers.formulas`) rather than the detach trick, which
materializes several temporaries.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import formulas
from . import ops as _ops
from .base import Param, Quantizer, check_bits
from .granularity import GRAD_SCALE_COUNTS, GRANULARITIES, grad_scale_elements, step_count
from .scale_search import least_mse_scale

GRAD_SCALES = ("numel", "per_sample", "none")
INITS = ("lsq", "minmax", "mse", "percentile")


def lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: signed codes are ``-2^(b-1) .. 2^(b-1)-1``, unsigned ``0 .. 2^b-1``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class LSQQuantizer(Quantizer):
    """Learned step size quantizer for one weight tensor or one activation site.

    Args:
        bits: bit-width, 2..16.
        signed: signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        grad_scale: ``numel`` (``g = 1/sqrt(numel(v) * Q_P)``, batch dimension included, the
            paper's code), ``per_sample`` (``numel`` divided by the batch size; for activations)
            or ``none`` (``g = 1``).
        per_channel: one step size per output channel (dim 0): ``granularity="channel"``.
        channels: number of channels, required for ``channel`` granularity without ``shape``.
        granularity: ``tensor`` (one step), ``channel`` (one per output channel) or ``group``
            (one per ``group_size`` consecutive input elements of each output row; see
            :mod:`qtrainer.quantizers.granularity`); weights only.
        group_size: elements per group for ``granularity="group"``.
        grad_scale_count: ``N`` of ``g`` for channel and group steps: ``per_step`` (default)
            the elements sharing one step (``numel / C`` per channel, ``group_size`` per group),
            ``tensor`` the whole tensor's ``numel`` (lsq-net's code).
        shape: the weight's shape, required for ``group`` granularity.
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

    method_name = "lsq"
    params = (
        Param("grad_scale", "str", "numel", "Factor on the step size's gradient: numel is "
              "1/sqrt(N Q_P) with N the quantized tensor's element count (batch included for "
              "activations, the paper's code), per_sample leaves the batch out, none is 1.",
              choices=GRAD_SCALES),
        Param("per_channel", "bool", False, "One step size per output channel of a weight "
              "(the same as granularity: channel; activations always have one)."),
        Param("granularity", "str", "tensor", "Step sizes of a weight: tensor one, channel one "
              "per output channel, group one per group_size consecutive input elements of each "
              "output row (activations always have one).", choices=GRANULARITIES),
        Param("group_size", "int", 128, "Elements per group along a weight's flattened input "
              "dimension for granularity: group (must divide it).", low=1,
              high=1 << 20),
        Param("grad_scale_count", "str", "per_step", "N of the gradient scale 1/sqrt(N Q_P) "
              "for channel and group steps: per_step the elements sharing one step, tensor "
              "the whole weight's element count (lsq-net).", choices=GRAD_SCALE_COUNTS),
        Param("init", "str", "lsq", "Step size initialization: lsq 2 mean|v| / sqrt(Q_P) (the "
              "paper), minmax max|v| / Q_P, mse the least quantization MSE, percentile the "
              "init_percentile-th percentile of |v| over Q_P.", choices=INITS),
        Param("init_percentile", "float", 99.9, "The percentile of |v| (percent) used by "
              "init=percentile.", low=0.0, high=100.0, low_open=True),
    )

    def __init__(self, bits: int = 4, signed: bool = True, grad_scale: str = "numel",
                 per_channel: bool = False, channels: int | None = None, init: str = "lsq",
                 init_percentile: float = 99.9, granularity: str = "tensor",
                 group_size: int = 128, grad_scale_count: str = "per_step",
                 shape: tuple[int, ...] | None = None):
        super().__init__(signed)
        self._bits = check_bits("bits", bits)
        self.grad_scale = self.param("grad_scale").check(grad_scale)
        self.init = self.param("init").check(init)
        self.init_percentile = self.param("init_percentile").check(init_percentile)
        self.grad_scale_count = self.param("grad_scale_count").check(grad_scale_count)
        granularity = self.param("granularity").check(granularity)
        if self.param("per_channel").check(per_channel):
            if granularity == "group":
                raise ValueError("per_channel=True and granularity='group' contradict each "
                                 "other; give granularity alone")
            granularity = "channel"
        self.granularity = granularity
        self.group_size = self.param("group_size").check(group_size)
        self.per_channel = granularity == "channel"
        self.n_steps = step_count(granularity, group_size, shape, channels)
        self.step = nn.Parameter(torch.ones(self.n_steps))

    @classmethod
    def build(cls, bits: int, signed: bool, role: str, channels: int | None = None,
              shape: tuple[int, ...] | None = None, **params) -> LSQQuantizer:
        """Per-sample gradient scaling applies to activations only (weights use ``numel``);
        per-channel and per-group step sizes to weights only (one step per activation site).
        ``shape``: the weight's shape (group granularity)."""
        if role == "weight":
            if params.get("grad_scale") == "per_sample":
                params["grad_scale"] = "numel"
            params.update(channels=channels, shape=shape)
        else:
            for key in ("per_channel", "granularity", "group_size"):
                params.pop(key, None)
        return cls(bits=bits, signed=signed, **params)

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

    def grad_scale_value(self, x: torch.Tensor) -> float:
        """``g`` for a tensor shaped like ``x``."""
        if self.grad_scale == "none":
            return 1.0
        n = x.numel()
        if self.n_steps > 1:
            n = grad_scale_elements(n, self.n_steps, self.grad_scale_count)
        elif self.grad_scale == "per_sample" and x.dim() > 1:
            n //= x.shape[0]
        return 1.0 / math.sqrt(max(n, 1) * self.levels[1])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        q_n, q_p = self.levels

        flat = x.reshape(self.n_steps, -1)  # one row per step: tensor, channel, group
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
                s0 = least_mse_scale(  # also tries the paper's step
                    flat, s0, lambda v, s: (formulas.step_codes(v, s, q_n, q_p) * s - v)
                    .square().mean(1), extra=(2 * flat.abs().mean(dim=1) / math.sqrt(q_p),))
        self.step.copy_(s0.clamp(min=1e-8).to(self.step))
        self._mark_initialized()

    def _check_shape(self, x: torch.Tensor) -> None:
        """``ValueError`` when ``x`` is not a tensor this quantizer's steps were made for."""
        n = self.n_steps
        if n == 1:
            return
        if self.granularity == "channel" and (x.dim() == 0 or x.shape[0] != n):
            raise ValueError(f"per-channel step size of {n} values does not match dim 0 of a "
                             f"tensor shaped {tuple(x.shape)}")
        if self.granularity == "group" and x.numel() != n * self.group_size:
            raise ValueError(f"{n} group-wise step sizes (group_size={self.group_size}) do not "
                             f"match a tensor shaped {tuple(x.shape)}")

    def fused_plan(self, x: torch.Tensor) -> _ops.Plan:
        """The ``step`` contract without noise."""
        self._check_shape(x)
        q_n, q_p = self.levels
        return _ops.Plan("step", (self.step.float(),), (None, None),
                         (q_n, q_p, float(self.grad_scale_value(x)), 0))

    @torch.no_grad()
    def int_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes shaped like x, scale)``: the scale broadcasts against the codes (``[1]`` or
        ``[C, 1, ...]``); per group it is flat ``[R]`` and ``formulas.dequantize(codes, scale)``
        gives the eval output."""
        rows = formulas.step_rows(self.step, x.float())
        s = formulas.step_view(self.step, rows)
        codes = formulas.step_codes(rows, s, *self.levels).view(x.shape)
        return codes, (s if rows.shape == x.shape else self.step.detach().float().reshape(-1))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return f"{super().extra_repr()}, granularity={self.granularity}{group}"
