"""Weight oscillation in QAT (Nagel et al., ICML 2022; docs/algorithms.md section 4): the
tracker of integer-code flips, iterative freezing and the dampening regularizer's gradient.

Everything here works on the integer codes of a weight quantizer (``int_codes``: no forward of
the model) and is called once per optimizer step by the callback layer.

Tracking, per weight element (``f`` the oscillation frequency, ``m`` the EMA momentum)::

    delta = prev_code - code          # in {-1, 0, 1} normally
    dir = sign(delta)
    oscillated = prev_dir * dir == -1 # a change whose direction reverses the previous change
    f = m * oscillated + (1 - m) * f
    prev_dir = dir where delta != 0;  prev_code = code

Extra memory per tracked weight element: 7 bytes (previous code int16, previous direction int8,
``f`` fp32); with freezing 7 more (code EMA fp32, frozen flag bool, frozen code int16).

Freezing: an element whose ``f`` exceeds the threshold is frozen for the rest of training at
``round(ema_code)`` (EMA of its code, momentum ``m``, taken before this step's update, as the
official code does). It is applied outside the quantizer: the latent weight is written to
``frozen_code * scale`` after every optimizer step (so the quantizer emits the frozen code,
its export too) and its gradient is zeroed before the step.

Dampening: ``L = lambda_d * sum_layers agg((sg(w_hat) - clip(w, s * -Q_N, s * Q_P))^2)`` with
the clip bounds and ``w_hat`` (the hard-quantized weight) held constant, so its gradient is
``dL/dw = -2 lambda_d * c_agg * (w_hat - w)`` inside the range and 0 outside, with ``c_agg`` 1
(``sum``), ``1 / numel`` (``mean``) or ``1 / (numel / shape[0])`` (``kernel_mean``: sum over the
output channels, then mean). :func:`add_dampening_gradient` adds that to ``w.grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .nn import QuantizedLayer
from .quantizers.formulas import dequantize


def flip_step(prev_code: torch.Tensor, prev_dir: torch.Tensor, freq: torch.Tensor,
              code: torch.Tensor, momentum: float) -> torch.Tensor:
    """One tracking step in place on ``prev_code``/``prev_dir``/``freq`` (same shape as
    ``code``); returns the bool mask of the elements that oscillated at this step."""
    delta = prev_code.to(torch.int32) - code.to(torch.int32)
    direction = delta.sign().to(torch.int8)
    oscillated = (prev_dir * direction) == -1
    freq.mul_(1 - momentum).add_(oscillated.to(freq.dtype), alpha=momentum)
    changed = delta != 0
    prev_dir.copy_(torch.where(changed, direction, prev_dir))
    prev_code.copy_(code.to(prev_code.dtype))
    return oscillated


def quantized_weights(model: nn.Module) -> dict[str, QuantizedLayer]:
    """The layers of ``model`` with an enabled weight quantizer, by qualified name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None
            and m.weight_quantizer.enabled}


