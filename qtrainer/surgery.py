"""Model surgery: turn a model's conv/linear layers into quantized ones by rules, or by a saved
plan.

``quantize_model`` validates every rule and builds every quantizer before it touches the model,
so bad input raises ``ValueError`` and leaves the model as it was. The first and last layers are
the quantizable layers that run first and last on an example input (traced with hooks, not
module order); input signedness is detected from the same trace (a negative value seen means a
signed site) unless set per layer. Each layer's :class:`LayerReport` is the plan that
``quantize_from_plan`` rebuilds the same quantized model from, without an example input.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .forward import call_args, disable_transformer_fast_paths, run_forward
from .nn import QUANTIZED_TYPES, QuantizedLayer, named_quantizers
from .quantizers import METHODS, Quantizer, check_bits, check_choice, make_quantizer

log = logging.getLogger("qtrainer")

OVERRIDE_KEYS = ("weight_bits", "act_bits", "signed_input", "skip")
FIRST_LAST_WORDS = ("same", "fp")


@dataclass
class LayerReport:
    """One quantized layer: what :func:`quantize_from_plan` needs to rebuild it. Bits are None
    where that side stays full precision (for NIPQ with learned bits: the initial bits);
    ``macs`` and ``act_numel`` are per example (0 when no example input was traced)."""

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
    method_kwargs: dict = field(default_factory=dict)  # the quantizers' constructor arguments

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Trace:
    order: list[str]
    signed: dict[str, bool]
    act_numel: dict[str, int]
    macs: dict[str, int]


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
                # output positions per example: H*W of a conv, tokens of a linear on (B, T, D)
                positions = output[0].numel() // output.shape[1 if isinstance(
                    module, nn.modules.conv._ConvNd) else -1] if output.dim() > 2 else 1
                trace.macs[name] = module.weight.numel() * positions
            trace.signed[name] |= bool((x < 0).any())
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        args, kwargs = call_args(example_input)
        with torch.no_grad():
            run_forward(model, args, {**kwargs, **dict(example_kwargs or {})}, "tracing forward")
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
    allowed = set(inspect.signature(METHODS[method]).parameters) - {"bits", "signed", "role", "channels",
                                                                     "shape"}
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
    reports: list[LayerReport] = []
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
        if not skip:
            reports.append(LayerReport(name, type(modules[name]).__name__, wb, ab, signed, method,
                                       position, modules[name].weight.numel(),
                                       trace.act_numel.get(name, 0), trace.macs.get(name, 0),
                                       dict(method_kwargs)))
    if not reports:
        raise ValueError("nothing to quantize: include/exclude/overrides leave no layer "
                         f"(layers: {', '.join(layers[:8])})")
    return _swap(model, [(r, _build_layer(modules[r.name], r)) for r in reports])


def _build_layer(module: nn.Module, report: LayerReport) -> QuantizedLayer:
    """The quantized layer of ``module`` described by ``report`` (``module`` is not changed)."""
    ref = module.weight
    kwargs = report.method_kwargs
    try:
        wq = make_quantizer(report.method, report.weight_bits, True, "weight", ref.shape[0],
                            tuple(ref.shape), **kwargs) if report.weight_bits is not None else None
    except ValueError as e:  # e.g. a group size that does not divide this layer's inputs
        raise ValueError(f"layer {report.name!r} ({report.kind}): {e}") from None
    aq = make_quantizer(report.method, report.act_bits, report.signed_input, "input", **kwargs) \
        if report.act_bits is not None else None
    qlayer = QUANTIZED_TYPES[type(module)].from_float(
        module, wq and wq.to(ref.device), aq and aq.to(ref.device))
    qlayer.act_numel, qlayer.macs, qlayer.qreport = report.act_numel, report.macs, report
    return qlayer


def _swap(model: nn.Module, built: list[tuple[LayerReport, QuantizedLayer]]) -> list[LayerReport]:
    """Put the built layers in place; turn off the Transformer fast paths that would skip them."""
    modules = dict(model.named_modules())
    for report, qlayer in built:
        parent_name, _, child = report.name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, qlayer)
    changed = disable_transformer_fast_paths(model)
    if changed:
        log.info("qtrainer: the fused fast path of %s is off: it computes with the float "
                 "weights and would skip the quantized linear1/linear2",
                 ", ".join(repr(n) for n in changed))
    return [r for r, _ in built]


def quantize_from_plan(model: nn.Module, plan) -> list[LayerReport]:
    """Quantize ``model`` as a saved plan says: one :class:`LayerReport` (or its ``to_dict()``)
    per layer, as :func:`quantize_model` returned them. No example input is needed; the model's
    layers must be the planned ones (name, kind, weight size), else ``ValueError`` naming the
    first mismatch and the model is left as it was. A model already quantized by the same plan
    is returned unchanged."""
    try:
        reports = [p if isinstance(p, LayerReport) else LayerReport(**dict(p)) for p in plan]
    except TypeError as e:
        raise ValueError(f"malformed layer plan ({e}); expected the fields "
                         f"{', '.join(f.name for f in fields(LayerReport))}") from None
    existing = _existing_report(model)
    if existing:
        if [(r.name, r.weight_bits, r.act_bits) for r in existing] != \
                [(r.name, r.weight_bits, r.act_bits) for r in reports]:
            raise ValueError(f"model {type(model).__name__} is already quantized, differently "
                             "from the plan")
        return existing
    if not reports:
        raise ValueError("the layer plan is empty")
    modules = dict(model.named_modules())
    for r in reports:
        module = modules.get(r.name)
        if module is None:
            close = difflib.get_close_matches(r.name, list(modules), n=1)
            hint = f"; close: {close[0]!r}" if close else ""
            raise ValueError(f"layer {r.name!r} of the plan is not in {type(model).__name__}{hint}")
        if type(module) not in QUANTIZED_TYPES or type(module).__name__ != r.kind:
            raise ValueError(f"layer {r.name!r}: the plan has a {r.kind}, the model a "
                             f"{type(module).__name__}")
        if module.weight.numel() != r.weight_numel:
            raise ValueError(f"layer {r.name!r}: {module.weight.numel()} weights in the model, "
                             f"{r.weight_numel} in the plan")
        check_choice(f"layer {r.name!r} method", r.method, tuple(METHODS))
        _check_method_kwargs(r.method, r.method_kwargs)
        for side in ("weight_bits", "act_bits"):
            if getattr(r, side) is not None:
                check_bits(f"layer {r.name!r} {side}", getattr(r, side))
    return _swap(model, [(r, _build_layer(modules[r.name], r)) for r in reports])


def initialize_quantizers(model: nn.Module, *batch, **kwargs) -> int:
    """Initialize every quantizer from data: weight quantizers from their weights, input
    quantizers from one forward pass on ``batch`` (positional and keyword model inputs).

    The pass runs without gradients in the model's current mode with hard quantization, and all
    buffers (BatchNorm statistics) are restored afterwards; input quantizers it does not reach
    (a GAN's discriminator under ``forward(z)``) initialize from their first input later. A
    failing pass raises :class:`~qtrainer.forward.ForwardError` naming the module that failed
    and the shapes it got. Returns the number of quantizers.
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
            run_forward(model, batch, kwargs, "initializing forward")
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
           "quantize_from_plan", "quantize_model", "set_quantizers"]
