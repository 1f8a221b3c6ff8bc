"""Quantized conv/linear that keeps only the un-quantized input for the backward.

The plain quantized layer keeps ``x`` (for the input quantizer's backward) and ``x_hat`` (for the
conv's weight gradient) alive until the backward: two activation-sized tensors per layer, where
a full-precision layer keeps one. Here one autograd function runs both fake quantizers and the
conv/linear and saves only ``x``, ``w`` and the quantizers' small tensors (step sizes, seeds);
the backward recomputes ``x_hat`` and ``w_hat`` (one elementwise pass each; the noise comes back
from its seed), gets their gradients from ``aten.convolution_backward`` (or two matmuls) and runs
the quantizers' backward ops. Forward outputs are bit-identical to the plain layer and the
gradients equal its gradients (the same ops on the same values).

Autocast: the quantization math stays fp32 (output in ``x``'s dtype, weights fp32) and the layer
runs in the autocast dtype, as in the plain layer.

Used by quantized layers (:class:`qtrainer.nn.QuantizedLayer`; any module with ``weight``,
``weight_quantizer``, ``input_quantizer`` and a ``recompute`` attribute) according to
``recompute``: ``None`` (default) recomputes wherever the fused ops are enabled (every device
unless ``QTRAINER_FUSED=off``), ``True`` always, ``False`` never. Both quantizers must have a
fused plan (:meth:`qtrainer.quantizers.Quantizer.has_fused_plan`), else the plain layer runs.
:func:`set_recompute` sets the attribute on every quantized layer of a model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from .quantizers import ops

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def set_recompute(model: nn.Module, flag: bool | None) -> int:
    """Set ``recompute`` (None = auto, True, False) on every quantized layer (a module with
    ``weight_quantizer``, ``input_quantizer`` and ``recompute`` attributes); returns how many."""
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"recompute={flag!r} must be None (auto), True or False")
    count = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("weight_quantizer", "input_quantizer", "recompute")):
            module.recompute = flag
            count += 1
    return count


def supported(layer: nn.Module) -> bool:
    """Layers this module handles: ``nn.Linear`` and zero-padded ``nn.Conv1d/2d/3d`` with
    numeric padding (``'same'``/``'valid'`` and reflect/replicate/circular padding keep the
    plain path)."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return False


def _prepare(q, x: torch.Tensor):
    """The quantizer's plan on ``x``, after its lazy initialization (as ``Quantizer.forward``)."""
    if q is None or not getattr(q, "enabled", True):
        return ops.IDENTITY
    if not q._ready:
        with torch.no_grad():
            q.initialize(x.detach())
    return q.fused_plan(x)


