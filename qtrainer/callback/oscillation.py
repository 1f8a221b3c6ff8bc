"""The recipe's ``oscillation`` section during training: the tracker and freezing run after
every optimizer step (a ``register_step_post_hook`` on each optimizer holding quantized weights,
so manual optimization and several optimizers are covered), dampening's gradient is added and
frozen elements' gradients are zeroed before each step (``on_before_optimizer_step``, after the
loss scaler has unscaled the gradients and before gradient clipping); figures per epoch and for
the run's summary. The math is in :mod:`qtrainer.oscillation`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..oscillation import OscillationTracker, add_dampening_gradient, quantized_weights
from ..recipes import RecipeError
from ..recipes import Oscillation
from ..schedules import CosineRamp


class OscillationControl:
    """Telemetry, dampening and freezing of one fit.

    Args:
        config: the recipe's ``oscillation`` section.
        model: the quantized module.
        total_steps: the run's optimizer steps (the schedules' length; None: unknown).
        step: returns the current optimizer step (0-based).
        treating: returns whether dampening and freezing act now (NIPQ: in its hard phase only,
            whose bit-widths are fixed; LSQ and tempering: always).
    """

    def __init__(self, config: Oscillation, model: torch.nn.Module, total_steps: int | None,
                 step: Callable[[], int], treating: Callable[[], bool]):
        self.config = config
        self.step = step
        self.treating = treating
        damp, freeze = config.dampening, config.freezing
        if (damp.enabled or freeze.enabled) and total_steps is None:
            key = "dampening" if damp.enabled else "freezing"
            raise RecipeError(f"oscillation.{key}.enabled", f"oscillation {key}'s schedule needs "
                              "the run's length in optimizer steps, which the Trainer does not "
                              "know (a training loader without __len__): set "
                              "Trainer(max_steps=...)")
        total = total_steps or 1
        self.damp_weight = None if not damp.enabled else CosineRamp(
            0.0 if damp.schedule == "cosine" else damp.weight, damp.weight, total)
        self.freeze_threshold = None if not freeze.enabled else CosineRamp(
            freeze.threshold_start, freeze.threshold_final, total, begin=int(freeze.begin * total))
        self.tracker = OscillationTracker(model, config.momentum, config.threshold,
                                          freezing=freeze.enabled) if config.track else None
        self.layers = quantized_weights(model)
        self._damp_sum, self._damp_steps = 0.0, 0
        self._by_optimizer: dict[int, list[str]] = {}
        self._handles: list = []

    @classmethod
    def start(cls, callback, trainer, pl_module, hard_phase: str) -> OscillationControl:
        """The control of a ``QuantizationCallback``'s fit (in its ``on_fit_start``, after the
        optimizers are final): the recipe's section, the callback's step count, and the state
        of a resumed checkpoint, else of the callback's previous fit (a second ``fit`` keeps
        its frozen weights); NIPQ treats only in ``hard_phase``."""
        control = cls(callback.recipe.oscillation, pl_module, callback.total_steps,
                      lambda: callback._step(trainer),
                      lambda: not callback.is_nipq or callback.phase == hard_phase)
        previous = callback.oscillation
        control.load_state_dict(callback._oscillation_state or (
            previous.state_dict() if previous is not None else {}))
        callback._oscillation_state = {}
        control.attach(trainer.optimizers)
        return control

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizers) -> None:
        """Hook every optimizer that holds quantized weights (once per optimizer); none with
        tracking and dampening off."""
        self.detach()
        if self.tracker is None and self.damp_weight is None:
            return
        owner = {id(layer.weight): name for name, layer in self.layers.items()}
        for opt in optimizers:
            names = [owner[id(p)] for g in opt.param_groups for p in g["params"] if id(p) in owner]
            if names:
                self._by_optimizer[id(opt)] = names
                self._handles.append(opt.register_step_post_hook(self._after_step))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._by_optimizer = [], {}

    def before_step(self, optimizer) -> None:
        """Add dampening's gradient and zero frozen elements' gradients of the quantized
        weights ``optimizer`` holds."""
        names = self._by_optimizer.get(id(optimizer), ())
        if not names or not self.treating():
            return
        if self.damp_weight is not None:
            weight = self.damp_weight(self.step())
            agg = self.config.dampening.aggregation
            self._damp_sum += sum(add_dampening_gradient(self.layers[n], weight, agg)
                                  for n in names)
            self._damp_steps += 1
        if self.tracker is not None:
            self.tracker.mask_gradients(names)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.tracker is None:
            return
        threshold = 0.0
        if self.freeze_threshold is not None and self.treating():
            threshold = self.freeze_threshold(self.step())
        self.tracker.update(self._by_optimizer.get(id(optimizer), ()), threshold)

    # ------------------------------------------------------------------ figures
    def summary(self, reset: bool = False) -> dict:
        """Totals over the tracked weights (fractions weighted by element count) and per layer:
        ``threshold``, ``oscillating``, ``mean_freq``, ``boundary_distance`` (steps),
        ``frozen``, ``oscillations`` (since the last ``reset``), ``layers`` (name -> the
        same figures, :meth:`qtrainer.oscillation.OscillationTracker.stats`). Empty before the
        first step or with ``track: false``."""
        stats = self.tracker.stats(reset) if self.tracker is not None else {}
        if not stats:
            return {}
        n = sum(s["elements"] for s in stats.values())
        out = {"threshold": self.config.threshold}
        for key in ("oscillating", "mean_freq", "frozen"):
            out[key] = sum(s[key] * s["elements"] for s in stats.values()) / n
        inside = [s for s in stats.values() if s["boundary_distance"] == s["boundary_distance"]]
        out["boundary_distance"] = (sum(s["boundary_distance"] * s["elements"] for s in inside)
                                    / max(sum(s["elements"] for s in inside), 1))
        out["oscillations"] = sum(s["oscillations"] for s in stats.values())
        out["layers"] = stats
        return out

    def metrics(self, per_layer: bool) -> dict[str, float]:
        """This epoch's logged figures (``qat/osc_*``, ``qat/dampening_*``, per layer
        ``qat_osc/<layer>``: its oscillating fraction); resets the oscillation counts."""
        out: dict[str, float] = {}
        s = self.summary(reset=True)
        if s:
            out.update({"qat/osc_fraction": s["oscillating"], "qat/osc_freq": s["mean_freq"],
                        "qat/osc_boundary_distance": s["boundary_distance"],
                        "qat/osc_count": float(s["oscillations"])})
            if self.freeze_threshold is not None:
                out["qat/osc_frozen"] = s["frozen"]
                out["qat/osc_freeze_threshold"] = self.freeze_threshold(self.step())
            if per_layer:
                out.update({f"qat_osc/{name}": v["oscillating"] for name, v in s["layers"].items()})
        if self.damp_weight is not None:
            out["qat/dampening_weight"] = self.damp_weight(self.step())
            if self._damp_steps:
                out["qat/dampening_loss"] = float(self._damp_sum) / self._damp_steps
            self._damp_sum, self._damp_steps = 0.0, 0
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {} if self.tracker is None else self.tracker.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state:
            self.tracker.load_state_dict(state)


__all__ = ["OscillationControl"]
