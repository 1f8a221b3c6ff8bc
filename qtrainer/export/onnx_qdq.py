"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) around every quantized weight and input.

Emitted with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``), which
in torch 2.14 supports opsets up to 20; default opset 17, any of 13..20 works. Custom
``torch.autograd.Function`` s with a ``symbolic`` method produce the QDQ nodes; the rest of the
graph is what torch exports.

- Weights: the integer codes are an initializer (``int8`` for signed ranges up to 8 bits,
  ``uint8`` unsigned, ``int32`` above 8 bits) feeding ``DequantizeLinear`` with the fp32 step
  (per tensor, or per output channel with ``axis=0``), zero point 0. ``codes * scale`` is the
  exact quantized weight. Sub-8-bit codes are stored one per byte (opset 13..20 has no int4).
  Group-wise steps (:func:`_group_rows`): opset 21's blocked ``DequantizeLinear``
  (``block_size``) is beyond this exporter, so the codes are stored as ``[groups,
  group_size]`` and dequantized per axis 0 (one scale per group, exact), then ``Reshape``-d to
  the weight's shape.
- Inputs (activations) up to 8 bits: ``Clip(x, lo*s, hi*s) -> QuantizeLinear(s, zp=0) ->
  DequantizeLinear(s, zp=0)`` with ``int8`` (signed) or ``uint8`` (unsigned). The clip in the
  float domain restricts sub-8-bit ranges (e.g. 4-bit signed ``[-8, 7]``) to the code range;
  it is left out where the code range is the whole int8/uint8 range. Clipping in the integer
  domain (Clip on int8) is not supported by every runtime, and opset 21's int4 types are
  beyond this exporter, so this is the form onnxruntime CPU runs everywhere.
- Inputs above 8 bits (no int16 QuantizeLinear before opset 21): the quantizer's own math as
  float ops (``Div, Clip, Round, Mul``), exact.
- Biases of layers with quantized input and weight: an ``int32`` initializer through
  ``DequantizeLinear(scale = s_in * s_w, axis=0)`` into the Conv/Gemm when the bias lies on
  that accumulator grid (``fold_bn="int"``), otherwise a float ``Add`` after the layer.
  onnxruntime (>= 1.20, ``WeightBiasQuantization``, on by default) rounds a float Conv bias fed
  by DequantizeLinear inputs to ``s_in * s_w`` by itself, which moves outputs by up to half an
  accumulator step and flips activation codes downstream; the separate ``Add`` keeps
  onnxruntime's result equal to PyTorch's.

Numerics: QuantizeLinear computes ``round_half_even(x / s)``, as LSQ does (``x / s``, not
``x * (1/s)``; checked against onnxruntime CPU). NIPQ computes ``round(n * clamp(x/alpha))`` and
its step is ``alpha / n``, so the ONNX codes may differ from PyTorch's on values within float
rounding of a rounding boundary (measured parity in tests/test_export.py).
"""

from __future__ import annotations

import json
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from ._common import EvalQuant, active, as_args, int_weight, quantized_layers

DEFAULT_OPSET = 17
OPSETS = range(13, 21)


def _int_type(lo: int, hi: int) -> torch.dtype:
    for dtype in (torch.int8, torch.uint8, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    raise ValueError(f"code range {lo}..{hi} does not fit int32")  # pragma: no cover


def _zero(g, dtype: torch.dtype, channels: int | None):
    value = torch.zeros((channels,) if channels else (), dtype=dtype)
    return g.op("Constant", value_t=value)


class DequantizeFunction(torch.autograd.Function):
    """``codes * scale`` (weights); ONNX: ``DequantizeLinear(codes, scale, 0[, axis=0])``."""

    @staticmethod
    def forward(ctx, codes, scale, per_channel: bool):
        s = scale.view(-1, *([1] * (codes.dim() - 1))) if per_channel else scale
        return codes.float() * s

    @staticmethod
    def symbolic(g, codes, scale, per_channel: bool):
        dtype = codes.type().dtype()
        if per_channel:
            channels = codes.type().sizes()[0]
            return g.op("DequantizeLinear", codes, scale, _zero(g, dtype, channels), axis_i=0)
        return g.op("DequantizeLinear", codes, scale, _zero(g, dtype, None))


class QDQFunction(torch.autograd.Function):
    """Fake quantization as ONNX computes it: ``clamp(round(clip(x, clo, chi) / s), qmin, qmax) * s``;
    ONNX: optional ``Clip`` then ``QuantizeLinear``/``DequantizeLinear`` (int8 or uint8)."""

    @staticmethod
    def forward(ctx, x, scale, signed: bool, clip: bool, clip_lo: float, clip_hi: float):
        info = torch.iinfo(torch.int8 if signed else torch.uint8)
        xf = x.float()
        if clip:
            xf = torch.clamp(xf, clip_lo, clip_hi)
        q = torch.clamp(torch.round(xf / scale), info.min, info.max)
        return (q * scale).to(x.dtype)

    @staticmethod
    def symbolic(g, x, scale, signed: bool, clip: bool, clip_lo: float, clip_hi: float):
        if clip:
            lo = g.op("Constant", value_t=torch.tensor(clip_lo, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip_hi, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        zp = _zero(g, torch.int8 if signed else torch.uint8, None)
        q = g.op("QuantizeLinear", x, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp)


def _group_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight codes as the rows the scales run along: unchanged for one scale or one per
    output channel, ``[groups, group_size]`` for group-wise scales (the per-channel form of a
    blocked dequantization, for opsets without ``block_size``)."""
    if scale.numel() in (1, codes.shape[0]):
        return codes
    return codes.reshape(scale.numel(), -1)


