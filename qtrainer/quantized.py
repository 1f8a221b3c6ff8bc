"""Quantized modules without Lightning: build one from a recipe, or load a QAT checkpoint as the
quantized module it was trained as.

    model, report = qtrainer.prepare(MyModule(), "nipq-4bit", example_input=x)  # surgery only
    model.load_state_dict(state)                                               # then its weights
    model = qtrainer.load_quantized(MyModule, "last.ckpt")                     # eval mode, as trained

A checkpoint written under ``QuantizationCallback`` holds ``checkpoint["qtrainer"]`` with the
resolved recipe (``recipe``), the layer plan (``plan``: one
:class:`~qtrainer.surgery.LayerReport` dict per quantized layer: name, kind, bits, signedness,
position, method and its arguments) and the example input's shapes (``input_spec``), so
:func:`load_quantized` rebuilds the quantized layers without an example input or data.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping

import torch
from torch import nn

from .checkpoint_files import read_checkpoint
from .recipes import Recipe, load_recipe
from .surgery import LayerReport, quantize_from_plan, quantize_model

QAT_ENTRY = "qtrainer"
"""Key of a checkpoint's qtrainer entry (recipe, layer plan, input shapes, digest)."""


def prepare(module: nn.Module, recipe: str | os.PathLike | Mapping | Recipe = "lsq-4bit",
            example_input=None, *, overrides: Mapping | None = None,
            example_kwargs: Mapping | None = None) -> tuple[nn.Module, list[LayerReport]]:
    """Quantize ``module`` in place as ``recipe`` says (surgery only: no training, no
    Lightning) and return it with its per-layer report.

    ``example_input`` is one input of ``forward`` (a tuple: positional arguments, a mapping:
    keyword arguments), used as :func:`~qtrainer.surgery.quantize_model` uses it: first/last
    layers, input signedness, sizes. Rebuilding a trained model this way reproduces it only if
    the example input shows the same signs; :func:`load_quantized` uses the saved plan instead.
    Initialize a freshly prepared model's quantizers with
    :func:`~qtrainer.surgery.initialize_quantizers` before training it by hand.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    r = recipe if isinstance(recipe, Recipe) and not overrides \
        else load_recipe(recipe, overrides=dict(overrides or {}))
    report = quantize_model(module, **r.surgery_kwargs(), example_input=example_input,
                            example_kwargs=dict(example_kwargs or {}))
    return module, report


def qat_entry(checkpoint, source: str) -> Mapping:
    """The qtrainer entry of a loaded checkpoint, with a ``plan`` to rebuild from; else
    ``ValueError`` naming ``source``."""
    entry = checkpoint.get(QAT_ENTRY) if isinstance(checkpoint, Mapping) else None
    if not isinstance(entry, Mapping):
        raise ValueError(f"{source} holds no '{QAT_ENTRY}' entry: it was not written under "
                         "QuantizationCallback (a full-precision checkpoint loads with the "
                         "module's own load_state_dict)")
    if not isinstance(entry.get("plan"), list):
        raise ValueError(f"{source}: its '{QAT_ENTRY}' entry has no layer plan (written by an "
                         "older qtrainer); rebuild the module with qtrainer.prepare and the "
                         "run's recipe, then load_state_dict")
    return entry


def quantize_as_saved(module: nn.Module, entry: Mapping, source: str = "the checkpoint"
                      ) -> list[LayerReport]:
    """Quantize ``module`` by the layer plan of a checkpoint's qtrainer ``entry``."""
    try:
        return quantize_from_plan(module, entry["plan"])
    except ValueError as e:
        raise ValueError(f"{source} does not fit {type(module).__name__}: {e}") from None


def plan_difference(plan: list, reports: list[LayerReport]) -> str | None:
    """How a saved layer plan differs from a model's reports in what decides the quantized
    layers (name, kind, bits, input signedness); None when it does not."""
    fields = ("name", "kind", "weight_bits", "act_bits", "signed_input")
    if len(plan) != len(reports):
        return f"the checkpoint has {len(plan)} quantized layers, this run {len(reports)}"
    for saved, now in zip(plan, [r.to_dict() for r in reports]):
        if any(saved.get(f) != now[f] for f in fields):
            return (f"the checkpoint's layer {saved.get('name')!r} was quantized as "
                    f"{[saved.get(f) for f in fields[1:]]}, this run's {now['name']!r} as "
                    f"{[now[f] for f in fields[1:]]} (kind, weight bits, input bits, signed "
                    "input)")
    return None


