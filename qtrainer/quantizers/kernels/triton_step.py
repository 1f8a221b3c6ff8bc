"""Triton kernels of the ``step`` contract: step-size fake quantization (LSQ) with optional
noise tempering, forward and backward, one launch each.

Forward: read ``x``, write ``y``; fp32 math in the operation order of
:func:`qtrainer.quantizers.formulas.step_forward` (IEEE division, round half to even, no fused
multiply-add), so the output is bit-identical to the torch formula given the same scaled noise
``lam * xi``.

Backward: read ``grad`` and ``x``, write ``grad_x`` (``grad`` where ``-Q_N < x/s < Q_P``, else
0) and per-block fp32 partial sums of ``grad * d y / d s``, which the last block adds up and
multiplies by the gradient scale ``g`` (:func:`.common.finish_sums`). Per-channel and
per-group step sizes (a row: a channel along dim 0, or a group of consecutive elements, see
:func:`.common.channel_layout`) number the programs row by row (``nblk`` blocks per row, the
block no wider than the row needs), so each partial belongs to one row; a row of one block
stores its own sum (no final reduction: groups of up to ``BLOCK`` elements).

Tempering noise ``xi`` is generated in the kernel from a seed (an int64 device tensor, so CUDA
graph replays draw new noise when the seed tensor is refreshed by ``torch.randint``) and the
element's storage offset; the backward regenerates the same values. Noise codes:
``0`` none, ``1`` error-aware ``U(-sqrt 3, sqrt 3)``, ``2`` error-aware ``N(0, 1)``,
``3`` ``uniform_step`` (``U(-1/2, 1/2)``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (NUM_WARPS, SUM_BLOCK, block_for, channel_layout, clip, finish_sums, grads,
                     like, match, rint, ticket, to_out)


@triton.jit
def tempering_noise(seed, offs, NOISE: tl.constexpr):
    """The noise of element ``offs``: ``xi`` (codes 1, 2) or ``u ~ U(-1/2, 1/2)`` (code 3)."""
    if NOISE == 2:
        xi = tl.randn(seed, offs)
    else:
        u = tl.rand(seed, offs)
        if NOISE == 1:
            xi = (u * 2.0 - 1.0) * 1.7320508075688772
        else:
            xi = u - 0.5
    return xi


@triton.jit
def _step_fwd_kernel(x_ptr, s_ptr, seed_ptr, lam_ptr, y_ptr, noise_ptr, inner, nblk, lo, hi,
                     NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    prog = tl.program_id(0)
    c = prog // nblk
    idx = (prog % nblk) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    offs = c * inner + idx
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c).to(tl.float32)
    clipped = clip(tl.math.div_rn(x, s), lo, hi)
    code = rint(clipped)
    if NOISE == 0:
        y = code * s
    else:
        seed = tl.load(seed_ptr)
        lam = tl.load(lam_ptr).to(tl.float32)
        xi = tempering_noise(seed, offs, NOISE)
        xil = lam * xi
        if NOISE == 3:
            y = (code + xil) * s
        else:
            y = (code + (code - clipped) * xil) * s
        if WRITE_NOISE:
            tl.store(noise_ptr + offs, xi, mask=mask)
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_bwd_kernel(g_ptr, x_ptr, s_ptr, seed_ptr, lam_ptr, gx_ptr, part_ptr, out_ptr,
                     ticket_ptr, inner, nblk, lo, hi, scale,
                     NOISE: tl.constexpr, NEED_X: tl.constexpr, NEED_S: tl.constexpr,
                     BLOCK: tl.constexpr, SUM_BLOCK: tl.constexpr):
    prog = tl.program_id(0)
    pid = prog % nblk
    c = prog // nblk
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    offs = c * inner + idx
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c).to(tl.float32)
    xs = tl.math.div_rn(x, s)
    outside = (xs <= lo) | (xs >= hi)  # NaN: neither, like aten.hardtanh_backward
    if NEED_X:
        tl.store(gx_ptr + offs, to_out(tl.where(outside, 0.0, grad), gx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_S:
        clipped = clip(xs, lo, hi)
        code = rint(clipped)
        term = code - tl.where(outside, 0.0, clipped)
        if NOISE != 0:
            seed = tl.load(seed_ptr)
            lam = tl.load(lam_ptr).to(tl.float32)
            xi = tempering_noise(seed, offs, NOISE)
            if NOISE == 3:
                term = term + lam * xi
            else:
                term = term + (lam * xi) * (code - clipped)  # 0 at and beyond the bounds
        part = tl.sum(tl.where(mask, grad * term, 0.0), axis=0)
        if nblk == 1:
            tl.store(out_ptr + c, part * scale)
        else:
            tl.store(part_ptr + c * nblk + pid, part)
            finish_sums(part_ptr, out_ptr, ticket_ptr, tl.num_programs(0) // nblk, nblk,
                        scale, SUM_BLOCK=SUM_BLOCK)


# -- host side -------------------------------------------------------------------------------

def _lam(lam, like_t: torch.Tensor) -> torch.Tensor:
    """The noise weight as a device tensor (a float is accepted for convenience)."""
    if isinstance(lam, torch.Tensor):
        return lam.detach().reshape(-1).contiguous()
    return torch.full((1,), float(lam), device=like_t.device, dtype=torch.float32)


def forward(x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, lam=0.0, noise: int = 0,
            seed: torch.Tensor | None = None, return_noise: bool = False):
    """Fake-quantize ``x`` (any float dtype, output the same dtype). ``s``: 1-D step sizes, one,
    one per channel (dim 0) or one per group (:func:`.common.channel_layout`); ``lam``: the noise weight (tensor ``[1]`` or float). With
    ``return_noise`` also return the fp32 noise the kernel drew (a debug path for tests; shaped
    and strided like the output)."""
    s = s.detach().reshape(-1).contiguous()
    xd, inner = channel_layout(x, s.numel())
    y = torch.empty_like(xd)
    if noise and seed is None:
        raise ValueError("tempering noise needs a seed tensor")
    out_noise = torch.zeros_like(xd, dtype=torch.float32) if return_noise and noise else None
    if inner > 0:
        block = block_for(inner)
        nblk = triton.cdiv(inner, block)
        _step_fwd_kernel[(nblk * s.numel(),)](
            xd, s, seed if noise else s, _lam(lam, s) if noise else s, y,
            out_noise if out_noise is not None else y, inner, nblk, float(-q_n), float(q_p),
            NOISE=int(noise), WRITE_NOISE=out_noise is not None, BLOCK=block,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
    y = like(y, x) if xd is not x else y
    return (y, out_noise) if return_noise else y


def backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int,
             g: float, lam=0.0, noise: int = 0, seed: torch.Tensor | None = None,
             need_x: bool = True, need_s: bool = True):
    """``(grad_x, grad_s)`` in one launch; ``grad_x`` in ``x``'s dtype, ``grad_s`` fp32
    shaped like ``s`` (``None`` where not needed)."""
    s_shape = s.shape
    s = s.detach().reshape(-1).contiguous()
    xd, inner = channel_layout(x, s.numel())
    gd = match(grad, xd)
    channels = s.numel()
    block = block_for(inner)
    nblk = max(triton.cdiv(inner, block), 1)
    gx = torch.empty_like(xd) if need_x else None
    part, gs = grads(channels, nblk, xd, need_s)
    if inner > 0 and (need_x or need_s):
        _step_bwd_kernel[(nblk * channels,)](
            gd, xd, s, seed if noise else s, _lam(lam, s) if noise else s,
            gx if need_x else xd, part, gs, ticket(xd.device), inner, nblk, float(-q_n),
            float(q_p), float(g), NOISE=int(noise), NEED_X=need_x, NEED_S=need_s,
            BLOCK=block, SUM_BLOCK=SUM_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    elif need_s:
        gs = torch.zeros(channels, device=xd.device, dtype=torch.float32)
    if gx is not None and xd is not x:
        gx = like(gx, x)
    return gx, (gs.reshape(s_shape) if need_s else None)
