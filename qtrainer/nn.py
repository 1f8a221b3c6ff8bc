"""Quantized layers: the FP layer plus a weight quantizer and an input quantizer.

Conv1d/Conv2d/Linear (``nn.MultiheadAttention``'s ``out_proj`` included), ``nn.Embedding``
(weights only: its inputs are indices) and ``nn.MultiheadAttention`` (its input projection:
the packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim`` differ from
``embed_dim``, and its query/key/value inputs; the output projection is a quantized
``out_proj``). Each class subclasses its torch layer and keeps its parameter names (``weight``,
``bias``, ``in_proj_weight``...), so a full-precision state dict loads into the quantized model
(quantizer entries are extra and stay as they are) and the quantized model's parameters load
back into the FP model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import recompute as _recompute
from .nn_attention import MATMUL_SITES, attend, merge_heads, merged_mask, split_heads
from .quantizers import Quantizer


class QuantizedLayer:
    """Mixin: ``input_quantizer`` and ``weight_quantizer`` (either may be None: left FP).

    Surgery also records, per example (batch 1): ``act_numel`` (elements of the input) and
    ``macs`` (multiply-accumulates) as plain attributes used for size and BOPs accounting.
    """

    FLOAT_TYPES: tuple[type[nn.Module], ...] = ()
    WEIGHT_NAME = "weight"  # the parameter the weight quantizer acts on (state-dict name)
    BIAS_NAME = "bias"  # the bias added to that weight's product (state-dict name)
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    act_numel: int = 0
    macs: int = 0
    # Backward recomputes the quantized input and weight instead of keeping them alive (see
    # qtrainer/recompute.py): None = auto (on wherever the fused ops are enabled: every device
    # unless QTRAINER_FUSED=off), True = always, False = never. Same outputs and gradients.
    recompute: bool | None = None

    @classmethod
    def from_float(cls, module: nn.Module, weight_quantizer: Quantizer | None,
                   input_quantizer: Quantizer | None):
        """A quantized layer sharing ``module``'s parameters, buffers and settings."""
        if type(module) not in cls.FLOAT_TYPES:
            raise TypeError(f"{cls.__name__}.from_float expects {cls.FLOAT_TYPES}, got {type(module)}")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for attr in ("_parameters", "_buffers", "_modules"):
            new.__dict__[attr] = dict(module.__dict__[attr])
        new.__dict__["_float_type"] = type(module)
        new.weight_quantizer = weight_quantizer
        new.input_quantizer = input_quantizer
        return new

    def to_float(self) -> nn.Module:
        """The plain FP layer sharing this layer's parameters (quantizers dropped)."""
        cls = self.__dict__.get("_float_type", self.FLOAT_TYPES[0])
        fp = cls.__new__(cls)
        fp.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_float_type"})
        modules = dict(self._modules)
        for name in ("weight_quantizer", "input_quantizer", "matmul_quantizers"):
            modules.pop(name, None)
        fp.__dict__["_modules"] = modules
        return fp

    @property
    def float_kind(self) -> str:
        """The class name of the float layer this one replaced (``NonDynamicallyQuantizableLinear``
        for an attention layer's ``out_proj``)."""
        return self.__dict__.get("_float_type", self.FLOAT_TYPES[0]).__name__

    def weight_parameters(self) -> list[nn.Parameter]:
        """The parameters the weight quantizer acts on (optimizer groups, weight decay)."""
        return [getattr(self, self.WEIGHT_NAME)]

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    FLOAT_TYPES = (nn.Conv1d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.recompute is False else _recompute.forward(self, x)
        if y is not None:
            return y
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """Quantized ``nn.Conv2d`` (grouped and depthwise included)."""

    FLOAT_TYPES = (nn.Conv2d,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.recompute is False else _recompute.forward(self, x)
        if y is not None:
            return y
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantizedLayer, nn.Linear):
    """Quantized ``nn.Linear``, also in place of ``nn.MultiheadAttention``'s ``out_proj`` (a
    ``NonDynamicallyQuantizableLinear``, a subclass of ``nn.Linear``)."""

    FLOAT_TYPES = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.recompute is False else _recompute.forward(self, x)
        if y is not None:
            return y
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(QuantizedLayer, nn.Embedding):
    """Quantized ``nn.Embedding``: the table's weights only (``input_quantizer`` stays None, the
    inputs are indices). Per-row steps are the quantizer's per-channel option (dim 0)."""

    FLOAT_TYPES = (nn.Embedding,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.quantized_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


class QuantMultiheadAttention(QuantizedLayer, nn.MultiheadAttention):
    """Quantized ``nn.MultiheadAttention``: this layer's quantizers act on the input projection
    (``weight_quantizer`` on ``in_proj_weight``, ``(3E, E)``; with separate
    ``q/k/v_proj_weight`` one per-tensor step serves all three, as it does for the packed
    matrix) and on its inputs (``input_quantizer``: query, key and value, quantized once when
    they are the same tensor); ``out_proj`` is a :class:`QuantLinear` of its own. Optional
    ``matmul_quantizers`` (a ``ModuleDict`` over ``q``, ``k``, ``probs``, ``v``) quantize the
    attention matmul inputs. The forward takes ``nn.MultiheadAttention``'s arguments (masks,
    ``is_causal``, ``need_weights``, ``average_attn_weights``, ``batch_first``, unbatched
    inputs) and never takes torch's fused path, which would compute with the float weights.
    ``add_bias_kv``/``add_zero_attn`` are not supported (surgery refuses them).
    """

    FLOAT_TYPES = (nn.MultiheadAttention,)
    WEIGHT_NAME, BIAS_NAME = "in_proj_weight", "in_proj_bias"
    matmul_quantizers: nn.ModuleDict | None

    @classmethod
    def from_float(cls, module, weight_quantizer, input_quantizer, matmul_quantizers=None):
        new = super().from_float(module, weight_quantizer, input_quantizer)
        new.matmul_quantizers = None if matmul_quantizers is None else nn.ModuleDict(
            {site: matmul_quantizers[site] for site in MATMUL_SITES})
        return new

    @property
    def weight(self) -> torch.Tensor:
        """The input projection's weights: ``in_proj_weight`` ``(3E, E)``, or the separate
        q/k/v weights flattened and concatenated (1-D)."""
        return attention_weight(self)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.in_proj_bias

    def weight_parameters(self) -> list[nn.Parameter]:
        if self._qkv_same_embed_dim:
            return [self.in_proj_weight]
        return [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]

    def _projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wq = self.weight_quantizer
        if self._qkv_same_embed_dim:
            return self.quantized_weight().chunk(3, dim=0)
        ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return tuple(w if wq is None else wq(w) for w in ws)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        q_in = self.quantized_input(query)
        k_in = q_in if key is query else self.quantized_input(key)
        v_in = k_in if value is key else self.quantized_input(value)
        if not batched or self.batch_first:  # to (T, N, E)
            q_in, k_in, v_in = (t.unsqueeze(1) if not batched else t.transpose(0, 1)
                                for t in (q_in, k_in, v_in))
        w_q, w_k, w_v = self._projection_weights()
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
        lq, n, _ = q.shape
        h = self.num_heads
        mask = merged_mask(attn_mask, key_padding_mask, is_causal, n, h, lq, k.shape[0],
                           q.dtype, q.device)
        out, weights = attend(split_heads(q, h), split_heads(k, h), split_heads(v, h), mask,
                              self.dropout if self.training else 0.0, need_weights,
                              self.matmul_quantizers)
        out = self.out_proj(merge_heads(out))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if not batched else weights
        return out, weights


def attention_weight(module: nn.MultiheadAttention) -> torch.Tensor:
    """An attention module's input-projection weights: ``in_proj_weight`` or the separate
    ``q/k/v_proj_weight`` flattened and concatenated."""
    if module._qkv_same_embed_dim:
        return module.in_proj_weight
    return torch.cat([w.reshape(-1) for w in (module.q_proj_weight, module.k_proj_weight,
                                                module.v_proj_weight)])


def quantizable_weight(module: nn.Module) -> torch.Tensor:
    """The weight that a quantizable (FP or quantized) layer's weight quantizer acts on."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_weight(module)
    return module.weight


QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
    nn.modules.linear.NonDynamicallyQuantizableLinear: QuantLinear,
    nn.Embedding: QuantEmbedding, nn.MultiheadAttention: QuantMultiheadAttention,
}


def named_quantizers(model: nn.Module):
    """Yield ``(qualified_name, quantizer)`` for every quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module
