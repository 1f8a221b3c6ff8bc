"""Each contract's implementation chosen per call: the Triton kernels
(:mod:`qtrainer.quantizers.kernels`, which draw their noise in the kernel from the seed) or the
torch formulas (:mod:`qtrainer.quantizers.formulas`, noise drawn here from the seed).

Arguments follow the contracts' order (``x``, parameters, auxiliary tensors, constants; see
:mod:`.contracts`). Backward functions return ``(grad_x or None, packed parameter gradients
fp32 or None)``; the packed tensor holds the parameters' gradients one after the other.

``cache``: a dict that a forward fills with what its backward can reuse (the torch path's noise
tensor and clipped input) when the forward is a recomputation just before the backward; None
otherwise. The Triton path leaves it empty (its kernels recompute both in registers).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import formulas, kernels
from .switches import use_triton


def _noise(cache: dict | None, draw):
    """The cached noise, else a fresh draw (cached when a cache is given)."""
    if cache is not None and "noise" in cache:
        return cache.pop("noise")
    noise = draw()
    if cache is not None:
        cache["noise"] = noise
    return noise


def _clip(cache: dict | None):
    """The clipped input a recomputed forward left in the cache, or None."""
    return cache.pop("clip", None) if cache else None


def _keep(cache: dict | None, result):
    """The forward's output; its clipped input goes to the cache (when there is one)."""
    if cache is None:
        return result
    y, cache["clip"] = result
    return y


@torch.library.custom_op("qtrainer::tempering_noise", mutates_args=())
def tempering_noise_op(seed: Tensor, like: Tensor, lam: Tensor, noise: int) -> Tensor:
    """``formulas.tempering_noise``: ``lam * xi`` for noise code ``noise``, fp32 shaped like
    ``like``, as an op that ``torch.compile`` calls rather than traces (numpy draws from the
    int64 seed ``[1]``)."""
    return formulas.tempering_noise(noise, seed, like, lam)


@tempering_noise_op.register_fake
def _(seed, like, lam, noise):
    return torch.empty_like(like, dtype=torch.float32)


def _tempering_noise(noise: int, seed: Tensor, x: Tensor, lam: Tensor) -> Tensor:
    """``formulas.tempering_noise`` (fp32 shaped like ``x``); while ``torch.compile`` traces,
    behind its op (the step formulas around it are traced, and fused by Inductor)."""
    if torch.compiler.is_compiling():
        return tempering_noise_op(seed, x, lam.float(), noise)
    return formulas.tempering_noise(noise, seed, x, lam.float())


def step_forward(x: Tensor, s: Tensor, seed, lam, q_n: int, q_p: int, g: float, noise: int,
                 cache: dict | None = None) -> Tensor:
    if use_triton(x):
        return kernels.step().forward(x, s, q_n, q_p, lam, noise, seed)
    xil = (_noise(cache, lambda: _tempering_noise(noise, seed, x, lam))
           if noise else None)
    return _keep(cache, formulas.step_forward(x, s, q_n, q_p, noise, xil,
                                              keep_clip=cache is not None))


def step_backward(grad: Tensor, x: Tensor, s: Tensor, seed, lam, q_n: int, q_p: int, g: float,
                  noise: int, need_x: bool, need_params: bool, cache: dict | None = None):
    if use_triton(x):
        return kernels.step().backward(grad, x, s, q_n, q_p, g, lam, noise, seed, need_x,
                                       need_params)
    xil = (_noise(cache, lambda: _tempering_noise(noise, seed, x, lam))
           if noise and need_params else None)
    return formulas.step_backward(grad, x, s, q_n, q_p, g, noise, xil, need_x, need_params,
                                  clip=_clip(cache))


def nipq_lut(x: Tensor, alpha: Tensor, delta: Tensor, signed: bool) -> Tensor:
    if use_triton(x):
        return kernels.nipq().noise_lut(x, alpha, delta, signed)
    return formulas.nipq_lut(formulas.nipq_error_bins(x, alpha, delta, signed))


def nipq_noise_forward(x: Tensor, alpha: Tensor, delta: Tensor, seed: Tensor, lut,
                       signed: bool, cache: dict | None = None) -> Tensor:
    if use_triton(x):
        return kernels.nipq().noise_forward(x, alpha, delta, seed, lut, signed)
    zd = _noise(cache, lambda: formulas.nipq_z(seed, lut, x, delta))
    return _keep(cache, formulas.nipq_noise_forward(x, alpha, zd, signed,
                                                    keep_clip=cache is not None))


def nipq_noise_backward(grad: Tensor, x: Tensor, alpha: Tensor, delta: Tensor, seed: Tensor,
                        lut, signed: bool, need_x: bool, need_params: bool,
                        cache: dict | None = None):
    if use_triton(x):
        return kernels.nipq().noise_backward(grad, x, alpha, seed, lut, signed, need_x,
                                             need_params)
    zd = _noise(cache, lambda: formulas.nipq_z(seed, lut, x, delta)) if need_params else None
    return formulas.nipq_noise_backward(grad, x, alpha, delta, zd, signed, need_x,
                                        need_params, clip=_clip(cache))


def nipq_hard_forward(x: Tensor, alpha: Tensor, n: int, signed: bool,
                      cache: dict | None = None) -> Tensor:
    if use_triton(x):
        return kernels.nipq().hard_forward(x, alpha, n, signed)
    return _keep(cache, formulas.nipq_hard_forward(x, alpha, n, signed,
                                                   keep_clip=cache is not None))


def nipq_hard_backward(grad: Tensor, x: Tensor, alpha: Tensor, n: int, signed: bool,
                       need_x: bool, need_params: bool, cache: dict | None = None):
    if use_triton(x):
        return kernels.nipq().hard_backward(grad, x, alpha, n, signed, need_x, need_params)
    return formulas.nipq_hard_backward(grad, x, alpha, n, signed, need_x, need_params,
                                       clip=_clip(cache))
