"""The sections of a recipe other than ``method``: one frozen dataclass per section, each field
with its checker, default and unit."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .checks import (Bool, BitFactors, Float, FloatPair, Int, NoneOr, Nullable, NumberOr, OneOf,
                     Text)
from .errors import RecipeError, show
from .fields import BITS, MAX_EPOCHS, checked_field, expect_mapping, join_path, parse_section


@dataclass(frozen=True, kw_only=True)
class Bits:
    """Default bit-widths of quantized layers (initial bits when NIPQ learns them).

    Attributes:
        weight: bits of weight quantizers.
        activation: bits of input-activation quantizers; ``none`` quantizes weights only (every
            layer input stays as it is).
        attention_matmul: bits of quantizers on the inputs of the attention matmuls (q, k, the
            softmax output, v) of quantized ``nn.MultiheadAttention`` layers; ``none``
            (default) leaves them full precision.
    """

    weight: int = checked_field(BITS)
    activation: int | None = checked_field(NoneOr(BITS))
    attention_matmul: int | None = checked_field(NoneOr(BITS), None)


@dataclass(frozen=True, kw_only=True)
class FirstLast:
    """Treatment of the first and the last quantizable layer.

    Attributes:
        bits: an int: weights and inputs of both layers use that many bits (LSQ paper: 8),
            fixed also when NIPQ learns the other layers' bits; ``"same"``: quantized like every
            other layer, bits learned too (NIPQ official); ``"fp"``: left in full precision.
        first, last: the layer names that take the first/last position (null: the layers
            that run first and last on the example input; in a transformer, usually the token
            embedding or patch projection, and the head).
    """

    bits: int | str = checked_field(NumberOr(BITS, ("same", "fp")), 8)
    first: str | None = checked_field(Nullable(Text(what="a layer name")), None)
    last: str | None = checked_field(Nullable(Text(what="a layer name")), None)


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


POLICIES = ("auto", "keep", "replace")


@dataclass(frozen=True, kw_only=True)
class Optimizer:
    """Which optimizer trains the quantized model.

    Attributes:
        policy: ``keep``: the module's own optimizers and LR schedulers train it; the
            quantizer parameters join the optimizer that holds their layer's weight, in a param
            group of their own (weight decay ``weight_decay.quantizer_params``, learning rate
            from ``quantizer_lr``/``quantizer_lr_factor``), and weight decay by precision
            multiplies the decay of the user's group of each quantized weight; ``name``..``eps``
            and ``lr_schedule`` are not used. ``replace``: the recipe's optimizer (the keys
            below) and ``lr_schedule`` replace the module's (the papers' settings). ``auto``:
            ``keep`` under ``QuantizationCallback`` on a user's module, ``replace`` under
            ``QTrainer`` and ``qtrainer run``, which build the module's optimizer themselves.
        name: ``sgd`` or ``adamw`` (``replace``).
        lr: peak learning rate (``replace``).
        momentum: SGD momentum (sgd only).
        nesterov: Nesterov momentum (sgd only, needs momentum > 0).
        betas: AdamW's (beta1, beta2) (adamw only).
        eps: AdamW's epsilon (adamw only).
        quantizer_lr: base learning rate of the quantizer parameters (null: from
            ``quantizer_lr_factor``); schedules scale it as they scale the group it comes from.
        quantizer_lr_factor: quantizer lr = this factor x the lr of the group holding the
            layer's weight. ``auto``: 1.0 with SGD (LSQ and NIPQ train their parameters at the
            weights' lr; LSQ's gradient scale keeps step-size updates in proportion) and for
            NIPQ (alpha and bit-width are softplus/sigmoid parameters of order 1, positive by
            construction); 0.01 for LSQ/tempering step sizes under any other optimizer (Adam's
            update is about +-lr whatever the gradient: an 8-bit first-layer step size of ~0.017
            moves 6% per step at lr 1e-3 and turns negative in one step at lr 0.05).
    """

    policy: str = checked_field(OneOf(POLICIES), "auto")
    name: str = checked_field(OneOf(("sgd", "adamw")), "sgd")
    lr: float = checked_field(Float(0.0, 10.0, lo_open=True))
    momentum: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.9)
    nesterov: bool = checked_field(Bool(), False)
    betas: tuple[float, float] = checked_field(FloatPair(Float(0.0, 1.0, hi_open=True)), (0.9, 0.999))
    eps: float = checked_field(Float(0.0, 1.0, lo_open=True), 1e-8)
    quantizer_lr: float | None = checked_field(Nullable(Float(0.0, 10.0, lo_open=True)), None)
    quantizer_lr_factor: float | str = checked_field(NumberOr(Float(0.0, 100.0, lo_open=True),
                                                              ("auto",)), "auto")

    def quantizer_factor(self, method: str, sgd: bool) -> float:
        """The ``auto`` rule (or the set factor): 1.0 under SGD or for NIPQ, else 0.01."""
        if self.quantizer_lr_factor != "auto":
            return float(self.quantizer_lr_factor)
        return 1.0 if sgd or method == "nipq" else ADAPTIVE_QUANTIZER_LR_FACTOR


ADAPTIVE_QUANTIZER_LR_FACTOR = 0.01
"""``quantizer_lr_factor: auto`` for LSQ/tempering step sizes under an adaptive optimizer."""


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
            (not with ``optimizer.policy: replace``; no warm-up, no floor). The schedule applies
            only where the recipe's optimizer replaces the module's (``optimizer.policy``).
        warmup_epochs: epochs of linear warm-up (0 = none).
        warmup_start_factor: lr factor in the first warm-up epoch, rising linearly to 1
            (NIPQ: 0.1 -> 0.1, 0.4, 0.7 of lr over 3 epochs).
        floor: final lr as a fraction of ``lr`` (cosine only; NIPQ official 1e-3).
    """

    name: str = checked_field(OneOf(("cosine", "constant", "keep")), "cosine")
    warmup_epochs: int = checked_field(Int(0, MAX_EPOCHS), 0)
    warmup_start_factor: float = checked_field(Float(0.0, 1.0, lo_open=True), 0.1)
    floor: float = checked_field(Float(0.0, 1.0), 0.0)


