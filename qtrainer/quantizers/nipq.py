"""NIPQ: Noise proxy-based Integrated Pseudo-Quantization (Shin et al., CVPR 2023).

docs/algorithms.md section 2, from the official code. Per quantizer, two parameters:
``alpha = softplus(theta_a)`` (truncation boundary: one, or for a weight one per channel or per
group, :mod:`qtrainer.quantizers.granularity`) and the continuous bit-width
``b_c = b_min + (b_max - b_min) * sigmoid(theta_b)``. Levels: signed ``n = 2^(b-1) - 1``
(codes ``-n..n``), unsigned ``n = 2^b - 1`` (codes ``0..n``); step ``delta = alpha / n``.

- Noise phase (training): ``y = alpha`` above, ``lo`` below (``-alpha`` or 0), else
  ``v + z * delta`` with ``z`` detached; ``b = round(b_c + u)`` (one ``u ~ U(-1/2, 1/2)`` per
  step) with a straight-through gradient to ``b_c``. ``z`` is uniform on ``[-1/2, 1/2)`` or drawn
  from the histogram of this tensor's real rounding error (``noise="histogram"``, official).
- Hard quantization (eval, phase 2): ``Q(v) = delta * round(n * clip(v/alpha, lo/alpha, 1))``
  with STE and ``n`` from the detached, rounded bit-width.

Both phases run the fused ops' contracts ``nipq_noise`` and ``nipq_hard``
(:mod:`qtrainer.quantizers.ops`, formulas in :mod:`qtrainer.quantizers.formulas`); the
bit-width's straight-through chain to ``delta`` stays in torch autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import formulas
from . import ops as _ops
from .base import Param, Quantizer, check_bits, check_choice, round_ste
from .granularity import GRANULARITIES, step_count
from .scale_search import least_mse_scale

NOISES = ("histogram", "uniform")
WEIGHT_INITS = ("max_abs", "official")
ALPHA_INITS = ("official", "mse")
ROLES = ("weight", "input")


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` such that ``softplus(x) == y`` for ``y > 0`` (stable for large ``y``)."""
    return y + torch.log(-torch.expm1(-y))


