"""Model surgery: turn a model's conv/linear/embedding/attention layers into quantized ones by
rules, or by a saved plan.

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

from .forward import disable_transformer_fast_paths, run_forward
from .layer_trace import Trace, trace_layers
from .nn import QUANTIZED_TYPES, QuantizedLayer, named_quantizers, quantizable_weight
from .nn_attention import MATMUL_SITES
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
    matmul_bits: int | None = None  # attention layers: bits of the q, k, softmax, v quantizers

    def to_dict(self) -> dict:
        return asdict(self)


TYPE_PREFIX = "type:"


def module_kinds(module: nn.Module) -> set[str]:
    """Class names a ``type:`` pattern matches: the module's class and its torch bases
    (``type:Linear`` also matches ``nn.MultiheadAttention``'s ``out_proj``)."""
    return {c.__name__ for c in type(module).__mro__ if issubclass(c, nn.Module)} - {"Module"}


def _match_one(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith(TYPE_PREFIX):
        return pattern[len(TYPE_PREFIX):] in module_kinds(module)
    return fnmatch.fnmatchcase(name, pattern)


def _match(name: str, patterns, modules: dict) -> bool:
    return any(_match_one(name, modules[name], p) for p in patterns)


def _check_patterns(arg: str, patterns, names: list[str], modules: dict) -> None:
    """Every pattern (a glob on module names, or ``type:<Class>``) matches a quantizable layer."""
    kinds = sorted(set().union(*(module_kinds(modules[n]) for n in names)))
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{arg}: pattern {p!r} is not a string")
        if p.startswith(TYPE_PREFIX) and p[len(TYPE_PREFIX):] not in kinds:
            close = difflib.get_close_matches(p[len(TYPE_PREFIX):], kinds, n=1)
            hint = f"; did you mean '{TYPE_PREFIX}{close[0]}'?" if close else ""
            raise ValueError(f"{arg}: pattern {p!r} matches no quantizable layer type{hint} "
                             f"(types in this model: {', '.join(kinds)})")
        if not p.startswith(TYPE_PREFIX) and not any(fnmatch.fnmatchcase(n, p) for n in names):
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


def _check_overrides(overrides: dict, names: list[str], modules: dict) -> None:
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides={overrides!r} must be a mapping of layer pattern to settings")
    _check_patterns("overrides", list(overrides), names, modules)
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
                   act_bits: int | None = 4, method_kwargs: dict | None = None,
                   first_last_bits: int | str = 8, include=None, exclude=None,
                   overrides: dict | None = None, example_input=None,
                   example_kwargs: dict | None = None, first_layer: str | None = None,
                   last_layer: str | None = None,
                   attention_matmul_bits: int | None = None) -> list[LayerReport]:
    """Replace the model's ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear``/``nn.Embedding``/
    ``nn.MultiheadAttention`` layers in place (an attention layer's ``out_proj`` is a linear
    layer of its own).

    Args:
        method: ``lsq``, ``nipq`` or ``tempering``.
        weight_bits, act_bits: bit-widths (2..16) of weights and layer inputs; ``act_bits=None``
            quantizes weights only (inputs untouched). Embedding inputs are indices, never
            quantized.
        method_kwargs: constructor arguments of the method's quantizer (e.g. ``grad_scale``).
        first_last_bits: bits of the first and last layer (weights and inputs; fixed even
            where ``method_kwargs`` learns the others' bits), ``"same"`` to treat them like
            the others, ``"fp"`` to leave them full precision.
        include, exclude: patterns (default: everything, nothing): globs on module names, or
            ``type:<Class>`` matching a layer's class or a torch base class of it
            (``type:Embedding``, ``type:MultiheadAttention``, ``type:Linear``).
        overrides: ``{pattern: {weight_bits, act_bits, signed_input, skip}}``, applied last,
            in order (patterns as for include).
        example_input, example_kwargs: one call's arguments (a tensor or a tuple of positional
            arguments, plus keyword arguments), used to find the first/last layers, input
            signedness and per-example sizes. Without it, module order is used and every input
            is taken as signed (with a warning).
        first_layer, last_layer: layer names that take the first/last position instead of the
            traced ones (e.g. a transformer's token embedding and its head).
        attention_matmul_bits: bits of quantizers on the attention matmul inputs (q, k, softmax
            output, v) of every quantized ``nn.MultiheadAttention``; None (default) leaves them
            full precision.

    Returns the per-layer report. A model that already holds quantized layers is returned
    unchanged with its existing report (idempotent).
    """
    existing = _existing_report(model)
    if existing:
        return existing
    check_choice("method", method, tuple(METHODS))
    check_bits("weight_bits", weight_bits)
    for arg, value in (("act_bits", act_bits), ("attention_matmul_bits", attention_matmul_bits)):
        if value is not None:
            check_bits(arg, value)
    if isinstance(first_last_bits, str):
        check_choice("first_last_bits", first_last_bits, FIRST_LAST_WORDS)
    else:
        check_bits("first_last_bits", first_last_bits)
    method_kwargs = dict(method_kwargs or {})
    _check_method_kwargs(method, method_kwargs)
    include = ["*"] if include is None else list(include)
    exclude = [] if exclude is None else list(exclude)
    overrides = {} if overrides is None else overrides

    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if type(m) in QUANTIZED_TYPES]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has nothing to quantize: no nn.Conv1d, "
                         "nn.Conv2d, nn.Linear, nn.Embedding or nn.MultiheadAttention found")
    if "" in layers:
        raise ValueError(f"model {type(model).__name__} is itself a quantizable layer: surgery "
                         "replaces the layers inside a model, not the model object; wrap it, "
                         "e.g. nn.Sequential(model)")
    _check_patterns("include", include, layers, modules)
    _check_patterns("exclude", exclude, layers, modules)
    _check_overrides(overrides, layers, modules)
    for arg, value in (("first_layer", first_layer), ("last_layer", last_layer)):
        if value is not None and value not in layers:
            close = difflib.get_close_matches(str(value), layers, n=1)
            raise ValueError(f"{arg}={value!r} is not a quantizable layer"
                             f"{f'; did you mean {close[0]!r}?' if close else ''}")

    if example_input is not None:
        trace = trace_layers(model, layers, example_input, example_kwargs)
    else:
        warnings.warn("quantize_model without example_input: first/last layers taken in module "
                      "order and every input quantized as signed", stacklevel=2)
        trace = Trace(list(layers), {n: True for n in layers}, {}, {})
    order = trace.order or list(layers)
    first, last = first_layer or order[0], last_layer or order[-1]

    reports: list[LayerReport] = []
    for name in layers:
        if not _match(name, include, modules) or _match(name, exclude, modules):
            continue
        position = "+".join(p for p, n in (("first", first), ("last", last)) if n == name)
        wb, ab, signed, skip = weight_bits, act_bits, trace.signed.get(name, True), False
        if position and first_last_bits == "fp":
            skip = True
        elif position and first_last_bits != "same":
            wb, ab = first_last_bits, (None if act_bits is None else first_last_bits)
        for pattern, spec in overrides.items():
            if _match_one(name, modules[name], pattern):
                wb = spec.get("weight_bits", wb)
                ab = spec.get("act_bits", ab)
                signed = spec.get("signed_input", signed)
                skip = spec.get("skip", skip)
        attention = isinstance(modules[name], nn.MultiheadAttention)
        kwargs = dict(method_kwargs)
        if position and not isinstance(first_last_bits, str) and kwargs.get("learn_bits"):
            kwargs["learn_bits"] = False  # first/last bits given: fixed, not learned
        if not skip:
            reports.append(LayerReport(
                name, type(modules[name]).__name__, wb,
                None if isinstance(modules[name], nn.Embedding) else ab, signed, method,
                position, quantizable_weight(modules[name]).numel(),
                trace.act_numel.get(name, 0), trace.macs.get(name, 0), kwargs,
                attention_matmul_bits if attention else None))
    if not reports:
        raise ValueError("nothing to quantize: include/exclude/overrides leave no layer "
                         f"(layers: {', '.join(layers[:8])})")
    kept_fp = set(layers) - {r.name for r in reports}
    for name in kept_fp & set(trace.macs):  # their cost in the whole-model summary
        modules[name].act_numel, modules[name].macs = trace.act_numel[name], trace.macs[name]
    return _swap(model, [(r, _build_layer(modules[r.name], r)) for r in reports])


