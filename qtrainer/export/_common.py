"""Shared pieces of the exporters: the eval-mode working copy, quantizer descriptions, and the
hard (eval) quantization of a trained quantizer as plain tensor ops.

Depends on quantizers/nn/surgery only.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import nn

from ..nn import QuantizedLayer, named_quantizers
from ..quantizers import METHODS, NIPQQuantizer, Quantizer, make_quantizer, nipq_levels
from ..quantizers.formulas import dequantize
from ..quantizers.lsq import LSQQuantizer

METHOD_OF = {cls: name for name, cls in METHODS.items()}


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def active(q: Quantizer | None) -> bool:
    """The quantizer exists and is enabled (otherwise that side of the layer stays FP)."""
    return q is not None and q.enabled


def eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every quantizer in hard mode.

    The user's model is never touched. A model with no quantized layer, or with an enabled
    quantizer that was never initialized, raises ``ValueError``; a model in training mode gets
    a ``UserWarning`` (the export is of the eval model with hard quantization).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no quantized layer: run "
                         "qtrainer.quantize_model (and train/initialize it) before exporting")
    stale = [n for n, q in named_quantizers(model) if q.enabled and not (q._ready or bool(q.initialized))]
    if stale:
        raise ValueError(f"{len(stale)} quantizer(s) were never initialized (e.g. {stale[0]}): run "
                         "qtrainer.initialize_quantizers(model, batch) or train before exporting")
    noisy = [n for n, q in named_quantizers(model) if q.enabled and q.noisy]
    if any(m.training for m in model.modules()):
        what = f"; {len(noisy)} quantizer(s) in noise mode" if noisy else ""
        warnings.warn(f"exporting a model in training mode{what}: the export is of the eval model "
                      "with hard quantization (your model is left as it is)", UserWarning, stacklevel=3)
    work = copy.deepcopy(model)
    work.eval()
    for _, q in named_quantizers(work):
        q.set_hard(True)
    return work


def quantizer_spec(q: Quantizer, role: str) -> dict:
    """JSON description of a quantizer: method, bits, signedness, code range and the
    constructor arguments needed to rebuild it with ``make_quantizer``."""
    method = METHOD_OF.get(type(q))
    if method is None:
        raise ValueError(f"cannot export quantizer of type {type(q).__name__}: supported are "
                         f"{', '.join(c.__name__ for c in METHOD_OF)}")
    kwargs = {}
    for p in inspect.signature(type(q)).parameters:
        if p in ("bits", "signed", "channels", "role"):
            continue
        value = getattr(q, p, None)
        if isinstance(value, (bool, int, float, str)):
            kwargs[p] = value
    lo, hi = q.code_range
    return {"method": method, "role": role, "bits": int(q.bits), "signed": bool(q.signed),
            "code_range": [int(lo), int(hi)], "enabled": bool(q.enabled), "kwargs": kwargs}


def build_quantizer(spec: dict, channels: int | None,
                    shape: tuple[int, ...] | None = None) -> Quantizer:
    """Rebuild an (uninitialized) quantizer from :func:`quantizer_spec`'s description (a
    weight's: ``channels`` and ``shape`` of the weight); its tensors (step, theta_a/theta_b,
    fixed bits) come from the state dict afterwards."""
    kwargs = dict(spec["kwargs"])
    bits = int(spec["bits"])
    if spec["method"] == "nipq" and kwargs.get("learn_bits"):
        # learned bit-widths are restored from theta_b; the constructor only needs a valid start
        bits = min(max(bits, kwargs.get("b_min", 2) + 1), kwargs.get("b_max", 14) - 1)
    q = make_quantizer(spec["method"], bits, bool(spec["signed"]), spec["role"], channels, shape,
                       **kwargs)
    q.enabled = bool(spec.get("enabled", True))
    q.set_hard(True)
    return q


def int_weight(layer: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes fp32 holding integers, shaped like the weight; scale fp32, shape [1], [C] per
    channel or [R] per group: the weight is ``formulas.dequantize(codes, scale)``)."""
    codes, scale = layer.weight_quantizer.int_codes(layer.weight.detach())
    return codes, scale.detach().reshape(-1).clone()


class EvalQuant(nn.Module):
    """The eval (hard) output of a trained activation quantizer as plain tensor ops: bit-identical
    to the quantizer, but traceable by ``torch.jit.trace``/``torch.export`` (no autograd
    Function, no Python-side state).

    LSQ/tempering: ``round(clamp(x / s, lo, hi)) * s``; NIPQ:
    ``round(n * clamp(x / alpha, lo, 1)) * (alpha / n)`` (the same operations in the same order
    as the quantizers' own forward).
    """

    def __init__(self, q: Quantizer):
        super().__init__()
        self.nipq = isinstance(q, NIPQQuantizer)
        if self.nipq:
            self.n = int(nipq_levels(q.bits, q.signed))
            self.lo = -1.0 if q.signed else 0.0
            alpha = q.alpha.detach().clone()
            self.register_buffer("alpha", alpha)
            self.register_buffer("scale", alpha / self.n)
        elif isinstance(q, LSQQuantizer):
            if q.step.numel() != 1:
                raise ValueError("per-channel activation quantizers are not supported by export")
            q_n, q_p = q.levels
            self.lo, self.hi = -float(q_n), float(q_p)
            self.register_buffer("scale", q.step.detach().float().clone())
        else:  # pragma: no cover - METHOD_OF check comes first
            raise ValueError(f"unsupported quantizer {type(q).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.nipq:
            ratio = torch.clamp(xf / self.alpha, self.lo, 1.0)
            y = torch.round(self.n * ratio) * self.scale
        else:
            y = torch.round(torch.clamp(xf / self.scale, self.lo, self.hi)) * self.scale
        return y.to(x.dtype)


def bake_fake_quant(model: nn.Module) -> nn.Module:
    """In place on an eval copy: weights replaced by their quantized values (``codes * scale``),
    weight quantizers removed, input quantizers replaced by :class:`EvalQuant`. The model's
    output is bit-identical to the eval output of the quantized model."""
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            if active(layer.weight_quantizer):
                for w in layer.weight_parameters():  # separate q/k/v weights: each
                    codes, scale = layer.weight_quantizer.int_codes(w.detach())
                    w.copy_(dequantize(codes, scale.detach().reshape(-1)).to(w.dtype))
            layer.weight_quantizer = None
            layer.input_quantizer = EvalQuant(layer.input_quantizer) if active(layer.input_quantizer) else None
            if getattr(layer, "matmul_quantizers", None) is not None:
                layer.matmul_quantizers = nn.ModuleDict(
                    {k: EvalQuant(q) if active(q) else nn.Identity()
                     for k, q in layer.matmul_quantizers.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def as_args(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def layer_table(model: nn.Module) -> list[dict]:
    """Per quantized layer: name, kind, method, bits, signedness and the quantizer descriptions."""
    table = []
    for name, layer in quantized_layers(model):
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        w = quantizer_spec(wq, "weight") if wq is not None else None
        i = quantizer_spec(iq, "input") if iq is not None else None
        table.append({"name": name, "kind": layer.float_kind,
                      "method": (w or i or {}).get("method"),
                      "weight_bits": w["bits"] if w and w["enabled"] else None,
                      "act_bits": i["bits"] if i and i["enabled"] else None,
                      "signed_input": i["signed"] if i and i["enabled"] else None,
                      "weight_shape": list(layer.weight.shape), "weight": w, "input": i})
    return table
