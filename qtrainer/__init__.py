"""qtrainer: quantization-aware training for PyTorch Lightning (LSQ, NIPQ, noise tempering)."""

from .nn import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear, quantizers
from .quantizers import LSQQuantizer, NIPQQuantizer, Quantizer, TemperingQuantizer, make_quantizer
from .surgery import (LayerReport, fp_state_dict, initialize_quantizers, quantize_model,
                      set_quantizers)

__version__ = "0.1.0"

__all__ = [
    "LSQQuantizer", "LayerReport", "NIPQQuantizer", "QuantConv1d", "QuantConv2d", "QuantLinear",
    "Quantizer", "QuantizedLayer", "TemperingQuantizer", "__version__", "fp_state_dict",
    "initialize_quantizers", "make_quantizer", "quantize_model", "quantizers", "set_quantizers",
]
