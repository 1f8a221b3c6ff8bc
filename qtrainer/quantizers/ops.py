"""Fused fake quantization as ``torch.library`` custom ops (``qtrainer::*``).

Every op has a fake (meta) implementation and registered autograd, so ``torch.compile`` traces
models that use them without graph breaks, and dispatches at run time to the Triton kernels of
:mod:`qtrainer.quantizers.kernels` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or to a torch
implementation of the same closed forms (everywhere else). The torch implementations follow the
reference modules' operation order, so on CPU their forward is bit-identical to them.

Ops (``x`` any float dtype, output the same dtype, math in fp32; ``seed`` an int64 tensor ``[1]``):

- ``lsq_fake_quant(x, s, q_n, q_p, g, lam, noise, seed)``: LSQ, plus tempering noise of
  weight ``lam`` (fp32 tensor ``[1]``) when ``noise`` is 1 (error-aware uniform), 2 (error-aware
  gaussian) or 3 (``uniform_step``). ``s`` is 1-D: one step size, or one per channel (dim 0).
  The noise weight is a tensor so that a compiled graph (and a CUDA graph) does not bake in the
  value of a schedule that changes every step.
- ``nipq_noise_lut(x, alpha, delta, signed)``: NIPQ's histogram noise table (uint8, 65536 cells).
- ``nipq_noise_fake_quant(x, alpha, delta, seed, lut, signed)``: NIPQ noise phase; ``lut`` None
  for uniform noise. Gradients go to ``x``, ``alpha`` (boundary terms) and ``delta``.
- ``nipq_hard_fake_quant(x, alpha, n, signed)``: NIPQ hard quantization with STE.

Each has a ``*_backward`` op. Noise is a deterministic function of the seed, so a backward (or
a recomputed forward) regenerates it instead of storing it; the Triton kernels and the torch
implementation draw different (equally distributed) streams from the same seed.

Switches (module level, or environment variables read at import):

- ``QTRAINER_FUSED`` / :func:`set_fused`: ``auto`` (default: the quantizers use these ops for
  CUDA inputs when Triton is installed, and their reference torch code elsewhere), ``on`` (the
  ops everywhere) or ``off`` (reference code everywhere).
- ``QTRAINER_KERNELS`` / :func:`set_backend`: ``auto`` (Triton for CUDA tensors, torch
  otherwise), ``triton`` (Triton for every tensor: CPU needs ``TRITON_INTERPRET=1``) or
  ``torch``.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import kernels

FUSED_MODES = ("auto", "on", "off")
BACKENDS = ("auto", "triton", "torch")
NOISE_CODES = {"none": 0, "error_uniform": 1, "error_gaussian": 2, "uniform_step": 3}
HIST_BINS = 256
LUT_SIZE = 1 << 16
_SEED_HIGH = 2**31 - 1


def _env(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(value, value)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


_FUSED = _env("QTRAINER_FUSED", FUSED_MODES)
_BACKEND = _env("QTRAINER_KERNELS", BACKENDS)


def set_fused(mode) -> None:
    """Where the quantizers use the fused ops: ``auto`` (CUDA with Triton), ``on``, ``off``
    (also ``True``/``False``)."""
    global _FUSED
    mode = {True: "on", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
    if mode not in FUSED_MODES:
        raise ValueError(f"fused={mode!r} is not allowed; allowed: {', '.join(FUSED_MODES)}")
    _FUSED = mode


def set_backend(name: str) -> None:
    """Which implementation the ops run: ``auto``, ``triton`` or ``torch``."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if name == "triton" and not kernels.available():
        raise RuntimeError("backend='triton' needs the triton package")
    _BACKEND = name


def get_options() -> dict:
    return {"fused": _FUSED, "backend": _BACKEND}


@contextlib.contextmanager
def options(fused=None, backend: str | None = None):
    """Temporarily set :func:`set_fused` and/or :func:`set_backend`."""
    old = get_options()
    try:
        if fused is not None:
            set_fused(fused)
        if backend is not None:
            set_backend(backend)
        yield
    finally:
        set_fused(old["fused"])
        set_backend(old["backend"])


def fused_enabled(x: Tensor) -> bool:
    """True when a quantizer should route ``x`` through the fused ops."""
    if _FUSED == "auto":
        return x.is_cuda and kernels.available()
    return _FUSED == "on"


