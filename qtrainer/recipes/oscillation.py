"""The recipe's ``oscillation`` section: weight-oscillation telemetry, dampening and iterative
freezing (Nagel et al., ICML 2022; docs/algorithms.md section 4), with the paper's defaults.

A recipe whose section equals the defaults (telemetry on, no treatment) leaves it out of
:meth:`~qtrainer.recipes.Recipe.to_dict`, so recipes and their content hashes written before
the section existed are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .checks import Bool, Float, OneOf
from .errors import RecipeError
from .fields import checked_field, parse_section

AGGREGATIONS = ("kernel_mean", "sum", "mean")


@dataclass(frozen=True, kw_only=True)
class Dampening:
    """The regularizer ``lambda_d * sum_layers agg((sg(w_hat) - clip(w, s*-Q_N, s*Q_P))^2)``
    pulling latent weights towards their quantized value.

    Attributes:
        enabled: add it (its gradient is added to the weights' before each optimizer step, so it
            acts under manual optimization too).
        weight: the final ``lambda_d`` (paper: 0.1 in every published configuration).
        schedule: ``cosine``: ``lambda_d`` rises from 0 to ``weight`` along half a cosine over
            the run (paper); ``constant``: ``weight`` throughout.
        aggregation: ``kernel_mean`` (sum over the output channels, then mean; paper), ``sum``
            or ``mean`` over a layer's elements.
    """

    enabled: bool = checked_field(Bool(), False)
    weight: float = checked_field(Float(0.0, 1e6), 0.1)
    schedule: str = checked_field(OneOf(("cosine", "constant")), "cosine")
    aggregation: str = checked_field(OneOf(AGGREGATIONS), "kernel_mean")


@dataclass(frozen=True, kw_only=True)
class Freezing:
    """Iterative weight freezing: an element whose oscillation frequency exceeds the threshold
    is frozen at ``round(EMA of its code)`` for the rest of training.

    Attributes:
        enabled: freeze (needs ``oscillation.track``).
        threshold_start: the threshold when freezing begins (paper: 0.1).
        threshold_final: the threshold at the end of the run, reached along half a cosine
            (paper: 0.01 at 4 bits, 0.011 at 3 bits for MobileNetV2).
        begin: the fraction of the run's optimizer steps before which nothing is frozen
            ([choice]: 0, freezing from the first step).
    """

    enabled: bool = checked_field(Bool(), False)
    threshold_start: float = checked_field(Float(0.0, 1.0, lo_open=True), 0.1)
    threshold_final: float = checked_field(Float(0.0, 1.0, lo_open=True), 0.01)
    begin: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.0)


@dataclass(frozen=True, kw_only=True)
class Oscillation:
    """Weight-oscillation telemetry and treatment.

    Attributes:
        track: measure, per quantized weight tensor, the EMA frequency of integer-code flips
            that reverse the previous flip (once per optimizer step, from the codes: no extra
            forward, 7 bytes per weight), logged per epoch and in the run's summary.
        momentum: the EMA momentum of the frequency and of freezing's code average (paper:
            0.01).
        threshold: the frequency above which a weight counts as oscillating in the reports
            ([choice]: 0.05, an oscillation every 20 steps).
        dampening: the :class:`Dampening` subsection.
        freezing: the :class:`Freezing` subsection.
    """

    track: bool = checked_field(Bool(), True)
    momentum: float = checked_field(Float(0.0, 1.0, lo_open=True, hi_open=True), 0.01)
    threshold: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.05)
    dampening: Dampening = checked_field(
        lambda v, path: parse_section(Dampening, v, path), factory=Dampening)
    freezing: Freezing = checked_field(
        lambda v, path: parse_section(Freezing, v, path), factory=Freezing)

    @property
    def active(self) -> bool:
        """Anything to do during training."""
        return self.track or self.dampening.enabled or self.freezing.enabled

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (_flat(getattr(self, f.name)) if f.name in ("dampening", "freezing")
                         else getattr(self, f.name)) for f in fields(self)}


def _flat(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def parse_oscillation(raw: object) -> Oscillation:
    """Validate the ``oscillation`` section (unknown keys rejected with a close match)."""
    osc = parse_section(Oscillation, raw, "oscillation")
    if osc.freezing.enabled and not osc.track:
        raise RecipeError("oscillation.freezing.enabled", "oscillation.freezing.enabled: true "
                          "needs the frequencies it thresholds; set oscillation.track: true")
    f = osc.freezing
    if f.enabled and f.threshold_final > f.threshold_start:
        raise RecipeError("oscillation.freezing.threshold_final",
                          f"oscillation.freezing.threshold_final: {f.threshold_final} is greater "
                          f"than threshold_start ({f.threshold_start}); allowed: at most it")
    return osc


__all__ = ["AGGREGATIONS", "Dampening", "Freezing", "Oscillation", "parse_oscillation"]
