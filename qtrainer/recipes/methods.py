"""The ``method:`` section of a recipe: one frozen dataclass per quantization method, with the
method's parameters, and its parser."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union

from .checks import Bool, Float, OneOf
from .errors import RecipeError
from .fields import BITS, checked_field, expect_mapping, parse_section


@dataclass(frozen=True, kw_only=True)
class LSQMethod:
    """LSQ, Esser et al. 2020 (docs/algorithms.md section 1).

    Attributes:
        grad_scale: factor on the step size's gradient. ``numel``: ``1/sqrt(N*Q_P)`` with ``N``
            the element count of the quantized tensor, batch included for activations (the
            paper's code); ``per_sample``: ``N`` without the batch dimension; ``none``: 1.
        per_channel: one step size per output channel of a weight instead of one per tensor.
        init: step size initialization. ``lsq``: ``2*mean|v|/sqrt(Q_P)`` (the paper);
            ``minmax``: ``max|v|/Q_P``; ``mse``: the step of least quantization MSE on the
            initializing tensor (a grid search that includes the lsq and minmax steps);
            ``percentile``: the 99.9th percentile of ``|v|`` over ``Q_P``. ``mse`` and
            ``percentile`` keep ``lsq`` for tensors where one clipped element's step gradient
            ``Q_P * g`` exceeds 0.1 (8-bit first/last layer weights), where a tight step is
            unstable.
    """

    name: ClassVar[str] = "lsq"
    quantizer_args: ClassVar[tuple[str, ...]] = ("grad_scale", "per_channel", "init")

    grad_scale: str = checked_field(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = checked_field(Bool(), False)
    init: str = checked_field(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")


@dataclass(frozen=True, kw_only=True)
class TemperingMethod:
    """Noise tempering, Wang et al. 2022 (docs/algorithms.md section 3): LSQ plus decaying noise.

    Attributes:
        grad_scale, per_channel, init: as in :class:`LSQMethod`.
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
        "grad_scale", "per_channel", "init", "noise", "noise_dist",
    )

    grad_scale: str = checked_field(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = checked_field(Bool(), False)
    init: str = checked_field(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")
    noise: str = checked_field(OneOf(("error", "uniform_step")), "error")
    noise_dist: str = checked_field(OneOf(("uniform", "gaussian")), "uniform")
    lambda_0: float = checked_field(Float(0.0, 100.0), 1.0)
    k: float = checked_field(Float(0.0, 100.0), 5.0)


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
            ``official``: ``alpha0 = softplus(max W)`` as the official code does.
    """

    name: ClassVar[str] = "nipq"
    quantizer_args: ClassVar[tuple[str, ...]] = (
        "noise", "learn_bits", "b_min", "b_max", "weight_init",
    )

    noise: str = checked_field(OneOf(("histogram", "uniform")), "histogram")
    learn_bits: bool = checked_field(Bool(), False)
    b_min: int = checked_field(BITS, 2)
    b_max: int = checked_field(BITS, 14)
    weight_init: str = checked_field(OneOf(("max_abs", "official")), "max_abs")


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
