"""``QuantizationCallback``: one Lightning callback that applies a whole QAT recipe.

Hooks and what they do:

- ``setup``: model surgery (before optimizers exist, so the quantizer parameters are optimized
  and wrapped by DDP); idempotent across fit/validate/test. For a mixed-precision recipe the
  module's ``training_step`` is wrapped to add the resource loss to the returned loss.
- ``on_fit_start``: checks the phases against ``max_epochs``, regroups or replaces the optimizer
  (quantizer parameters in their own group, weight decay by precision) and installs the LR
  schedule; Lightning then restores optimizer/scheduler state when resuming.
- ``on_train_batch_start``: quantizer initialization from the first training batch (statistics
  averaged across ranks), the tempering ``lambda`` of the current optimizer step.
- ``on_train_epoch_start``: NIPQ's switch to hard quantization (bits frozen, BN re-estimated).
- ``on_train_batch_end``: BN re-estimation after the last batch for LSQ/tempering when asked.
- ``on_train_epoch_end``: logs bits, step sizes, lambda, phase, size, GBOPs.
- ``state_dict``/``load_state_dict``: recipe, hash, phase, versions and the RNG state, so a
  resumed run continues as an uninterrupted one would.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..bn import reestimate_batchnorm
from ..nn import QuantizedLayer, named_quantizers
from ..quantizers import NIPQQuantizer, TemperingQuantizer
from ..recipes import Recipe, RecipeError, load_recipe
from ..resources import resource_loss, summarize
from ..schedules import ExponentialDecay
from ..surgery import initialize_quantizers, quantize_model
from ..versions import package_versions
from .batches import batch_input, peek_batch
from .faults import check_gradients, check_quantizers
from .optimizers import apply_optimizer_policy, install_lr_schedule

PHASE_NOISE, PHASE_HARD = "noise", "hard"


class QuantizationCallback(Callback):
    """Quantize any LightningModule's conv/linear layers and train it with a recipe.

    Args:
        recipe: a built-in or registered name (``"lsq-4bit"``), a YAML path, a dict or a
            :class:`~qtrainer.recipes.Recipe`.
        overrides: dotted overrides applied to the recipe (``{"method.grad_scale": "none"}``).
        example_input: one input of the module's ``forward`` used to trace the layers (first and
            last layer, input signedness, sizes). Default: ``pl_module.example_input_array``,
            else the first batch of the stage's dataloader.
        input_fn: maps a batch to the module's ``forward`` input (default :func:`batch_input`).
        allow_recipe_change: resume from a checkpoint written under another recipe hash.
        log_layers: log per-layer bits and step sizes at each epoch end.
    """

    def __init__(self, recipe: str | dict | Recipe = "lsq-4bit", overrides: dict | None = None,
                 example_input=None, input_fn: Callable | None = None,
                 allow_recipe_change: bool = False, log_layers: bool = True):
        if isinstance(recipe, Recipe):
            recipe = recipe.to_dict() if overrides else recipe
        self.recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides=overrides)
        self.example_input = example_input
        self.input_fn = input_fn or batch_input
        self.allow_recipe_change = allow_recipe_change
        self.log_layers = log_layers
        self.report = []
        self.phase = PHASE_NOISE
        self.lambda_schedule: ExponentialDecay | None = None
        self.skipped_steps: list[int] = []
        self._module: pl.LightningModule | None = None

    # ------------------------------------------------------------------ properties
    @property
    def is_nipq(self) -> bool:
        return self.recipe.method.name == "nipq"

    @property
    def hard_epoch(self) -> int:
        """First epoch (0-based) of NIPQ's hard phase."""
        return self.recipe.phases.epochs - self.recipe.phases.hard_epochs

    @property
    def mixed_precision(self) -> bool:
        return self.recipe.mixed_precision.target != "none"

    # ------------------------------------------------------------------ setup: surgery
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module
        if any(isinstance(m, QuantizedLayer) for m in pl_module.modules()):
            self.report = [m.qreport for m in pl_module.modules() if isinstance(m, QuantizedLayer)]
            return
        example = self._example(trainer, pl_module, stage)
        try:
            self.report = quantize_model(pl_module, **self.recipe.surgery_kwargs(),
                                         example_input=example)
        except ValueError as err:
            raise RecipeError("include", f"recipe {self.recipe.name!r} cannot quantize "
                              f"{type(pl_module).__name__}: {err}") from err
        if self.mixed_precision and not getattr(pl_module, "_qtrainer_step_wrapped", False):
            self._wrap_training_step(pl_module)

    def _example(self, trainer, pl_module, stage):
        if self.example_input is not None:
            return self.example_input
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        loop = {"fit": trainer.fit_loop, "validate": trainer.validate_loop,
                "test": trainer.test_loop, "predict": trainer.predict_loop}.get(stage)
        source = getattr(loop, "_data_source", None)
        try:
            loader = source.dataloader() if source is not None and source.is_defined() else None
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            return None if loader is None else self.input_fn(peek_batch(loader))
        except (StopIteration, TypeError, ValueError, IndexError) as err:
            warnings.warn(f"could not take an example input from the {stage} dataloader ({err}); "
                          "pass QuantizationCallback(example_input=...)", stacklevel=2)
            return None

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        """Add the mixed-precision resource loss to what ``training_step`` returns."""
        original = pl_module.training_step
        mp = self.recipe.mixed_precision

        def training_step(*args, **kwargs):
            out = original(*args, **kwargs)
            if out is None or self.phase != PHASE_NOISE:
                return out
            loss = resource_loss(pl_module, mp.target, mp.value, mp.w_scale, mp.a_scale,
                                 mp.bops_scale).squeeze()
            pl_module.log("qat/resource_loss", loss.detach(), on_step=True, on_epoch=True)
            if isinstance(out, Mapping):
                return {**out, "loss": out["loss"] + loss}
            return out + loss

        pl_module.training_step = training_step
        pl_module._qtrainer_step_wrapped = True

    # ------------------------------------------------------------------ fit start: optimizer
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phases = self.recipe.phases
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and phases.epochs > max_epochs:
            raise RecipeError("phases.epochs", 
                f"phases.epochs={phases.epochs} of recipe {self.recipe.name!r} exceeds the "
                f"Trainer's max_epochs={max_epochs}; set Trainer(max_epochs={phases.epochs}) or "
                f"override phases.epochs (e.g. overrides={{'phases.epochs': {max_epochs}}})")
        total = int(trainer.estimated_stepping_batches)
        if max_epochs is not None and max_epochs > 0:
            total = total * phases.epochs // max_epochs
            if max_epochs > phases.epochs:
                warnings.warn(f"max_epochs={max_epochs} exceeds the recipe's phases.epochs="
                              f"{phases.epochs}: the schedules end at epoch {phases.epochs}",
                              stacklevel=2)
        self.total_steps = max(total, 1)
        optimizer = apply_optimizer_policy(self.recipe, trainer, pl_module)
        install_lr_schedule(self.recipe, trainer, optimizer, self.total_steps)
        if self.recipe.method.name == "tempering":
            m = self.recipe.method
            self.lambda_schedule = ExponentialDecay(m.lambda_0, m.k, self.total_steps)
            self._set_lambda(pl_module, trainer.global_step)
        if self.phase == PHASE_HARD:  # resumed inside the hard phase
            self._enter_hard(pl_module)

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not all(q._ready for _, q in named_quantizers(pl_module)):
            self._initialize(trainer, pl_module, batch)
        if self.lambda_schedule is not None:
            self._set_lambda(pl_module, trainer.global_step)

    def _initialize(self, trainer, pl_module, batch) -> None:
        """Initialize quantizers from this batch and average their parameters across ranks."""
        initialize_quantizers(pl_module, self.input_fn(batch))
        if trainer.world_size > 1:
            with torch.no_grad():
                for _, q in named_quantizers(pl_module):
                    for p in q.parameters():
                        p.copy_(trainer.strategy.reduce(p.detach().clone(), reduce_op="mean"))

    def _set_lambda(self, pl_module, step: int) -> None:
        value = self.lambda_schedule(step)
        for _, q in named_quantizers(pl_module):
            if isinstance(q, TemperingQuantizer):
                q.set_lambda(value)
        self.current_lambda = value

    # ------------------------------------------------------------------ faults
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Stop, or skip the step (``faults.on_nonfinite: skip``), on a nan/inf gradient; fp16
        loss scaling handles its own infs."""
        if str(trainer.precision).startswith("16"):
            return
        if check_gradients(pl_module, optimizer, trainer.global_step,
                           self.recipe.faults.on_nonfinite):
            self.skipped_steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        check_quantizers(pl_module, trainer.global_step - 1)
        phases = self.recipe.phases
        last_batch = batch_idx == trainer.num_training_batches - 1
        if (not self.is_nipq and phases.bn_reestimation_batches and last_batch
                and trainer.current_epoch == phases.epochs - 1):
            self._reestimate_bn(trainer, pl_module)

    # ------------------------------------------------------------------ phases
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.is_nipq and self.phase == PHASE_NOISE and trainer.current_epoch >= self.hard_epoch:
            self.phase = PHASE_HARD
            self._enter_hard(pl_module)
            if self.recipe.phases.bn_reestimation_batches:
                self._reestimate_bn(trainer, pl_module)

    def _enter_hard(self, pl_module) -> None:
        for _, q in named_quantizers(pl_module):
            if isinstance(q, NIPQQuantizer) and q.learn_bits:
                q.freeze_bits()
            q.set_hard(True)

    def _reestimate_bn(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        device = pl_module.device

        def forward(batch):
            pl_module(self.input_fn(trainer.strategy.batch_to_device(batch, device)))

        reestimate_batchnorm(pl_module, loader, forward, self.recipe.phases.bn_reestimation_batches)
        if trainer.world_size > 1:
            with torch.no_grad():
                for m in pl_module.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                        m.running_mean.copy_(trainer.strategy.reduce(m.running_mean.clone(), reduce_op="mean"))
                        m.running_var.copy_(trainer.strategy.reduce(m.running_var.clone(), reduce_op="mean"))

    # ------------------------------------------------------------------ logging
    def metrics(self, pl_module) -> dict[str, float]:
        """Current figures: phase, lambda, averages, size, GBOPs and (optionally) per layer."""
        s = summarize(pl_module)
        out = {"qat/avg_weight_bits": s.avg_weight_bits, "qat/avg_act_bits": s.avg_act_bits,
               "qat/size_mb": s.size_mb, "qat/gbops": s.gbops,
               "qat/phase_hard": float(self.phase == PHASE_HARD)}
        if self.lambda_schedule is not None:
            out["qat/lambda"] = self.current_lambda
        if self.log_layers:
            for name, q in named_quantizers(pl_module):
                out[f"qat_bits/{name}"] = float(q.bits)
                out[f"qat_step/{name}"] = float(q.step_size.detach().float().mean())
        return out

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log_dict(self.metrics(pl_module), on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.content_hash(),
                 "phase": self.phase, "versions": package_versions(),
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("recipe_hash")
        current = self.recipe.content_hash()
        if saved != current and not self.allow_recipe_change:
            raise RecipeError("recipe", 
                f"the checkpoint was trained with recipe {state_dict.get('recipe', {}).get('name')!r} "
                f"(hash {saved}) but this run uses {self.recipe.name!r} (hash {current}); pass "
                "QuantizationCallback(allow_recipe_change=True) (QTrainer: allow_recipe_change=True; "
                "qtrainer run: --allow-recipe-change) to resume anyway")
        self.phase = state_dict.get("phase", PHASE_NOISE)
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["qtrainer"] = {"recipe_hash": self.recipe.content_hash(),
                                  "recipe_name": self.recipe.name, "versions": package_versions()}


__all__ = ["PHASE_HARD", "PHASE_NOISE", "QuantizationCallback"]
