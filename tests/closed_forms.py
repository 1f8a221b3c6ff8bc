"""The docs/algorithms.md closed forms evaluated independently of qtrainer, and tolerances derived
from fp32 rounding, for the quantizer tests.

Values that the formulas define in fp32 (the ratio ``x / s``, its clip, ``n * c``) are taken
in fp32 and promoted; every other quantity (per-element gradient terms, sums) is evaluated in
float64. A parameter gradient that the code accumulates in fp32 from exactly computed
per-element terms ``t_i = a_i * b_i`` then lies within ``gamma_m * sum_i |a_i b_i|`` of the
exact sum, whatever the summation order (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., eq. 3.5), with ``gamma_m = m u / (1 - m u)``, ``u = 2^-24`` and ``m`` the
number of terms plus the few extra roundings of the code path (``EXTRA_ROUNDINGS``). The bound
holds on any machine and BLAS; a wrong term moves the result by far more whenever the affected
elements carry a visible share of ``sum |t_i|``.
"""

from __future__ import annotations

import torch

U32 = 2.0**-24
EXTRA_ROUNDINGS = 8  # products of terms, splitting into several dots, scaling, autograd chain

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (sign of zero and NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def gamma(m: int) -> float:
    return m * U32 / (1 - m * U32)


def assert_fp32_sum(got: torch.Tensor, terms: torch.Tensor, rows: int = 1, scale: float = 1.0,
                    slack: float = 0.0):
    """``got`` (fp32, ``[rows]`` or one value) against ``scale * sum(terms)`` per row of dim 0
    (float64), within the fp32 accumulation bound of the terms' magnitudes plus ``slack`` (an
    absolute bound on rounding the code makes inside a term, where it has one)."""
    t = terms.double().reshape(rows, -1)
    exact = t.sum(1) * scale
    bound = (gamma(t.shape[1] + EXTRA_ROUNDINGS) * t.abs().sum(1) + slack) * abs(scale) + 1e-30
    err = (got.double().reshape(-1) - exact).abs()
    assert bool((err <= bound).all()), f"error {err.tolist()} > fp32 bound {bound.tolist()}"


# -- LSQ / tempering (docs/algorithms.md sections 1 and 3) ------------------------------------------

def lsq_ratio(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``fl(x / s)`` (fp32; ``s`` broadcast per channel along dim 0 when it has several)."""
    s = s.float()
    view = s.reshape(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s.reshape(1)
    return x.float() / view


def lsq_forward(x, s, q_n, q_p):
    """``round(clip(x / s, -Q_N, Q_P)) * s`` in fp32, the paper's order."""
    s = s.float()
    view = s.reshape(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s.reshape(1)
    return torch.round(torch.clamp(x.float() / view, -q_n, q_p)) * view


def lsq_grad_x(x, s, q_n, q_p, w):
    """``w`` where ``-Q_N < x/s < Q_P`` strictly, else 0."""
    r = lsq_ratio(x, s)
    return torch.where((r > -q_n) & (r < q_p), w.float(), torch.zeros_like(w, dtype=torch.float32))


def lsq_step_terms(x, s, q_n, q_p, w, lam=0.0, xi=None, noise="none"):
    """Per-element ``w * d y / d s`` (float64) before the gradient scale: ``round(x/s) - x/s``
    inside, ``-Q_N`` at or below, ``Q_P`` at or above, plus tempering's
    ``lam * xi * (round(x/s) - x/s)`` inside (``noise="error"``) or ``lam * u``
    (``"uniform_step"``)."""
    r = lsq_ratio(x, s).double()
    inside = (r > -q_n) & (r < q_p)
    frac = torch.round(r) - r
    t = torch.where(inside, frac, torch.where(r <= -q_n, float(-q_n), float(q_p)))
    if noise == "error":
        t = t + lam * xi.double() * torch.where(inside, frac, 0.0)
    elif noise == "uniform_step":
        t = t + lam * xi.double()
    return w.double() * t


# -- NIPQ (docs/algorithms.md section 2) --------------------------------------------------------

def nipq_noise_forward(x, alpha: float, delta: torch.Tensor, z, signed):
    """``alpha`` where ``x >= alpha``, ``lo`` where ``x <= lo``, else ``x + z * delta``."""
    a = torch.tensor(float(alpha))
    lo = -a if signed else torch.tensor(0.0)
    return torch.where(x >= a, a, torch.where(x <= lo, lo, x + z * delta.float()))


def nipq_noise_masks(x, alpha: float, signed):
    """``(above, below, inside)``: ``x >= alpha``; ``x <= lo`` (and not above); the rest."""
    above = x >= alpha
    below = (x <= (-alpha if signed else 0.0)) & ~above
    return above, below, ~(above | below)


def nipq_alpha_terms(x, alpha: float, signed, w):
    """Per-element direct ``alpha`` gradient: ``+w`` at and above, ``-w`` at and below when
    signed (float64)."""
    above, below, _ = nipq_noise_masks(x, alpha, signed)
    sign = above.double() - (below.double() if signed else 0.0)
    return w.double() * sign


def nipq_hard_parts(x, alpha: float, n: int, signed):
    """``(c, code, inside)``: ``c = clip(fl(x / alpha), lo, 1)`` (fp32), ``code =
    round(fl(n c))``, ``inside``: ``lo < c < 1`` strictly."""
    lo = -1.0 if signed else 0.0
    c = torch.clamp(x.float() / torch.tensor(float(alpha)), lo, 1.0)
    return c, torch.round(c * n), (c > lo) & (c < 1.0)


def nipq_hard_forward(x, alpha: float, n: int, signed):
    """``(alpha / n) * round(n * clip(x / alpha, lo, 1))`` in fp32."""
    _, code, _ = nipq_hard_parts(x, alpha, n, signed)
    return code * (torch.tensor(float(alpha)) / n)


def nipq_hard_alpha_terms(x, alpha: float, n: int, signed, w):
    """``(terms, slack)``: per-element ``w * dQ/d alpha`` (float64): ``(Q - x) / alpha = code /
    n - c`` inside, ``code / n`` (``+1``, ``-1`` or 0) at and beyond the bounds; and the
    rounding of ``fl(n c) / n`` for ``c`` the code may make (``2 u sum |w c|`` inside)."""
    c, code, inside = nipq_hard_parts(x, alpha, n, signed)
    terms = w.double() * (code.double() / n - torch.where(inside, c.double(), 0.0))
    slack = 2 * U32 * (w.double() * c.double()).abs()[inside].sum().item()
    return terms, slack
