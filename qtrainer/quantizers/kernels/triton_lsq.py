"""Triton kernels for LSQ fake quantization and noise tempering (forward and backward).

Forward (one launch): read ``x``, write ``y``; fp32 math in the same operation order as
:class:`qtrainer.quantizers.lsq.LSQFunction` (IEEE division, round half to even, no fused
multiply-add), so the output is bit-identical to the torch reference.

Backward (two launches): one kernel reads ``grad`` and ``x``, writes ``grad_x`` and one fp32
partial sum of ``grad * d y / d s`` per block; a second kernel adds the partials (fp32) and
multiplies by the gradient scale ``g``. Per-channel step sizes (channel = dim 0) use a 2-D grid
(blocks within a channel x channels), so each partial belongs to one channel.

Tempering noise ``xi`` is generated in the kernel from a seed (an int64 device tensor, so CUDA
graph replays draw new noise when the seed tensor is refreshed by ``torch.randint``) and the
element's storage offset; the backward regenerates the same values. Noise codes:
``0`` none, ``1`` error-aware ``U(-sqrt 3, sqrt 3)``, ``2`` error-aware ``N(0, 1)``,
``3`` ``uniform_step`` (``U(-1/2, 1/2)`` times ``s``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
SUM_BLOCK = 1024
NUM_WARPS = 4
SQRT3 = 1.7320508075688772


@triton.jit
def rint(v):
    """Round half to even, exact for ``|v| < 2**22`` (callers only use it there), keeping the
    sign of zero like ``torch.round``: adding and subtracting ``1.5 * 2**23`` leaves the
    integer part rounded by the fp32 adder."""
    r = (v + 12582912.0) - 12582912.0
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def to_out(v, dtype: tl.constexpr):
    """Cast fp32 ``v`` to the output dtype rounding to nearest even (bf16 rounded by hand first:
    Triton's interpreter truncates fp32 -> bf16; on a GPU the extra integer ops are free)."""
    if dtype == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & 0xFFFF0000
        v = tl.where(v == v, b.to(tl.float32, bitcast=True), v)
    return v.to(dtype)


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
def _lsq_fwd_kernel(x_ptr, s_ptr, seed_ptr, lam_ptr, y_ptr, noise_ptr, inner, q_n, q_p,
                    NOISE: tl.constexpr, WRITE_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    offs = c * inner + idx
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c).to(tl.float32)
    xs = tl.math.div_rn(x, s)
    clipped = tl.minimum(tl.maximum(xs, -q_n, propagate_nan=tl.PropagateNan.ALL), q_p,
                         propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN like torch.clamp
    q = rint(clipped) * s
    if NOISE == 0:
        y = q
    else:
        seed = tl.load(seed_ptr)
        lam = tl.load(lam_ptr).to(tl.float32)
        xi = tempering_noise(seed, offs, NOISE)
        if NOISE == 3:
            y = q + (lam * s) * xi
        else:
            y = q + (lam * xi) * (q - clipped * s)
        if WRITE_NOISE:
            tl.store(noise_ptr + offs, xi, mask=mask)
    tl.store(y_ptr + offs, to_out(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lsq_bwd_kernel(g_ptr, x_ptr, s_ptr, seed_ptr, lam_ptr, gx_ptr, part_ptr, inner, nblk,
                    q_n, q_p,
                    NOISE: tl.constexpr, NEED_X: tl.constexpr, NEED_S: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    offs = c * inner + idx
    grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + c).to(tl.float32)
    xs = tl.math.div_rn(x, s)
    inside = (xs > -q_n) & (xs < q_p)
    if NEED_X:
        gx = grad * inside.to(tl.float32)  # a product like the reference: -0.0 stays -0.0
        tl.store(gx_ptr + offs, to_out(gx, gx_ptr.dtype.element_ty), mask=mask)
    if NEED_S:
        frac = rint(xs) - xs
        term = tl.where(inside, frac, tl.where(xs <= -q_n, -q_n, q_p))
        if NOISE != 0:
            seed = tl.load(seed_ptr)
            lam = tl.load(lam_ptr).to(tl.float32)
            xi = tempering_noise(seed, offs, NOISE)
            if NOISE == 3:
                term = term + lam * xi
            else:
                term = term + tl.where(inside, (lam * xi) * frac, 0.0)
        part = tl.sum(tl.where(mask, grad * term, 0.0), axis=0)
        tl.store(part_ptr + c * nblk + pid, part)


@triton.jit
def sum_rows_kernel(part_ptr, out_ptr, ncol, scale, BLOCK: tl.constexpr):
    """``out[r] = scale * sum(part[r, :])`` in fp32, one program per row."""
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, ncol, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + row * ncol + idx, mask=idx < ncol, other=0.0)
    total = tl.sum(acc, axis=0) * scale
    tl.store(out_ptr + row, total.to(out_ptr.dtype.element_ty))


# -- host side -------------------------------------------------------------------------------

def is_dense(t: torch.Tensor) -> bool:
    """Storage holds exactly the tensor's elements (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its storage is dense, else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with the same strides as the dense tensor ``ref`` (copied only when they differ)."""
    if t.stride() == ref.stride() or t.numel() <= 1:
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def match(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as ``ref``) laid out with ``ref``'s strides, so both can be read
    through one flat storage index (copied only when the layouts differ)."""
    if t.stride() == ref.stride() and is_dense(t):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def channel_layout(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, int]:
    """``(dense x, elements per channel)``; per channel needs dim 0 outermost in storage."""
    x = dense(x)
    if channels > 1:
        if x.dim() == 0 or x.shape[0] != channels:
            raise ValueError(f"per-channel step size of {channels} values does not match "
                             f"dim 0 of a tensor shaped {tuple(x.shape)}")
        if x.stride(0) != x.numel() // channels:
            x = x.contiguous()
    if x.numel() >= 2**31:
        raise ValueError("fused fake quantization supports tensors below 2**31 elements")
    return x, x.numel() // max(channels, 1)


def sum_rows(part: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out[r] = scale * part[r].sum()`` (fp32, one launch)."""
    rows, ncol = part.shape
    sum_rows_kernel[(rows,)](part, out, ncol, float(scale), BLOCK=SUM_BLOCK, num_warps=NUM_WARPS)
    return out


def _lam(lam, like: torch.Tensor) -> torch.Tensor:
    """The noise weight as a device tensor (a float is accepted for convenience)."""
    if isinstance(lam, torch.Tensor):
        return lam.detach().reshape(-1).contiguous()
    return torch.full((1,), float(lam), device=like.device, dtype=torch.float32)


def lsq_forward(x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, lam=0.0,
                noise: int = 0, seed: torch.Tensor | None = None, return_noise: bool = False):
    """Fake-quantize ``x`` (any float dtype, output the same dtype). ``s``: 1-D step sizes, one
    or one per channel (dim 0); ``lam``: the noise weight (tensor ``[1]`` or float). With
    ``return_noise`` also return the fp32 noise the kernel drew (a debug path for tests; shaped
    and strided like the output)."""
    s = s.detach().reshape(-1).contiguous()
    xd, inner = channel_layout(x, s.numel())
    y = torch.empty_like(xd)
    if noise and seed is None:
        raise ValueError("tempering noise needs a seed tensor")
    out_noise = torch.zeros_like(xd, dtype=torch.float32) if return_noise and noise else None
    if inner > 0:
        grid = (triton.cdiv(inner, BLOCK), s.numel())
        _lsq_fwd_kernel[grid](
            xd, s, seed if noise else s, _lam(lam, s) if noise else s, y,
            out_noise if out_noise is not None else y, inner, float(q_n), float(q_p),
            NOISE=int(noise),
            WRITE_NOISE=out_noise is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
            enable_fp_fusion=False)
    y = like(y, x) if xd is not x else y
    return (y, out_noise) if return_noise else y


def lsq_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int,
                 g: float, lam=0.0, noise: int = 0, seed: torch.Tensor | None = None,
                 need_x: bool = True, need_s: bool = True):
    """``(grad_x, grad_s)``; ``grad_x`` in ``x``'s dtype, ``grad_s`` fp32 shaped like ``s``
    (``None`` where not needed)."""
    s_shape = s.shape
    s = s.detach().reshape(-1).contiguous()
    xd, inner = channel_layout(x, s.numel())
    gd = match(grad, xd)
    channels = s.numel()
    nblk = max(triton.cdiv(inner, BLOCK), 1)
    gx = torch.empty_like(xd) if need_x else None
    part = torch.empty((channels, nblk), device=xd.device, dtype=torch.float32) if need_s else None
    if inner > 0 and (need_x or need_s):
        _lsq_bwd_kernel[(nblk, channels)](
            gd, xd, s, seed if noise else s, _lam(lam, s) if noise else s, gx if need_x else xd,
            part if need_s else s, inner, nblk, float(q_n), float(q_p), NOISE=int(noise),
            NEED_X=need_x,
            NEED_S=need_s, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)
    gs = None
    if need_s:
        if inner == 0:
            part.zero_()
        gs = sum_rows(part, g, torch.empty(channels, device=xd.device, dtype=torch.float32))
        gs = gs.reshape(s_shape)
    if gx is not None and xd is not x:
        gx = like(gx, x)
    return gx, gs