def _supported_quantizer(q) -> bool:
    """No quantizer, a disabled one, or one whose class has a fused plan (other modules in a
    quantizer's place, such as the exporters' eval quantizers, keep the plain layer)."""
    if q is None or not getattr(q, "enabled", True):
        return True
    has_plan = getattr(type(q), "has_fused_plan", None)
    return has_plan is not None and has_plan()


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the recomputing path, or None when it does not apply (the
    caller runs its plain forward)."""
    flag = layer.recompute
    if flag is False or not torch.is_grad_enabled() or not supported(layer):
        return None
    if flag is None and not ops.fused_enabled(x):
        return None
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if not (_supported_quantizer(iq) and _supported_quantizer(wq)):
        return None
    # same order as the plain layer: input quantizer first (initialization, noise seeds)
    xp = _prepare(iq, x)
    wp = _prepare(wq, layer.weight)
    device = x.device.type
    cdt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if isinstance(layer, nn.Linear):
        lspec = ("linear",)
    else:
        lspec = ("conv", len(layer.kernel_size), tuple(layer.stride), tuple(layer.padding),
                 tuple(layer.dilation), int(layer.groups))
    spec = (lspec, cdt, xp.contract, xp.consts, len(xp.params), len(xp.aux),
            wp.contract, wp.consts, len(wp.params), len(wp.aux))
    tensors = (*xp.params, *xp.aux, *wp.params, *wp.aux)
    if torch.compiler.is_compiling():
        # AOTAutograd would merge the backward's recomputation with the forward call and keep
        # x_hat; selective checkpointing tells its partitioner to recompute the quantizers.
        return checkpoint(_layer_compute, x, layer.weight, layer.bias, spec, *tensors,
                          use_reentrant=False, context_fn=_recompute_quantizers)
    return _QuantLayerFn.apply(x, layer.weight, layer.bias, spec, *tensors)


def _layer_compute(x, w, b, spec, *tensors):
    xp, wp = _plans(spec, tensors)
    cdt = spec[1]
    xq, wq = ops.apply(x, xp), ops.apply(w, wp)
    return _layer_forward(spec[0], _cast(xq, cdt), _cast(wq, cdt), _cast(b, cdt))


def _policy(ctx, op, *args, **kwargs):
    """Inside a recomputing layer only the conv/linear product keeps its output; everything
    else (the quantizers' custom ops, casts) is recomputed in backward."""
    if op in _KEPT:
        return CheckpointPolicy.PREFER_SAVE
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_quantizers():
    return create_selective_checkpoint_contexts(_policy)


_KEPT = (torch.ops.aten.convolution.default, torch.ops.aten.addmm.default,
         torch.ops.aten.mm.default)


def _plans(spec, tensors):
    _, _, xk, xc, nxp, nxa, wk, wc, nwp, nwa = spec
    i = 0
    xp = ops.Plan(xk, tuple(tensors[i:i + nxp]), tuple(tensors[i + nxp:i + nxp + nxa]), xc)
    i = nxp + nxa
    wp = ops.Plan(wk, tuple(tensors[i:i + nwp]), tuple(tensors[i + nwp:i + nwp + nwa]), wc)
    return xp, wp


def _cast(t, dtype):
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def _layer_forward(lspec, x, w, b):
    if lspec[0] == "linear":
        return F.linear(x, w, b)
    _, nd, stride, padding, dilation, groups = lspec
    return _CONVS[nd](x, w, b, stride, padding, dilation, groups)


def _layer_backward(lspec, gy, x, w, has_b, need_x, need_w, need_b):
    if lspec[0] == "linear":
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = gy2.mm(w).reshape(x.shape) if need_x else None
        gw = gy2.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None
        gb = gy2.sum(0) if need_b else None
        return gx, gw, gb
    _, nd, stride, padding, dilation, groups = lspec
    gx, gw, gb = torch.ops.aten.convolution_backward(
        gy, x, w, [w.shape[0]] if has_b else None, list(stride), list(padding), list(dilation),
        False, [0] * nd, groups, [need_x, need_w, need_b and has_b])
    return gx, gw, gb


class _QuantLayerFn(torch.autograd.Function):
    """``layer(q_x(x), q_w(w), b)`` saving ``x``, ``w`` and the quantizers' tensors only."""

    @staticmethod
    def forward(ctx, x, w, b, spec, *tensors):
        xp, wp = _plans(spec, tensors)
        cdt = spec[1]
        xq, wq = ops.apply(x, xp), ops.apply(w, wp)
        y = _layer_forward(spec[0], _cast(xq, cdt), _cast(wq, cdt), _cast(b, cdt))
        ctx.save_for_backward(x, w, *tensors)
        ctx.spec = spec
        ctx.b_dtype = None if b is None else b.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, *tensors = ctx.saved_tensors
        spec = ctx.spec
        cdt = spec[1]
        xp, wp = _plans(spec, tensors)
        needs = ctx.needs_input_grad
        nxp, nxa, nwp, nwa = spec[4], spec[5], spec[8], spec[9]
        need_xp = any(needs[4:4 + nxp])
        need_wp = any(needs[4 + nxp + nxa:4 + nxp + nxa + nwp])
        need_xq, need_wq = needs[0] or need_xp, needs[1] or need_wp
        has_b = ctx.b_dtype is not None
        with torch.no_grad():
            (xq, xcache), (wq, wcache) = ops.recompute(x, xp), ops.recompute(w, wp)
            gxq, gwq, gb = _layer_backward(spec[0], gy, _cast(xq, cdt), _cast(wq, cdt), has_b,
                                           need_xq, need_wq, needs[2])
            del xq, wq
            gx, gxp = (ops.backward(gxq.to(x.dtype), x, xp, needs[0], need_xp, xcache)
                       if need_xq else (None, (None,) * nxp))
            gw, gwp = (ops.backward(gwq.to(w.dtype), w, wp, needs[1], need_wp, wcache)
                       if need_wq else (None, (None,) * nwp))
        if gb is not None:
            gb = gb.to(ctx.b_dtype)
        return (gx, gw, gb if needs[2] else None, None, *gxp, *([None] * nxa), *gwp,
                *([None] * nwa))


__all__ = ["forward", "set_recompute", "supported"]
