"""The typed recipe: one frozen dataclass per section, validated by :meth:`Recipe.from_dict`.

Every field carries its checker (:func:`~.fields.checked_field`); the generic
:func:`~.fields.parse_section` applies them, rejects unknown keys (with a close match) and fills
defaults. Cross-field rules (method-specific ranges, phases, mixed precision) live in
:meth:`Recipe._check_consistency`. Build recipes with :meth:`Recipe.from_dict` or
:func:`qtrainer.recipes.load_recipe`; calling the constructors directly skips validation.

Units: bit-widths are integer bits; epochs are passes over the training set; learning rates
and weight decays are the values handed to the torch optimizer; factors are dimensionless.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .checks import Int, Patterns, Text
from .errors import ROOT, RecipeError
from .fields import expect_mapping, parse_section, reject_unknown
from .methods import Method, method_kwargs, parse_method
from .oscillation import Oscillation, parse_oscillation
from .sections import (NIPQ_PHASE_DEFAULTS, Bits, Distillation, Faults, FirstLast, LayerOverride,
                       LRSchedule, MixedPrecision, Optimizer, Phases, WeightDecay,
                       parse_overrides)
from .yaml_codec import dump_yaml_text


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
        optimizer, weight_decay, lr_schedule, phases, mixed_precision, distillation, faults,
            oscillation: the sections documented on their classes.
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
    oscillation: Oscillation = field(default_factory=Oscillation)

    # ---------------------------------------------------------------- dict / yaml

    @classmethod
    def from_dict(cls, d: object) -> Recipe:
        """Validate a resolved recipe mapping (no ``extends``; use ``load_recipe`` for that).

        Raises:
            RecipeError: for any invalid input, naming the key path.
        """
        d = expect_mapping(d, ROOT)
        if "extends" in d:
            raise RecipeError("extends", "extends is resolved by load_recipe(); Recipe.from_dict() "
                                         "takes a recipe without it")
        reject_unknown(d, [f.name for f in fields(cls)], "")
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in d:
                raise RecipeError(f.name, f"missing required key '{f.name}'")
        method = parse_method(d["method"])
        phase_defaults = NIPQ_PHASE_DEFAULTS if method.name == "nipq" else None
        parsers = {
            "name": lambda v: NAME(v, "name"),
            "version": lambda v: Int(1, 1_000_000)(v, "version"),
            "description": lambda v: Text()(v, "description"),
            "bits": lambda v: parse_section(Bits, v, "bits"),
            "first_last": lambda v: parse_section(FirstLast, v, "first_last"),
            "include": lambda v: Patterns(min_len=1)(v, "include"),
            "exclude": lambda v: Patterns()(v, "exclude"),
            "overrides": parse_overrides,
            "optimizer": lambda v: parse_section(Optimizer, v, "optimizer"),
            "weight_decay": lambda v: parse_section(WeightDecay, v, "weight_decay"),
            "lr_schedule": lambda v: parse_section(LRSchedule, v, "lr_schedule"),
            "phases": lambda v: parse_section(Phases, v, "phases", defaults=phase_defaults),
            "mixed_precision": lambda v: parse_section(MixedPrecision, v, "mixed_precision"),
            "distillation": lambda v: parse_section(Distillation, v, "distillation"),
            "faults": lambda v: parse_section(Faults, v, "faults"),
            "oscillation": parse_oscillation,
        }
        values = {key: parse(d[key]) for key, parse in parsers.items() if key in d}
        recipe = cls(method=method, **values)
        recipe._check_consistency()
        return recipe

    def _check_consistency(self) -> None:
        """Rules that involve more than one field."""
        m = self.method
        if getattr(m, "per_channel", False) and getattr(m, "granularity", None) == "group":
            raise RecipeError("method.per_channel", "method.per_channel: true contradicts "
                              "method.granularity: group; give method.granularity alone (tensor, "
                              "channel or group)")
        if m.name == "nipq":
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
        if s.name == "keep" and self.optimizer.policy == "replace":
            raise RecipeError("lr_schedule.name", "lr_schedule.name: 'keep' leaves the user's scheduler, which "
                                                  "drives the user's optimizer: it needs optimizer.policy 'keep' "
                                                  "or 'auto', not 'replace'")
        if s.name != "cosine" and s.floor:
            raise RecipeError("lr_schedule.floor", f"lr_schedule.floor: {s.floor} is only used by the 'cosine' "
                                                   f"schedule, not '{s.name}'; allowed: 0.0")
        o = self.optimizer
        if o.quantizer_lr is not None and o.quantizer_lr_factor != "auto":
            raise RecipeError("optimizer.quantizer_lr_factor", "optimizer.quantizer_lr_factor: "
                              f"{o.quantizer_lr_factor} and optimizer.quantizer_lr: {o.quantizer_lr} "
                              "both set the quantizers' learning rate; set one (the factor 'auto')")
        if o.nesterov and (o.name != "sgd" or o.momentum == 0):
            raise RecipeError("optimizer.nesterov", "optimizer.nesterov: true needs optimizer.name 'sgd' and "
                                                    f"optimizer.momentum > 0 (got '{o.name}', {o.momentum})")
        mp = self.mixed_precision
        if mp.target == "none":
            if mp.value is not None:
                raise RecipeError("mixed_precision.value", f"mixed_precision.value: {mp.value} is only used "
                                                           "with a mixed_precision.target; allowed: null")
            return
        if not (m.name == "nipq" and m.learn_bits):
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
        """The resolved recipe as plain YAML/JSON-able data (every key, defaults included;
        the ``oscillation`` section only where it differs from its defaults)."""
        def section(obj: Any) -> dict[str, Any]:
            return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}

        out = {
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
        if self.oscillation != Oscillation():
            out["oscillation"] = self.oscillation.to_dict()
        return out

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text; ``load_recipe`` of it gives an equal recipe."""
        return dump_yaml_text(self.to_dict())

    def content_hash(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of :meth:`to_dict` without
        ``name`` and ``description``: equal for recipes that train the same way."""
        d = self.to_dict()
        del d["name"], d["description"]
        for section, key, value in UNHASHED_AT:  # keys added later: old hashes stay valid
            if key in d[section] and d[section][key] == value:
                del d[section][key]
        if d["mixed_precision"]["target"] == "none":  # no effect without a target
            for key in MP_TARGET_ONLY:
                d["mixed_precision"].pop(key, None)
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
            "first_layer": self.first_last.first,
            "last_layer": self.first_last.last,
            "attention_matmul_bits": self.bits.attention_matmul,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {p: o.to_dict() for p, o in self.overrides.items()},
        }


UNHASHED_AT = (("bits", "attention_matmul", None), ("first_last", "first", None),
               ("first_last", "last", None), ("method", "init_percentile", 99.9),
               ("method", "granularity", "tensor"), ("method", "group_size", 128),
               ("method", "grad_scale_count", "per_step"), ("method", "alpha_init", "official"),
               ("mixed_precision", "loss", "official"), ("mixed_precision", "freeze", "round"))
MP_TARGET_ONLY = ("loss", "freeze")
"""``mixed_precision`` keys added later that act only with a target: not hashed without one."""
"""Keys added after recipes were first hashed, as ``(section, key, value)``: left out of
:meth:`Recipe.content_hash` while they hold ``value`` (the behaviour from before they existed),
so checkpoints written before they existed still match their recipe."""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value

