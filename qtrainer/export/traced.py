"""TorchScript and ``torch.export`` (ExportedProgram) exports of the fake-quantized eval model.

The graph holds the quantized weights (``codes * scale``) as constants and each input quantizer's
eval math as plain tensor ops (:class:`~qtrainer.export._common.EvalQuant`), so its outputs are
bit-identical to the quantized model in eval mode. The JSON header (layer table, metadata) is
stored as the extra file ``qtrainer.json``.
"""

from __future__ import annotations

import json
import warnings

import torch
from torch import nn

from ..atomic import atomic_path
from ._common import as_args, bake_fake_quant

EXTRA_FILE = "qtrainer.json"


def export_torchscript(model: nn.Module, path, example_input, *, header: dict | None = None) -> dict:
    """``torch.jit.trace`` of the baked eval copy ``model`` (modified), saved atomically."""
    model = bake_fake_quant(model)
    args = as_args(example_input)
    extra = {EXTRA_FILE: json.dumps(header or {}, sort_keys=True)}
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export; the user asked for it explicitly
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, args, check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, tmp, _extra_files=extra)
    return {}


def export_program(model: nn.Module, path, example_input, *, dynamic_batch: bool = True,
                   header: dict | None = None) -> dict:
    """``torch.export.export`` of the baked eval copy ``model`` (modified), saved atomically
    with ``torch.export.save``; ``dynamic_batch`` makes dim 0 of every input dynamic."""
    model = bake_fake_quant(model)
    args = as_args(example_input)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    try:
        program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds
        if not dynamic_batch:
            raise
        raise ValueError(f"torch.export failed with a dynamic batch dimension ({type(e).__name__}: "
                         f"{str(e)[:300]}); try dynamic_batch=False") from None
    extra = {EXTRA_FILE: json.dumps(header or {}, sort_keys=True)}
    with atomic_path(path) as tmp:
        torch.export.save(program, tmp, extra_files=extra)
    return {"dynamic_batch": dynamic_batch}