FIT_MODES = ("auto", "strict")


@dataclass(frozen=True, kw_only=True)
class Phases:
    """Length and stages of the run.

    Attributes:
        epochs: total QAT epochs, the hard phase included (NIPQ official: 40 + 3 = 43).
        fit: ``auto``: the run is as long as the Trainer's (``max_epochs``, or ``max_steps``
            over the batches per epoch): ``epochs``, ``hard_epochs`` and
            ``lr_schedule.warmup_epochs`` are scaled to it (:func:`~qtrainer.recipes.scale_epochs`)
            and the step-based schedules (cosine, tempering's decay) span it; ``strict``: the
            Trainer must run at least ``epochs`` epochs (else an error) and the schedules end
            at ``epochs``.
        hard_epochs: NIPQ phase 2: the last epochs train with hard quantization (STE) and frozen
            bits (default 3 for nipq; must be 0 for lsq and tempering, which are always hard).
        bn_reestimation_batches: forward-only BatchNorm statistics re-estimation over this many
            training batches (cumulative average); for nipq at the switch to the hard phase,
            otherwise after the last epoch. 0 = off (default 100 for nipq, 0 otherwise).
    """

    epochs: int = checked_field(Int(1, MAX_EPOCHS))
    fit: str = checked_field(OneOf(FIT_MODES), "auto")
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
        loss: the form of the resource loss (:func:`qtrainer.resources.resource_loss`).
            ``relative``: the model's average bits (or GBOPs) divided by the target, so that
            the same scales reach the target on any model size; ``official``: the official
            code's bit-weighted element counts over 2^23 (sized for ImageNet models: weak on
            small models, strong on large ones).
        w_scale: weight of the weight term of the avg_bits loss.
        a_scale: weight of the activation term of the avg_bits loss.
        bops_scale: weight of the gbops loss.
        freeze: the bit-widths frozen for the hard phase. ``round``: ``round(b_c)`` of each
            quantizer (official; the average lands where rounding leaves it, tenths of a bit
            off when one layer holds a third of the weights); ``target``: the integers nearest
            to the learned ``b_c`` that meet the target (:mod:`qtrainer.bit_targets`).
    """

    target: str = checked_field(OneOf(("none", "avg_bits", "gbops")), "none")
    value: float | None = checked_field(Nullable(Float(0.0, 1e9, lo_open=True)), None)
    loss: str = checked_field(OneOf(("relative", "official")), "relative")
    w_scale: float = checked_field(Float(0.0, 1e6), 1.0)
    a_scale: float = checked_field(Float(0.0, 1e6), 1.0)
    bops_scale: float = checked_field(Float(0.0, 1e6), 3.0)
    freeze: str = checked_field(OneOf(("round", "target")), "target")


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


__all__ = ["ADAPTIVE_QUANTIZER_LR_FACTOR", "Bits", "Distillation", "FIT_MODES", "Faults",
           "FirstLast", "LRSchedule", "LayerOverride", "MixedPrecision", "NIPQ_PHASE_DEFAULTS",
           "Optimizer", "POLICIES", "Phases", "WeightDecay", "parse_overrides"]
