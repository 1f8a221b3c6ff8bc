"""The sections of a recipe other than ``method``: one frozen dataclass per section, each field
with its checker, default and unit."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .checks import Bool, BitFactors, Float, FloatPair, Int, IntOr, Nullable, OneOf
from .errors import RecipeError, show
from .fields import BITS, MAX_EPOCHS, checked_field, expect_mapping, join_path, parse_section


@dataclass(frozen=True, kw_only=True)
class Bits:
    """Default bit-widths of quantized layers (initial bits when NIPQ learns them).

    Attributes:
        weight: bits of weight quantizers.
        activation: bits of input-activation quantizers.
    """

    weight: int = checked_field(BITS)
    activation: int = checked_field(BITS)


@dataclass(frozen=True, kw_only=True)
class FirstLast:
    """Treatment of the first and the last quantizable layer.

    Attributes:
        bits: an int: weights and inputs of both layers use that many bits (LSQ paper: 8);
            ``"same"``: quantized like every other layer (NIPQ official); ``"fp"``: left in
            full precision.
    """

    bits: int | str = checked_field(IntOr(BITS, ("same", "fp")), 8)


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

    weight_bits: int | None = checked_field(Nullable(BITS), None)
    act_bits: int | None = checked_field(Nullable(BITS), None)
    signed_input: bool | None = checked_field(Nullable(Bool()), None)
    skip: bool | None = checked_field(Nullable(Bool()), None)

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

    policy: str = checked_field(OneOf(("keep", "replace")), "replace")
    name: str = checked_field(OneOf(("sgd", "adamw")), "sgd")
    lr: float = checked_field(Float(0.0, 10.0, lo_open=True))
    momentum: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.9)
    nesterov: bool = checked_field(Bool(), False)
    betas: tuple[float, float] = checked_field(FloatPair(Float(0.0, 1.0, hi_open=True)), (0.9, 0.999))
    eps: float = checked_field(Float(0.0, 1.0, lo_open=True), 1e-8)


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

    base: float = checked_field(Float(0.0, 1.0))
    factors: dict[int, float] = checked_field(BitFactors(BITS, Float(0.0, 100.0)), factory=dict)
    quantizer_params: float = checked_field(Float(0.0, 1.0), 0.0)
    one_d_params: bool = checked_field(Bool(), True)

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

    name: str = checked_field(OneOf(("cosine", "constant", "keep")), "cosine")
    warmup_epochs: int = checked_field(Int(0, MAX_EPOCHS), 0)
    warmup_start_factor: float = checked_field(Float(0.0, 1.0, lo_open=True), 0.1)
    floor: float = checked_field(Float(0.0, 1.0), 0.0)


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

    epochs: int = checked_field(Int(1, MAX_EPOCHS))
    hard_epochs: int = checked_field(Int(0, MAX_EPOCHS), 0)
    bn_reestimation_batches: int = checked_field(Int(0, 1_000_000), 0)


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

    target: str = checked_field(OneOf(("none", "avg_bits", "gbops")), "none")
    value: float | None = checked_field(Nullable(Float(0.0, 1e9, lo_open=True)), None)
    w_scale: float = checked_field(Float(0.0, 1e6), 1.0)
    a_scale: float = checked_field(Float(0.0, 1e6), 1.0)
    bops_scale: float = checked_field(Float(0.0, 1e6), 3.0)


@dataclass(frozen=True, kw_only=True)
class Distillation:
    """Knowledge distillation from the full-precision model.

    Attributes:
        enabled: add the distillation loss.
        temperature: softmax temperature of teacher and student logits.
        weight: weight of the distillation loss next to the task loss.
    """

    enabled: bool = checked_field(Bool(), False)
    temperature: float = checked_field(Float(0.0, 100.0, lo_open=True), 1.0)
    weight: float = checked_field(Float(0.0, 1000.0), 1.0)


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to do when training goes wrong.

    Attributes:
        on_nonfinite: a nan/inf loss or gradient: ``stop`` the run with an error, or ``skip``
            the optimizer step.
    """

    on_nonfinite: str = checked_field(OneOf(("stop", "skip")), "stop")


def parse_overrides(raw: object) -> dict[str, LayerOverride]:
    raw = expect_mapping(raw, "overrides")
    out = {}
    for pattern, entry in raw.items():
        if not isinstance(pattern, str) or not pattern:
            raise RecipeError(join_path("overrides", pattern),
                              f"overrides: key {show(pattern)} must be a non-empty glob pattern (string)")
        path = f"overrides.{pattern}"
        override = parse_section(LayerOverride, entry, path)
        if not override.to_dict():
            raise RecipeError(path, f"{path}: empty override; set at least one of "
                                    f"{', '.join(f.name for f in fields(LayerOverride))}")
        if override.skip and (override.weight_bits is not None or override.act_bits is not None):
            raise RecipeError(f"{path}.skip", f"{path}.skip: true leaves the layer in full precision; "
                                              "weight_bits/act_bits cannot be set with it")
        out[pattern] = override
    return out


__all__ = ["Bits", "Distillation", "Faults", "FirstLast", "LRSchedule", "LayerOverride",
           "MixedPrecision", "NIPQ_PHASE_DEFAULTS", "Optimizer", "Phases", "WeightDecay",
           "parse_overrides"]