def nipq_levels(bits, signed: bool):
    """``n``: the largest code at ``bits`` (int or tensor)."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def bits_logit(bits: float, b_min: int, b_max: int) -> float:
    """``theta_b`` with ``b_c = bits``: ``logit((bits - b_min) / (b_max - b_min))``, the
    fraction kept inside ``[1e-6, 1 - 1e-6]``."""
    p = min(max((bits - b_min) / (b_max - b_min), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def least_mse_alpha(rows: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Per row of ``rows`` (shape ``[R, M]``), the truncation boundary ``alpha`` (shape ``[R]``,
    > 0) of least mean squared error of the hard quantizer at ``bits``
    (:func:`formulas.nipq_hard_codes` times ``alpha / n``), searched from ``max|v|`` down by
    :func:`~qtrainer.quantizers.scale_search.least_mse_scale`."""
    rows = rows.detach().float()
    n = nipq_levels(bits, signed)

    def error(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return (formulas.nipq_hard_codes(v, alpha[:, 0], n, signed) * (alpha / n) - v) \
            .square().mean(1)

    return least_mse_scale(rows, rows.abs().amax(1).clamp(min=1e-8), error)


class NIPQQuantizer(Quantizer):
    """NIPQ pseudo-quantizer for one weight tensor or activation site.

    Args:
        bits: fixed bit-width, or the initial bit-width when ``learn_bits``.
        signed: signed (``lo = -alpha``) or unsigned (``lo = 0``) data.
        learn_bits: learn ``theta_b`` (mixed precision) instead of freezing it.
        b_min, b_max: range of the continuous bit-width (official 2 and 14).
        noise: ``histogram`` (official) or ``uniform``.
        role: ``weight`` (``alpha0`` from the tensor) or ``input`` (``theta_a = 6`` unsigned,
            ``3`` signed, the official constants).
        weight_init: ``max_abs`` (``alpha0 = max|W|`` exactly) or ``official``
            (``theta_a = max(W)``, so ``alpha0 = softplus(max W)``), per channel or group.
        alpha_init: ``official`` (``weight_init`` for weights, the constants for inputs) or
            ``mse`` (:func:`least_mse_alpha` of the tensor at ``bits``, per channel or group).
        granularity, group_size: one ``alpha`` per tensor, output channel or group of
            ``group_size`` input elements (weights; inputs always have one).
        channels, shape: the weight's output channels and shape (channel, group).
    """

    method_name = "nipq"
    hard_phase = True
    learnable_bits = True
    params = (
        Param("noise", "str", "histogram", "Distribution of the pseudo-quantization noise: "
              "histogram draws from the tensor's own rounding-error histogram (official code), "
              "uniform is U(-1/2, 1/2).", choices=NOISES),
        Param("learn_bits", "bool", False, "Learn each quantizer's bit-width (mixed precision); "
              "false keeps the given bits fixed."),
        Param("b_min", "int", 2, "Lower bound of the continuous bit-width (bits).", low=2,
              high=16),
        Param("b_max", "int", 14, "Upper bound of the continuous bit-width "
              "b_c = b_min + (b_max - b_min) sigmoid(theta_b) (bits).", low=2, high=16),
        Param("weight_init", "str", "max_abs", "Weight truncation boundary at start: max_abs "
              "alpha0 = max|W|, official alpha0 = softplus(max W) as the official code.",
              choices=WEIGHT_INITS),
        Param("alpha_init", "str", "official", "Truncation boundaries at start: official "
              "(weights by weight_init, inputs theta_a = 6 unsigned or 3 signed, as the official "
              "code), mse the least-MSE alpha at the initial bits (weights from the weights, "
              "inputs from the first batch; at 2 bits the official ones start near chance).",
              choices=ALPHA_INITS),
        Param("granularity", "str", "tensor", "Truncation boundaries of a weight: tensor one, "
              "channel one per output channel, group one per group_size consecutive input "
              "elements of each output row (activations always have one).",
              choices=GRANULARITIES),
        Param("group_size", "int", 128, "Elements per group along a weight's flattened input "
              "dimension for granularity: group (must divide it).", low=1,
              high=1 << 20),
    )

    def __init__(self, bits: int = 4, signed: bool = True, learn_bits: bool = False,
                 b_min: int = 2, b_max: int = 14, noise: str = "histogram", role: str = "input",
                 weight_init: str = "max_abs", alpha_init: str = "official",
                 granularity: str = "tensor",
                 group_size: int = 128, channels: int | None = None,
                 shape: tuple[int, ...] | None = None):
        super().__init__(signed)
        self.param("b_min").check(b_min)
        self.param("b_max").check(b_max)
        if b_min >= b_max:
            raise ValueError(f"b_min={b_min} must be smaller than b_max={b_max}")
        check_bits("bits", bits)
        if learn_bits and not b_min < bits < b_max:
            raise ValueError(f"bits={bits} must lie strictly inside b_min..b_max = {b_min}..{b_max} "
                             "when learn_bits=True")
        if not learn_bits and not b_min <= bits <= b_max:
            raise ValueError(f"bits={bits} must lie in b_min..b_max = {b_min}..{b_max}")
        self.noise = self.param("noise").check(noise)
        self.role = check_choice("role", role, ROLES)
        self.weight_init = self.param("weight_init").check(weight_init)
        self.alpha_init = self.param("alpha_init").check(alpha_init)
        learn_bits = self.param("learn_bits").check(learn_bits)
        self.b_min, self.b_max = b_min, b_max
        self.generator: torch.Generator | None = None
        self.theta_b = nn.Parameter(torch.tensor([bits_logit(bits, b_min, b_max)]),
                                    requires_grad=learn_bits)
        granularity = self.param("granularity").check(granularity)
        self.group_size = self.param("group_size").check(group_size)
        self.granularity = granularity if self.role == "weight" else "tensor"
        count = step_count(self.granularity, group_size, shape, channels)
        self.theta_a = nn.Parameter(torch.full((count,), 3.0 if signed else 6.0))
        # 0 while bits are learned, else the frozen integer bit-width.
        self.register_buffer("fixed_bits", torch.tensor(0 if learn_bits else bits))
        self._fixed = 0 if learn_bits else bits

    # -- bit-width -------------------------------------------------------------------------
    @property
    def learn_bits(self) -> bool:
        return self._fixed == 0

    def continuous_bits(self) -> torch.Tensor:
        """``b_c`` (shape ``[1]``, differentiable w.r.t. ``theta_b``)."""
        return self.b_min + (self.b_max - self.b_min) * torch.sigmoid(self.theta_b.float())

    def bits_ste(self) -> torch.Tensor:
        """``round(b_c)`` with a straight-through gradient (the resource loss's bit-width)."""
        if not self.learn_bits:
            return torch.full((1,), float(self._fixed), device=self.theta_b.device)
        return round_ste(self.continuous_bits())

    @property
    def bits(self) -> int:
        if not self.learn_bits:
            return self._fixed
        return int(torch.round(self.continuous_bits().detach()).item())

    def freeze_bits(self) -> int:
        """Fix the bit-width at ``round(b_c)`` for the rest of training; returns it."""
        b = self.bits
        self._fixed = b
        self.fixed_bits.fill_(b)
        self.theta_b.requires_grad_(False)
        return b

    # -- levels ----------------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return F.softplus(self.theta_a.float())

    @property
    def code_range(self) -> tuple[int, int]:
        n = nipq_levels(self.bits, self.signed)
        return (-n if self.signed else 0), n

    @property
    def step_size(self) -> torch.Tensor:
        return (self.alpha / nipq_levels(self.bits, self.signed)).detach()

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        rows = x.detach().float().reshape(self.theta_a.numel(), -1)  # one row per alpha
        if self.alpha_init == "mse":
            alpha = least_mse_alpha(rows, self.bits, self.signed)
            self.theta_a.copy_(inverse_softplus(alpha).to(self.theta_a))
        elif self.role == "weight":
            if self.weight_init == "max_abs":
                self.theta_a.copy_(inverse_softplus(rows.abs().amax(1).clamp(min=1e-6)))
            else:
                self.theta_a.copy_(rows.amax(1))
        self._mark_initialized()

    # -- forward ---------------------------------------------------------------------------
    def _noise_bits(self) -> torch.Tensor:
        """Training bit-width: ``round(b_c + u)`` with STE, or the fixed bits."""
        if not self.learn_bits:
            return torch.full((1,), float(self._fixed), device=self.theta_b.device)
        u = torch.rand(1, generator=self.generator, device=self.theta_b.device) - 0.5
        return round_ste(self.continuous_bits() + u)

    def fused_plan(self, x: torch.Tensor) -> _ops.Plan:
        """Training: the ``nipq_noise`` contract (``delta = alpha / n(b)`` differentiable
        w.r.t. ``alpha`` and, with learned bits, ``theta_b``; seed drawn now; histogram noise
        through its lookup table). Otherwise ``nipq_hard`` at the rounded bit-width."""
        if self.noisy:
            alpha = self.alpha
            # fixed bits: a Python level count (the same fp32 division, fewer tiny launches)
            delta = alpha / nipq_levels(self._noise_bits() if self.learn_bits else self._fixed,
                                        self.signed)
            seed = _ops.draw_seed(x, self.generator)
            lut = (_ops.nipq_lut(x, alpha, delta, self.signed) if self.noise == "histogram"
                   else None)
            return _ops.Plan("nipq_noise", (alpha, delta), (seed, lut), (bool(self.signed),))
        return _ops.Plan("nipq_hard", (self.alpha,), (),
                         (int(nipq_levels(self.bits, self.signed)), bool(self.signed)))

    @torch.no_grad()
    def int_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes shaped like x, scale = alpha / n)``; the scale broadcasts against the
        codes, except per group (flat ``[R]``, see ``formulas.dequantize``)."""
        n = int(nipq_levels(self.bits, self.signed))
        alpha = self.alpha
        rows = formulas.step_rows(alpha, x.float())
        scale = alpha / n
        scale = formulas.step_view(scale, rows) if rows.shape == x.shape else scale
        return formulas.nipq_hard_codes(x.float(), alpha, n, self.signed), scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fixed = int(self.fixed_bits)
        self.theta_b.requires_grad_(self._fixed == 0)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.granularity == "group" else ""
        return (f"{super().extra_repr()}, learn_bits={self.learn_bits}, noise={self.noise}, "
                f"granularity={self.granularity}{group}")
