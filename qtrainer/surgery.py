"""Model surgery: turn a model's conv/linear layers into quantized ones by rules.

``quantize_model`` validates every rule and builds every quantizer before it touches the model,
so bad input raises ``ValueError`` and leaves the model as it was. The first and last layers are
the quantizable layers that run first and last on an example input (traced with hooks, not
module order); input signedness is detected from the same trace (a negative value seen means a
signed site) unless set per layer.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .nn import QUANTIZED_TYPES, QuantizedLayer, named_quantizers
from .quantizers import METHODS, Quantizer, check_bits, check_choice, make_quantizer

OVERRIDE_KEYS = ("weight_bits", "act_bits", "signed_input", "skip")
FIRST_LAST_WORDS = ("same", "fp")


@dataclass
class LayerReport:
    """One quantized layer. Bits are None where that side stays full precision; ``macs`` and
    ``act_numel`` are per example (0 when no example input was traced)."""

    name: str
    kind: str
    weight_bits: int | None
    act_bits: int | None
    signed_input: bool
    method: str
    position: str  # "first", "last", "first+last" or ""
    weight_numel: int
    act_numel: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Trace:
    order: list[str]
    signed: dict[str, bool]
    act_numel: dict[str, int]
    macs: dict[str, int]


def _as_call(example_input, example_kwargs) -> tuple[tuple, dict]:
    args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    return tuple(args), dict(example_kwargs or {})


def _trace(model: nn.Module, names: list[str], example_input, example_kwargs) -> _Trace:
    """Run ``model`` once (eval, no grad, buffers untouched) recording what each layer sees."""
    trace = _Trace([], {}, {}, {})
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            if name not in trace.signed:
                trace.order.append(name)
                trace.signed[name] = False
                trace.act_numel[name] = x[0].numel() if x.dim() > 1 else x.numel()
                per_position = output[0, 0].numel() if output.dim() > 2 else 1
                trace.macs[name] = module.weight.numel() * per_position
            trace.signed[name] |= bool((x < 0).any())
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        args, kwargs = _as_call(example_input, example_kwargs)
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return trace


def _match(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(arg: str, patterns, names: list[str]) -> None:
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg}: pattern {p!r} is not a string")
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            close = difflib.get_close_matches(p, names, n=3)
            hint = f"; close layer names: {', '.join(close)}" if close else ""
            raise ValueError(f"{arg}: pattern {p!r} matches no quantizable layer{hint} "
                             f"(layers: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")


def _check_method_kwargs(method: str, method_kwargs: dict) -> None:
    allowed = set(inspect.signature(METHODS[method]).parameters) - {"bits", "signed", "role", "channels"}
    for key in method_kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"method_kwargs: unknown argument {key!r} for method {method!r}; "
                             f"allowed: {', '.join(sorted(allowed))}{hint}")


def _check_overrides(overrides: dict, names: list[str]) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides={overrides!r} must be a mapping of layer pattern to settings")
    _check_patterns("overrides", list(overrides), names)
    for pattern, spec in overrides.items():
        if not isinstance(spec, dict):
            raise ValueError(f"overrides[{pattern!r}]={spec!r} must be a mapping with keys "
                             f"{', '.join(OVERRIDE_KEYS)}")
        for key, value in spec.items():
            check_choice(f"overrides[{pattern!r}] key", key, OVERRIDE_KEYS)
            if key in ("weight_bits", "act_bits") and value is not None:
                check_bits(f"overrides[{pattern!r}].{key}", value)
            elif key in ("signed_input", "skip") and not isinstance(value, bool):
                raise ValueError(f"overrides[{pattern!r}].{key}={value!r} must be true or false")


def _existing_report(model: nn.Module) -> list[LayerReport]:
    return [m.qreport for m in model.modules() if isinstance(m, QuantizedLayer)]


def quantize_model(model: nn.Module, *, method: str = "lsq", weight_bits: int = 4,
                   act_bits: int = 4, method_kwargs: dict | None = None,
                   first_last_bits: int | str = 8, include=None, exclude=None,
                   overrides: dict | None = None, example_input=None,
                   example_kwargs: dict | None = None) -> list[LayerReport]:
    """Replace the model's ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` layers in place.

    Args:
        method: ``lsq``, ``nipq`` or ``tempering``.
        weight_bits, act_bits: bit-widths (2..16) of weights and layer inputs.
        method_kwargs: constructor arguments of the method's quantizer (e.g. ``grad_scale``).
        first_last_bits: bits of the first and last layer (weights and inputs), ``"same"`` to
            treat them like the others, ``"fp"`` to leave them full precision.
        include, exclude: glob patterns on module names (default: everything, nothing).
        overrides: ``{pattern: {weight_bits, act_bits, signed_input, skip}}``, applied last.
        example_input, example_kwargs: one call's arguments (a tensor or a tuple of positional
            arguments, plus keyword arguments), used to find the first/last layers, input
            signedness and per-example sizes. Without it, module order is used and every input
            is taken as signed (with a warning).

    Returns the per-layer report. A model that already holds quantized layers is returned
    unchanged with its existing report (idempotent).
    """
    existing = _existing_report(model)
    if existing:
        return existing
    check_choice("method", method, tuple(METHODS))
    check_bits("weight_bits", weight_bits)
    check_bits("act_bits", act_bits)
    if isinstance(first_last_bits, str):
        check_choice("first_last_bits", first_last_bits, FIRST_LAST_WORDS)
    else:
        check_bits("first_last_bits", first_last_bits)
    method_kwargs = dict(method_kwargs or {})
    _check_method_kwargs(method, method_kwargs)
    include = ["*"] if include is None else list(include)
    exclude = [] if exclude is None else list(exclude)
    overrides = {} if overrides is None else overrides

    layers = [n for n, m in model.named_modules() if type(m) in QUANTIZED_TYPES]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has nothing to quantize: no nn.Conv1d, "
                         "nn.Conv2d or nn.Linear layer found")
    _check_patterns("include", include, layers)
    _check_patterns("exclude", exclude, layers)
    _check_overrides(overrides, layers)

    if example_input is not None:
        trace = _trace(model, layers, example_input, example_kwargs)
    else:
        warnings.warn("quantize_model without example_input: first/last layers taken in module "
                      "order and every input quantized as signed", stacklevel=2)
        trace = _Trace(list(layers), {n: True for n in layers}, {}, {})
    order = trace.order or list(layers)
    first, last = order[0], order[-1]

    modules = dict(model.named_modules())
    plan: list[tuple[str, QuantizedLayer]] = []
    for name in layers:
        if not _match(name, include) or _match(name, exclude):
            continue
        position = "+".join(p for p, n in (("first", first), ("last", last)) if n == name)
        wb, ab, signed, skip = weight_bits, act_bits, trace.signed.get(name, True), False
        if position and first_last_bits == "fp":
            skip = True
        elif position and first_last_bits != "same":
            wb = ab = first_last_bits
        for pattern, spec in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                wb = spec.get("weight_bits", wb)
                ab = spec.get("act_bits", ab)
                signed = spec.get("signed_input", signed)
                skip = spec.get("skip", skip)
        if skip:
            continue
        module = modules[name]
        ref = module.weight
        wq = make_quantizer(method, wb, True, "weight", module.weight.shape[0], **method_kwargs) \
            if wb is not None else None
        aq = make_quantizer(method, ab, signed, "input", **method_kwargs) if ab is not None else None
        qlayer = QUANTIZED_TYPES[type(module)].from_float(
            module, wq and wq.to(ref.device), aq and aq.to(ref.device))
        qlayer.act_numel = trace.act_numel.get(name, 0)
        qlayer.macs = trace.macs.get(name, 0)
        qlayer.qreport = LayerReport(name, type(module).__name__, wb, ab, signed, method, position,
                                     ref.numel(), qlayer.act_numel, qlayer.macs)
        plan.append((name, qlayer))
    if not plan:
        raise ValueError("nothing to quantize: include/exclude/overrides leave no layer "
                         f"(layers: {', '.join(layers[:8])})")

    for name, qlayer in plan:
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, qlayer)
    return [q.qreport for _, q in plan]


def initialize_quantizers(model: nn.Module, *batch, **kwargs) -> int:
    """Initialize every quantizer from data: weight quantizers from their weights, input
    quantizers from one forward pass on ``batch`` (positional and keyword model inputs).

    The pass runs without gradients in the model's current mode with hard quantization, and all
    buffers (BatchNorm statistics) are restored afterwards. Returns the number of quantizers.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    for layer in layers:
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.initialize(layer.weight.detach())
        if layer.input_quantizer is not None:
            layer.input_quantizer._ready = False
    named_q = dict(named_quantizers(model))
    hard = {q: q.hard for q in named_q.values()}
    saved = {k: b.clone() for k, b in model.named_buffers() if k.rpartition(".")[0] not in named_q}
    try:
        for q in hard:
            q.set_hard(True)
        with torch.no_grad():
            model(*batch, **kwargs)
    finally:
        for q, h in hard.items():
            q.set_hard(h)
        own = dict(model.named_buffers())
        for k, b in saved.items():
            own[k].copy_(b)
    return len(hard)


def fp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without quantizer entries: loads into the full-precision model."""
    names = {n for n, _ in named_quantizers(model)}
    return {k: v for k, v in model.state_dict().items()
            if not any(k.startswith(n + ".") for n in names)}


def set_quantizers(model: nn.Module, *, enabled: bool | None = None, hard: bool | None = None) -> None:
    """Enable/disable every quantizer, or switch every one between noise and hard mode."""
    for _, q in named_quantizers(model):
        if enabled is not None:
            q.enabled = enabled
        if hard is not None:
            q.set_hard(hard)


__all__ = ["LayerReport", "Quantizer", "fp_state_dict", "initialize_quantizers",
           "quantize_model", "set_quantizers"]
