"""Size, bit-operation and average-bit accounting of a quantized model, and NIPQ's resource loss.

Element counts are per example (batch 1), recorded by surgery's trace: ``numel(W_l)`` for
weights, ``act_numel`` for layer inputs, ``macs`` multiply-accumulates. A side left in full
precision counts at its real width (32 bits for fp32). Sizes in megabytes are 10^6 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nn import QUANTIZED_TYPES, QuantizedLayer, quantizable_weight
from .quantizers import NIPQQuantizer, Quantizer

FP_BITS = 32


def _bits(q: Quantizer | None) -> int:
    return FP_BITS if q is None else q.bits


def _bits_tensor(q: Quantizer | None, device) -> torch.Tensor:
    """The bit-width as a tensor; NIPQ's learned bits carry a straight-through gradient."""
    if isinstance(q, NIPQQuantizer):
        return q.bits_ste().to(device)
    return torch.full((1,), float(_bits(q)), device=device)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def weight_bearing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer that holds a weight matrix: the quantized layers and the conv/linear/
    embedding/attention layers left in full precision (kept FP by the recipe or never
    quantizable by rule)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QuantizedLayer) or type(m) in QUANTIZED_TYPES]


@dataclass
class ResourceSummary:
    """Whole-model figures over every weight-bearing layer (full-precision layers at their real
    width, their dtype's bits): average bits weighted by element counts, size in MB (every
    parameter of the model), GBOPs, and the share of weight elements that are quantized."""

    avg_weight_bits: float
    avg_act_bits: float
    size_mb: float
    gbops: float
    quantized_weight_share: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def summarize(model: nn.Module) -> ResourceSummary:
    """Average weight/activation bits, model size and GBOPs of one example over every
    weight-bearing layer (:func:`weight_bearing_layers`).

    Size: every parameter at its dtype's width, except quantized weights at their bits
    (quantizer parameters included, fp32). A full-precision layer's weights and inputs count at
    the weight's dtype width (32 for fp32); its input elements and multiply-accumulates count
    where surgery traced them (``act_numel``/``macs`` attributes), else 0. The attention
    matmuls (no weights) are not counted.
    """
    w_num = w_den = a_num = a_den = bops = quantized = 0.0
    size_bits = float(sum(p.numel() * p.element_size() * 8 for p in model.parameters()))
    for _, layer in weight_bearing_layers(model):
        w = quantizable_weight(layer)
        fp_bits = w.element_size() * 8
        wq = getattr(layer, "weight_quantizer", None)
        iq = getattr(layer, "input_quantizer", None)
        wb, ab = (fp_bits if wq is None else wq.bits), (fp_bits if iq is None else iq.bits)
        n, act_numel = w.numel(), getattr(layer, "act_numel", 0)
        w_num += wb * n
        w_den += n
        a_num += ab * act_numel
        a_den += act_numel
        if wq is not None:
            size_bits -= (fp_bits - wb) * n
            quantized += n
        bops += getattr(layer, "macs", 0) * wb * ab
    return ResourceSummary(w_num / max(w_den, 1), a_num / max(a_den, 1), size_bits / 8e6,
                           bops / 1e9, quantized / max(w_den, 1))


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer: name, kind, position, weight/input bits and step sizes
    (mean over channels for per-channel steps; None where a side is full precision)."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLayer):
            continue
        report = getattr(m, "qreport", None)
        wq, aq = m.weight_quantizer, m.input_quantizer
        rows.append({
            "name": name.removeprefix("model."),
            "kind": type(m).__name__,
            "position": getattr(report, "position", ""),
            "weight_bits": None if wq is None else int(wq.bits),
            "act_bits": None if aq is None else int(aq.bits),
            "weight_step": None if wq is None else float(wq.step_size.detach().float().mean()),
            "act_step": None if aq is None else float(aq.step_size.detach().float().mean()),
            "weight_numel": int(m.weight.numel()),
            "act_numel": int(getattr(m, "act_numel", 0)),
            "macs": int(getattr(m, "macs", 0)),
            "signed_input": None if aq is None else bool(aq.signed),
        })
    return rows