class WeightDQ(nn.Module):
    """Replaces a weight quantizer: ignores the FP weight, returns ``codes * scale`` (group-wise
    scales: per-axis DQ of the ``[groups, group_size]`` codes, reshaped to the weight)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, lo: int, hi: int):
        super().__init__()
        self.shape = tuple(codes.shape)
        rows = _group_rows(codes, scale)
        self.register_buffer("codes", rows.to(torch.int64).to(_int_type(lo, hi)))
        self.per_channel = scale.numel() > 1
        self.register_buffer("scale", scale.float().reshape(-1) if self.per_channel else scale.float().reshape(()))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w_q = DequantizeFunction.apply(self.codes, self.scale, self.per_channel)
        return (w_q if w_q.shape == self.shape else w_q.reshape(self.shape)).to(w.dtype)


class ActQDQ(nn.Module):
    """Replaces an activation quantizer of at most 8 bits by a Clip/QuantizeLinear/DequantizeLinear."""

    def __init__(self, scale: torch.Tensor, lo: int, hi: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.signed = lo < 0
        info = torch.iinfo(torch.int8 if self.signed else torch.uint8)
        self.clip = (lo, hi) != (info.min, info.max)
        s = float(self.scale)
        self.clip_lo, self.clip_hi = float(torch.tensor(lo * s, dtype=torch.float32)), \
            float(torch.tensor(hi * s, dtype=torch.float32))
        if self.clip_lo > self.clip_hi:  # pragma: no cover - a negative step size
            raise ValueError("activation step size must be positive for ONNX export")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QDQFunction.apply(x, self.scale, self.signed, self.clip, self.clip_lo, self.clip_hi)


def _bias_on_grid(layer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(k int32, grid)`` when the layer's bias is exactly ``k * (s_in * s_w)`` in fp32 (e.g.
    after ``fold_bn="int"``), else None."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    s_in = iq.step_size.detach().float().reshape(-1)
    if s_in.numel() != 1:
        return None
    bias = layer.bias.detach().float()
    s_w = wq.step_size.detach().float().reshape(-1)
    if s_w.numel() not in (1, bias.shape[0]):  # group-wise steps: no per-channel grid
        return None
    grid = (s_in * s_w).expand(bias.shape[0]).contiguous()
    k = torch.round(bias.double() / grid.double())
    if not torch.isfinite(k).all() or k.abs().max() >= 2**24 or not torch.equal(k.float() * grid, bias):
        return None
    return k.to(torch.int32), grid


class BiasDQ(nn.Module):
    """An int32 bias on the accumulator grid: ``DequantizeLinear(k, s_in * s_w, axis=0)``."""

    def __init__(self, k: torch.Tensor, grid: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", k)
        self.register_buffer("scale", grid)

    def forward(self) -> torch.Tensor:
        return DequantizeFunction.apply(self.codes, self.scale, True)


def _qdq_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Forward of a QDQ layer whose bias is an int32 DequantizeLinear (``bias_dq``) or a float
    ``Add`` after the conv/matmul (``bias_add``)."""
    xq, w = self.quantized_input(x), self.quantized_weight()
    b = self.bias_dq() if self.bias_dq is not None else None
    y = F.linear(xq, w, b) if isinstance(self, nn.Linear) else self._conv_forward(xq, w, b)
    if self.bias_add is not None:
        add = self.bias_add if isinstance(self, nn.Linear) else self.bias_add.view(-1, *([1] * (y.dim() - 2)))
        y = y + add
    return y