def _check_attention(module: nn.Module, report: LayerReport) -> None:
    """The attention options the quantized layer supports, else ``ValueError``."""
    if not isinstance(module, nn.MultiheadAttention):
        return
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError(f"layer {report.name!r}: nn.MultiheadAttention with add_bias_kv or "
                         "add_zero_attn is not supported; exclude it (exclude: "
                         f"[{report.name!r}]) to leave it in full precision")
    if not module._qkv_same_embed_dim and report.method_kwargs.get("per_channel"):
        raise ValueError(f"layer {report.name!r}: per_channel weight steps need the packed "
                         "in_proj_weight (kdim = vdim = embed_dim); this layer has separate "
                         "q/k/v weights")


def _build_layer(module: nn.Module, report: LayerReport) -> QuantizedLayer:
    """The quantized layer of ``module`` described by ``report`` (``module`` is not changed)."""
    _check_attention(module, report)
    ref = quantizable_weight(module)
    kwargs = report.method_kwargs
    try:
        wq = make_quantizer(report.method, report.weight_bits, True, "weight", ref.shape[0],
                            tuple(ref.shape), **kwargs) if report.weight_bits is not None else None
    except ValueError as e:  # e.g. a group size that does not divide this layer's inputs
        raise ValueError(f"layer {report.name!r} ({report.kind}): {e}") from None
    aq = make_quantizer(report.method, report.act_bits, report.signed_input, "input", **kwargs) \
        if report.act_bits is not None else None
    built = (module, wq and wq.to(ref.device), aq and aq.to(ref.device))
    if report.matmul_bits is not None:
        mq = {site: make_quantizer(report.method, report.matmul_bits, site != "probs", "input",
                                   **kwargs).to(ref.device) for site in MATMUL_SITES}
        qlayer = QUANTIZED_TYPES[type(module)].from_float(*built, matmul_quantizers=mq)
    else:
        qlayer = QUANTIZED_TYPES[type(module)].from_float(*built)
    qlayer.act_numel, qlayer.macs, qlayer.qreport = report.act_numel, report.macs, report
    return qlayer


