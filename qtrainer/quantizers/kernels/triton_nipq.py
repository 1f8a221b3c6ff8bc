"""Triton kernels of the ``nipq_noise`` contract (uniform or histogram noise drawn in the
kernel) and the ``nipq_hard`` contract, forward and backward, one launch each.

Noise phase, ``y = alpha`` where ``x >= alpha``, ``lo`` where ``x <= lo``, else
``x + z * delta``. ``z`` comes from a seed tensor and the element's storage offset:

- uniform: ``z = u - 1/2`` with ``u = rand(seed, offset)``;
- histogram: two words of one Philox draw give a lookup-table cell (``LUT_SIZE`` cells of equal
  probability, built from this tensor's rounding-error histogram) and ``u`` inside the bin:
  ``z = (bin + u) / 256 - 1/2``, the inverse-CDF sampling of the torch formula.

The histogram takes two small launches before the forward (per-block ``tl.histogram`` merged
with 256 atomic adds, then the lookup table from exact integer arithmetic), binned like
:func:`qtrainer.quantizers.formulas.nipq_error_bins`; the table is an input of the forward and
backward so the backward regenerates the same ``z``.

Backward: ``grad_x`` (``grad`` strictly inside, like ``aten.hardtanh_backward``), and the
direct ``alpha`` gradient (``+1`` at and above, ``-1`` at and below when signed) with the
``delta`` gradient ``grad * z`` inside, summed in the kernel (:func:`.common.finish_sums`; the
chain to ``alpha`` and the bit-width runs in torch).

Hard quantization: ``delta * round(n * clip(x / alpha, lo, 1))`` in the torch formula's
operation order, so the forward is bit-identical; ``grad_x = grad`` strictly inside ``(lo, 1)``
of ``x / alpha``, and ``d/d alpha = round(n c) / n - [inside] c`` per element, ``c`` the
clipped ratio (``+-1`` at the bounds whatever the torch version).

Several alphas (one per channel or per group, :func:`.common.channel_layout`): the programs are
numbered row by row (``nblk`` blocks per row), each reads its row's ``alpha`` and ``delta``
and sums its row's gradients; a row of one block stores its own sums. The histogram pools
every row's rounding errors (each in units of its own ``delta``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import (NUM_WARPS, SUM_BLOCK, block_for, channel_layout, clip, finish_sums, grads,
                     like, match, rint, scalar, ticket, to_out)

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
def _row_site(inner, nblk, BLOCK: tl.constexpr):
    """``(row, block in row, offs, mask)`` of this program (rows of ``inner`` elements)."""
    prog = tl.program_id(0)
    c = prog // nblk
    pid = prog % nblk
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return c, pid, c * inner + idx, idx < inner


@triton.jit
def _row_sum(part_ptr, out_ptr, value, slot, c, pid, nblk):
    """Store this program's sum of gradient ``slot`` for row ``c`` (``out[slot * rows + c]``):
    directly when a row is one block, else as a partial (the caller then calls
    ``finish_sums``)."""
    rows = tl.num_programs(0) // nblk
    if nblk == 1:
        tl.store(out_ptr + slot * rows + c, value)
    else:
        tl.store(part_ptr + (slot * rows + c) * nblk + pid, value)


@triton.jit
def _noise_site(x_ptr, alpha_ptr, inner, nblk, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One program's elements of the noise phase: ``(c, pid, offs, mask, x, alpha, above,
    below)``, ``above``: ``x >= alpha``, ``below``: ``x <= lo`` and not above."""
    c, pid, offs, mask = _row_site(inner, nblk, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + c).to(tl.float32)
    above = x >= alpha
    if SIGNED:
        below = (x <= -alpha) & (~above)
    else:
        below = (x <= 0.0) & (~above)
    return c, pid, offs, mask, x, alpha, above, below


@triton.jit
def _noise_fwd_kernel(x_ptr, alpha_ptr, delta_ptr, seed_ptr, lut_ptr, y_ptr, z_ptr, inner, nblk,
                      SIGNED: tl.constexpr, HIST: tl.constexpr, WRITE_Z: tl.constexpr,
                      BLOCK: tl.constexpr):
    c, pid, offs, mask, x, alpha, above, below = _noise_site(x_ptr, alpha_ptr, inner, nblk,
                                                             SIGNED, BLOCK)
    delta = tl.load(delta_ptr + c).to(tl.float32)
    z = nipq_z(tl.load(seed_ptr), offs, lut_ptr, HIST)
    if SIGNED:
        lo = -alpha
    else:
        lo = 0.0
    y = tl.where(above, alpha, tl.where(below, lo, x + z * delta))
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)
    if WRITE_Z:
        tl.store(z_ptr + offs, z, mask=mask)


