"""The ``method:`` section of a recipe: one frozen dataclass per quantization method, with the
method's parameters, and its parser."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union

from .checks import Bool, Float, Int, OneOf
from .errors import RecipeError
from .fields import BITS, checked_field, expect_mapping, parse_section


GRANULARITY = OneOf(("tensor", "channel", "group"))
GROUP_SIZE = Int(1, 1 << 20)
GRAD_SCALE_COUNT = OneOf(("per_step", "tensor"))


def check_granularity(method) -> None:
    """``per_channel: true`` (the older spelling of ``granularity: channel``) contradicts
    ``granularity: group``."""
    if getattr(method, "per_channel", False) and method.granularity == "group":
        raise RecipeError("method.per_channel", "method.per_channel: true contradicts "
                          "method.granularity: group; give method.granularity alone (tensor, "
                          "channel or group)")


@dataclass(frozen=True, kw_only=True)
class LSQMethod:
    """LSQ, Esser et al. 2020 (docs/algorithms.md section 1).

    Attributes:
        grad_scale: factor on the step size's gradient. ``numel``: ``1/sqrt(N*Q_P)`` with ``N``
            the element count of the quantized tensor, batch included for activations (the
            paper's code); ``per_sample``: ``N`` without the batch dimension; ``none``: 1.
        per_channel: one step size per output channel of a weight (the older spelling of
            ``granularity: channel``; ``true`` with ``granularity: group`` is an error).
        granularity: step sizes of a weight. ``tensor``: one; ``channel``: one per output
            channel; ``group``: one per ``group_size`` consecutive input elements of each output
            row (a conv weight ``[out, in, kh, kw]`` read as ``[out, in*kh*kw]``). Activations
            always have one step.
        group_size: elements per group for ``granularity: group``; it must divide every
            quantized layer's input elements per output row (checked when the model is
            quantized, naming the layer).
        grad_scale_count: ``N`` of the gradient scale for channel and group steps.
            ``per_step``: the elements sharing one step (``numel / C``, ``group_size``);
            ``tensor``: the whole weight's element count (lsq-net's code).
        init: step size initialization. ``lsq``: ``2*mean|v|/sqrt(Q_P)`` (the paper);
            ``minmax``: ``max|v|/Q_P``; ``mse``: the step of least quantization MSE on the
            initializing tensor (a grid search that includes the lsq and minmax steps);
            ``percentile``: the 99.9th percentile of ``|v|`` over ``Q_P``. ``mse`` and
            ``percentile`` keep ``lsq`` for tensors where one clipped element's step gradient
            ``Q_P * g`` exceeds 0.1 (8-bit first/last layer weights), where a tight step is
            unstable.
    """

    name: ClassVar[str] = "lsq"
    quantizer_args: ClassVar[tuple[str, ...]] = (
        "grad_scale", "per_channel", "init", "granularity", "group_size", "grad_scale_count",
    )

    grad_scale: str = checked_field(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = checked_field(Bool(), False)
    init: str = checked_field(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")
    granularity: str = checked_field(GRANULARITY, "tensor")
    group_size: int = checked_field(GROUP_SIZE, 128)
    grad_scale_count: str = checked_field(GRAD_SCALE_COUNT, "per_step")

    def __post_init__(self):
        check_granularity(self)


@dataclass(frozen=True, kw_only=True)
class TemperingMethod:
    """Noise tempering, Wang et al. 2022 (docs/algorithms.md section 3): LSQ plus decaying noise.

    Attributes:
        grad_scale, per_channel, init, granularity, group_size, grad_scale_count: as in
            :class:`LSQMethod`.
        noise: ``error``: ``y = q + lambda_t * xi * e`` with ``e`` the quantization error;
            ``uniform_step``: ``y = q + lambda_t * s * u``, ``u ~ U(-1/2, 1/2)`` (error-unaware).
        noise_dist: distribution of ``xi`` (zero mean, unit variance): ``uniform`` is
            ``U(-sqrt 3, sqrt 3)``, ``gaussian`` is ``N(0, 1)``.
        lambda_0: noise strength at step 0 (dimensionless; 0 turns the method into LSQ).
        k: decay rate: ``lambda_t = lambda_0 * exp(-k * t / T)``, ``t`` the optimizer step,
            ``T`` the run's total steps.
    """

    name: ClassVar[str] = "tempering"
    quantizer_args: ClassVar[tuple[str, ...]] = (
        "grad_scale", "per_channel", "init", "noise", "noise_dist", "granularity", "group_size",
        "grad_scale_count",
    )

    grad_scale: str = checked_field(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = checked_field(Bool(), False)
    init: str = checked_field(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")
    granularity: str = checked_field(GRANULARITY, "tensor")
    group_size: int = checked_field(GROUP_SIZE, 128)
    grad_scale_count: str = checked_field(GRAD_SCALE_COUNT, "per_step")
    noise: str = checked_field(OneOf(("error", "uniform_step")), "error")
    noise_dist: str = checked_field(OneOf(("uniform", "gaussian")), "uniform")
    lambda_0: float = checked_field(Float(0.0, 100.0), 1.0)
    k: float = checked_field(Float(0.0, 100.0), 5.0)

    def __post_init__(self):
        check_granularity(self)


@dataclass(frozen=True, kw_only=True)
class NIPQMethod:
    """NIPQ, Shin et al. 2023 (docs/algorithms.md section 2).

    Attributes:
        noise: distribution of the pseudo-quantization noise. ``histogram``: drawn from the
            tensor's own rounding-error histogram (official code); ``uniform``: ``U(-1/2, 1/2)``.
        learn_bits: learn each quantizer's bit-width (mixed precision); false keeps the bits of
            the ``bits`` section fixed.
        b_min, b_max: bounds of the continuous bit-width
            ``b_c = b_min + (b_max - b_min) * sigmoid(theta_b)`` (bits).
        weight_init: weight truncation boundary at start. ``max_abs``: ``alpha0 = max|W|``;
            ``official``: ``alpha0 = softplus(max W)`` as the official code does (per channel
            or group with those granularities).
        granularity, group_size: one truncation boundary ``alpha`` per weight tensor, output
            channel or group of ``group_size`` input elements, as for :class:`LSQMethod`.
    """

    name: ClassVar[str] = "nipq"
    quantizer_args: ClassVar[tuple[str, ...]] = (
        "noise", "learn_bits", "b_min", "b_max", "weight_init", "granularity", "group_size",
    )

    noise: str = checked_field(OneOf(("histogram", "uniform")), "histogram")
    learn_bits: bool = checked_field(Bool(), False)
    b_min: int = checked_field(BITS, 2)
    b_max: int = checked_field(BITS, 14)
    weight_init: str = checked_field(OneOf(("max_abs", "official")), "max_abs")
    granularity: str = checked_field(GRANULARITY, "tensor")
    group_size: int = checked_field(GROUP_SIZE, 128)


Method = Union[LSQMethod, TemperingMethod, NIPQMethod]
METHODS: dict[str, type] = {c.name: c for c in (LSQMethod, TemperingMethod, NIPQMethod)}


def method_kwargs(method: Method) -> dict[str, Any]:
    """The method's parameters that are quantizer constructor arguments."""
    return {key: getattr(method, key) for key in method.quantizer_args}


def parse_method(raw: object) -> Method:
    raw = expect_mapping(raw, "method")
    if "name" not in raw:
        raise RecipeError("method.name", "missing required key 'method.name' (one of 'lsq', 'nipq', 'tempering')")
    name = OneOf(tuple(METHODS))(raw["name"], "method.name")
    cls = METHODS[name]

    def owner(key: object) -> str:
        others = [m for m, c in METHODS.items() if m != name and key in {f.name for f in fields(c)}]
        return f" for method '{name}' (it is a parameter of {' and '.join(others)})" if others else ""

    return parse_section(cls, raw, "method", note=owner, skip=("name",))


__all__ = ["METHODS", "LSQMethod", "Method", "NIPQMethod", "TemperingMethod", "method_kwargs",
           "parse_method"]
