"""Quantized conv/linear layers: the FP layer plus a weight quantizer and an input quantizer.

Each class subclasses its torch layer and keeps its parameter names (``weight``, ``bias``), so a
full-precision state dict loads into the quantized model (quantizer entries are extra and stay
as they are) and the quantized model's ``weight``/``bias`` load back into the FP model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import recompute as _recompute
from .quantizers import Quantizer


class QuantizedLayer:
    """Mixin: ``input_quantizer`` and ``weight_quantizer`` (either may be None: left FP).

    Surgery also records, per example (batch 1): ``act_numel`` (elements of the input) and
    ``macs`` (multiply-accumulates) as plain attributes used for size and BOPs accounting.
    """

    FLOAT_TYPES: tuple[type[nn.Module], ...] = ()
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
        new.weight_quantizer = weight_quantizer
        new.input_quantizer = input_quantizer
        return new

    def to_float(self) -> nn.Module:
        """The plain FP layer sharing this layer's parameters (quantizers dropped)."""
        fp = self.FLOAT_TYPES[0].__new__(self.FLOAT_TYPES[0])
        fp.__dict__.update(self.__dict__)
        modules = dict(self._modules)
        modules.pop("weight_quantizer", None)
        modules.pop("input_quantizer", None)
        fp.__dict__["_modules"] = modules
        return fp

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
    FLOAT_TYPES = (nn.Linear,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.recompute is False else _recompute.forward(self, x)
        if y is not None:
            return y
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


QUANTIZED_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear,
}


def named_quantizers(model: nn.Module):
    """Yield ``(qualified_name, quantizer)`` for every quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module
