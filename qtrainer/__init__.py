"""qtrainer: quantization-aware training for PyTorch Lightning (LSQ, NIPQ, noise tempering).

    trainer = lightning.Trainer(callbacks=[qtrainer.QuantizationCallback(recipe="nipq-4bit")])

Every name below is imported on first use: ``import qtrainer`` imports neither torch nor
Lightning (``qtrainer --help`` stays fast); the quantizers, layers, surgery, recipes and export
need only torch, :class:`QuantizationCallback` and :class:`QTrainer` also Lightning.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(("QuantConv1d", "QuantConv2d", "QuantizedLayer", "QuantLinear",
                     "named_quantizers"), ".nn"),
    **dict.fromkeys(("LSQQuantizer", "NIPQQuantizer", "Quantizer", "TemperingQuantizer",
                     "make_quantizer"), ".quantizers"),
    **dict.fromkeys(("Recipe", "RecipeError", "get_recipe", "list_recipes", "load_recipe",
                     "register_recipe"), ".recipes"),
    **dict.fromkeys(("LayerReport", "fp_state_dict", "initialize_quantizers",
                     "quantize_from_plan", "quantize_model", "set_quantizers"), ".surgery"),
    **dict.fromkeys(("load_quantized", "prepare"), ".quantized"),
    "QuantizationCallback": ".callback", "QuantizationFault": ".callback",
    "QTrainer": ".trainer",
}


def __getattr__(name: str):
    """Import a public name, or a submodule (``qtrainer.export``), on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
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