def _use_triton(x: Tensor) -> bool:
    if _BACKEND == "torch" or not kernels.available():
        return False
    return _BACKEND == "triton" or x.is_cuda


# -- torch implementations (the reference closed forms, op by op) ----------------------------

def _step_view(s: Tensor, x: Tensor) -> Tensor:
    s = s.float()
    return s.reshape(-1, *([1] * (x.dim() - 1))) if s.numel() > 1 else s.reshape(1)


def _generator(seed: Tensor, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.reshape(-1)[0]))
    return gen


def _tempering_noise_torch(noise: int, seed: Tensor, x: Tensor) -> Tensor:
    """The noise of :meth:`TemperingQuantizer.sample_noise`, drawn from ``seed``."""
    gen = _generator(seed, x.device)
    if noise == 2:
        return torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    return u - 0.5 if noise == 3 else (u * 2 - 1) * math.sqrt(3.0)


def _lsq_fwd_torch(x, s, q_n, q_p, lam, noise, seed):
    xf = x.float()
    sv = _step_view(s, xf)
    xs = xf / sv
    clipped = torch.clamp(xs, -q_n, q_p)
    q = torch.round(clipped) * sv
    if noise:
        nz = _tempering_noise_torch(noise, seed, xf)
        q = q + lam * sv * nz if noise == 3 else q + lam * nz * (q - clipped * sv)
    return q.to(x.dtype)


def _lsq_bwd_torch(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x, need_s):
    xf = x.float()
    sv = _step_view(s, xf)
    xs = xf / sv
    inside = (xs > -q_n) & (xs < q_p)
    gf = grad.float()
    gx = (gf * inside).to(x.dtype) if need_x else x.new_empty(0)
    gs = s.new_empty(0, dtype=torch.float32)
    if need_s:
        frac = torch.round(xs) - xs
        term = torch.where(inside, frac, torch.where(xs <= -q_n, -float(q_n), float(q_p)))
        if noise:
            nz = _tempering_noise_torch(noise, seed, xf)
            term = term + (lam * nz if noise == 3 else lam * nz * frac * inside)
        t = gf * term
        gs = (t.reshape(s.numel(), -1).sum(1) if s.numel() > 1 else t.sum().reshape(1)) * g
        gs = gs.reshape(s.shape)
    return gx, gs


