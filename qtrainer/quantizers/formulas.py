"""The quantizers' math in torch, written once (docs/algorithms.md sections 1-3).

Every quantizer forward and backward that runs in torch runs these functions: the eager path
of the quantizer modules, the CPU default and the torch fallback of the fused ops
(:mod:`qtrainer.quantizers.ops`). The Triton kernels (:mod:`qtrainer.quantizers.kernels`)
implement the same contracts and are compared with these functions by the tests.

Conventions: ``x`` any float dtype (the math runs in fp32, outputs come back in ``x``'s dtype,
gradients of parameters in fp32); parameters are 1-D fp32 tensors (``s``: one step size, one
per channel along dim 0 of ``x``, or one per group: see :func:`step_rows`; ``alpha``,
``delta``: one value); ``lam`` an fp32 tensor
``[1]``; training noise is an fp32 tensor shaped like ``x``, drawn from an int64 seed tensor
``[1]`` by :func:`tempering_noise` / :func:`nipq_z` (so forward, recomputed forward and
backward use the same noise without storing it). Gradient sums accumulate in fp32.

Written for few passes over the tensor: comparisons go through ``aten.hardtanh_backward``
(gradient passed strictly inside ``(lo, hi)``, 0 at and beyond the bounds, whatever the torch
version), products and sums through ``torch.dot``, and temporaries are updated in place.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

HIST_BINS = 256
LUT_SIZE = 1 << 16
NOISE_CODES = {"none": 0, "error_uniform": 1, "error_gaussian": 2, "uniform_step": 3}
SQRT3 = math.sqrt(3.0)
_HTB = torch.ops.aten.hardtanh_backward.default
_HTB_OUT = torch.ops.aten.hardtanh_backward.grad_input


def step_rows(s: Tensor, x: Tensor) -> Tensor:
    """``x`` viewed so that the step sizes ``s`` run along its dim 0: ``x`` itself for one
    step or one per channel (``s.numel() == x.shape[0]``), else (one step per group) ``x``
    reshaped to ``[R, numel / R]``, ``R = s.numel()``: the elements of ``x`` in row-major order
    cut into ``R`` equal contiguous groups (a weight ``[out, in, ...]`` with groups of
    ``group_size`` along its flattened input dimension). A view for a contiguous ``x``."""
    rows = s.numel()
    if rows == 1 or (x.dim() > 0 and x.shape[0] == rows):
        return x
    if rows == 0 or x.numel() % rows:
        raise ValueError(f"{rows} step sizes do not divide a tensor shaped {tuple(x.shape)} "
                         f"({x.numel()} elements) into equal groups")
    return x.reshape(rows, -1)


def step_view(s: Tensor, x: Tensor) -> Tensor:
    """The fp32 step size shaped to broadcast against ``x`` (already passed through
    :func:`step_rows`): ``[1]`` or ``[R, 1, ...]``."""
    s = s.float()
    if s.numel() == 1:
        return s.reshape(1)
    if x.dim() == 0 or x.shape[0] != s.numel():
        raise ValueError(f"per-channel step size of {s.numel()} values does not match dim 0 of "
                         f"a tensor shaped {tuple(x.shape)}")
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def inside_grad(grad: Tensor, v: Tensor, lo: float, hi: float, out: Tensor | None = None) -> Tensor:
    """``grad`` where ``lo < v < hi`` strictly, 0 at and beyond the bounds (one pass)."""
    if out is None:
        return _HTB(grad, v, lo, hi)
    return _HTB_OUT(grad, v, lo, hi, grad_input=out)


def dot_rows(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """``sum(a * b)`` of fp32 tensors in fp32 (never an autocast matmul): shape ``[rows]``,
    one sum per slice of dim 0 (per-channel weights) or one in all. Traced by
    ``torch.compile``, a product and a sum (``dot`` of flat views would fix the logical
    element order: Inductor's channels-last buffers then give a scalar loop with index
    arithmetic instead of a vectorized reduction in memory order)."""
    if rows == 1 and a.is_contiguous() and b.is_contiguous() and not torch.compiler.is_compiling():
        return torch.dot(a.view(-1), b.view(-1)).reshape(1)
    p = a * b
    return p.sum().reshape(1) if rows == 1 else p.reshape(rows, -1).sum(1)


# -- noise from a seed -------------------------------------------------------------------------
# numpy's SFC64 bit generator seeded by the seed (several times faster than torch's CPU
# generator). Uniform noise takes 16 random bits per element (a grid of 2^-16 of the range);
# histogram and gaussian noise take 32 (words become floats by setting exponent bits).

def _words(seed: Tensor, n: int, dtype=np.uint32) -> np.ndarray:
    """``n`` random words (``dtype``: uint32 or int16) from ``seed`` (a fresh array)."""
    per_raw = 8 // np.dtype(dtype).itemsize
    rng = np.random.SFC64(int(seed.reshape(-1)[0]))
    return rng.random_raw((n + per_raw - 1) // per_raw).view(dtype)[:n]


def _one_to_two(words: np.ndarray, shift: int = 0) -> np.ndarray:
    """In place: the float32 ``1 + m / 2^23`` with ``m`` the low ``23 - shift`` bits of each
    word, shifted up by ``shift`` (so ``1 + m' 2^(shift - 23)``); returned as a float32 view."""
    words &= 0x7FFFFF >> shift
    if shift:
        words <<= shift
    words |= 0x3F800000
    return words.view(np.float32)


def _like(flat: Tensor, like: Tensor) -> Tensor:
    """A flat tensor of ``like.numel()`` values laid out like ``like`` (storage order for a
    dense ``like``: contiguous, channels_last), on ``like``'s device."""
    dense = like.is_contiguous() or _dense(like)
    t = flat.as_strided(like.shape, like.stride()) if dense else flat.view(like.shape)
    return t.to(like.device)


def _dense(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else (
        t.is_contiguous(memory_format=torch.channels_last_3d) if t.dim() == 5 else False)


def uniform(seed: Tensor, like: Tensor, width) -> Tensor:
    """Uniform noise on ``(-width/2, width/2)`` shaped like ``like``, fp32: ``(k + 1/2) *
    (width / 2^16)`` for ``k`` a random int16 (65536 values, symmetric around 0). ``width``: a
    float, or a ``[1]`` tensor (a scale folded into the one multiplication)."""
    k = _like(torch.from_numpy(_words(seed, like.numel(), np.int16)), like)
    return k.float().add_(0.5).mul_(width * 2.0**-16)


def gaussian(seed: Tensor, like: Tensor) -> Tensor:
    """``N(0, 1)`` shaped like ``like`` (Box-Muller on pairs of uniforms), fp32."""
    n = like.numel()
    m = (n + 1) // 2
    f = torch.from_numpy(_one_to_two(_words(seed, 2 * m)))
    u1 = f[:m].neg().add_(2.0)  # (0, 1]
    theta = f[m:].sub(1.0).mul_(2 * math.pi)
    rad = u1.log_().mul_(-2.0).sqrt_()
    return torch.cat([rad * theta.cos(), rad * theta.sin()])[:n].view(like.shape).to(like.device)


def tempering_noise(noise: int, seed: Tensor, like: Tensor, lam: Tensor | None = None) -> Tensor:
    """Tempering's noise for code ``noise`` (``NOISE_CODES``): ``xi`` zero mean, unit variance
    (1: ``U(-sqrt 3, sqrt 3)``, 2: ``N(0, 1)``) or 3: ``u ~ U(-1/2, 1/2)``; fp32. With
    ``lam`` (fp32 ``[1]``): ``lam * xi`` (for uniform noise scaled in the one multiplication
    that maps the random integers, so not always ``lam`` times the unscaled draw)."""
    if noise == NOISE_CODES["error_gaussian"]:
        xi = gaussian(seed, like)
        return xi if lam is None else xi.mul_(lam)
    width = 1.0 if noise == NOISE_CODES["uniform_step"] else 2 * SQRT3
    return uniform(seed, like, width if lam is None else lam * width)


def nipq_z(seed: Tensor, lut: Tensor | None, like: Tensor, delta: Tensor | None = None) -> Tensor:
    """NIPQ's noise in units of ``delta``, in ``[-1/2, 1/2)``, fp32 shaped like ``like``:
    uniform when ``lut`` is None, else a bin by inverse-CDF sampling through the lookup table
    (a random 16-bit ``j`` picks one of ``LUT_SIZE`` equal-probability cells) and uniform
    inside the bin (a second 16-bit ``k``): ``z = bin / 256 - 1/2 + k / 2^24``, exact. With
    ``delta`` (``[1]``): ``z * delta`` (bit for bit the product); several deltas: each row of
    :func:`step_rows` times its delta (shaped like ``like``, contiguous)."""
    if delta is not None and delta.numel() > 1:  # one delta per row of step_rows
        z = nipq_z(seed, lut, like)
        rows = step_rows(delta, z)
        return (rows * step_view(delta, rows).to(rows.device)).view(like.shape)
    if lut is None:
        return uniform(seed, like, 1.0 if delta is None else delta.float().reshape(1))
    n = like.numel()
    halves = _words(seed, 2 * n, np.int16)  # j, then k - 2^15 (contiguous halves)
    pick = torch.from_numpy(halves[:n].view(np.uint16).astype(np.int32))
    # bin / 256 - 1/2 + 2^-9, plus (k - 2^15) / 2^24: the same z, one exact addition
    table = lut.to(pick.device).float().mul_(1.0 / HIST_BINS).sub_(0.5 - 2.0**-9)
    z = table.index_select(0, pick).add_(torch.from_numpy(halves[n:]), alpha=2.0**-24)
    return _like(z if delta is None else z.mul_(delta.float().reshape(1).cpu()), like)


# -- step-size fake quantization (LSQ, noise tempering) ------------------------------------

def step_codes(x: Tensor, sv: Tensor, q_n: int, q_p: int) -> Tensor:
    """The integer codes ``round(clip(x / s, -Q_N, Q_P))`` (fp32) for a step size ``sv``
    already shaped to broadcast against ``x``."""
    return torch.div(x, sv).clamp_(-q_n, q_p).round_()


def dequantize(codes: Tensor, s: Tensor) -> Tensor:
    """``codes * s`` with ``s`` one step, one per channel or one per group (:func:`step_rows`),
    fp32 shaped like ``codes``: the eval output of the step contract from its codes."""
    rows = step_rows(s, codes.float())
    return (rows * step_view(s, rows)).view(codes.shape)


def step_forward(x: Tensor, s: Tensor, q_n: int, q_p: int, noise: int, xil: Tensor | None,
                 keep_clip: bool = False):
    """``q = round(clip(x / s, -Q_N, Q_P)) * s``; with tempering noise ``xil = lambda * xi``
    (fp32, shaped like ``x``, from :func:`tempering_noise`) for noise code ``noise``:
    ``(code + (code - c) xil) * s`` (error-aware: ``q + lambda xi e`` with ``e = q - c s``)
    or ``(code + xil) * s`` (``uniform_step``: ``q + lambda s u``), ``code = round(c)``,
    ``c = clip(x / s)``. Returns ``x``'s dtype (``xil`` is not modified); with ``keep_clip``
    also ``c`` for :func:`step_backward` (shaped like ``step_rows(s, x)``)."""
    rows = step_rows(s, x)
    if rows is not x:  # one step per group
        out = step_forward(rows, s, q_n, q_p, noise, None if xil is None else
                           xil.reshape(rows.shape), keep_clip)
        return (out[0].view(x.shape), out[1]) if keep_clip else out.view(x.shape)
    sv = step_view(s, x)
    if not (noise or keep_clip):
        return step_codes(x, sv, q_n, q_p).mul_(sv).to(x.dtype)
    c = torch.div(x, sv).clamp_(-q_n, q_p)
    code = torch.round(c)
    if noise == NOISE_CODES["uniform_step"]:
        code.add_(xil)
    elif noise:
        frac = torch.sub(code, c) if keep_clip else torch.sub(code, c, out=c)
        code.add_(frac.mul_(xil))
    y = code.mul_(sv).to(x.dtype)
    return (y, c) if keep_clip else y


def step_backward(grad: Tensor, x: Tensor, s: Tensor, q_n: int, q_p: int, g: float,
                  noise: int, xil: Tensor | None, need_x: bool, need_s: bool,
                  clip: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x in x's dtype, grad_s fp32 shaped like s)``, None where not needed.

    ``grad_x = grad`` where ``-Q_N < x/s < Q_P``, else 0. ``grad_s = g * sum(grad * t)`` with
    ``t = round(x/s) - x/s`` inside, ``-Q_N``/``Q_P`` at and beyond the bounds (that is
    ``round(c) - [inside] c`` for ``c = clip(x/s)``), plus the noise terms
    ``lambda xi (round(x/s) - x/s)`` inside (error-aware) or ``lambda u`` (``uniform_step``),
    ``xil = lambda * xi`` as in :func:`step_forward`. Each sum is an fp32 dot product of
    exactly computed per-element terms. ``clip``: ``c`` from :func:`step_forward`
    (``keep_clip``), else computed; ``xil`` and ``clip`` are consumed. One step per group:
    the sums run over each group of :func:`step_rows`.
    """
    rows = step_rows(s, x)
    if rows is not x:
        gx, gs = step_backward(grad.reshape(rows.shape), rows, s, q_n, q_p, g, noise,
                               None if xil is None else xil.reshape(rows.shape), need_x,
                               need_s, clip)
        return (None if gx is None else gx.view(x.shape)), gs
    sv = step_view(s, x)
    c = torch.div(x, sv).clamp_(-q_n, q_p) if clip is None else clip
    gf = grad.float()
    gx = inside_grad(gf, c, -q_n, q_p)
    gs = None
    if need_s:
        rows = s.numel()
        term = torch.round(c).sub_(inside_grad(c, c, -q_n, q_p, out=c))
        gs = dot_rows(gf, term, rows)
        if noise == NOISE_CODES["uniform_step"]:
            gs += dot_rows(gf, xil, rows)
        elif noise:  # inside, term is round(c) - c; outside, grad_x is 0
            gs += dot_rows(xil.mul_(gx), term, rows)
        gs = (gs * g).reshape(s.shape)
    return (gx.to(x.dtype) if need_x else None), gs


# -- NIPQ ------------------------------------------------------------------------------------
# ``alpha`` (and ``delta``) hold one value, one per channel or one per group; ``x`` is read
# through :func:`step_rows` (by the alpha's count) as for step sizes.

def _bounds(alpha: Tensor, signed: bool, rows: Tensor):
    """``(lo, alpha)``: Python floats (read on the host) for one ``alpha``, else fp32 tensors
    broadcasting against ``rows`` (``x`` through :func:`step_rows`; ``lo`` 0.0 unsigned)."""
    if alpha.numel() == 1:
        a = float(alpha.reshape(-1)[0])
        return (-a if signed else 0.0), a
    a = step_view(alpha, rows)
    return (-a if signed else 0.0), a


def _inside(grad: Tensor, v: Tensor, lo, hi, signed: bool, out: Tensor | None = None) -> Tensor:
    """:func:`inside_grad` for float or per-row tensor bounds (NaN passes, as there; signed
    bounds ``-hi, hi`` test ``|v| >= hi``: one broadcast comparison instead of two)."""
    if not isinstance(hi, Tensor):
        return inside_grad(grad, v, lo, hi, out)
    beyond = v.abs() >= hi if signed else (v <= lo) | (v >= hi)
    return grad.masked_fill(beyond, 0.0) if out is None else out.copy_(grad).masked_fill_(beyond, 0.0)


def _clip(v: Tensor, lo, hi) -> Tensor:
    """``clamp(v, lo, hi)`` (NaN stays NaN); per-row tensor bounds through ``minimum`` and
    ``maximum``, several times faster on CPU than ``clamp`` with broadcast tensors."""
    if not isinstance(hi, Tensor):
        return torch.clamp(v, lo, hi)
    low = torch.minimum(v, hi)
    return torch.maximum(low, lo) if isinstance(lo, Tensor) else low.clamp_(min=lo)


def nipq_error_bins(x: Tensor, alpha: Tensor, delta: Tensor, signed: bool) -> Tensor:
    """Per element, 1 + the histogram bin (of ``HIST_BINS`` over ``[-1/2, 1/2]``) of the
    rounding error ``e = round(x/delta) - x/delta`` for ``lo < x < alpha``, 0 elsewhere
    (int32; per row of :func:`step_rows` for several alphas, one histogram in all). Bin of
    ``e``: ``min(trunc(fl(256 e + 129)), 256) - 1`` (``fl``: fp32 rounding)."""
    xf = step_rows(alpha, x.float())
    lo, hi = _bounds(alpha, signed, xf)
    r = torch.div(xf, step_view(delta, xf))
    v = torch.round(r).sub_(r).mul_(HIST_BINS).add_(HIST_BINS // 2 + 1)  # in [1, 257]
    v = _inside(v, xf, lo, hi, signed, out=v)
    return v.to(torch.int32).clamp_(0, HIST_BINS)  # NaN inputs land in the dropped 0


def nipq_lut(bins: Tensor) -> Tensor:
    """Lookup table (uint8, ``LUT_SIZE`` cells of equal probability, each holding a bin) that
    samples the histogram of :func:`nipq_error_bins`' ``bins``: cell ``j`` holds the number
    of bins whose cumulative count ``C`` satisfies ``2 L C <= (2 j + 1) N`` (exact integers;
    ``N`` the count, ``L = LUT_SIZE``). An empty histogram gives equal bins."""
    hist = torch.bincount(bins.reshape(-1), minlength=HIST_BINS + 1)[1:]
    cum = hist.cumsum(0)
    total = cum[-1]
    grid = torch.arange(LUT_SIZE, device=bins.device)
    cnt = torch.searchsorted(cum * (2 * LUT_SIZE), (2 * grid + 1) * total, right=True)
    cnt = torch.where(total > 0, cnt.clamp_(max=HIST_BINS - 1), grid // (LUT_SIZE // HIST_BINS))
    return cnt.to(torch.uint8)


def nipq_noise_forward(x: Tensor, alpha: Tensor, zd: Tensor, signed: bool,
                       keep_clip: bool = False):
    """``alpha`` where ``x >= alpha``, ``lo`` where ``x <= lo``, else ``x + zd`` with ``zd =
    z * delta`` (fp32 shaped like ``x``, from :func:`nipq_z`; set to 0 outside, in place);
    with ``keep_clip`` also ``clip(x, lo, alpha)`` (shaped like ``step_rows(alpha, x)``) for
    :func:`nipq_noise_backward`."""
    xf = x.float()
    rows = step_rows(alpha, xf)
    lo, hi = _bounds(alpha, signed, rows)
    zr = zd if rows is xf else zd.view(rows.shape)
    noise = _inside(zr, rows, lo, hi, signed, out=zr)  # 0 outside: the backward's sums agree
    clipped = _clip(rows, lo, hi)
    if keep_clip:
        return torch.add(clipped, noise).view(x.shape).to(x.dtype), clipped
    return clipped.add_(noise).view(x.shape).to(x.dtype)


def nipq_noise_backward(grad: Tensor, x: Tensor, alpha: Tensor, delta: Tensor,
                        zd: Tensor | None, signed: bool, need_x: bool, need_params: bool,
                        clip: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x, grad_params)``: ``grad_x = grad`` where ``lo < x < alpha``; ``grad_params``
    fp32 ``[2R]`` (``R`` alphas): the direct ``alpha`` gradients (``+sum(grad)`` at and above
    ``alpha``, ``-sum(grad)`` at and below ``-alpha`` when signed), then the ``delta``
    gradients ``sum(grad * z)`` inside, as ``sum(grad_x * zd) / delta`` (``zd`` as drawn, or
    as the forward left it), each summed over its row. ``clip``: ``clip(x, lo, alpha)`` from
    the forward, consumed."""
    xf, gf = x.float(), grad.float()
    rows, n = step_rows(alpha, xf), alpha.numel()
    if rows is not xf:
        gf = gf.reshape(rows.shape)
        zd = None if zd is None else zd.reshape(rows.shape)
    lo, hi = _bounds(alpha, signed, rows)
    gx = _inside(gf, rows, lo, hi, signed)
    gp = None
    if need_params:
        # at and beyond the bounds clip(x) / alpha is exactly 1, -1 or 0 (unsigned)
        side = (_clip(rows, lo, hi) if clip is None else clip).div_(hi)
        g_alpha = dot_rows(torch.sub(gf, gx), side, n)
        gp = torch.cat([g_alpha, dot_rows(gx, zd, n) / delta.float().reshape(-1)])
    return (gx.view(x.shape).to(x.dtype) if need_x else None), gp


def nipq_hard_codes(x: Tensor, alpha: Tensor, n: int, signed: bool) -> Tensor:
    """The integer codes ``round(n * clip(x / alpha, lo, 1))`` (fp32, shaped like ``x``),
    ``lo = -1`` signed, else 0; the step is ``alpha / n``."""
    rows = step_rows(alpha, x)
    c = torch.div(rows, step_view(alpha, rows)).clamp_(-1.0 if signed else 0.0, 1.0)
    return c.mul_(n).round_().view(x.shape)


def nipq_hard_forward(x: Tensor, alpha: Tensor, n: int, signed: bool, keep_clip: bool = False):
    """``(alpha / n) * round(n * clip(x / alpha, lo, 1))``; with ``keep_clip`` also
    ``clip(x / alpha, lo, 1)`` (shaped like ``step_rows(alpha, x)``) for
    :func:`nipq_hard_backward`."""
    rows = step_rows(alpha, x)
    av = step_view(alpha, rows)
    c = torch.div(rows, av).clamp_(-1.0 if signed else 0.0, 1.0)
    codes = torch.mul(c, n) if keep_clip else c.mul_(n)  # c itself unless kept
    y = codes.round_().mul_(av / n).view(x.shape).to(x.dtype)
    return (y, c) if keep_clip else y


def nipq_hard_backward(grad: Tensor, x: Tensor, alpha: Tensor, n: int, signed: bool,
                       need_x: bool, need_alpha: bool,
                       clip: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x, grad_alpha fp32 [R])``: ``grad_x = grad`` strictly inside ``(lo, 1)`` of
    ``x / alpha``, 0 at and beyond the bounds; ``d/d alpha = (Q(x) - x) / alpha`` inside,
    ``+1`` at and above ``alpha``, ``-1`` at and below ``-alpha`` (signed; 0 unsigned): per
    element ``round(n c) / n - [inside] c`` for ``c = clip(x / alpha, lo, 1)``, summed per
    row as ``sum(grad (round(n c) - n c)) / n + sum((grad - grad_x) c)`` (exact terms, fp32
    dots). ``clip``: ``c`` from the forward, consumed."""
    lo = -1.0 if signed else 0.0
    rows = step_rows(alpha, x)
    c = torch.div(rows, step_view(alpha, rows)).clamp_(lo, 1.0) if clip is None else clip
    gf = grad.float().reshape(c.shape)
    gx = inside_grad(gf, c, lo, 1.0)
    ga = None
    if need_alpha:
        nc = c * n
        frac = torch.round(nc).sub_(nc)  # 0 at the bounds, where n c is an integer
        r = alpha.numel()
        ga = dot_rows(gf, frac, r) / n + dot_rows(torch.sub(gf, gx, out=frac), c, r)
    return (gx.view(x.shape).to(x.dtype) if need_x else None), ga


__all__ = [
    "HIST_BINS", "LUT_SIZE", "NOISE_CODES", "dequantize", "dot_rows", "gaussian", "inside_grad",
    "nipq_error_bins", "nipq_hard_backward", "nipq_hard_codes", "nipq_hard_forward", "nipq_lut",
    "nipq_noise_backward", "nipq_noise_forward", "nipq_z", "step_backward",
    "step_codes", "step_forward", "step_rows", "step_view", "tempering_noise", "uniform",
]