def _instantiate(cls: type, checkpoint: Mapping, args: tuple, kwargs: dict) -> nn.Module:
    """``cls(*args, **kwargs)``; without arguments, from the checkpoint's saved
    ``hyper_parameters`` (Lightning's ``save_hyperparameters``) where the signature takes them."""
    if not args and not kwargs and isinstance(checkpoint.get("hyper_parameters"), Mapping):
        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in checkpoint["hyper_parameters"].items()
                  if takes_any or k in params}
    module = cls(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{cls.__name__}(...) is not a torch.nn.Module")
    return module


def load_quantized(module_or_class: nn.Module | type, checkpoint_path: str | os.PathLike,
                   *init_args, strict: bool = True, **init_kwargs) -> nn.Module:
    """The module a QAT checkpoint was trained as, quantized and in eval mode: its outputs are
    bit-identical to the trained module's eval outputs.

    Args:
        module_or_class: a fresh full-precision instance of the trained module's class, or the
            class itself (built as ``cls(*init_args, **init_kwargs)``; without arguments, from
            the checkpoint's saved hyperparameters).
        checkpoint_path: a checkpoint written under ``QuantizationCallback`` (``trainer.fit``'s
            ``ModelCheckpoint`` files, ``trainer.save_checkpoint``, ``qtrainer run``'s). Read with
            ``weights_only=True`` and checked against the digest qtrainer wrote with it.
        strict: every weight and quantizer entry must match (``load_state_dict(strict=...)``).

    Raises ``FileNotFoundError``; ``ValueError`` naming the file for a damaged checkpoint, one
    without a qtrainer entry, or a module whose layers or state do not match it.
    """
    path = os.fspath(checkpoint_path)
    checkpoint = read_checkpoint(path)
    entry = qat_entry(checkpoint, path)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping) or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    if isinstance(module_or_class, type):
        module = _instantiate(module_or_class, checkpoint, init_args, init_kwargs)
    elif isinstance(module_or_class, nn.Module):
        if init_args or init_kwargs:
            raise TypeError("init arguments are for a class; module_or_class is an instance")
        module = module_or_class
    else:
        raise TypeError(f"module_or_class must be a torch.nn.Module or its class, got "
                        f"{type(module_or_class).__name__}")
    quantize_as_saved(module, entry, path)
    missing, unexpected = module.load_state_dict(dict(state), strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"{path} does not match {type(module).__name__}: missing "
                         f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return module.eval()


def input_spec(example) -> dict | None:
    """The shapes and dtypes of an example input (a tensor, a tuple of positional arguments or
    a mapping of keyword arguments; plain numbers and strings kept as values), JSON-able; None
    for anything else."""
    def one(x):
        if isinstance(x, torch.Tensor):
            return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise TypeError

    try:
        if isinstance(example, Mapping):
            return {"args": [], "kwargs": {str(k): one(v) for k, v in example.items()}}
        items = example if isinstance(example, (tuple, list)) else [example]
        return {"args": [one(x) for x in items], "kwargs": {}, "single": not isinstance(
            example, (tuple, list))}
    except TypeError:
        return None


def example_from_spec(spec: Mapping, batch: int = 1):
    """An input shaped as ``spec`` says with ``batch`` examples (floats from a seeded normal,
    integers and booleans zero), in the call convention it was saved in."""
    g = torch.Generator().manual_seed(0)

    def one(s):
        if "value" in s:
            return s["value"]
        dtype = getattr(torch, s["dtype"])
        shape = [batch, *s["shape"][1:]] if s["shape"] else []
        if dtype.is_floating_point:
            return torch.randn(shape, generator=g).to(dtype)
        return torch.zeros(shape, dtype=dtype)

    if spec.get("kwargs"):
        return {k: one(s) for k, s in spec["kwargs"].items()}
    args = [one(s) for s in spec["args"]]
    return args[0] if spec.get("single") else tuple(args)


__all__ = ["QAT_ENTRY", "example_from_spec", "input_spec", "load_quantized", "plan_difference",
           "prepare", "qat_entry", "quantize_as_saved"]