def weight_codes(layer: QuantizedLayer,
                 broadcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of the layer's latent weight: integer codes (float tensor) and the
    scale broadcasting against the weight (``codes * scale`` is the hard-quantized weight):
    one step ``[1]``, one per channel ``[C, 1, ...]``, or for group-wise steps (``[R]``, one
    per group) each element's step, shaped like the weight. ``broadcast=False``: the scale as
    the quantizer gives it (a caller that needs only the codes skips the expansion)."""
    codes, scale = layer.weight_quantizer.int_codes(layer.weight.detach())
    return codes, (_broadcast_scale(codes, scale) if broadcast else scale)


def _broadcast_scale(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The scale of :func:`weight_codes` (``broadcast=False``) shaped to multiply ``codes``."""
    if scale.numel() > 1 and scale.dim() != codes.dim():  # one step per group
        return dequantize(torch.ones_like(codes), scale)
    return scale


def boundary_distance(layer: QuantizedLayer, exclude: torch.Tensor | None = None) -> float:
    """Mean distance of the latent weights inside the quantization range to their nearest
    rounding boundary (``k + 1/2`` in step units), in steps: 0.5 sits on a code, 0 on a
    boundary. ``exclude``: a bool mask of elements left out (frozen ones). NaN if none is left."""
    with torch.no_grad():
        _, scale = weight_codes(layer)
        v = layer.weight.detach().float() / scale
        lo, hi = layer.weight_quantizer.code_range
        inside = (v > lo) & (v < hi)
        if exclude is not None:
            inside &= ~exclude
        d = 0.5 - (v - torch.round(v)).abs()
        n = int(inside.sum())
        return float(d[inside].sum() / n) if n else float("nan")


def dampening_loss(layer: QuantizedLayer, aggregation: str = "kernel_mean") -> torch.Tensor:
    """``agg((sg(w_hat) - clip(w, lo, hi))^2)`` of one layer (the bounds held constant), a 0-d
    tensor differentiable in ``layer.weight``; the regularizer without its weight."""
    codes, scale = weight_codes(layer)
    lo, hi = layer.weight_quantizer.code_range
    w = layer.weight.float()
    target = (codes * scale).detach()
    clipped = torch.minimum(torch.maximum(w, (lo * scale).detach()), (hi * scale).detach())
    sq = (target - clipped).square()
    if aggregation == "sum":
        return sq.sum()
    if aggregation == "mean":
        return sq.mean()
    return sq.sum(dim=0).mean()


@torch.no_grad()
def add_dampening_gradient(layer: QuantizedLayer, weight: float,
                           aggregation: str = "kernel_mean") -> torch.Tensor:
    """Add ``weight * d dampening_loss / d w`` to ``layer.weight.grad`` (created if None) in
    closed form; returns ``weight * dampening_loss`` (a 0-d tensor on the weight's device, so
    no device sync)."""
    codes, scale = weight_codes(layer)
    lo, hi = layer.weight_quantizer.code_range
    w = layer.weight.detach().float()
    inside = (w >= lo * scale) & (w <= hi * scale)
    diff = codes * scale - torch.minimum(torch.maximum(w, lo * scale), hi * scale)
    n = w.numel()
    factor = {"sum": 1.0, "mean": 1.0 / n}.get(aggregation, w.shape[0] / n)
    grad = (-2.0 * weight * factor) * diff * inside
    p = layer.weight
    if p.grad is None:
        p.grad = grad.to(p.dtype)
    else:
        p.grad.add_(grad.to(p.grad.dtype))
    return weight * factor * diff.square().sum()


@dataclass
class LayerState:
    """The per-element tracking state of one weight tensor (all shaped like the weight)."""

    prev_code: torch.Tensor  # int16
    prev_dir: torch.Tensor  # int8, 0 before the first change
    freq: torch.Tensor  # fp32, the EMA oscillation frequency
    ema_code: torch.Tensor | None = None  # fp32 (freezing only)
    frozen: torch.Tensor | None = None  # bool (freezing only)
    frozen_code: torch.Tensor | None = None  # int16 (freezing only)
    count: torch.Tensor | int = 0  # oscillations since the last stats(reset=True) (0-d, on
    # the weight's device: no device sync per step)
    bits: int = 0  # the weight bit-width the codes were taken at (0: not known yet)


STATE_KEYS = ("prev_code", "prev_dir", "freq", "ema_code", "frozen", "frozen_code")


class OscillationTracker:
    """Oscillation frequency per element of every quantized weight of ``model`` (layers whose
    ``weight_quantizer`` is set and enabled), and, with ``freezing``, iterative freezing.

    Args:
        model: the quantized model.
        momentum: EMA momentum ``m`` of the frequency and of the frozen code (paper: 0.01).
        threshold: ``f`` above which an element counts as oscillating in :meth:`stats`.
        freezing: keep the state freezing needs (code EMA, frozen mask and codes).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.01, threshold: float = 0.05,
                 freezing: bool = False):
        self.momentum = float(momentum)
        self.threshold = float(threshold)
        self.freezing = bool(freezing)
        self.layers = quantized_weights(model)
        self.state: dict[str, LayerState] = {}

    def _init(self, name: str, codes: torch.Tensor) -> LayerState:
        st = LayerState(codes.to(torch.int16), torch.zeros_like(codes, dtype=torch.int8),
                        torch.zeros_like(codes, dtype=torch.float32))
        if self.freezing:
            st.ema_code = codes.float().clone()
            st.frozen = torch.zeros_like(codes, dtype=torch.bool)
            st.frozen_code = torch.zeros_like(codes, dtype=torch.int16)
        self.state[name] = st
        return st

    @torch.no_grad()
    def update(self, names=None, freeze_threshold: float = 0.0) -> None:
        """One tracking step on the current codes of the layers ``names`` (default all); with
        freezing and ``freeze_threshold > 0``, freeze the elements whose ``f`` exceeds it;
        then write the frozen elements' latent weights (:meth:`apply_frozen`)."""
        m = self.momentum
        for name in self.layers if names is None else names:
            layer = self.layers[name]
            codes, scale = weight_codes(layer, broadcast=False)
            bits = int(layer.weight_quantizer.bits)
            st = self.state.get(name)
            if st is None or st.prev_code.shape != codes.shape or st.bits not in (0, bits):
                # first step, or codes at another bit-width (NIPQ's learned bits moved): a
                # change of scale, not an oscillation; tracking starts again from these codes
                self._init(name, codes).bits = bits
                continue
            st.bits = bits
            if st.frozen is not None:
                codes = torch.where(st.frozen, st.frozen_code.to(codes.dtype), codes)
            st.count = st.count + flip_step(st.prev_code, st.prev_dir, st.freq, codes, m).sum()
            if self.freezing:
                if freeze_threshold > 0:
                    new = (st.freq > freeze_threshold) & ~st.frozen
                    st.frozen_code.copy_(torch.where(new, torch.round(st.ema_code).to(torch.int16),
                                                     st.frozen_code))
                    st.frozen |= new
                st.ema_code.mul_(1 - m).add_(codes.float(), alpha=m)
            if st.frozen is not None:  # the codes' own scale: no second quantization pass
                self._write_frozen(layer, st, _broadcast_scale(codes, scale))

    @torch.no_grad()
    def apply_frozen(self, names=None) -> None:
        """Write ``frozen_code * scale`` into the latent weight of every frozen element (clamped
        to the current code range), so the quantizer's forward and export emit that code."""
        for name in self.layers if names is None else names:
            st = self.state.get(name)
            if st is not None and st.frozen is not None:
                layer = self.layers[name]
                self._write_frozen(layer, st, weight_codes(layer)[1])

    @staticmethod
    def _write_frozen(layer: QuantizedLayer, st: LayerState, scale: torch.Tensor) -> None:
        lo, hi = layer.weight_quantizer.code_range
        value = st.frozen_code.float().clamp(lo, hi) * scale
        w = layer.weight
        w.copy_(torch.where(st.frozen, value.to(w.dtype), w))

    @torch.no_grad()
    def mask_gradients(self, names=None) -> None:
        """Zero the gradient of every frozen element (the optimizer then does not push it)."""
        for name in self.layers if names is None else names:
            st = self.state.get(name)
            grad = self.layers[name].weight.grad
            if st is not None and st.frozen is not None and grad is not None:
                grad.masked_fill_(st.frozen, 0)

    def stats(self, reset: bool = False) -> dict[str, dict[str, float]]:
        """Per layer: ``elements``, ``mean_freq`` (mean ``f``), ``oscillating`` (fraction with
        ``f > threshold``), ``boundary_distance`` (steps, frozen elements left out),
        ``oscillations`` (count since the last ``reset``), ``frozen`` (fraction frozen, 0
        without freezing). Layers not stepped yet are left out."""
        out = {}
        for name, st in self.state.items():
            frozen = st.frozen if st.frozen is not None else None
            out[name] = {
                "elements": st.freq.numel(), "mean_freq": float(st.freq.mean()),
                "oscillating": float((st.freq > self.threshold).float().mean()),
                "boundary_distance": boundary_distance(self.layers[name], frozen),
                "oscillations": int(st.count),
                "frozen": float(frozen.float().mean()) if frozen is not None else 0.0}
            if reset:
                st.count = 0
        return out

    def state_dict(self) -> dict[str, dict]:
        """The per-element state as CPU tensors (checkpointable with ``weights_only=True``)."""
        return {name: {k: getattr(st, k).cpu() for k in STATE_KEYS if getattr(st, k) is not None}
                | {"count": int(st.count), "bits": st.bits} for name, st in self.state.items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        """Restore :meth:`state_dict` (layers unknown to this model are ignored), then write the
        frozen elements' latent weights."""
        for name, entry in state.items():
            if name not in self.layers:
                continue
            device = self.layers[name].weight.device
            st = LayerState(**{k: v.to(device) for k, v in entry.items()
                               if k not in ("count", "bits")},
                            count=int(entry.get("count", 0)), bits=int(entry.get("bits", 0)))
            if self.freezing and st.frozen is None:
                st.ema_code = st.prev_code.float()
                st.frozen = torch.zeros_like(st.prev_code, dtype=torch.bool)
                st.frozen_code = torch.zeros_like(st.prev_code)
            self.state[name] = st
        self.apply_frozen()


__all__ = ["LayerState", "OscillationTracker", "add_dampening_gradient",
           "boundary_distance", "dampening_loss", "flip_step", "quantized_weights", "weight_codes"]