def _swap(model: nn.Module, built: list[tuple[LayerReport, QuantizedLayer]]) -> list[LayerReport]:
    """Put the built layers in place; turn off the Transformer fast paths that would skip them."""
    # outer layers first, parents looked up after their own swap (an attention layer and its
    # out_proj: the quantized attention layer holds out_proj after the swap)
    for report, qlayer in sorted(built, key=lambda b: b[0].name.count(".")):
        parent_name, _, child = report.name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qlayer)
    changed = disable_transformer_fast_paths(model)
    if changed:
        log.info("qtrainer: the fused fast path of %s is off: it computes with the float "
                 "weights and would skip the quantized attention and feed-forward layers",
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
        if quantizable_weight(module).numel() != r.weight_numel:
            raise ValueError(f"layer {r.name!r}: {quantizable_weight(module).numel()} weights in the model, "
                             f"{r.weight_numel} in the plan")
        check_choice(f"layer {r.name!r} method", r.method, tuple(METHODS))
        _check_method_kwargs(r.method, r.method_kwargs)
        for side in ("weight_bits", "act_bits", "matmul_bits"):
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
        for q in (getattr(layer, "matmul_quantizers", None) or {}).values():
            q._ready = False
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


__all__ = ["LayerReport", "Quantizer", "TYPE_PREFIX", "fp_state_dict", "initialize_quantizers",
           "module_kinds", "quantize_from_plan", "quantize_model", "set_quantizers"]