def _nipq_lut_torch(x, alpha, delta, signed):
    xf = x.detach().float()
    a, d = alpha.detach().float().reshape(1), delta.detach().float().reshape(1)
    lo = -a if signed else torch.zeros_like(a)
    valid = (xf > lo) & (xf < a)
    r = xf / d
    err = torch.round(r) - r
    b = ((err[valid] + 0.5) * HIST_BINS).to(torch.int32).clamp(0, HIST_BINS - 1)
    hist = torch.bincount(b.reshape(-1).long(), minlength=HIST_BINS)
    cum = hist.cumsum(0)
    total = cum[-1]
    grid = torch.arange(LUT_SIZE, device=xf.device)
    cnt = torch.searchsorted(cum * (2 * LUT_SIZE), (2 * grid + 1) * total, right=True)
    cnt = torch.where(total > 0, cnt.clamp(max=HIST_BINS - 1), grid // (LUT_SIZE // HIST_BINS))
    return cnt.to(torch.uint8)


def _nipq_z_torch(seed, lut, x):
    gen = _generator(seed, x.device)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    if lut is None:
        return u - 0.5
    pick = torch.randint(LUT_SIZE, x.shape, generator=gen, device=x.device)
    return (lut.long()[pick] + u) / HIST_BINS - 0.5


def _nipq_noise_fwd_torch(x, alpha, delta, seed, lut, signed):
    xf = x.float()
    a, d = alpha.float().reshape(1), delta.float().reshape(1)
    inner = xf + _nipq_z_torch(seed, lut, xf) * d
    lo = -a if signed else torch.zeros_like(a)
    return torch.where(xf >= a, a, torch.where(xf <= lo, lo, inner)).to(x.dtype)


def _nipq_noise_bwd_torch(grad, x, alpha, seed, lut, signed, need_x, need_p):
    xf, gf = x.float(), grad.float()
    a = alpha.float().reshape(1)
    above = xf >= a
    below = (xf <= (-a if signed else torch.zeros_like(a))) & ~above
    inside = ~(above | below)
    gx = torch.where(inside, gf, 0.0).to(x.dtype) if need_x else x.new_empty(0)
    gp = a.new_empty(0)
    if need_p:
        g_alpha = torch.where(above, gf, 0.0)
        if signed:
            g_alpha = g_alpha - torch.where(below, gf, 0.0)
        gd = torch.where(inside, gf * _nipq_z_torch(seed, lut, xf), 0.0)
        gp = torch.stack([g_alpha.sum(), gd.sum()])
    return gx, gp


def _nipq_hard_fwd_torch(x, alpha, n, signed):
    xf = x.float()
    a = alpha.float().reshape(1)
    ratio = torch.clamp(xf / a, -1.0 if signed else 0.0, 1.0)
    return (torch.round(n * ratio) * (a / n)).to(x.dtype)


def _probe_clamp_grad() -> bool:
    t = torch.ones(1, requires_grad=True)
    with torch.enable_grad():
        torch.clamp(t, -1.0, 1.0).sum().backward()
    return bool(t.grad.item() == 1.0)


# Whether torch.clamp's gradient passes at the bounds in this torch version (the reference NIPQ
# hard quantizer inherits it). Probed at import: inside an op it could not run autograd.
_CLAMP_INCLUSIVE = _probe_clamp_grad()


def clamp_grad_inclusive() -> bool:
    return _CLAMP_INCLUSIVE


def _nipq_hard_bwd_torch(grad, x, alpha, n, signed, need_x, need_a):
    xf, gf = x.float(), grad.float()
    a = alpha.float().reshape(1)
    lo = -1.0 if signed else 0.0
    r = xf / a
    inside = (r >= lo) & (r <= 1.0) if clamp_grad_inclusive() else (r > lo) & (r < 1.0)
    gx = torch.where(inside, (gf * (a / n)) * n / a, 0.0).to(x.dtype) if need_x else x.new_empty(0)
    ga = a.new_empty(0)
    if need_a:
        rn = n * torch.clamp(r, lo, 1.0)
        ga = (gf * ((torch.round(rn) - torch.where(inside, rn, 0.0)) / n)).sum().reshape(1)
    return gx, ga


def _empty_or(t, like: Tensor, **kw) -> Tensor:
    return t if t is not None else like.new_empty(0, **kw)


# -- implementations: Triton or torch, chosen per call ----------------------------------------

def lsq_forward_impl(x, s, q_n, q_p, lam, noise, seed):
    if _use_triton(x):
        return kernels.lsq().lsq_forward(x, s, q_n, q_p, lam, noise, seed)
    return _lsq_fwd_torch(x, s, q_n, q_p, lam, noise, seed)


def lsq_backward_impl(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x, need_s):
    if _use_triton(x):
        gx, gs = kernels.lsq().lsq_backward(grad, x, s, q_n, q_p, g, lam, noise, seed,
                                            need_x, need_s)
        return _empty_or(gx, x), _empty_or(gs, s, dtype=torch.float32)
    return _lsq_bwd_torch(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x, need_s)


def nipq_lut_impl(x, alpha, delta, signed):
    if _use_triton(x):
        return kernels.nipq().noise_lut(x, alpha, delta, signed)
    return _nipq_lut_torch(x, alpha, delta, signed)


def nipq_noise_forward_impl(x, alpha, delta, seed, lut, signed):
    if _use_triton(x):
        return kernels.nipq().noise_forward(x, alpha, delta, seed, lut, signed)
    return _nipq_noise_fwd_torch(x, alpha, delta, seed, lut, signed)


def nipq_noise_backward_impl(grad, x, alpha, seed, lut, signed, need_x, need_params):
    if _use_triton(x):
        gx, gp = kernels.nipq().noise_backward(grad, x, alpha, seed, lut, signed, need_x,
                                               need_params)
        return _empty_or(gx, x), _empty_or(gp, alpha, dtype=torch.float32)
    return _nipq_noise_bwd_torch(grad, x, alpha, seed, lut, signed, need_x, need_params)


def nipq_hard_forward_impl(x, alpha, n, signed):
    if _use_triton(x):
        return kernels.nipq().hard_forward(x, alpha, n, signed)
    return _nipq_hard_fwd_torch(x, alpha, n, signed)


def nipq_hard_backward_impl(grad, x, alpha, n, signed, need_x, need_alpha):
    if _use_triton(x):
        gx, ga = kernels.nipq().hard_backward(grad, x, alpha, n, signed, need_x, need_alpha,
                                              clamp_grad_inclusive())
        return _empty_or(gx, x), _empty_or(ga, alpha, dtype=torch.float32)
    return _nipq_hard_bwd_torch(grad, x, alpha, n, signed, need_x, need_alpha)


# -- custom ops: LSQ / tempering -------------------------------------------------------------

@torch.library.custom_op("qtrainer::lsq_fake_quant", mutates_args=())
def lsq_fake_quant(x: Tensor, s: Tensor, q_n: int, q_p: int, g: float, lam: Optional[Tensor],
                   noise: int, seed: Optional[Tensor]) -> Tensor:
    """LSQ fake quantization (plus tempering noise); ``g`` only scales the gradient of ``s``."""
    return lsq_forward_impl(x, s, q_n, q_p, lam, noise, seed)


@lsq_fake_quant.register_fake
def _(x, s, q_n, q_p, g, lam, noise, seed):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::lsq_fake_quant_backward", mutates_args=())
def lsq_fake_quant_backward(grad: Tensor, x: Tensor, s: Tensor, q_n: int, q_p: int, g: float,
                            lam: Optional[Tensor], noise: int, seed: Optional[Tensor], need_x: bool,
                            need_s: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_s)``; an output not asked for is an empty tensor."""
    return lsq_backward_impl(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x, need_s)


@lsq_fake_quant_backward.register_fake
def _(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x, need_s):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            s.new_empty(s.shape if need_s else (0,), dtype=torch.float32))


def _lsq_setup(ctx, inputs, output):
    x, s, q_n, q_p, g, lam, noise, seed = inputs
    ctx.save_for_backward(x, s, lam, seed)
    ctx.args = (q_n, q_p, g)
    ctx.noise = noise


def _lsq_backward(ctx, grad):
    x, s, lam, seed = ctx.saved_tensors
    need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = gs = None
    if need_x or need_s:
        gx, gs = lsq_fake_quant_backward(grad, x, s, *ctx.args, lam, ctx.noise, seed, need_x,
                                         need_s)
    return (gx if need_x else None, gs.to(s.dtype) if need_s else None,
            None, None, None, None, None, None)


lsq_fake_quant.register_autograd(_lsq_backward, setup_context=_lsq_setup)


# -- custom ops: NIPQ --------------------------------------------------------------------------

@torch.library.custom_op("qtrainer::nipq_noise_lut", mutates_args=())
def nipq_noise_lut(x: Tensor, alpha: Tensor, delta: Tensor, signed: bool) -> Tensor:
    """Lookup table (uint8, ``LUT_SIZE``) sampling this tensor's rounding-error histogram."""
    return nipq_lut_impl(x, alpha, delta, signed)


@nipq_noise_lut.register_fake
def _(x, alpha, delta, signed):
    return x.new_empty(LUT_SIZE, dtype=torch.uint8)


@torch.library.custom_op("qtrainer::nipq_noise_fake_quant", mutates_args=())
def nipq_noise_fake_quant(x: Tensor, alpha: Tensor, delta: Tensor, seed: Tensor,
                          lut: Optional[Tensor], signed: bool) -> Tensor:
    """NIPQ noise phase: ``alpha`` above, ``lo`` below, ``x + z * delta`` inside."""
    return nipq_noise_forward_impl(x, alpha, delta, seed, lut, signed)


@nipq_noise_fake_quant.register_fake
def _(x, alpha, delta, seed, lut, signed):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::nipq_noise_fake_quant_backward", mutates_args=())
def nipq_noise_fake_quant_backward(grad: Tensor, x: Tensor, alpha: Tensor, seed: Tensor,
                                   lut: Optional[Tensor], signed: bool, need_x: bool,
                                   need_params: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_params)``: ``grad_params`` fp32 ``[2]`` = (the ``alpha`` gradient that
    does not run through ``delta``, the ``delta`` gradient); outputs not asked for are empty."""
    return nipq_noise_backward_impl(grad, x, alpha, seed, lut, signed, need_x, need_params)


@nipq_noise_fake_quant_backward.register_fake
def _(grad, x, alpha, seed, lut, signed, need_x, need_params):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            alpha.new_empty((2,) if need_params else (0,), dtype=torch.float32))


def _nipq_noise_setup(ctx, inputs, output):
    x, alpha, delta, seed, lut, signed = inputs
    ctx.save_for_backward(x, alpha, seed, lut)
    ctx.signed = signed
    ctx.dtypes = (alpha.dtype, delta.dtype)


def _nipq_noise_backward(ctx, grad):
    x, alpha, seed, lut = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_p = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    gx = gp = None
    if need_x or need_p:
        gx, gp = nipq_noise_fake_quant_backward(grad, x, alpha, seed, lut, ctx.signed, need_x,
                                                need_p)
    return (gx if need_x else None,
            gp[0:1].to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None,
            gp[1:2].to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None, None, None, None)


nipq_noise_fake_quant.register_autograd(_nipq_noise_backward, setup_context=_nipq_noise_setup)


@torch.library.custom_op("qtrainer::nipq_hard_fake_quant", mutates_args=())
def nipq_hard_fake_quant(x: Tensor, alpha: Tensor, n: int, signed: bool) -> Tensor:
    """NIPQ hard quantization ``(alpha / n) * round(n * clip(x / alpha, lo, 1))``."""
    return nipq_hard_forward_impl(x, alpha, n, signed)


@nipq_hard_fake_quant.register_fake
def _(x, alpha, n, signed):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::nipq_hard_fake_quant_backward", mutates_args=())
def nipq_hard_fake_quant_backward(grad: Tensor, x: Tensor, alpha: Tensor, n: int, signed: bool,
                                  need_x: bool, need_alpha: bool) -> tuple[Tensor, Tensor]:
    return nipq_hard_backward_impl(grad, x, alpha, n, signed, need_x, need_alpha)


@nipq_hard_fake_quant_backward.register_fake
def _(grad, x, alpha, n, signed, need_x, need_alpha):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            alpha.new_empty((1,) if need_alpha else (0,), dtype=torch.float32))


def _nipq_hard_setup(ctx, inputs, output):
    x, alpha, n, signed = inputs
    ctx.save_for_backward(x, alpha)
    ctx.args = (n, signed)


def _nipq_hard_backward(ctx, grad):
    x, alpha = ctx.saved_tensors
    need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx = ga = None
    if need_x or need_a:
        gx, ga = nipq_hard_fake_quant_backward(grad, x, alpha, *ctx.args, need_x, need_a)
    return gx if need_x else None, ga.to(alpha.dtype) if need_a else None, None, None


nipq_hard_fake_quant.register_autograd(_nipq_hard_backward, setup_context=_nipq_hard_setup)


# -- eager fast path ---------------------------------------------------------------------------
# torch.library's Python dispatch and autograd wrapping cost several times a small kernel launch
# per call; eager code calls the same implementations through plain autograd functions instead,
# and only code being traced by torch.compile goes through the custom ops.

class _LSQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, lam, seed, q_n, q_p, g, noise):
        ctx.save_for_backward(x, s, lam, seed)
        ctx.args = (q_n, q_p, g)
        ctx.noise = noise
        return lsq_forward_impl(x, s, q_n, q_p, lam, noise, seed)

    @staticmethod
    def backward(ctx, grad):
        x, s, lam, seed = ctx.saved_tensors
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gs = None
        if need_x or need_s:
            gx, gs = lsq_backward_impl(grad, x, s, *ctx.args, lam, ctx.noise, seed, need_x,
                                       need_s)
        return (gx if need_x else None, gs.to(s.dtype) if need_s else None,
                None, None, None, None, None, None)


class _NIPQNoiseFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, delta, seed, lut, signed):
        ctx.save_for_backward(x, alpha, seed, lut)
        ctx.signed = signed
        ctx.dtypes = (alpha.dtype, delta.dtype)
        return nipq_noise_forward_impl(x, alpha, delta, seed, lut, signed)

    @staticmethod
    def backward(ctx, grad):
        x, alpha, seed, lut = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_p = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        gx = gp = None
        if need_x or need_p:
            gx, gp = nipq_noise_backward_impl(grad, x, alpha, seed, lut, ctx.signed, need_x,
                                              need_p)
        return (gx if need_x else None,
                gp[0:1].to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None,
                gp[1:2].to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None,
                None, None, None)


class _NIPQHardFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, n, signed):
        ctx.save_for_backward(x, alpha)
        ctx.args = (n, signed)
        return nipq_hard_forward_impl(x, alpha, n, signed)

    @staticmethod
    def backward(ctx, grad):
        x, alpha = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = ga = None
        if need_x or need_a:
            gx, ga = nipq_hard_backward_impl(grad, x, alpha, *ctx.args, need_x, need_a)
        return gx if need_x else None, ga.to(alpha.dtype) if need_a else None, None, None


def _tracing() -> bool:
    return torch.compiler.is_compiling()


# -- plans: one quantizer's training forward as op calls -------------------------------------

class Plan(NamedTuple):
    """What one quantizer does to one tensor, as op calls.

    ``kind``: ``identity``, ``lsq``, ``nipq_noise`` or ``nipq_hard``; ``params``: tensors that
    receive gradients (``(s,)``, ``(alpha, delta)``, ``(alpha,)``); ``aux``: other tensors
    (seed, lookup table; may hold None); ``consts``: Python scalars of the op call.
    """

    kind: str
    params: tuple
    aux: tuple
    consts: tuple


IDENTITY = Plan("identity", (), (), ())


def draw_seed(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A fresh int64 seed tensor ``[1]`` on ``x``'s device (from ``generator`` when given;
    from the device's default generator otherwise, which CUDA graphs replay correctly)."""
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), device=x.device)
    seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device)
    return seed.to(x.device)


