"""``optimizer.policy: replace``: the recipe's optimizer and learning-rate schedule in place of
the module's (the papers' settings; what ``QTrainer`` and ``qtrainer run`` use). Parameters are
grouped by role and planned precision (weight decay scaled by the weight bit-width, quantizer
parameters apart); the groups depend only on the layer plan, so a resumed run's saved optimizer
state loads even after NIPQ's learned bit-widths moved."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from ..nn import QuantizedLayer, named_quantizers
from ..recipes import Recipe, RecipeError
from ..schedules import WarmupCosine
from .user_optimizers import describe_optimizers


def param_groups(recipe: Recipe, pl_module) -> list[dict]:
    """The module's parameters in groups by role and precision, each with a ``name`` and its
    weight decay: ``quantizers`` (every quantizer parameter, trained or frozen, lr = the
    recipe's quantizer lr), ``weights_<b>bit`` (quantized weights, ``b`` the planned bits),
    ``fp`` (other trainable parameters) and ``one_d`` (trainable 1-D ones)."""
    wd, spec = recipe.weight_decay, recipe.optimizer
    groups: dict[str, dict] = {}

    def add(name: str, decay: float, p, **options) -> None:
        groups.setdefault(name, {"params": [], "weight_decay": decay, "name": name, **options})
        groups[name]["params"].append(p)

    quantizer_lr = spec.quantizer_lr if spec.quantizer_lr is not None else \
        spec.lr * spec.quantizer_factor(recipe.method.name, spec.name == "sgd")
    placed = set()
    for _, q in named_quantizers(pl_module):
        for p in q.parameters():
            add("quantizers", wd.quantizer_params, p, lr=quantizer_lr)
            placed.add(id(p))
    for m in pl_module.modules():
        if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None:
            bits = m.qreport.weight_bits
            for w in m.weight_parameters():
                if w.requires_grad:
                    add(f"weights_{bits}bit", wd.effective_weight_decay(bits), w)
                    placed.add(id(w))
    for p in pl_module.parameters():
        if p.requires_grad and id(p) not in placed:
            if p.ndim <= 1:
                add("one_d", wd.base if wd.one_d_params else 0.0, p)
            else:
                add("fp", wd.base, p)
    return list(groups.values())


def replace_optimizers(recipe: Recipe, trainer, pl_module) -> str:
    """Put the recipe's optimizer over :func:`param_groups` in place of the module's optimizers
    and schedulers, and its LR schedule (:func:`install_lr_schedule`). Returns what was
    replaced, for the log."""
    if not pl_module.automatic_optimization:
        raise RecipeError("optimizer.policy",
                          f"optimizer.policy 'replace' cannot train {type(pl_module).__name__}: it "
                          "uses manual optimization (automatic_optimization = False), so its "
                          "training_step steps its own optimizers; use optimizer.policy 'keep' "
                          "(or 'auto', the default)")
    before = describe_optimizers(trainer.optimizers, trainer.lr_scheduler_configs)
    spec = recipe.optimizer
    groups = param_groups(recipe, pl_module)
    if spec.name == "sgd":
        opt = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
    trainer.strategy.optimizers = [opt]
    trainer.strategy.lr_scheduler_configs = []
    return f"replaced {before} by the recipe's {describe_optimizers([opt], [])}"


def install_lr_schedule(recipe: Recipe, trainer, total_steps: int | None) -> str:
    """Install the recipe's warm-up + cosine/constant schedule (a ``LambdaLR`` stepped per
    optimizer step over ``total_steps``) on the replaced optimizer; ``lr_schedule.name: keep``
    is refused (the user's scheduler drove the optimizer that was replaced). Returns a phrase
    for the log."""
    sched = recipe.lr_schedule
    if sched.name == "keep":
        raise RecipeError("lr_schedule.name", "lr_schedule.name: 'keep' leaves the user's "
                          "scheduler, but optimizer.policy replaced the user's optimizer; set "
                          "optimizer.policy 'keep' or an lr_schedule.name of the recipe")
    if total_steps is None:
        raise RecipeError("lr_schedule.name", "the recipe's LR schedule needs the run's length "
                          "in optimizer steps, which the Trainer does not know (a training "
                          "loader without __len__): set Trainer(max_steps=...)")
    optimizer = trainer.optimizers[0]
    steps_per_epoch = total_steps / recipe.phases.epochs
    warmup = round(sched.warmup_epochs * steps_per_epoch)
    factor = WarmupCosine(total_steps, warmup, sched.warmup_start_factor, sched.floor, sched.name)
    for g in optimizer.param_groups:
        g.pop("initial_lr", None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    trainer.strategy.lr_scheduler_configs = [
        LRSchedulerConfig(scheduler, name="qat-lr", interval="step", frequency=1)]
    return (f"LR schedule {sched.name} over {total_steps} steps"
            + (f" after {warmup} warm-up steps" if warmup else ""))


__all__ = ["install_lr_schedule", "param_groups", "replace_optimizers"]