def _act_qdq(iq, counts: dict) -> nn.Module | None:
    """The ONNX form of an activation quantizer: QDQ up to 8 bits, float ops above, None when
    there is none (or it is disabled)."""
    if not active(iq):
        return None
    lo, hi = iq.code_range
    if hi - lo < 256 and (lo >= 0 and hi <= 255 or lo >= -128 and hi <= 127):
        counts["act_qdq"] += 1
        return ActQDQ(iq.step_size.detach().reshape(-1)[:1], lo, hi)
    counts["act_float"] += 1
    return EvalQuant(iq)


def qdq_model(model: nn.Module) -> tuple[nn.Module, dict]:
    """In place on an eval copy: quantizers replaced by QDQ modules. Returns (model, counts).

    The bias of a layer with quantized input and weight is emitted as an int32
    ``DequantizeLinear`` when it lies on the accumulator grid ``s_in * s_w`` (``fold_bn="int"``),
    else as a float ``Add`` after the layer: onnxruntime rounds a float Conv bias fed by QDQ
    inputs to that grid itself (its ``WeightBiasQuantization`` transformer), which would move
    the outputs away from PyTorch's.
    """
    counts = {"weight_dq": 0, "act_qdq": 0, "act_float": 0, "bias_int32": 0, "bias_add": 0}
    with torch.no_grad():
        for name, layer in quantized_layers(model):
            wq, iq = layer.weight_quantizer, layer.input_quantizer
            bias_dq = bias_add = None
            if isinstance(layer, nn.MultiheadAttention) and not layer._qkv_same_embed_dim:
                raise ValueError(f"layer {name!r}: ONNX QDQ export needs the packed "
                                 "in_proj_weight; nn.MultiheadAttention with separate q/k/v "
                                 "weights (kdim/vdim) exports as torchscript or exported_program")
            if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and active(wq) and \
                    active(iq) and layer.bias is not None:
                on_grid = _bias_on_grid(layer)
                if on_grid is not None:
                    bias_dq = BiasDQ(*on_grid)
                    counts["bias_int32"] += 1
                else:
                    bias_add = layer.bias.detach().clone()
                    counts["bias_add"] += 1
            if active(wq):
                codes, scale = int_weight(layer)
                lo, hi = wq.code_range
                layer.weight_quantizer = WeightDQ(codes, scale, lo, hi)
                counts["weight_dq"] += 1
            else:
                layer.weight_quantizer = None
            layer.input_quantizer = _act_qdq(iq, counts)
            if getattr(layer, "matmul_quantizers", None) is not None:
                layer.matmul_quantizers = nn.ModuleDict(
                    {k: _act_qdq(q, counts) or nn.Identity()
                     for k, q in layer.matmul_quantizers.items()})
            if bias_dq is not None or bias_add is not None:
                layer.bias = None
                layer.bias_dq = bias_dq
                layer.register_buffer("bias_add", bias_add)
                layer.forward = types.MethodType(_qdq_forward, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, counts


def export_onnx(model: nn.Module, path, example_input, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, header: dict | None = None) -> dict:
    """Write the QDQ ONNX model of an eval copy ``model`` (modified) to ``path`` atomically."""
    import onnx

    if opset not in OPSETS:
        raise ValueError(f"opset={opset!r} is not allowed; allowed: {OPSETS.start}..{OPSETS.stop - 1} "
                         "(the TorchScript-based exporter's range; QDQ needs 13+)")
    model, counts = qdq_model(model)
    args = as_args(example_input)
    with torch.no_grad():
        out = model(*args)
    input_names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    output_names = ["output"] if isinstance(out, torch.Tensor) else None
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in input_names + (output_names or [])}
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*Constant folding.*")
            torch.onnx.export(model, args, tmp, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        proto = onnx.load(tmp)
        if header is not None:
            entry = proto.metadata_props.add()
            entry.key, entry.value = "qtrainer", json.dumps(header, sort_keys=True)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
    ops = [n.op_type for n in proto.graph.node]
    return {"opset": opset, "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear"), **counts}