_KNOWN: list = []


def _known_quantize():
    """``(LSQQuantizer, TemperingQuantizer, NIPQQuantizer)`` (imported on first use: the
    quantizer modules import this one)."""
    if not _KNOWN:
        from .lsq import LSQQuantizer
        from .nipq import NIPQQuantizer
        from .tempering import TemperingQuantizer

        _KNOWN.extend((LSQQuantizer, TemperingQuantizer, NIPQQuantizer))
    return _KNOWN


def _lambda_tensor(q, x: Tensor) -> Tensor | None:
    """Tempering's noise weight as a device tensor, or None for no noise (``lambda = 0``).

    A quantizer may carry ``lambda_tensor`` (a buffer that ``set_lambda`` keeps equal to
    ``lambda_``): then the value is never read on the host, so torch.compile neither
    specializes on it nor recompiles when the schedule moves it. Otherwise the float
    ``lambda_`` is read (compiled code then guards on its value)."""
    t = getattr(q, "lambda_tensor", None)
    if isinstance(t, Tensor):
        if not torch.compiler.is_compiling() and q.lambda_ == 0.0:
            return None
        return t.detach().to(device=x.device, dtype=torch.float32).reshape(1)
    value = float(q.lambda_)
    return None if value == 0.0 else torch.full((1,), value, device=x.device,
                                                 dtype=torch.float32)


