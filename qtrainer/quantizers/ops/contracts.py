"""Op contracts: what the fused layer can run, independent of any quantizer class.

A quantizer describes its training (or eval) forward on one tensor as a :class:`Plan`: a
contract name, the tensors that receive gradients (``params``), other tensors (``aux``: noise
seed, lookup table; entries may be None) and Python constants. The contracts:

==============  ==========================  ===================  ==========================
contract        params                      aux                  consts
==============  ==========================  ===================  ==========================
``step``        ``s`` (1-D, [R])            ``seed``, ``lam``    ``q_n, q_p, g, noise``
``nipq_noise``  ``alpha``, ``delta`` ([R])  ``seed``, ``lut``    ``signed``
``nipq_hard``   ``alpha`` ([R])             --                   ``n, signed``
==============  ==========================  ===================  ==========================

``R`` parameters: one (per tensor), one per channel (``R`` equals dim 0 of ``x``) or one per
group (``x``'s elements in row-major order cut into ``R`` equal contiguous groups;
:func:`qtrainer.quantizers.formulas.step_rows`); their gradients are summed per row.

``step``: step-size fake quantization ``round(clip(x/s, -Q_N, Q_P)) * s`` (LSQ), ``g`` scaling
``s``'s gradient only, plus tempering noise of weight ``lam`` when ``noise`` is 1, 2 or 3
(``formulas.NOISE_CODES``). ``nipq_noise``: NIPQ's noise phase; ``nipq_hard``: NIPQ's hard
quantization. The formulas are in :mod:`qtrainer.quantizers.formulas` (torch) and
:mod:`qtrainer.quantizers.kernels` (Triton).

:func:`apply` runs a plan with autograd (a plain autograd function in eager code and, traced,
for the ``step`` contract on the torch backend under ``torch.compile``; the custom ops for the
rest under ``torch.compile``); :func:`recompute` and :func:`backward` are a plan's forward
without autograd and its gradient at an input (used by the recomputing layers).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from . import backends, custom
from .switches import use_triton

_SEED_HIGH = 2**31 - 1


class Contract(NamedTuple):
    """One op contract: argument counts, its backend implementations and its custom ops."""

    name: str
    n_params: int
    n_aux: int
    forward: Callable  # (x, *params, *aux, *consts) -> y
    backward: Callable  # (grad, x, *params, *aux, *consts, need_x, need_params) -> (gx, packed)
    op: Callable  # the forward custom op (same arguments)
    op_backward: Callable  # the backward custom op (empty tensors for outputs not needed)


CONTRACTS: dict[str, Contract] = {c.name: c for c in (
    Contract("step", 1, 2, backends.step_forward, backends.step_backward,
             custom.step_fake_quant, custom.step_fake_quant_backward),
    Contract("nipq_noise", 2, 2, backends.nipq_noise_forward, backends.nipq_noise_backward,
             custom.nipq_noise_fake_quant, custom.nipq_noise_fake_quant_backward),
    Contract("nipq_hard", 1, 0, backends.nipq_hard_forward, backends.nipq_hard_backward,
             custom.nipq_hard_fake_quant, custom.nipq_hard_fake_quant_backward),
)}


class Plan(NamedTuple):
    """One quantizer's forward on one tensor as a contract call (see the module docstring)."""

    contract: str
    params: tuple
    aux: tuple
    consts: tuple


IDENTITY = Plan("identity", (), (), ())


def draw_seed(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A fresh int64 seed tensor ``[1]`` on ``x``'s device (from ``generator`` when given; from
    the device's default generator otherwise, which CUDA graphs replay correctly)."""
    if generator is None:
        return torch.randint(0, _SEED_HIGH, (1,), device=x.device)
    seed = torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=generator.device)
    return seed.to(x.device)


def nipq_lut(x: Tensor, alpha: Tensor, delta: Tensor, signed: bool) -> Tensor:
    """The ``nipq_noise`` contract's histogram lookup table for ``x`` (an ``aux`` tensor)."""
    fn = custom.nipq_noise_lut if torch.compiler.is_compiling() else backends.nipq_lut
    return fn(x.detach(), alpha.detach(), delta.detach(), signed)


def unpack(packed: Tensor, params: tuple) -> tuple:
    """Split packed fp32 parameter gradients into one tensor per parameter (its shape and
    dtype)."""
    parts = torch.split(packed.reshape(-1), [p.numel() for p in params])
    return tuple(g.reshape(p.shape).to(p.dtype) for g, p in zip(parts, params))


