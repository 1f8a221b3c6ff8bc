"""Export a quantized model: integer weights (``int``), QDQ ONNX (``onnx``), TorchScript
(``torchscript``) or ``torch.export`` (``exported_program``).

Every export is of the **eval** model with hard quantization, taken from a deep copy: the
user's model (modes, parameters) is never changed; a model in training mode gets a
``UserWarning``. Files are written atomically (:mod:`qtrainer.atomic`).

Depends on quantizers/nn/surgery only.
"""

from __future__ import annotations

import json
import os

from torch import nn

from ..quantizers import check_choice
from ._common import eval_copy, layer_table, quantized_layers
from .fold_bn import BIAS_MODES, find_conv_bn_pairs, fold_batchnorm
from .int_format import FORMAT_VERSION, load_int, pack_codes, read_header, unpack_codes

FORMATS = ("int", "onnx", "torchscript", "exported_program")


def export(model: nn.Module, path: str | os.PathLike, format: str = "int", *, example_input=None,
           fold_bn: bool | str = False, metadata: dict | None = None, opset: int = 17,
           dynamic_batch: bool = True) -> dict:
    """Export the quantized ``model`` to ``path``.

    Args:
        format: ``int`` (safetensors with integer codes, see :mod:`qtrainer.export.int_format`),
            ``onnx`` (QDQ, see :mod:`qtrainer.export.onnx_qdq`), ``torchscript`` or
            ``exported_program`` (fake-quantized eval graph, see :mod:`qtrainer.export.traced`).
        example_input: a batch (tensor or tuple of positional inputs) to trace with; required
            by every format except ``int``.
        fold_bn: fold eval-mode BatchNorm into the preceding conv/linear before exporting
            (weight codes kept, per-channel step adjusted; see :mod:`qtrainer.export.fold_bn`):
            ``True``/``"float"`` keeps the folded bias in float (closest to the unfolded model),
            ``"int"`` rounds it to the int32 accumulator grid ``s_in * s_w`` as integer
            runtimes store it (ONNX: int32 bias codes; costs accuracy at low bit-widths).
        metadata: JSON-serializable dict stored in the file's header (``recipe_hash`` is also
            copied to the top level).
        opset: ONNX opset, 13..20 (``onnx`` only).
        dynamic_batch: make dim 0 of inputs/outputs dynamic (``onnx``, ``exported_program``).

    Returns a report dict: ``format``, ``path``, ``file_bytes``, ``folded_bn`` (pairs), plus for
    ``int`` the size accounting (``fp32_bytes``, ``ratio``, ``ratio_excluding_bn_8bit``,
    ``excluded_share`` and ``categories``: bytes, FP32-equivalent bytes and share of the file
    per ``layers_<b>bit`` (codes + bias of quantized layers of b-bit weights), ``quant_params``,
    ``batchnorm``, ``fp_layers``, ``other``, ``header``), and for ``onnx`` the opset and QDQ
    node counts.
    """
    format = check_choice("format", format, FORMATS)
    if not quantized_layers(model):
        raise ValueError(f"model {type(model).__name__} has no quantized layer: run "
                         "qtrainer.quantize_model (and train/initialize it) before exporting")
    if format != "int" and example_input is None:
        raise ValueError(f"format={format!r} needs example_input (a batch to trace the model with)")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serializable (strings, numbers, lists, dicts): {e}") from None
    if fold_bn is True:
        fold_bn = "float"
    elif fold_bn is not False and fold_bn is not None:
        check_choice("fold_bn", fold_bn, BIAS_MODES)
    path = os.fspath(path)
    work = eval_copy(model)
    folded = fold_batchnorm(work, fold_bn) if fold_bn else []
    report = {"format": format, "path": path, "folded_bn": folded, "fold_bias": fold_bn or None}
    if format == "int":
        from .int_format import save_int

        report.update(save_int(work, path, metadata, folded))
        return report
    meta = dict(metadata or {})
    header = {"format": f"qtrainer-{format}", "version": FORMAT_VERSION,
              "recipe_hash": meta.get("recipe_hash"), "metadata": meta,
              "folded_bn": [list(p) for p in folded], "layers": layer_table(work)}
    if format == "onnx":
        from .onnx_qdq import export_onnx

        report.update(export_onnx(work, path, example_input, opset=opset,
                                  dynamic_batch=dynamic_batch, header=header))
    elif format == "torchscript":
        from .traced import export_torchscript

        report.update(export_torchscript(work, path, example_input, header=header))
    else:
        from .traced import export_program

        report.update(export_program(work, path, example_input, dynamic_batch=dynamic_batch,
                                     header=header))
    report["file_bytes"] = os.path.getsize(path)
    return report


__all__ = ["FORMATS", "export", "find_conv_bn_pairs", "fold_batchnorm", "load_int",
           "pack_codes", "read_header", "unpack_codes"]