def plan_supported(q) -> bool:
    """True when :func:`plan` can express quantizer ``q`` (its class keeps the built-in
    ``quantize`` of LSQ, tempering or NIPQ)."""
    return getattr(type(q), "quantize", None) in _known_quantize_methods()


def _known_quantize_methods():
    LSQ, Tempering, NIPQ = _known_quantize()
    return LSQ.quantize, Tempering.quantize, NIPQ.quantize


def plan(q, x: Tensor) -> Plan | None:
    """The op calls of quantizer ``q``'s current forward on ``x`` (fp32 or the layer's dtype),
    drawing any noise seed now. ``IDENTITY`` for a missing or disabled quantizer; None when the
    quantizer's class overrides ``quantize`` (its own code must run)."""
    if q is None or not getattr(q, "enabled", True):
        return IDENTITY
    LSQ, Tempering, NIPQ = _known_quantize()
    kind = getattr(type(q), "quantize", None)
    if kind is LSQ.quantize or kind is Tempering.quantize:
        q_n, q_p = q.levels
        noise, lam, seed = 0, None, None
        if kind is Tempering.quantize and q.noisy:
            lam = _lambda_tensor(q, x)
            if lam is not None:
                noise = NOISE_CODES["uniform_step" if q.noise == "uniform_step"
                                    else "error_" + q.noise_dist]
                seed = draw_seed(x, q.generator)
        return Plan("lsq", (q.step.float(),), (seed, lam),
                    (q_n, q_p, float(q.grad_scale_value(x)), noise))
    if kind is NIPQ.quantize:
        from .nipq import nipq_levels

        if q.noisy:
            alpha = q.alpha
            # fixed bits: a Python level count (the same fp32 division, fewer tiny launches)
            bits = q._noise_bits() if q.learn_bits else q._fixed
            delta = alpha / nipq_levels(bits, q.signed)
            seed = draw_seed(x, q.generator)
            lut = None
            if q.noise == "histogram":
                lut = (nipq_noise_lut if _tracing() else nipq_lut_impl)(
                    x.detach(), alpha.detach(), delta.detach(), q.signed)
            return Plan("nipq_noise", (alpha, delta), (seed, lut), (bool(q.signed),))
        return Plan("nipq_hard", (q.alpha,), (), (int(nipq_levels(q.bits, q.signed)),
                                                  bool(q.signed)))
    return None


