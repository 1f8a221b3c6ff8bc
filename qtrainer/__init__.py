"""qtrainer: quantization-aware training for PyTorch Lightning (LSQ, NIPQ, noise tempering).

    trainer = lightning.Trainer(callbacks=[qtrainer.QuantizationCallback(recipe="nipq-4bit")])

The quantizers, layers, surgery, recipes and export need only torch; the Lightning parts
(:class:`QuantizationCallback`, :class:`QTrainer`) are imported on first use, so
``import qtrainer`` and ``import qtrainer.quantizers`` do not import Lightning.
"""

from __future__ import annotations

import importlib

from .nn import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear, named_quantizers
from .quantizers import LSQQuantizer, NIPQQuantizer, Quantizer, TemperingQuantizer, make_quantizer
from .recipes import Recipe, RecipeError, get_recipe, list_recipes, load_recipe, register_recipe
from .quantized import load_quantized, prepare
from .surgery import (LayerReport, fp_state_dict, initialize_quantizers, quantize_from_plan,
                      quantize_model, set_quantizers)

__version__ = "0.1.0"

_LAZY = {"QuantizationCallback": ".callback", "QuantizationFault": ".callback",
         "QTrainer": ".trainer"}


def __getattr__(name: str):
    """Import the Lightning-dependent names on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qtrainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "LSQQuantizer", "LayerReport", "NIPQQuantizer", "QTrainer", "QuantConv1d", "QuantConv2d", "QuantLinear",
    "QuantizationCallback", "QuantizationFault", "Quantizer", "QuantizedLayer", "Recipe", "RecipeError",
    "TemperingQuantizer", "__version__", "fp_state_dict", "get_recipe", "initialize_quantizers",
    "list_recipes", "load_quantized", "load_recipe", "make_quantizer", "named_quantizers",
    "prepare", "quantize_from_plan", "quantize_model", "register_recipe", "set_quantizers",
]
