"""``QuantizationCallback``: one Lightning callback that applies a whole QAT recipe.

Hooks and what they do:

- ``setup``: for ``fit``, model surgery (before optimizers exist, so the quantizer parameters
  are optimized and wrapped by DDP); for a mixed-precision recipe the module's
  ``training_step`` is wrapped to add the resource loss to the returned loss. For
  ``validate``/``test``/``predict`` on a module not yet quantized, nothing, unless the Trainer
  restores a QAT checkpoint (``ckpt_path``): then the module is quantized by the checkpoint's
  saved layer plan just before its weights load.
- ``on_fit_start``: fits the recipe to the Trainer's length (``phases.fit``), checks a resumed
  checkpoint's recipe, applies the optimizer policy (keep the user's optimizers and add the
  quantizer groups, or replace them with the recipe's optimizer and LR schedule); Lightning
  then restores optimizer/scheduler state when resuming.
- ``on_train_start``: a run resumed inside NIPQ's hard phase goes back to hard quantization.
- ``on_train_batch_start``: quantizer initialization from the first training batch (statistics
  averaged across ranks), the tempering ``lambda`` of the current optimizer step.
- ``on_train_epoch_start``: NIPQ's switch to hard quantization (bits frozen, BN re-estimated on
  this epoch's batches).
- ``on_train_batch_end``: BN re-estimation after the last batch for LSQ/tempering when asked.
- ``on_train_epoch_end``: logs bits, step sizes, lambda, phase, size, GBOPs, oscillation.
- ``state_dict``/``load_state_dict``/``on_save_checkpoint``: recipe, hash, phase, versions, RNG
  state, oscillation state, and the layer plan ``qtrainer.load_quantized`` rebuilds from.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ..bit_targets import freeze_learned_bits
from ..bn import reestimate_batchnorm
from ..forward import ForwardError, call_args
from ..nn import QuantizedLayer, named_quantizers
from ..quantized import QAT_ENTRY, input_spec, plan_difference
from ..quantizers import TemperingQuantizer, check_choice
from ..recipes import Recipe, RecipeError, describe_length, load_recipe
from ..recipes.sections import FIT_MODES
from ..resources import summarize
from ..schedules import ExponentialDecay
from ..surgery import initialize_quantizers, quantize_model
from ..versions import package_versions
from .batches import batch_input, peek_batch, set_loader_epoch
from .faults import check_gradients, check_quantizers
from .length import fit_length
from .module_hooks import add_resource_loss, quantize_on_restore
from .oscillation import OscillationControl
from .optimizers import install_lr_schedule, replace_optimizers
from .user_optimizers import describe_optimizers, keep_user_optimizers

PHASE_NOISE, PHASE_HARD = "noise", "hard"
AUTO_POLICIES = ("keep", "replace")

log = logging.getLogger("qtrainer")
if log.level == logging.NOTSET:  # info lines shown like Lightning's own
    log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not log.handlers:
    log.addHandler(logging.StreamHandler())
    log.propagate = False


class QuantizationCallback(Callback):
    """Quantize any LightningModule's conv/linear/attention/embedding layers and train it with
    a recipe.

    What it changes in your training: in ``fit``, the layers (quantized in place, keeping their
    parameter names); the recipe's length (scaled to the Trainer's ``max_epochs``/``max_steps``
    unless ``phases.fit: strict``); your optimizers, under ``optimizer.policy: keep`` (the
    default here) only by moving the quantizer parameters into groups of their own (lr from
    ``optimizer.quantizer_lr_factor``, no weight decay) and scaling the weight decay of
    low-bit weights; tempering's noise, NIPQ's hard phase with BatchNorm re-estimation and the
    mixed-precision loss added to what ``training_step`` returns. What it never touches: your
    optimizers' classes, hyperparameters and schedulers under ``keep``; what your
    ``training_step`` computes; your data.
    ``validate``/``test``/``predict`` before any ``fit`` leave the module in full precision,
    unless the Trainer restores a checkpoint written under this callback (``ckpt_path``): then
    the module is quantized as saved. Two log lines (logger ``qtrainer``, rank 0) say how long
    it runs and what it changed.

    Args:
        recipe: a built-in or registered name (``"lsq-4bit"``), a YAML path, a dict or a
            :class:`~qtrainer.recipes.Recipe`.
        overrides: dotted overrides applied to the recipe (``{"method.grad_scale": "none"}``).
        example_input: one input of the module's ``forward`` used to trace the layers (first and
            last layer, input signedness, sizes): a tensor, a tuple of positional arguments or a
            mapping of keyword arguments. Default: ``pl_module.example_input_array``, else
            ``input_fn`` of the first batch of the stage's dataloader.
        input_fn: maps a batch to the module's ``forward`` input, in the same convention
            (default :func:`batch_input`: the batch's first element).
        allow_recipe_change: resume from a checkpoint written under another recipe hash.
        log_layers: log per-layer bits and step sizes at each epoch end.
        fit: ``"auto"`` or ``"strict"``, in place of the recipe's ``phases.fit``.
        auto_policy: what ``optimizer.policy: auto`` means: ``"keep"`` (default: the module's
            optimizers are the user's) or ``"replace"`` (the caller built the module's optimizer
            for QAT and lets the recipe's replace it, as ``QTrainer`` and ``qtrainer run`` do).
    """

    def __init__(self, recipe: str | dict | Recipe = "lsq-4bit", overrides: dict | None = None,
                 example_input=None, input_fn: Callable | None = None,
                 allow_recipe_change: bool = False, log_layers: bool = True,
                 fit: str | None = None, auto_policy: str = "keep"):
        if isinstance(recipe, Recipe):
            recipe = recipe.to_dict() if overrides else recipe
        self.base_recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
        self.recipe = self.base_recipe  # fitted to the Trainer in on_fit_start
        try:
            self.fit_mode = check_choice("fit", fit, FIT_MODES) if fit is not None \
                else self.base_recipe.phases.fit
            self.auto_policy = check_choice("auto_policy", auto_policy, AUTO_POLICIES)
        except ValueError as e:
            raise ValueError(f"QuantizationCallback: {e}") from None
        self.example_input = example_input
        self.input_fn = input_fn or batch_input
        self.allow_recipe_change = allow_recipe_change
        self.log_layers = log_layers
        self.report = []
        self.phase = PHASE_NOISE
        self.lambda_schedule: ExponentialDecay | None = None
        self.total_steps: int | None = None
        self.skipped_steps: list[int] = []
        self.changes: list[str] = []  # what on_fit_start changed in the user's training
        self._input_spec: dict | None = None
        self._restored: dict | None = None  # the callback state of a checkpoint being resumed
        self._restored_plan: list | None = None  # and its layer plan
        self._fitted = self._init_checked = False
        self._unhook: Callable[[], None] | None = None  # removes the restore hook
        self.oscillation: OscillationControl | None = None  # set in on_fit_start
        self._oscillation_state: dict = {}  # a resumed checkpoint's, for on_fit_start

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

    @property
    def policy(self) -> str:
        """``keep`` or ``replace``: the recipe's ``optimizer.policy`` with ``auto`` resolved."""
        policy = self.recipe.optimizer.policy
        return self.auto_policy if policy == "auto" else policy

    # ------------------------------------------------------------------ setup: surgery
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn
        if stage == "fit":
            self._fitted = False  # fitted to this Trainer in on_fit_start
        if any(isinstance(m, QuantizedLayer) for m in pl_module.modules()):
            self.report = [m.qreport for m in pl_module.modules() if isinstance(m, QuantizedLayer)]
            return
        if stage != "fit":
            self._unhook = quantize_on_restore(pl_module, lambda r: setattr(self, "report", r))
            return
        example, source = self._example(trainer, pl_module, stage)
        self._input_spec = input_spec(example) if example is not None else None
        try:
            self.report = quantize_model(pl_module, **self.recipe.surgery_kwargs(),
                                         example_input=example)
        except ForwardError as err:
            raise ForwardError(f"{err}. The input came from {source}; pass "
                               "QuantizationCallback(input_fn=...) returning the forward's "
                               "arguments (a tuple: positional, a mapping: keyword), or "
                               "example_input=...") from err.__cause__
        except ValueError as err:
            raise RecipeError("include", f"recipe {self.recipe.name!r} cannot quantize "
                              f"{type(pl_module).__name__}: {err}") from err
        if self.mixed_precision:
            add_resource_loss(pl_module, self.recipe.mixed_precision,
                              lambda: self.phase == PHASE_NOISE)

    def _example(self, trainer, pl_module, stage) -> tuple[object, str]:
        """An example input and where it came from (for error messages)."""
        if self.example_input is not None:
            return self.example_input, "QuantizationCallback(example_input=...)"
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array, "the module's example_input_array"
        loop = {"fit": trainer.fit_loop, "validate": trainer.validate_loop,
                "test": trainer.test_loop, "predict": trainer.predict_loop}.get(stage)
        source = getattr(loop, "_data_source", None)
        name = getattr(self.input_fn, "__qualname__", repr(self.input_fn))
        where = f"input_fn={name} applied to the first {stage} batch"
        try:
            loader = source.dataloader() if source is not None and source.is_defined() else None
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            return (None if loader is None else self.input_fn(peek_batch(loader))), where
        except (StopIteration, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
            warnings.warn(f"could not take an example input from the {stage} dataloader "
                          f"({type(err).__name__}: {err}); pass "
                          "QuantizationCallback(example_input=...) or input_fn=...", stacklevel=2)
            return None, where

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.oscillation is not None:
            self.oscillation.detach()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None

    # ------------------------------------------------------------------ fit start
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recipe, self.total_steps = fit_length(self.base_recipe, trainer, self.fit_mode)
        self._fitted = True
        self._init_checked = False
        self._check_restored()
        policy = self.policy
        if policy == "replace":
            self.changes = [replace_optimizers(self.recipe, trainer, pl_module),
                            install_lr_schedule(self.recipe, trainer, self.total_steps)]
        else:
            kept = describe_optimizers(trainer.optimizers, trainer.lr_scheduler_configs)
            self.changes = [f"kept {kept}", *keep_user_optimizers(
                self.recipe, pl_module, trainer.optimizers, trainer.lr_scheduler_configs)]
        if self.recipe.method.name == "tempering":
            if self.total_steps is None:
                raise RecipeError("method.k", "tempering's noise decay needs the run's length in "
                                  "optimizer steps, which the Trainer does not know (a training "
                                  "loader without __len__): set Trainer(max_steps=...)")
            m = self.recipe.method
            self.lambda_schedule = ExponentialDecay(m.lambda_0, m.k, self.total_steps)
            self._set_lambda(pl_module, 0)
        self.oscillation = OscillationControl.start(self, trainer, pl_module, PHASE_HARD)
        if self.mixed_precision and not pl_module.automatic_optimization:
            warnings.warn("mixed_precision under manual optimization: the resource loss is added "
                          "to what training_step returns, which manual optimization does not "
                          "backpropagate; add qtrainer.resources.resource_loss(...) to your loss",
                          stacklevel=2)
        if trainer.is_global_zero:
            log.info("qtrainer: %s (%s)", describe_length(self.base_recipe, self.recipe,
                                                          warmup=policy == "replace"), policy)
            log.info("qtrainer: %s", "; ".join(self.changes))

    def _check_restored(self) -> None:
        """Refuse a resumed checkpoint written under another (fitted) recipe, or whose layers
        were quantized otherwise (unless ``allow_recipe_change``)."""
        if self._restored is None or not self._fitted:
            return
        state, self._restored = self._restored, None
        saved, current = state.get("recipe_hash"), self.recipe.content_hash()
        allow = ("pass QuantizationCallback(allow_recipe_change=True) (QTrainer: "
                 "allow_recipe_change=True; qtrainer run: --allow-recipe-change) to resume anyway")
        if saved != current and not self.allow_recipe_change:
            raise RecipeError("recipe",
                f"the checkpoint was trained with recipe {state.get('recipe', {}).get('name')!r} "
                f"(hash {saved}) but this run uses {self.recipe.name!r} (hash {current}; the "
                f"recipe as fitted to this Trainer's length); {allow}")
        # the same recipe traced on other data can choose another input signedness, and the
        # checkpoint's step sizes would load silently into differently quantized layers
        plan, self._restored_plan = self._restored_plan, None
        difference = plan_difference(plan, self.report) if plan else None
        if difference and not self.allow_recipe_change:
            raise RecipeError("recipe", f"{difference}; resume with the first run's example "
                              f"input, or {allow}")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.phase == PHASE_HARD:  # resumed inside the hard phase
            self._enter_hard(pl_module)

    # ------------------------------------------------------------------ per step
    def _step(self, trainer) -> int:
        """The optimizer step the schedules count: Lightning's global step, or under manual
        optimization (which may step several optimizers per batch) the batch index."""
        if trainer.lightning_module.automatic_optimization:
            return trainer.global_step
        return max(trainer.fit_loop.epoch_loop.total_batch_idx, 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._init_checked:
            self._init_checked = True
            if not all(q._ready for _, q in named_quantizers(pl_module)):
                self._initialize(trainer, pl_module, batch)
        if self.lambda_schedule is not None:
            self._set_lambda(pl_module, self._step(trainer))

    def _initialize(self, trainer, pl_module, batch) -> None:
        """Initialize quantizers from this batch and average their parameters across ranks."""
        inputs = self.input_fn(batch)
        args, kwargs = call_args(inputs)
        try:
            initialize_quantizers(pl_module, *args, **kwargs)
        except ForwardError as err:
            name = getattr(self.input_fn, "__qualname__", repr(self.input_fn))
            raise ForwardError(f"{err}. The input came from input_fn={name} applied to the "
                               "training batch; pass QuantizationCallback(input_fn=...) "
                               "returning the forward's arguments (a tuple: positional, a "
                               "mapping: keyword)") from err.__cause__
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
        loss scaling handles its own infs. First: ``oscillation`` (:mod:`.oscillation`)."""
        if self.oscillation is not None:
            self.oscillation.before_step(getattr(optimizer, "_optimizer", optimizer))
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
        mp = self.recipe.mixed_precision
        freeze_learned_bits(pl_module, mp.target if mp.freeze == "target" else "none", mp.value)
        for _, q in named_quantizers(pl_module):
            q.set_hard(True)

    def _reestimate_bn(self, trainer, pl_module) -> None:
        """BN statistics from this epoch's first training batches: the loader is set to the
        current epoch before (and after) iterating it, so a resumed run re-estimates from the
        same batches as an uninterrupted one whatever the loader's state was."""
        loader = trainer.train_dataloader
        device = pl_module.device

        def forward(batch):
            args, kwargs = call_args(self.input_fn(trainer.strategy.batch_to_device(batch, device)))
            pl_module(*args, **kwargs)

        set_loader_epoch(loader, trainer.current_epoch)
        reestimate_batchnorm(pl_module, loader, forward, self.recipe.phases.bn_reestimation_batches)
        set_loader_epoch(loader, trainer.current_epoch)
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
               "qat/quantized_weight_share": s.quantized_weight_share,
               "qat/phase_hard": float(self.phase == PHASE_HARD)}
        if self.lambda_schedule is not None:
            out["qat/lambda"] = self.current_lambda
        if self.log_layers:
            for name, q in named_quantizers(pl_module):
                out[f"qat_bits/{name}"] = float(q.bits)
                out[f"qat_step/{name}"] = float(q.step_size.detach().float().mean())
        out.update(self.oscillation.metrics(self.log_layers) if self.oscillation else {})
        return out

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log_dict(self.metrics(pl_module), on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.content_hash(),
                 "phase": self.phase, "versions": package_versions(),
                 "torch_rng": torch.get_rng_state()}
        state["oscillation"] = self.oscillation.state_dict() if self.oscillation else {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict
        self._check_restored()  # now if the recipe is fitted already, else in on_fit_start
        self.phase = state_dict.get("phase", PHASE_NOISE)
        self._oscillation_state = state_dict.get("oscillation", {})
        if "torch_rng" in state_dict:
            torch.set_rng_state(state_dict["torch_rng"])
        if "cuda_rng" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda_rng"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        entry = checkpoint.get(QAT_ENTRY)
        self._restored_plan = entry.get("plan") if isinstance(entry, dict) else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if not self.report:
            return
        checkpoint[QAT_ENTRY] = {
            "recipe_hash": self.recipe.content_hash(), "recipe_name": self.recipe.name,
            "recipe": self.recipe.to_dict(), "plan": [r.to_dict() for r in self.report],
            "input_spec": self._input_spec, "versions": package_versions()}


__all__ = ["PHASE_HARD", "PHASE_NOISE", "QuantizationCallback"]
