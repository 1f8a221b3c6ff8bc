"""Pieces shared by the Triton kernels: exact rounding and output casts, the in-kernel final
reduction of parameter gradients, and host-side layout helpers.

Final reduction: every program of a backward kernel stores its fp32 partial sums (one per
row: a channel, or one of a contract's parameters), then takes a ticket (an atomic counter);
the program holding the last ticket adds all partials of each row in a fixed order (fp32),
scales them and stores the result, and resets the counter. A backward is therefore one launch,
and its result does not depend on the order in which programs ran. The counter is one int32
per device, allocated zeroed once and left at zero by every kernel, so kernels that use it
must not run concurrently on two streams of one device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
SUM_BLOCK = 1024
NUM_WARPS = 4

_TICKETS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def rint(v):
    """Round half to even, exact for ``|v| < 2**22`` (callers only use it there), keeping the
    sign of zero like ``torch.round``: adding and subtracting ``1.5 * 2**23`` leaves the
    integer part rounded by the fp32 adder."""
    r = (v + 12582912.0) - 12582912.0
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def clip(v, lo, hi):
    """``torch.clamp(v, lo, hi)``: NaN stays NaN and ``-0.0`` stays ``-0.0`` (``lo`` and ``hi``
    come from the host, so a bound of 0 is ``+0.0``)."""
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


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
def finish_sums(part_ptr, out_ptr, ticket_ptr, rows, ncol, scale, SUM_BLOCK: tl.constexpr):
    """After this program stored its partials: if it is the last of the launch to arrive,
    ``out[r] = scale * sum(part[r, :ncol])`` for every row (fp32, fixed order) and reset the
    ticket. ``part`` is ``[rows, ncol]`` with one column per program along grid axis 0."""
    nprog = tl.num_programs(0) * tl.num_programs(1)
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == nprog - 1:
        for r in range(rows):
            acc = tl.zeros([SUM_BLOCK], tl.float32)
            for start in range(0, ncol, SUM_BLOCK):
                idx = start + tl.arange(0, SUM_BLOCK)
                acc += tl.load(part_ptr + r * ncol + idx, mask=idx < ncol, other=0.0,
                               volatile=True)
            tl.store(out_ptr + r, tl.sum(acc, axis=0) * scale)
        tl.atomic_xchg(ticket_ptr, 0, sem="release")


def ticket(device: torch.device) -> torch.Tensor:
    """The zeroed int32 counter of :func:`finish_sums` on ``device``."""
    t = _TICKETS.get(device)
    if t is None:
        t = _TICKETS[device] = torch.zeros(1, device=device, dtype=torch.int32)
    return t


def is_dense(t: torch.Tensor) -> bool:
    """Storage holds exactly the tensor's elements (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


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


def block_for(inner: int) -> int:
    """The block width for rows of ``inner`` elements: ``BLOCK``, or the power of two that
    holds a shorter row (at least 16), so small groups do not leave most lanes masked."""
    return min(BLOCK, max(16, triton.next_power_of_2(max(inner, 1))))


def channel_layout(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, int]:
    """``(dense x, elements per row)`` for ``channels`` parameters: one (per tensor), one per
    channel (dim 0 outermost in storage) or, when ``channels`` is not ``x.shape[0]``, one per
    group of consecutive elements in row-major order (``x`` made contiguous), as
    :func:`qtrainer.quantizers.formulas.step_rows`."""
    x = x if is_dense(x) else x.contiguous()
    if channels > 1:
        if x.dim() > 0 and x.shape[0] == channels:
            if x.stride(0) != x.numel() // channels:
                x = x.contiguous()
        elif x.numel() % channels == 0:
            x = x.contiguous()
        else:
            raise ValueError(f"{channels} step sizes do not divide a tensor shaped "
                             f"{tuple(x.shape)} ({x.numel()} elements) into equal groups")
    if x.numel() >= 2**31:
        raise ValueError("fused fake quantization supports tensors below 2**31 elements")
    return x, x.numel() // max(channels, 1)


def scalar(t: torch.Tensor) -> torch.Tensor:
    """A one-element parameter as a flat contiguous tensor (a kernel reads element 0)."""
    return t.detach().reshape(-1).contiguous()


def grads(rows: int, nblk: int, x: torch.Tensor, need: bool):
    """``(partials [rows, nblk], result [rows])`` fp32 buffers of a backward's parameter
    gradients, or ``(x, x)`` placeholders when they are not needed."""
    if not need:
        return x, x
    return (torch.empty((rows, nblk), device=x.device, dtype=torch.float32),
            torch.empty(rows, device=x.device, dtype=torch.float32))
