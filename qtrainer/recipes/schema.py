"""The typed recipe: one frozen dataclass per section, validated by :meth:`Recipe.from_dict`.

Every field carries its checker in ``field(metadata={"check": ...})``; the generic
:func:`_parse_section` applies them, rejects unknown keys (with a close match) and fills
defaults. Cross-field rules (method-specific ranges, phases, mixed precision) live in
:meth:`Recipe._check_consistency`. Build recipes with :meth:`Recipe.from_dict` or
:func:`qtrainer.recipes.load_recipe`; calling the constructors directly skips validation.

Units: bit-widths are integer bits; epochs are passes over the training set; learning rates
and weight decays are the values handed to the torch optimizer; factors are dimensionless.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Union

from .checks import Bool, BitFactors, Float, FloatPair, Int, IntOr, Nullable, OneOf, Patterns, Text
from .errors import ROOT, RecipeError, did_you_mean, show
from .yaml_codec import dump_yaml_text

BITS = Int(2, 16)
"""Bit-widths a quantizer may use anywhere in a recipe."""

MAX_EPOCHS = 100_000


def _f(check: Any, default: Any = MISSING, *, factory: Any = MISSING) -> Any:
    return field(default=default, default_factory=factory, metadata={"check": check})


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True, kw_only=True)
class LSQMethod:
    """LSQ, Esser et al. 2020 (ALGORITHMS.md section 1).

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

    grad_scale: str = _f(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = _f(Bool(), False)
    init: str = _f(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")


@dataclass(frozen=True, kw_only=True)
class TemperingMethod:
    """Noise tempering, Wang et al. 2022 (ALGORITHMS.md section 3): LSQ plus decaying noise.

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

    grad_scale: str = _f(OneOf(("numel", "per_sample", "none")), "numel")
    per_channel: bool = _f(Bool(), False)
    init: str = _f(OneOf(("lsq", "minmax", "mse", "percentile")), "lsq")
    noise: str = _f(OneOf(("error", "uniform_step")), "error")
    noise_dist: str = _f(OneOf(("uniform", "gaussian")), "uniform")
    lambda_0: float = _f(Float(0.0, 100.0), 1.0)
    k: float = _f(Float(0.0, 100.0), 5.0)


@dataclass(frozen=True, kw_only=True)
class NIPQMethod:
    """NIPQ, Shin et al. 2023 (ALGORITHMS.md section 2).

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

    noise: str = _f(OneOf(("histogram", "uniform")), "histogram")
    learn_bits: bool = _f(Bool(), False)
    b_min: int = _f(BITS, 2)
    b_max: int = _f(BITS, 14)
    weight_init: str = _f(OneOf(("max_abs", "official")), "max_abs")


Method = Union[LSQMethod, TemperingMethod, NIPQMethod]
METHODS: dict[str, type] = {c.name: c for c in (LSQMethod, TemperingMethod, NIPQMethod)}


def method_kwargs(method: Method) -> dict[str, Any]:
    """The method's parameters that are quantizer constructor arguments."""
    return {key: getattr(method, key) for key in method.quantizer_args}


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class Bits:
    """Default bit-widths of quantized layers (initial bits when NIPQ learns them).

    Attributes:
        weight: bits of weight quantizers.
        activation: bits of input-activation quantizers.
    """

    weight: int = _f(BITS)
    activation: int = _f(BITS)


@dataclass(frozen=True, kw_only=True)
class FirstLast:
    """Treatment of the first and the last quantizable layer.

    Attributes:
        bits: an int: weights and inputs of both layers use that many bits (LSQ paper: 8);
            ``"same"``: quantized like every other layer (NIPQ official); ``"fp"``: left in
            full precision.
    """

    bits: int | str = _f(IntOr(BITS, ("same", "fp")), 8)


@dataclass(frozen=True, kw_only=True)
class LayerOverride:
    """Per-layer settings for the modules whose name matches a glob pattern; unset keys (None)
    fall back to the recipe's defaults.

    Attributes:
        weight_bits: bits of the weight quantizer.
        act_bits: bits of the input quantizer.
        signed_input: force the input quantizer signed (true) or unsigned (false) instead of
            the automatic choice.
        skip: true leaves the matching modules in full precision.
    """

    weight_bits: int | None = _f(Nullable(BITS), None)
    act_bits: int | None = _f(Nullable(BITS), None)
    signed_input: bool | None = _f(Nullable(Bool()), None)
    skip: bool | None = _f(Nullable(Bool()), None)

    def to_dict(self) -> dict[str, Any]:
        """Only the keys that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class Optimizer:
    """Which optimizer trains the quantized model.

    Attributes:
        policy: ``replace``: build the recipe's optimizer below; ``keep``: keep the user's
            optimizer and its hyperparameters, only set weight decay from ``weight_decay`` and
            add the quantizer parameters (then ``name``..``eps`` are unused).
        name: ``sgd`` or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum (sgd only).
        nesterov: Nesterov momentum (sgd only, needs momentum > 0).
        betas: AdamW's (beta1, beta2) (adamw only).
        eps: AdamW's epsilon (adamw only).
    """

    policy: str = _f(OneOf(("keep", "replace")), "replace")
    name: str = _f(OneOf(("sgd", "adamw")), "sgd")
    lr: float = _f(Float(0.0, 10.0, lo_open=True))
    momentum: float = _f(Float(0.0, 1.0, hi_open=True), 0.9)
    nesterov: bool = _f(Bool(), False)
    betas: tuple[float, float] = _f(FloatPair(Float(0.0, 1.0, hi_open=True)), (0.9, 0.999))
    eps: float = _f(Float(0.0, 1.0, lo_open=True), 1e-8)


@dataclass(frozen=True, kw_only=True)
class WeightDecay:
    """Weight decay (L2 coefficient handed to the optimizer).

    Attributes:
        base: full-precision value (ImageNet 1e-4, CIFAR 5e-4; NIPQ official 1e-5).
        factors: weight bit-width -> multiplier of ``base`` (LSQ paper: {2: 0.25, 3: 0.5,
            4: 1.0, 8: 1.0}); bit-widths not listed use 1.0.
        quantizer_params: weight decay of quantizer parameters (step sizes, alpha, bits).
        one_d_params: decay 1-D parameters (BatchNorm, biases) with the effective value too;
            false gives them 0 (NIPQ official).
    """

    base: float = _f(Float(0.0, 1.0))
    factors: dict[int, float] = _f(BitFactors(BITS, Float(0.0, 100.0)), factory=dict)
    quantizer_params: float = _f(Float(0.0, 1.0), 0.0)
    one_d_params: bool = _f(Bool(), True)

    def effective_weight_decay(self, weight_bits: int) -> float:
        """``base * factors.get(weight_bits, 1.0)``: the decay of weights quantized to that many bits."""
        return self.base * self.factors.get(weight_bits, 1.0)

    def __hash__(self) -> int:
        return hash((self.base, tuple(self.factors.items()), self.quantizer_params, self.one_d_params))


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Learning-rate schedule over the QAT epochs.

    Attributes:
        name: ``cosine``: cosine decay from ``lr`` to ``floor * lr`` over the epochs after the
            warm-up; ``constant``: ``lr`` after the warm-up; ``keep``: leave the user's scheduler
            (needs ``optimizer.policy: keep``, no warm-up, no floor).
        warmup_epochs: epochs of linear warm-up (0 = none).
        warmup_start_factor: lr factor in the first warm-up epoch, rising linearly to 1
            (NIPQ: 0.1 -> 0.1, 0.4, 0.7 of lr over 3 epochs).
        floor: final lr as a fraction of ``lr`` (cosine only; NIPQ official 1e-3).
    """

    name: str = _f(OneOf(("cosine", "constant", "keep")), "cosine")
    warmup_epochs: int = _f(Int(0, MAX_EPOCHS), 0)
    warmup_start_factor: float = _f(Float(0.0, 1.0, lo_open=True), 0.1)
    floor: float = _f(Float(0.0, 1.0), 0.0)


@dataclass(frozen=True, kw_only=True)
class Phases:
    """Length and stages of the run.

    Attributes:
        epochs: total QAT epochs, the hard phase included (NIPQ official: 40 + 3 = 43).
        hard_epochs: NIPQ phase 2: the last epochs train with hard quantization (STE) and frozen
            bits (default 3 for nipq; must be 0 for lsq and tempering, which are always hard).
        bn_reestimation_batches: forward-only BatchNorm statistics re-estimation over this many
            training batches (cumulative average); for nipq at the switch to the hard phase,
            otherwise after the last epoch. 0 = off (default 100 for nipq, 0 otherwise).
    """

    epochs: int = _f(Int(1, MAX_EPOCHS))
    hard_epochs: int = _f(Int(0, MAX_EPOCHS), 0)
    bn_reestimation_batches: int = _f(Int(0, 1_000_000), 0)


NIPQ_PHASE_DEFAULTS = {"hard_epochs": 3, "bn_reestimation_batches": 100}


@dataclass(frozen=True, kw_only=True)
class MixedPrecision:
    """Resource constraint that steers NIPQ's learned bit-widths (nipq with learn_bits only).

    Attributes:
        target: ``none``; ``avg_bits``: average bits per weight and per activation element;
            ``gbops``: bit-operations of one forward pass at batch 1, in GBOPs.
        value: the target (bits for avg_bits, GBOPs for gbops); required with a target.
        w_scale: weight of the weight term of the avg_bits loss.
        a_scale: weight of the activation term of the avg_bits loss.
        bops_scale: weight of the gbops loss.
    """

    target: str = _f(OneOf(("none", "avg_bits", "gbops")), "none")
    value: float | None = _f(Nullable(Float(0.0, 1e9, lo_open=True)), None)
    w_scale: float = _f(Float(0.0, 1e6), 1.0)
    a_scale: float = _f(Float(0.0, 1e6), 1.0)
    bops_scale: float = _f(Float(0.0, 1e6), 3.0)


@dataclass(frozen=True, kw_only=True)
class Distillation:
    """Knowledge distillation from the full-precision model.

    Attributes:
        enabled: add the distillation loss.
        temperature: softmax temperature of teacher and student logits.
        weight: weight of the distillation loss next to the task loss.
    """

    enabled: bool = _f(Bool(), False)
    temperature: float = _f(Float(0.0, 100.0, lo_open=True), 1.0)
    weight: float = _f(Float(0.0, 1000.0), 1.0)


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to do when training goes wrong.

    Attributes:
        on_nonfinite: a nan/inf loss or gradient: ``stop`` the run with an error, or ``skip``
            the optimizer step.
    """

    on_nonfinite: str = _f(OneOf(("stop", "skip")), "stop")


# ----------------------------------------------------------------------------- parsing


def _join(path: str, key: object) -> str:
    text = key if isinstance(key, str) and key else show(key)
    return f"{path}.{text}" if path else text


def _reject_unknown(raw: Mapping, allowed: list[str], path: str, note: Any = None) -> None:
    """Raise for the first key of ``raw`` not in ``allowed``; ``note(key)`` may add a hint."""
    for key in raw:
        if isinstance(key, str) and key in allowed:
            continue
        where = f"'{path}'" if path else "the top level"
        extra = note(key) if note else ""
        raise RecipeError(
            _join(path, key),
            f"unknown key '{_join(path, key)}'{did_you_mean(key, allowed)}{extra} "
            f"(allowed keys in {where}: {', '.join(allowed)})",
        )


def _mapping(raw: object, path: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise RecipeError(path, f"{path}: expected a mapping, got {show(raw)} ({type(raw).__name__})")
    return raw


def _parse_section(cls: type, raw: object, path: str, defaults: Mapping | None = None,
                   note: Any = None, skip: tuple[str, ...] = ()) -> Any:
    raw = _mapping(raw, path)
    names = [f.name for f in fields(cls)]
    _reject_unknown({k: v for k, v in raw.items() if k not in skip}, [*skip, *names], path, note)
    values = {}
    for f in fields(cls):
        key_path = _join(path, f.name)
        check = f.metadata["check"]
        if f.name in raw:
            values[f.name] = check(raw[f.name], key_path)
        elif defaults and f.name in defaults:
            values[f.name] = defaults[f.name]
        elif f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
        else:
            raise RecipeError(key_path, f"missing required key '{key_path}' ({check.allowed})")
    return cls(**values)


def _parse_method(raw: object) -> Method:
    raw = _mapping(raw, "method")
    if "name" not in raw:
        raise RecipeError("method.name", "missing required key 'method.name' (one of 'lsq', 'nipq', 'tempering')")
    name = OneOf(tuple(METHODS))(raw["name"], "method.name")
    cls = METHODS[name]

    def owner(key: object) -> str:
        others = [m for m, c in METHODS.items() if m != name and key in {f.name for f in fields(c)}]
        return f" for method '{name}' (it is a parameter of {' and '.join(others)})" if others else ""

    return _parse_section(cls, raw, "method", note=owner, skip=("name",))


def _parse_overrides(raw: object) -> dict[str, LayerOverride]:
    raw = _mapping(raw, "overrides")
    out = {}
    for pattern, entry in raw.items():
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(_join("overrides", pattern),
                              f"overrides: key {show(pattern)} must be a non-empty glob pattern (string)")
        path = f"overrides.{pattern}"
        override = _parse_section(LayerOverride, entry, path)
        if not override.to_dict():
            raise RecipeError(path, f"{path}: empty override; set at least one of "
                                    f"{', '.join(f.name for f in fields(LayerOverride))}")
        if override.skip and (override.weight_bits is not None or override.act_bits is not None):
            raise RecipeError(f"{path}.skip", f"{path}.skip: true leaves the layer in full precision; "
                                              "weight_bits/act_bits cannot be set with it")
        out[pattern] = override
    return out


# ----------------------------------------------------------------------------- recipe


NAME = Text(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}",
            "a name of letters, digits, '.', '_', '+', '-' (starting with a letter or digit, "
            "at most 100 characters)")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A complete, validated QAT recipe.

    Attributes:
        name: registry name (letters, digits, ``.``, ``_``, ``+``, ``-``).
        version: integer version of this recipe's content (>= 1).
        description: what the recipe does and its source.
        method: the quantization method and its parameters.
        bits: default weight and activation bit-widths.
        first_last: treatment of the first and last layer.
        include: glob patterns of module names to quantize.
        exclude: glob patterns of module names never to quantize (wins over include).
        overrides: glob pattern -> per-layer settings.
        optimizer, weight_decay, lr_schedule, phases, mixed_precision, distillation, faults:
            the sections documented on their classes.
    """

    name: str
    version: int = 1
    description: str = ""
    method: Method
    bits: Bits
    first_last: FirstLast = field(default_factory=FirstLast)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    optimizer: Optimizer
    weight_decay: WeightDecay
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    phases: Phases
    mixed_precision: MixedPrecision = field(default_factory=MixedPrecision)
    distillation: Distillation = field(default_factory=Distillation)
    faults: Faults = field(default_factory=Faults)

    # ---------------------------------------------------------------- dict / yaml

    @classmethod
    def from_dict(cls, d: object) -> Recipe:
        """Validate a resolved recipe mapping (no ``extends``; use ``load_recipe`` for that).

        Raises:
            RecipeError: for any invalid input, naming the key path.
        """
        d = _mapping(d, ROOT)
        if "extends" in d:
            raise RecipeError("extends", "extends is resolved by load_recipe(); Recipe.from_dict() "
                                         "takes a recipe without it")
        _reject_unknown(d, [f.name for f in fields(cls)], "")
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
                raise RecipeError(f.name, f"missing required key '{f.name}'")
        method = _parse_method(d["method"])
        phase_defaults = NIPQ_PHASE_DEFAULTS if isinstance(method, NIPQMethod) else None
        parsers = {
            "name": lambda v: NAME(v, "name"),
            "version": lambda v: Int(1, 1_000_000)(v, "version"),
            "description": lambda v: Text()(v, "description"),
            "bits": lambda v: _parse_section(Bits, v, "bits"),
            "first_last": lambda v: _parse_section(FirstLast, v, "first_last"),
            "include": lambda v: Patterns(min_len=1)(v, "include"),
            "exclude": lambda v: Patterns()(v, "exclude"),
            "overrides": _parse_overrides,
            "optimizer": lambda v: _parse_section(Optimizer, v, "optimizer"),
            "weight_decay": lambda v: _parse_section(WeightDecay, v, "weight_decay"),
            "lr_schedule": lambda v: _parse_section(LRSchedule, v, "lr_schedule"),
            "phases": lambda v: _parse_section(Phases, v, "phases", defaults=phase_defaults),
            "mixed_precision": lambda v: _parse_section(MixedPrecision, v, "mixed_precision"),
            "distillation": lambda v: _parse_section(Distillation, v, "distillation"),
            "faults": lambda v: _parse_section(Faults, v, "faults"),
        }
        values = {key: parse(d[key]) for key, parse in parsers.items() if key in d}
        recipe = cls(method=method, **values)
        recipe._check_consistency()
        return recipe

    def _check_consistency(self) -> None:
        """Rules that involve more than one field."""
        m = self.method
        if isinstance(m, NIPQMethod):
            if m.b_min >= m.b_max:
                raise RecipeError("method.b_max", f"method.b_max: {m.b_max} must be greater than "
                                                  f"method.b_min ({m.b_min})")
            # b_c = b_min + (b_max-b_min)*sigmoid(theta) never reaches the bounds, so with learned
            # bits every quantizer's (initial) bit-width must lie strictly inside them.
            lo, hi, how = ((m.b_min + 1, m.b_max - 1, "strictly between") if m.learn_bits
                           else (m.b_min, m.b_max, "between"))
            keyed = [("bits.weight", self.bits.weight), ("bits.activation", self.bits.activation),
                     ("first_last.bits", self.first_last.bits)] + [
                (f"overrides.{p}.{k}", getattr(o, k)) for p, o in self.overrides.items()
                for k in ("weight_bits", "act_bits")]
            for key, value in keyed:
                if isinstance(value, int) and not lo <= value <= hi:
                    raise RecipeError(key, f"{key}: {value} is out of range; with method 'nipq' (learn_bits "
                                           f"{str(m.learn_bits).lower()}) bits must be {how} method.b_min "
                                           f"({m.b_min}) and method.b_max ({m.b_max})")
        elif self.phases.hard_epochs:
            raise RecipeError("phases.hard_epochs", f"phases.hard_epochs: {self.phases.hard_epochs} is not "
                                                    f"allowed for method '{m.name}' (always hard quantization); "
                                                    "allowed: 0 (only nipq has a hard phase)")
        p = self.phases
        if p.hard_epochs > p.epochs:
            raise RecipeError("phases.hard_epochs", f"phases.hard_epochs: {p.hard_epochs} is greater than "
                                                    f"phases.epochs ({p.epochs}); allowed: 0..{p.epochs}")
        s = self.lr_schedule
        if s.warmup_epochs > p.epochs:
            raise RecipeError("lr_schedule.warmup_epochs", f"lr_schedule.warmup_epochs: {s.warmup_epochs} is "
                                                           f"greater than phases.epochs ({p.epochs})")
        if s.name == "keep" and s.warmup_epochs:
            raise RecipeError("lr_schedule.warmup_epochs", "lr_schedule.warmup_epochs: must be 0 with "
                                                           "lr_schedule.name 'keep' (the user's scheduler is kept)")
        if s.name == "keep" and self.optimizer.policy != "keep":
            raise RecipeError("lr_schedule.name", "lr_schedule.name: 'keep' leaves the user's scheduler, which "
                                                  "drives the user's optimizer: it needs optimizer.policy 'keep'")
        if s.name != "cosine" and s.floor:
            raise RecipeError("lr_schedule.floor", f"lr_schedule.floor: {s.floor} is only used by the 'cosine' "
                                                   f"schedule, not '{s.name}'; allowed: 0.0")
        o = self.optimizer
        if o.nesterov and (o.name != "sgd" or o.momentum == 0):
            raise RecipeError("optimizer.nesterov", "optimizer.nesterov: true needs optimizer.name 'sgd' and "
                                                    f"optimizer.momentum > 0 (got '{o.name}', {o.momentum})")
        mp = self.mixed_precision
        if mp.target == "none":
            if mp.value is not None:
                raise RecipeError("mixed_precision.value", f"mixed_precision.value: {mp.value} is only used "
                                                           "with a mixed_precision.target; allowed: null")
            return
        if not (isinstance(m, NIPQMethod) and m.learn_bits):
            raise RecipeError("mixed_precision.target", f"mixed_precision.target: '{mp.target}' needs "
                                                        "method.name 'nipq' with method.learn_bits true; "
                                                        "allowed here: 'none'")
        if mp.value is None:
            raise RecipeError("mixed_precision.value", f"missing required key 'mixed_precision.value' "
                                                       f"(the {mp.target} target)")
        if mp.target == "avg_bits" and not m.b_min <= mp.value <= m.b_max:
            raise RecipeError("mixed_precision.value", f"mixed_precision.value: {mp.value} average bits is out "
                                                       f"of range; allowed: [{m.b_min}, {m.b_max}] "
                                                       "(method.b_min, method.b_max)")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML/JSON-able data (every key, defaults included)."""
        def section(obj: Any) -> dict[str, Any]:
            return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}

        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "method": {"name": self.method.name, **section(self.method)},
            "bits": section(self.bits),
            "first_last": section(self.first_last),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {p: o.to_dict() for p, o in self.overrides.items()},
            "optimizer": section(self.optimizer),
            "weight_decay": section(self.weight_decay),
            "lr_schedule": section(self.lr_schedule),
            "phases": section(self.phases),
            "mixed_precision": section(self.mixed_precision),
            "distillation": section(self.distillation),
            "faults": section(self.faults),
        }

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text; ``load_recipe`` of it gives an equal recipe."""
        return dump_yaml_text(self.to_dict())

    def content_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of :meth:`to_dict` without
        ``name`` and ``description``: equal for recipes that train the same way."""
        d = self.to_dict()
        del d["name"], d["description"]
        text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash((self.name, self.description, self.content_hash()))

    # ---------------------------------------------------------------- consumers

    def surgery_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``qtrainer.surgery.quantize_model(model, **kwargs)``.

        Keys: ``method`` (str), ``weight_bits``, ``act_bits`` (int), ``method_kwargs`` (the
        method parameters that are quantizer constructor arguments; tempering's ``lambda_0`` and
        ``k`` are the schedule's, not the quantizer's), ``first_last_bits`` (int, "same" or
        "fp"), ``include``, ``exclude`` (lists of globs), ``overrides`` (glob -> dict of the set
        keys among weight_bits, act_bits, signed_input, skip).
        """
        return {
            "method": self.method.name,
            "weight_bits": self.bits.weight,
            "act_bits": self.bits.activation,
            "method_kwargs": method_kwargs(self.method),
            "first_last_bits": self.first_last.bits,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {p: o.to_dict() for p, o in self.overrides.items()},
        }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
