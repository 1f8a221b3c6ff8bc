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


def resource_loss(model: nn.Module, target: str, value: float, w_scale: float = 1.0,
                  a_scale: float = 1.0, bops_scale: float = 3.0) -> torch.Tensor:
    """NIPQ's resource constraint (docs/algorithms.md section 2); its gradient reaches only the
    learned bit-widths (through ``round(b_c)`` with STE).

    ``avg_bits``: ``w_scale * SmoothL1(sum b_l numel(W_l), T sum numel(W)) / 2^23 +
    a_scale * SmoothL1(sum b_l numel(A_l), T sum numel(A)) / 2^23`` (activation quantizers only).
    ``gbops``: ``bops_scale * SmoothL1(sum macs_l b_w b_a / 1e9, G)`` with each layer's real
    input bit-width.
    """
    layers = [layer for _, layer in quantized_layers(model)]
    device = layers[0].weight.device
    zero = torch.zeros(1, device=device)
    if target == "avg_bits":
        w_bits = sum((_bits_tensor(m.weight_quantizer, device) * m.weight.numel() for m in layers
                      if m.weight_quantizer is not None), zero)
        w_total = sum(m.weight.numel() for m in layers if m.weight_quantizer is not None)
        a_bits = sum((_bits_tensor(m.input_quantizer, device) * m.act_numel for m in layers
                      if m.input_quantizer is not None), zero)
        a_total = sum(m.act_numel for m in layers if m.input_quantizer is not None)
        loss_w = F.smooth_l1_loss(w_bits, torch.full_like(w_bits, value * w_total))
        loss_a = F.smooth_l1_loss(a_bits, torch.full_like(a_bits, value * a_total))
        return (w_scale * loss_w + a_scale * loss_a) / 2**23
    if target == "gbops":
        bops = sum((_bits_tensor(m.weight_quantizer, device) * _bits_tensor(m.input_quantizer, device)
                    * m.macs for m in layers), zero) / 1e9
        return bops_scale * F.smooth_l1_loss(bops, torch.full_like(bops, value))
    raise ValueError(f"target={target!r} is not allowed; allowed: avg_bits, gbops")
