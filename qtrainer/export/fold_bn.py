"""Fold eval-mode BatchNorm into the conv/linear layer that feeds it.

For a layer ``y = W x + b`` followed by BN with running statistics ``mu, var`` and affine
``gamma, beta``: ``f = gamma / sqrt(var + eps)`` per output channel, ``W' = W * f``,
``b' = (b - mu) * f + beta``, and the BN becomes ``nn.Identity``.

For a quantized layer the integer weight codes are kept exactly: the weight quantizer becomes a
per-channel LSQ quantizer (same bits and signedness; its code range contains the NIPQ one) with
step ``s_c = s * f_c`` (fp32), and the weight is set to ``codes * s_c``. A negative ``gamma``
gives a negative per-channel step (the codes are unchanged; ``codes * s_c`` is still the
folded weight). The input quantizer is unchanged.

Bias (``bias=``): ``"float"`` (default) keeps ``b'`` as computed, so the folded model is
closest to the unfolded one. ``"int"`` rounds ``b'`` of a layer whose input and weight are both
quantized to the int32 accumulator grid ``s_in * s_c`` (fp32 product), the way integer runtimes
store a bias (the ONNX export then stores it as int32 codes); it costs accuracy at low bit-widths
(the grid is coarse when ``s_in`` is). Either way the folded model is only numerically close to
the unfolded one, not bit-identical.

Pairs are found with ``torch.fx`` (quantized layers are leaves): a conv/linear whose only user
is a BN module used nowhere else. A BN without running statistics is left as it is.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..nn import QuantizedLayer
from ..quantizers import LSQQuantizer, check_choice
from ..quantizers.formulas import dequantize
from ._common import active, int_weight

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualname)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(layer_name, bn_name)]`` of foldable conv/linear -> BatchNorm pairs."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds
        raise ValueError(f"fold_bn=True needs a model torch.fx can trace; tracing "
                         f"{type(model).__name__} failed ({type(e).__name__}: {e}). Export with "
                         "fold_bn=False (BN kept as is)") from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), FOLDABLE):
            continue
        if isinstance(modules[node.target], nn.modules.conv._ConvTransposeNd):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn_name = users[0].target
        bn = modules.get(bn_name)
        if (not isinstance(bn, BATCHNORMS) or calls[bn_name] != 1 or calls[node.target] != 1
                or users[0].args[0] is not node or bn.running_mean is None):
            continue
        if bn.num_features != modules[node.target].weight.shape[0]:
            continue
        pairs.append((node.target, bn_name))
    return pairs


def _on_accumulator_grid(bias: torch.Tensor, layer: QuantizedLayer) -> torch.Tensor:
    """Round a folded bias to the int32 accumulator grid ``s_in * s_w`` (fp32 product), as
    integer runtimes store it (onnxruntime's QDQ ``WeightBiasQuantization`` does exactly this)."""
    s_in = layer.input_quantizer.step_size.detach().float().reshape(-1)
    if s_in.numel() != 1:
        return bias
    s_w = layer.weight_quantizer.step_size.detach().float().reshape(-1)
    if s_w.numel() not in (1, bias.shape[0]):  # per group: no one accumulator grid per channel
        return bias
    grid = (s_in * s_w).expand(bias.shape[0])
    k = torch.round(bias / grid.double())
    if not torch.isfinite(k).all() or k.abs().max() >= 2**24:  # not exact in fp32: keep as is
        return bias
    return (k.float() * grid).double()


BIAS_MODES = ("int", "float")


@torch.no_grad()
def fold_batchnorm(model: nn.Module, bias: str = "float") -> list[tuple[str, str]]:
    """Fold every foldable BN of an eval-mode ``model`` in place (see the module docstring).

    ``bias="float"`` keeps the folded bias as computed; ``"int"`` puts the folded bias of layers
    with quantized input and weight on the int32 accumulator grid ``s_in * s_w``.
    Returns the folded ``(layer_name, bn_name)`` pairs. Call it on a copy to keep the original.
    """
    check_choice("bias", bias, BIAS_MODES)
    pairs = find_conv_bn_pairs(model)
    modules = dict(model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        w = layer.weight
        var = bn.running_var.double()
        factor = 1.0 / torch.sqrt(var + bn.eps)
        if bn.weight is not None:
            factor = factor * bn.weight.double()
        old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(var)
        new_bias = (old_bias - bn.running_mean.double()) * factor
        if bn.bias is not None:
            new_bias = new_bias + bn.bias.double()
        shape = (-1,) + (1,) * (w.dim() - 1)
        if isinstance(layer, QuantizedLayer) and active(layer.weight_quantizer):
            old = layer.weight_quantizer
            codes, scale = int_weight(layer)
            channels = w.shape[0]
            if scale.numel() in (1, channels):
                step = (scale.double().expand(channels) * factor).float()
                kind = {"per_channel": True, "channels": channels}
            else:  # one step per group: each group's step times its channel's factor
                step = (scale.double().view(channels, -1) * factor.view(-1, 1)).reshape(-1).float()
                kind = {"granularity": "group", "group_size": old.group_size,
                        "shape": tuple(w.shape)}
            q = LSQQuantizer(bits=old.bits, signed=old.signed, **kind)
            q.step.data.copy_(step)
            q._mark_initialized()
            q.set_hard(True)
            q.to(w.device)
            layer.weight_quantizer = q
            w.copy_(dequantize(codes, step).to(w.dtype))
        else:
            w.copy_((w.double() * factor.view(shape)).to(w.dtype))
        if (bias == "int" and isinstance(layer, QuantizedLayer) and active(layer.weight_quantizer)
                and active(layer.input_quantizer)):
            new_bias = _on_accumulator_grid(new_bias, layer)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(w.dtype), requires_grad=False)
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
        parent, _, child = bn_name.rpartition(".")
        setattr(modules[parent] if parent else model, child, nn.Identity())
    return pairs
