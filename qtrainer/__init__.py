"""qtrainer: quantization-aware training for PyTorch Lightning (LSQ, NIPQ, noise tempering).

    trainer = lightning.Trainer(callbacks=[qtrainer.QuantizationCallback(recipe="nipq-4bit")])
"""

from .callback import QuantizationCallback
from .nn import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear, named_quantizers
from .quantizers import LSQQuantizer, NIPQQuantizer, Quantizer, TemperingQuantizer, make_quantizer
from .recipes import Recipe, RecipeError, get_recipe, list_recipes, load_recipe, register_recipe
from .surgery import (LayerReport, fp_state_dict, initialize_quantizers, quantize_model,
                      set_quantizers)
from .trainer import QTrainer

__version__ = "0.1.0"

__all__ = [
    "LSQQuantizer", "LayerReport", "NIPQQuantizer", "QTrainer", "QuantConv1d", "QuantConv2d", "QuantLinear",
    "QuantizationCallback", "Quantizer", "QuantizedLayer", "Recipe", "RecipeError",
    "TemperingQuantizer", "__version__", "fp_state_dict", "get_recipe", "initialize_quantizers",
    "list_recipes", "load_recipe", "make_quantizer", "named_quantizers", "quantize_model",
    "register_recipe", "set_quantizers",
]