@triton.jit
def _noise_bwd_kernel(g_ptr, x_ptr, alpha_ptr, seed_ptr, lut_ptr, gx_ptr, part_ptr, out_ptr,
                      ticket_ptr, inner, nblk, SIGNED: tl.constexpr, HIST: tl.constexpr,
                      NEED_X: tl.constexpr, NEED_P: tl.constexpr, BLOCK: tl.constexpr,
                      SUM_BLOCK: tl.constexpr):
    c, pid, offs, mask, x, alpha, above, below = _noise_site(x_ptr, alpha_ptr, inner, nblk,
                                                             SIGNED, BLOCK)
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    inside = ~(above | below)
    if NEED_X:
        tl.store(gx_ptr + offs, to_out(tl.where(inside, grad, 0.0), gx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_P:
        z = nipq_z(tl.load(seed_ptr), offs, lut_ptr, HIST)
        g_alpha = tl.where(above, grad, 0.0)
        if SIGNED:
            g_alpha = g_alpha - tl.where(below, grad, 0.0)
        g_delta = tl.where(inside, grad * z, 0.0)
        _row_sum(part_ptr, out_ptr, tl.sum(tl.where(mask, g_alpha, 0.0), axis=0), 0, c, pid,
                 nblk)
        _row_sum(part_ptr, out_ptr, tl.sum(tl.where(mask, g_delta, 0.0), axis=0), 1, c, pid,
                 nblk)
        if nblk > 1:
            finish_sums(part_ptr, out_ptr, ticket_ptr, 2 * (tl.num_programs(0) // nblk), nblk,
                        1.0, SUM_BLOCK=SUM_BLOCK)


@triton.jit
def _hist_kernel(x_ptr, alpha_ptr, delta_ptr, hist_ptr, inner, nblk, SIGNED: tl.constexpr,
                 BINS: tl.constexpr, BLOCK: tl.constexpr):
    c, pid, offs, mask = _row_site(inner, nblk, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + c).to(tl.float32)
    delta = tl.load(delta_ptr + c).to(tl.float32)
    if SIGNED:
        valid = mask & (x > -alpha) & (x < alpha)
    else:
        valid = mask & (x > 0.0) & (x < alpha)
    r = tl.math.div_rn(x, delta)
    v = (rint(r) - r) * BINS + (BINS // 2 + 1)  # 1 + bin, in [1, BINS + 1]
    b = tl.minimum(tl.where(valid, v, 1.0).to(tl.int32), BINS) - 1
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
def _hard_site(x_ptr, alpha_ptr, inner, nblk, LO: tl.constexpr, BLOCK: tl.constexpr):
    """``(c, pid, offs, mask, alpha, clipped)``: the clipped ratio ``clip(x / alpha, LO, 1)``."""
    c, pid, offs, mask = _row_site(inner, nblk, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + c).to(tl.float32)
    return c, pid, offs, mask, alpha, clip(tl.math.div_rn(x, alpha), LO, 1.0)


@triton.jit
def _hard_fwd_kernel(x_ptr, alpha_ptr, y_ptr, inner, nblk, n_f, LO: tl.constexpr,
                     BLOCK: tl.constexpr):
    c, pid, offs, mask, alpha, clipped = _hard_site(x_ptr, alpha_ptr, inner, nblk, LO, BLOCK)
    y = rint(clipped * n_f) * tl.math.div_rn(alpha, n_f)
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hard_bwd_kernel(g_ptr, x_ptr, alpha_ptr, gx_ptr, part_ptr, out_ptr, ticket_ptr, inner,
                     nblk, n_f, LO: tl.constexpr, NEED_X: tl.constexpr, NEED_A: tl.constexpr,
                     BLOCK: tl.constexpr, SUM_BLOCK: tl.constexpr):
    c, pid, offs, mask, alpha, clipped = _hard_site(x_ptr, alpha_ptr, inner, nblk, LO, BLOCK)
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    outside = (clipped <= LO) | (clipped >= 1.0)
    if NEED_X:
        tl.store(gx_ptr + offs, to_out(tl.where(outside, 0.0, grad), gx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_A:
        nc = clipped * n_f
        term = tl.math.div_rn(rint(nc) - nc, n_f) + tl.where(outside, clipped, 0.0)
        _row_sum(part_ptr, out_ptr, tl.sum(tl.where(mask, grad * term, 0.0), axis=0), 0, c,
                 pid, nblk)
        if nblk > 1:
            finish_sums(part_ptr, out_ptr, ticket_ptr, tl.num_programs(0) // nblk, nblk, 1.0,
                        SUM_BLOCK=SUM_BLOCK)


# -- host side -------------------------------------------------------------------------------

def _layout(x: torch.Tensor, alpha: torch.Tensor):
    """``(dense x, rows, elements per row, block, blocks per row, flat alpha)``."""
    a = scalar(alpha)
    xd, inner = channel_layout(x, a.numel())
    block = block_for(inner)
    return xd, a.numel(), inner, block, max(triton.cdiv(inner, block), 1), a


def noise_lut(x: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor, signed: bool,
              return_hist: bool = False):
    """The ``LUT_SIZE`` uint8 lookup table (bin per equal-probability cell) of this tensor's
    rounding-error histogram; with ``return_hist`` also the int32 histogram."""
    xd, rows, inner, block, nblk, a = _layout(x, alpha)
    hist = torch.zeros(HIST_BINS, device=xd.device, dtype=torch.int32)
    if inner > 0:
        _hist_kernel[(nblk * rows,)](xd, a, scalar(delta), hist, inner, nblk,
                                     SIGNED=bool(signed), BINS=HIST_BINS, BLOCK=block,
                                     num_warps=NUM_WARPS, enable_fp_fusion=False)
    lut = torch.empty(LUT_SIZE, device=xd.device, dtype=torch.uint8)
    lut_block = 4096 if interpreting() else 64  # the interpreter pays per program
    _lut_kernel[(LUT_SIZE // lut_block,)](hist, lut, L=LUT_SIZE, BINS=HIST_BINS, BLOCK=lut_block,
                                          num_warps=NUM_WARPS)
    return (lut, hist) if return_hist else lut


def noise_forward(x: torch.Tensor, alpha: torch.Tensor, delta: torch.Tensor, seed: torch.Tensor,
                  lut: torch.Tensor | None, signed: bool, return_z: bool = False):
    """Noise-phase output (``x``'s dtype); with ``return_z`` also the fp32 ``z`` drawn."""
    xd, rows, inner, block, nblk, a = _layout(x, alpha)
    y = torch.empty_like(xd)
    z = torch.zeros_like(xd, dtype=torch.float32) if return_z else None
    hist = lut is not None
    if inner > 0:
        _noise_fwd_kernel[(nblk * rows,)](
            xd, a, scalar(delta), seed, lut if hist else seed, y,
            z if return_z else y, inner, nblk, SIGNED=bool(signed), HIST=hist, WRITE_Z=return_z,
            BLOCK=block, num_warps=NUM_WARPS, enable_fp_fusion=False)
    if xd is not x:
        y = like(y, x)
    return (y, z) if return_z else y


def _backward(kernel, slots: int, grad, x, alpha, need_x: bool, need_params: bool,
              inputs: tuple, scalars: tuple, **consts):
    """Launch a one-pass backward kernel ``kernel(grad, x, alpha, *inputs, grad_x, partials,
    out, ticket, inner, nblk, *scalars)``: ``(grad_x or None, parameter gradients fp32
    [slots * rows] or None)``."""
    xd, rows, inner, block, nblk, a = _layout(x, alpha)
    gx = torch.empty_like(xd) if need_x else None
    part, out = grads(slots * rows, nblk, xd, need_params)
    if inner > 0 and (need_x or need_params):
        kernel[(nblk * rows,)](match(grad, xd), xd, a, *inputs, gx if need_x else xd, part, out,
                               ticket(xd.device), inner, nblk, *scalars, NEED_X=need_x,
                               BLOCK=block, SUM_BLOCK=SUM_BLOCK, num_warps=NUM_WARPS,
                               enable_fp_fusion=False, **consts)
    elif need_params:
        out = torch.zeros(slots * rows, device=xd.device, dtype=torch.float32)
    if gx is not None and xd is not x:
        gx = like(gx, x)
    return gx, (out if need_params else None)


def noise_backward(grad, x, alpha, seed, lut, signed, need_x=True, need_params=True):
    """``(grad_x, grad_params)``: ``grad_params`` fp32 ``[2R]`` holds the direct ``alpha``
    gradients, then the ``delta`` gradients (``R`` alphas)."""
    hist = lut is not None
    return _backward(_noise_bwd_kernel, 2, grad, x, alpha, need_x, need_params,
                     (seed, lut if hist else seed), (), SIGNED=bool(signed),
                     HIST=hist, NEED_P=need_params)


def hard_forward(x: torch.Tensor, alpha: torch.Tensor, n_levels: int, signed: bool):
    xd, rows, inner, block, nblk, a = _layout(x, alpha)
    y = torch.empty_like(xd)
    if inner > 0:
        _hard_fwd_kernel[(nblk * rows,)](
            xd, a, y, inner, nblk, float(n_levels), LO=-1.0 if signed else 0.0, BLOCK=block,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
    return like(y, x) if xd is not x else y


def hard_backward(grad, x, alpha, n_levels, signed, need_x=True, need_alpha=True):
    """``(grad_x, grad_alpha)``; ``grad_alpha`` fp32 shape ``[R]``."""
    return _backward(_hard_bwd_kernel, 1, grad, x, alpha, need_x, need_alpha, (),
                     (float(n_levels),), LO=-1.0 if signed else 0.0, NEED_A=need_alpha)
