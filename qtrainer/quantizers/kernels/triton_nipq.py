"""Triton kernels for NIPQ: the noise phase (uniform or histogram noise drawn in the kernel) and
hard quantization, forward and backward.

Noise phase, ``y = alpha`` where ``x >= alpha``, ``lo`` where ``x <= lo``, else
``x + z * delta``. ``z`` comes from a seed tensor and the element's storage offset:

- uniform: ``z = u - 1/2`` with ``u = rand(seed, offset)``;
- histogram: two words of one Philox draw give a lookup-table cell (``LUT_SIZE`` cells of equal
  probability, built from this tensor's rounding-error histogram) and ``u`` inside the bin:
  ``z = (bin + u) / 256 - 1/2``, the reference's inverse-CDF sampling.

The histogram takes two small launches before the forward (per-block ``tl.histogram`` merged
with 256 atomic adds, then the lookup table from exact integer arithmetic); the table is an
input of the forward and backward so the backward regenerates the same ``z``.

Backward: ``grad_x`` (a select like ``torch.where``'s gradient) and fp32 per-block partial sums
of the direct ``alpha`` gradient (``+1`` above, ``-1`` below when signed) and of ``grad * z``
inside (the ``delta`` gradient; the chain to ``alpha`` and the bit-width runs in torch).

Hard quantization: ``delta * round(n * clip(x / alpha, lo / alpha, 1))`` with the reference's
operation order, so forward and ``grad_x`` are bit-identical; ``grad_alpha`` per element is
``(code - n r [inside]) / n`` summed in fp32. Whether the clip passes the gradient at its
bounds follows ``torch.clamp`` in the running torch version (exclusive in recent versions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .triton_lsq import BLOCK, NUM_WARPS, channel_layout, like, match, rint, sum_rows, to_out

HIST_BINS = 256
LUT_SIZE = 1 << 16


@triton.jit
def nipq_z(seed, offs, lut_ptr, HIST: tl.constexpr):
    """Noise in units of ``delta`` in ``[-1/2, 1/2)`` for element ``offs``."""
    if HIST:
        r0, r1, _, _ = tl.randint4x(seed, offs)
        pick = (r0 >> 16).to(tl.int32)  # a lookup-table cell in [0, 65536)
        b = tl.load(lut_ptr + pick).to(tl.float32)
        u = tl.uint_to_uniform_float(r1)
        z = (b + u) * 0.00390625 - 0.5
    else:
        z = tl.rand(seed, offs) - 0.5
    return z


@triton.jit
def _noise_fwd_kernel(x_ptr, alpha_ptr, delta_ptr, seed_ptr, lut_ptr, y_ptr, z_ptr, n,
                      SIGNED: tl.constexpr, HIST: tl.constexpr, WRITE_Z: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    delta = tl.load(delta_ptr).to(tl.float32)
    seed = tl.load(seed_ptr)
    z = nipq_z(seed, offs, lut_ptr, HIST)
    inner = x + z * delta
    if SIGNED:
        lo = -alpha
    else:
        lo = 0.0
    y = tl.where(x >= alpha, alpha, tl.where(x <= lo, lo, inner))
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)
    if WRITE_Z:
        tl.store(z_ptr + offs, z, mask=mask)


@triton.jit
def _noise_bwd_kernel(g_ptr, x_ptr, alpha_ptr, seed_ptr, lut_ptr, gx_ptr, part_ptr, n, nblk,
                      SIGNED: tl.constexpr, HIST: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_P: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    above = x >= alpha
    if SIGNED:
        below = (x <= -alpha) & (~above)
    else:
        below = (x <= 0.0) & (~above)
    inside = ~(above | below)
    if NEED_X:
        tl.store(gx_ptr + offs, to_out(tl.where(inside, grad, 0.0), gx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_P:
        seed = tl.load(seed_ptr)
        z = nipq_z(seed, offs, lut_ptr, HIST)
        g_alpha = tl.where(above, grad, 0.0)
        if SIGNED:
            g_alpha = g_alpha - tl.where(below, grad, 0.0)
        g_delta = tl.where(inside, grad * z, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, g_alpha, 0.0), axis=0))
        tl.store(part_ptr + nblk + pid, tl.sum(tl.where(mask, g_delta, 0.0), axis=0))


@triton.jit
def _hist_kernel(x_ptr, alpha_ptr, delta_ptr, hist_ptr, n, SIGNED: tl.constexpr,
                 BINS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    delta = tl.load(delta_ptr).to(tl.float32)
    if SIGNED:
        valid = mask & (x > -alpha) & (x < alpha)
    else:
        valid = mask & (x > 0.0) & (x < alpha)
    r = tl.math.div_rn(x, delta)
    err = tl.where(valid, rint(r) - r, 0.0)
    b = tl.minimum(tl.maximum(((err + 0.5) * BINS).to(tl.int32), 0), BINS - 1)
    h = tl.histogram(b, BINS, mask=valid)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), h)


@triton.jit
def _lut_kernel(hist_ptr, lut_ptr, L: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """``lut[g]`` = number of bins whose CDF is <= ``(g + 1/2) / L`` (clamped to the last bin),
    in exact integers: ``2 L cum[k] <= (2 g + 1) total``. An empty histogram gives equal bins."""
    h = tl.load(hist_ptr + tl.arange(0, BINS)).to(tl.int64)
    cum = tl.cumsum(h, axis=0)
    total = tl.sum(h, axis=0)
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    le = (cum[None, :] * (2 * L)) <= ((2 * g + 1) * total)[:, None]
    cnt = tl.minimum(tl.sum(le.to(tl.int32), axis=1), BINS - 1)
    cnt = tl.where(total > 0, cnt, (g // (L // BINS)).to(tl.int32))
    tl.store(lut_ptr + g, cnt.to(tl.uint8))


@triton.jit
def _hard_fwd_kernel(x_ptr, alpha_ptr, y_ptr, n, n_f, LO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    ratio = tl.minimum(tl.maximum(tl.math.div_rn(x, alpha), LO,
                                  propagate_nan=tl.PropagateNan.ALL),
                       1.0, propagate_nan=tl.PropagateNan.ALL)
    code = rint(n_f * ratio)
    y = code * tl.math.div_rn(alpha, n_f)
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hard_bwd_kernel(g_ptr, x_ptr, alpha_ptr, gx_ptr, part_ptr, n, n_f, LO: tl.constexpr,
                     INCL: tl.constexpr, NEED_X: tl.constexpr, NEED_A: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    r = tl.math.div_rn(x, alpha)
    if INCL:  # does torch.clamp's gradient pass at the bounds? (torch version dependent)
        inside = (r >= LO) & (r <= 1.0)
    else:
        inside = (r > LO) & (r < 1.0)
    scale = tl.math.div_rn(alpha, n_f)
    if NEED_X:
        gx = tl.where(inside, tl.math.div_rn((grad * scale) * n_f, alpha), 0.0)
        tl.store(gx_ptr + offs, to_out(gx, gx_ptr.dtype.element_ty), mask=mask)
    if NEED_A:
        ratio = tl.minimum(tl.maximum(r, LO, propagate_nan=tl.PropagateNan.ALL), 1.0,
                           propagate_nan=tl.PropagateNan.ALL)
        rn = n_f * ratio
        term = tl.math.div_rn(rint(rn) - tl.where(inside, rn, 0.0), n_f)
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, grad * term, 0.0), axis=0))


# -- host side -------------------------------------------------------------------------------

def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous()


def noise_lut(x: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor, signed: bool,
              return_hist: bool = False):
    """The ``LUT_SIZE`` uint8 lookup table (bin per equal-probability cell) of this tensor's
    rounding-error histogram; with ``return_hist`` also the int32 histogram."""
    xd, n = channel_layout(x, 1)
    hist = torch.zeros(HIST_BINS, device=xd.device, dtype=torch.int32)
    if n > 0:
        _hist_kernel[(triton.cdiv(n, BLOCK),)](xd, _scalar(alpha), _scalar(delta), hist, n,
                                              SIGNED=bool(signed), BINS=HIST_BINS, BLOCK=BLOCK,
                                              num_warps=NUM_WARPS, enable_fp_fusion=False)
    lut = torch.empty(LUT_SIZE, device=xd.device, dtype=torch.uint8)
    lut_block = 4096 if interpreting() else 64  # the interpreter pays per program
    _lut_kernel[(LUT_SIZE // lut_block,)](hist, lut, L=LUT_SIZE, BINS=HIST_BINS, BLOCK=lut_block,
                                          num_warps=NUM_WARPS)
    return (lut, hist) if return_hist else lut


def noise_forward(x: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor, seed: torch.Tensor,
                  lut: torch.Tensor | None, signed: bool, return_z: bool = False):
    """Noise-phase output (``x``'s dtype); with ``return_z`` also the fp32 ``z`` drawn."""
    xd, n = channel_layout(x, 1)
    y = torch.empty_like(xd)
    z = torch.zeros_like(xd, dtype=torch.float32) if return_z else None
    hist = lut is not None
    if n > 0:
        _noise_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            xd, _scalar(alpha), _scalar(delta), seed, lut if hist else seed, y,
            z if return_z else y, n, SIGNED=bool(signed), HIST=hist, WRITE_Z=return_z,
            BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    if xd is not x:
        y = like(y, x)
    return (y, z) if return_z else y


def noise_backward(grad, x, alpha, seed, lut, signed, need_x=True, need_params=True):
    """``(grad_x, grad_params)``: ``grad_params`` fp32 ``[2]`` holds the direct ``alpha``
    gradient and the ``delta`` gradient."""
    xd, n = channel_layout(x, 1)
    gd = match(grad, xd)
    nblk = max(triton.cdiv(n, BLOCK), 1)
    gx = torch.empty_like(xd) if need_x else None
    part = (torch.empty if n > 0 else torch.zeros)((2, nblk), device=xd.device,
                                                  dtype=torch.float32) if need_params else None
    hist = lut is not None
    if n > 0 and (need_x or need_params):
        _noise_bwd_kernel[(nblk,)](
            gd, xd, _scalar(alpha), seed, lut if hist else seed, gx if need_x else xd,
            part if need_params else xd, n, nblk, SIGNED=bool(signed), HIST=hist, NEED_X=need_x,
            NEED_P=need_params, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    gp = None
    if need_params:
        gp = sum_rows(part, 1.0, torch.empty(2, device=xd.device, dtype=torch.float32))
    if gx is not None and xd is not x:
        gx = like(gx, x)
    return gx, gp


def hard_forward(x: torch.Tensor, alpha: torch.Tensor, n_levels: int, signed: bool):
    xd, n = channel_layout(x, 1)
    y = torch.empty_like(xd)
    if n > 0:
        _hard_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            xd, _scalar(alpha), y, n, float(n_levels), LO=-1.0 if signed else 0.0, BLOCK=BLOCK,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
    return like(y, x) if xd is not x else y


def hard_backward(grad, x, alpha, n_levels, signed, need_x=True, need_alpha=True,
                  inclusive=False):
    """``(grad_x, grad_alpha)``; ``grad_alpha`` fp32 shape ``[1]``. ``inclusive``: the
    clip passes the gradient at its bounds (as ``torch.clamp`` does in the running version)."""
    xd, n = channel_layout(x, 1)
    gd = match(grad, xd)
    nblk = max(triton.cdiv(n, BLOCK), 1)
    gx = torch.empty_like(xd) if need_x else None
    part = (torch.empty if n > 0 else torch.zeros)((1, nblk), device=xd.device,
                                                  dtype=torch.float32) if need_alpha else None
    if n > 0 and (need_x or need_alpha):
        _hard_bwd_kernel[(nblk,)](
            gd, xd, _scalar(alpha), gx if need_x else xd, part if need_alpha else xd, n,
            float(n_levels), LO=-1.0 if signed else 0.0, INCL=bool(inclusive), NEED_X=need_x,
            NEED_A=need_alpha,
            BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    ga = sum_rows(part, 1.0, torch.empty(1, device=xd.device, dtype=torch.float32)) \
        if need_alpha else None
    if gx is not None and xd is not x:
        gx = like(gx, x)
    return gx, ga