def recompute(x: Tensor, p: Plan) -> tuple[Tensor, dict]:
    """Plan ``p``'s forward on ``x`` without autograd, and a cache for :func:`backward` of the
    same plan right after (the torch path keeps its noise there instead of drawing it
    again)."""
    cache: dict = {}
    if p.contract == "identity":
        return x, cache
    return CONTRACTS[p.contract].forward(x, *p.params, *p.aux, *p.consts, cache=cache), cache


def backward(grad: Tensor, x: Tensor, p: Plan, need_x: bool, need_params: bool,
             cache: dict | None = None):
    """``(grad_x, gradients of p.params)`` of plan ``p`` at input ``x`` (None where not
    needed); ``cache`` from :func:`recompute`."""
    if p.contract == "identity":
        return (grad if need_x else None), ()
    if not (need_x or need_params):
        return None, (None,) * len(p.params)
    c = CONTRACTS[p.contract]
    gx, packed = c.backward(grad, x, *p.params, *p.aux, *p.consts, need_x, need_params,
                            cache=cache)
    return (gx if need_x else None), (unpack(packed, p.params) if need_params
                                      else (None,) * len(p.params))


class _ContractFn(torch.autograd.Function):
    """A plan's forward saving ``x`` and the plan's tensors; backward by the contract."""

    @staticmethod
    def forward(ctx, x, contract, consts, *tensors):
        c = CONTRACTS[contract]
        ctx.save_for_backward(x, *tensors)
        ctx.plan = (contract, consts)
        return c.forward(x, *tensors, *consts)

    @staticmethod
    def backward(ctx, grad):
        x, *tensors = ctx.saved_tensors
        contract, consts = ctx.plan
        n = CONTRACTS[contract].n_params
        needs = ctx.needs_input_grad
        p = Plan(contract, tuple(tensors[:n]), tuple(tensors[n:]), consts)
        gx, pg = backward(grad, x, p, needs[0], any(needs[3:3 + n]))
        pg = tuple(g if needs[3 + i] else None for i, g in enumerate(pg))
        return (gx, None, None, *pg, *([None] * (len(tensors) - n)))


def _traceable(x: Tensor, p: Plan) -> bool:
    """True when ``torch.compile`` can trace plan ``p``'s torch formulas (its autograd
    function, forward and backward) rather than call its opaque custom op: the ``step``
    contract (LSQ, tempering) on the torch backend. Inductor then fuses the quantizer's
    pointwise math with its neighbours; tempering's noise draw (numpy, from a seed), NIPQ's
    contracts (bounds read on the host) and the Triton kernels stay behind custom ops."""
    return p.contract == "step" and not use_triton(x)


def apply(x: Tensor, p: Plan) -> Tensor:
    """Run plan ``p`` on ``x`` with autograd."""
    if p.contract == "identity":
        return x
    if torch.compiler.is_compiling() and not _traceable(x, p):
        return CONTRACTS[p.contract].op(x, *p.params, *p.aux, *p.consts)
    return _ContractFn.apply(x, p.contract, p.consts, *p.params, *p.aux)


def _register_autograd(c: Contract) -> None:
    """Autograd of a forward custom op: save ``x`` and the tensors, call the backward op."""
    k = 1 + c.n_params + c.n_aux

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:k])
        ctx.consts = inputs[k:]

    def grad_fn(ctx, grad):
        x, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_x, need_p = needs[0], any(needs[1:1 + c.n_params])
        pg: tuple = (None,) * c.n_params
        gx = None
        if need_x or need_p:
            gx, packed = c.op_backward(grad, x, *tensors, *ctx.consts, need_x, need_p)
            if need_p:
                pg = tuple(g if needs[1 + i] else None
                           for i, g in enumerate(unpack(packed, tuple(tensors[:c.n_params]))))
        return (gx if need_x else None, *pg, *([None] * (len(needs) - 1 - c.n_params)))

    c.op.register_autograd(grad_fn, setup_context=setup)


for _c in CONTRACTS.values():
    _register_autograd(_c)

__all__ = ["CONTRACTS", "IDENTITY", "Contract", "Plan", "apply", "backward", "draw_seed",
           "nipq_lut", "recompute", "unpack"]