def apply(x: Tensor, p: Plan) -> Tensor:
    """Run plan ``p`` on ``x`` with autograd (custom ops while torch.compile traces, plain
    autograd functions over the same implementations in eager code)."""
    if p.kind == "lsq":
        q_n, q_p, g, noise = p.consts
        seed, lam = p.aux
        if _tracing():
            return lsq_fake_quant(x, p.params[0], q_n, q_p, g, lam, noise, seed)
        return _LSQFn.apply(x, p.params[0], lam, seed, q_n, q_p, g, noise)
    if p.kind == "nipq_noise":
        fn = nipq_noise_fake_quant if _tracing() else _NIPQNoiseFn.apply
        return fn(x, p.params[0], p.params[1], p.aux[0], p.aux[1], *p.consts)
    if p.kind == "nipq_hard":
        fn = nipq_hard_fake_quant if _tracing() else _NIPQHardFn.apply
        return fn(x, p.params[0], *p.consts)
    return x


def backward(grad: Tensor, x: Tensor, p: Plan, need_x: bool, need_params: bool):
    """``(grad_x, grads of p.params)`` of plan ``p`` at input ``x`` (None where not needed)."""
    if p.kind == "identity":
        return (grad if need_x else None), ()
    if not (need_x or need_params):
        return None, (None,) * len(p.params)
    tracing = _tracing()
    if p.kind == "lsq":
        q_n, q_p, g, noise = p.consts
        fn = lsq_fake_quant_backward if tracing else lsq_backward_impl
        gx, gs = fn(grad, x, p.params[0], q_n, q_p, g, p.aux[1], noise, p.aux[0], need_x,
                    need_params)
        pg = (gs.to(p.params[0].dtype),) if need_params else (None,)
    elif p.kind == "nipq_noise":
        fn = nipq_noise_fake_quant_backward if tracing else nipq_noise_backward_impl
        gx, gp = fn(grad, x, p.params[0], p.aux[0], p.aux[1], *p.consts, need_x, need_params)
        pg = (gp[0:1], gp[1:2]) if need_params else (None, None)
    else:
        fn = nipq_hard_fake_quant_backward if tracing else nipq_hard_backward_impl
        gx, ga = fn(grad, x, p.params[0], *p.consts, need_x, need_params)
        pg = (ga,) if need_params else (None,)
    return (gx if need_x else None), pg


def fake_quant(q, x: Tensor) -> Tensor | None:
    """Quantizer ``q``'s forward on ``x`` through the fused ops (None: not supported, run the
    quantizer's own code)."""
    p = plan(q, x)
    return None if p is None else apply(x, p)


__all__ = [
    "BACKENDS", "FUSED_MODES", "IDENTITY", "NOISE_CODES", "Plan", "apply", "backward",
    "clamp_grad_inclusive", "draw_seed", "fake_quant", "fused_enabled", "get_options",
    "lsq_fake_quant", "lsq_fake_quant_backward", "nipq_hard_fake_quant",
    "nipq_hard_fake_quant_backward", "nipq_noise_fake_quant", "nipq_noise_fake_quant_backward",
    "nipq_noise_lut", "options", "plan", "plan_supported", "set_backend", "set_fused",
]