LOSS_FORMS = ("relative", "official")
RELATIVE_BETA = 0.02
"""Width of the quadratic zone of the relative loss's SmoothL1, as a fraction of the target
(0.06 bits at 3 bits): outside it the pull on the bits is constant, as in the official loss."""


def _average_bits(layers, side: str, device) -> tuple[torch.Tensor, int]:
    """``(sum_l b_l n_l, sum_l n_l)`` over the layers' ``side`` (``weight`` or ``input``)
    quantizers: ``n_l`` the weight's or the per-example input's element count, ``b_l`` the
    bit-width (NIPQ's learned ones as ``round(b_c)`` with a straight-through gradient)."""
    numel = (lambda m: m.weight.numel()) if side == "weight" else (lambda m: m.act_numel)
    pairs = [(getattr(m, f"{side}_quantizer"), numel(m)) for m in layers]
    pairs = [(q, n) for q, n in pairs if q is not None]
    total = sum((_bits_tensor(q, device) * n for q, n in pairs), torch.zeros(1, device=device))
    return total, sum(n for _, n in pairs)


def bops(layers, device) -> torch.Tensor:
    """GBOPs of one example: ``sum_l macs_l * b_w,l * b_a,l / 1e9`` (learned bits with a
    straight-through gradient; a full-precision side counts 32 bits)."""
    return sum((_bits_tensor(m.weight_quantizer, device) * _bits_tensor(m.input_quantizer, device)
                * m.macs for m in layers), torch.zeros(1, device=device)) / 1e9


def resource_loss(model: nn.Module, target: str, value: float, w_scale: float = 1.0,
                  a_scale: float = 1.0, bops_scale: float = 3.0,
                  form: str = "relative") -> torch.Tensor:
    """NIPQ's resource constraint (docs/algorithms.md sections 2 and 6), shape ``[1]``; its gradient
    reaches only the learned bit-widths (through ``round(b_c)`` with STE).

    ``form="relative"`` (default): in units of the target, so that one scale serves every
    model: ``avg_bits``: ``w_scale * SmoothL1(W_avg / T, 1) + a_scale * SmoothL1(A_avg / T, 1)``
    with ``W_avg = sum_l b_l numel(W_l) / sum_l numel(W_l)`` (``A_avg`` alike over the input
    quantizers' per-example element counts); ``gbops``: ``bops_scale * SmoothL1(GBOPs / G, 1)``;
    SmoothL1's quadratic zone is :data:`RELATIVE_BETA` wide.

    ``form="official"``: the official code's element counts over ``2^23``:
    ``w_scale * SmoothL1(sum b_l numel(W_l), T sum numel(W)) / 2^23 + a_scale * SmoothL1(sum
    b_l numel(A_l), T sum numel(A)) / 2^23``; ``gbops``: ``bops_scale * SmoothL1(GBOPs, G)``
    (each layer's real input bit-width). Its pull grows with the model's size.
    """
    if form not in LOSS_FORMS:
        raise ValueError(f"form={form!r} is not allowed; allowed: {', '.join(LOSS_FORMS)}")
    layers = [layer for _, layer in quantized_layers(model)]
    device = layers[0].weight.device
    if target == "avg_bits":
        terms = []
        for side, scale in (("weight", w_scale), ("input", a_scale)):
            bits, total = _average_bits(layers, side, device)
            if total == 0:
                continue
            if form == "official":
                terms.append(scale * F.smooth_l1_loss(bits, torch.full_like(bits, value * total))
                             / 2**23)
            else:
                relative = bits / (value * total)
                terms.append(scale * F.smooth_l1_loss(relative, torch.ones_like(relative),
                                                      beta=RELATIVE_BETA))
        return sum(terms, torch.zeros(1, device=device))
    if target == "gbops":
        g = bops(layers, device)
        if form == "official":
            return bops_scale * F.smooth_l1_loss(g, torch.full_like(g, value))
        return bops_scale * F.smooth_l1_loss(g / value, torch.ones_like(g), beta=RELATIVE_BETA)
    raise ValueError(f"target={target!r} is not allowed; allowed: avg_bits, gbops")
