"""The contracts as ``torch.library`` custom ops (``qtrainer::*``), for code that
``torch.compile`` traces: each op has a fake (meta) implementation, so Dynamo captures models
that use them without graph breaks, and runs :mod:`.backends` at run time. Autograd is
registered by :mod:`.contracts` (one generic rule for every contract).

Backward ops return ``(grad_x, packed parameter gradients)``; an output not asked for is an
empty tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import formulas
from . import backends


def _empty_or(t: Tensor | None, like: Tensor, **kw) -> Tensor:
    return t if t is not None else like.new_empty(0, **kw)


def _grads(gx, gp, x: Tensor, like: Tensor):
    return _empty_or(gx, x), _empty_or(gp, like, dtype=torch.float32)


def _fake_grads(x: Tensor, like: Tensor, n: int, need_x: bool, need_params: bool):
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            like.new_empty((n if need_params else 0,), dtype=torch.float32))


# -- step-size fake quantization ------------------------------------------------------------

@torch.library.custom_op("qtrainer::step_fake_quant", mutates_args=())
def step_fake_quant(x: Tensor, s: Tensor, seed: Optional[Tensor], lam: Optional[Tensor],
                    q_n: int, q_p: int, g: float, noise: int) -> Tensor:
    """``round(clip(x / s, -Q_N, Q_P)) * s`` plus tempering noise (code ``noise``)."""
    return backends.step_forward(x, s, seed, lam, q_n, q_p, g, noise)


@step_fake_quant.register_fake
def _(x, s, seed, lam, q_n, q_p, g, noise):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::step_fake_quant_backward", mutates_args=())
def step_fake_quant_backward(grad: Tensor, x: Tensor, s: Tensor, seed: Optional[Tensor],
                             lam: Optional[Tensor], q_n: int, q_p: int, g: float, noise: int,
                             need_x: bool, need_params: bool) -> tuple[Tensor, Tensor]:
    gx, gs = backends.step_backward(grad, x, s, seed, lam, q_n, q_p, g, noise, need_x,
                                    need_params)
    return _grads(gx, None if gs is None else gs.reshape(-1), x, s)


@step_fake_quant_backward.register_fake
def _(grad, x, s, seed, lam, q_n, q_p, g, noise, need_x, need_params):
    return _fake_grads(x, s, s.numel(), need_x, need_params)


# -- NIPQ noise phase --------------------------------------------------------------------------

@torch.library.custom_op("qtrainer::nipq_noise_lut", mutates_args=())
def nipq_noise_lut(x: Tensor, alpha: Tensor, delta: Tensor, signed: bool) -> Tensor:
    """Lookup table (uint8, ``LUT_SIZE``) sampling this tensor's rounding-error histogram."""
    return backends.nipq_lut(x, alpha, delta, signed)


@nipq_noise_lut.register_fake
def _(x, alpha, delta, signed):
    return x.new_empty(formulas.LUT_SIZE, dtype=torch.uint8)


@torch.library.custom_op("qtrainer::nipq_noise_fake_quant", mutates_args=())
def nipq_noise_fake_quant(x: Tensor, alpha: Tensor, delta: Tensor, seed: Tensor,
                          lut: Optional[Tensor], signed: bool) -> Tensor:
    """``alpha`` above, ``lo`` below, ``x + z * delta`` inside."""
    return backends.nipq_noise_forward(x, alpha, delta, seed, lut, signed)


@nipq_noise_fake_quant.register_fake
def _(x, alpha, delta, seed, lut, signed):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::nipq_noise_fake_quant_backward", mutates_args=())
def nipq_noise_fake_quant_backward(grad: Tensor, x: Tensor, alpha: Tensor, delta: Tensor,
                                   seed: Tensor, lut: Optional[Tensor], signed: bool,
                                   need_x: bool, need_params: bool) -> tuple[Tensor, Tensor]:
    gx, gp = backends.nipq_noise_backward(grad, x, alpha, delta, seed, lut, signed, need_x,
                                          need_params)
    return _grads(gx, gp, x, alpha)


@nipq_noise_fake_quant_backward.register_fake
def _(grad, x, alpha, delta, seed, lut, signed, need_x, need_params):
    return _fake_grads(x, alpha, 2 * alpha.numel(), need_x, need_params)


# -- NIPQ hard quantization -----------------------------------------------------------------

@torch.library.custom_op("qtrainer::nipq_hard_fake_quant", mutates_args=())
def nipq_hard_fake_quant(x: Tensor, alpha: Tensor, n: int, signed: bool) -> Tensor:
    """``(alpha / n) * round(n * clip(x / alpha, lo, 1))``."""
    return backends.nipq_hard_forward(x, alpha, n, signed)


@nipq_hard_fake_quant.register_fake
def _(x, alpha, n, signed):
    return torch.empty_like(x)


@torch.library.custom_op("qtrainer::nipq_hard_fake_quant_backward", mutates_args=())
def nipq_hard_fake_quant_backward(grad: Tensor, x: Tensor, alpha: Tensor, n: int, signed: bool,
                                  need_x: bool, need_params: bool) -> tuple[Tensor, Tensor]:
    gx, ga = backends.nipq_hard_backward(grad, x, alpha, n, signed, need_x, need_params)
    return _grads(gx, ga, x, alpha)


@nipq_hard_fake_quant_backward.register_fake
def _(grad, x, alpha, n, signed, need_x, need_params):
    return _fake_grads(x, alpha, alpha.numel(), need_x, need_params)
