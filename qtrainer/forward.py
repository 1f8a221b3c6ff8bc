"""Running a model's forward for surgery and quantizer initialization.

- :func:`call_args`: the forward's arguments from one input, by Lightning's
  ``example_input_array`` convention: a tuple or list is the positional arguments, a mapping
  the keyword arguments, anything else (a tensor) the one argument.
- :func:`run_forward`: one forward call with torch's fused Transformer fast paths off (they
  compute ``nn.TransformerEncoderLayer`` with the float weights, skipping the submodules' own
  ``forward``, so hooks and quantizers never see those layers), and a failure raised as
  :class:`ForwardError` naming the innermost module that was running and the shapes it got.
- :func:`disable_transformer_fast_paths`: turn those fast paths off for good in the encoder
  layers that hold quantized layers (the quantized model must run its quantized layers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from .nn import QuantizedLayer


class ForwardError(RuntimeError):
    """The model's forward failed while qtrainer ran it (tracing, initialization, BatchNorm
    re-estimation). The message names the module that was running, the shapes it got and the
    shapes the model was called with; the original error is the ``__cause__``."""


def call_args(inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the forward call for one input: a tuple/list -> positional
    arguments, a mapping -> keyword arguments, anything else -> the single argument."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (inputs,), {}


def describe(value, depth: int = 0) -> str:
    """Shapes and dtypes of a (nested) input, e.g. ``(float32[8, 3, 32, 32], int64[8])``."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"{dtype}[{', '.join(map(str, value.shape))}]"
    if depth > 3:
        return "..."
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in list(value)[:8])
        more = ", ..." if len(value) > 8 else ""
        return f"({inner}{more})" if isinstance(value, tuple) else f"[{inner}{more}]"
    if isinstance(value, Mapping):
        items = list(value.items())[:8]
        return "{" + ", ".join(f"{k!s}: {describe(v, depth + 1)}" for k, v in items) + "}"
    return type(value).__name__


def describe_call(args: tuple, kwargs: dict) -> str:
    parts = [describe(a) for a in args] + [f"{k}={describe(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


@contextlib.contextmanager
def transformer_fast_paths_off():
    """Turn off ``torch.backends.mha``'s fast path (fused ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` kernels, nested tensors) for the duration; restored after."""
    mha = torch.backends.mha
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


def run_forward(model: nn.Module, args: tuple, kwargs: dict, what: str = "forward"):
    """``model(*args, **kwargs)`` with the Transformer fast paths off; on failure a
    :class:`ForwardError` naming the innermost running module and its input shapes."""
    names = {id(m): n for n, m in model.named_modules()}
    running: list[tuple[str, nn.Module, tuple]] = []

    def enter(module, inputs):
        running.append((names.get(id(module), "?"), module, inputs))

    def leave(module, inputs, output):
        if running:
            running.pop()

    handles = [h for m in model.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with transformer_fast_paths_off():
            return model(*args, **kwargs)
    except ForwardError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with where it happened
        if running:
            name, module, inputs = running[-1]
            where = (f"in module '{name}' ({type(module).__name__})" if name
                     else f"in {type(module).__name__}.forward itself")
            got = f", which got {describe_call(tuple(inputs), {})}" if name else ""
        else:
            where, got = "before any module ran", ""
        raise ForwardError(
            f"the {what} of {type(model).__name__} failed {where}{got}: {type(err).__name__}: "
            f"{err} (the model was called with {describe_call(args, kwargs)})") from err
    finally:
        for h in handles:
            h.remove()


def disable_transformer_fast_paths(model: nn.Module) -> list[str]:
    """Turn off the fused fast path of every ``nn.TransformerEncoderLayer`` that holds a
    quantized layer (``activation_relu_or_gelu = 0``; it computes with the float weights and
    skips ``linear1``/``linear2``'s own forward) and the nested-tensor path of every
    ``nn.TransformerEncoder`` around one (``use_nested_tensor = False``). Returns the names of
    the modules changed."""
    changed = []
    for name, m in model.named_modules():
        holds = any(isinstance(c, QuantizedLayer) for c in m.modules())
        if not holds:
            continue
        if isinstance(m, nn.TransformerEncoderLayer) and m.activation_relu_or_gelu:
            m.activation_relu_or_gelu = 0
            changed.append(name)
        elif isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
            changed.append(name)
    return changed


__all__ = ["ForwardError", "call_args", "describe", "describe_call",
           "disable_transformer_fast_paths", "run_forward", "transformer_fast_paths_off"]
