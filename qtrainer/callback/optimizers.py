"""The optimizer side of a recipe: parameter groups by role and precision (weight decay scaled
by weight bit-width, quantizer parameters apart), the ``keep``/``replace`` optimizer policy and
the recipe's learning-rate schedule."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from ..nn import QuantizedLayer, named_quantizers
from ..recipes import Recipe, RecipeError
from ..schedules import WarmupCosine


def param_groups(recipe: Recipe, pl_module, options: list[dict], owner: dict[int, int]):
    """Split parameters into groups by role and precision, each with its weight decay.

    ``options[i]`` are the hyperparameters of original group ``i``; ``owner`` maps a parameter
    id to its original group (missing: group 0). Returns the groups (each with a ``name``) and,
    for each, the index of the original group it came from.
    """
    wd = recipe.weight_decay
    role: dict[int, tuple[str, float]] = {}
    for _, q in named_quantizers(pl_module):
        for p in q.parameters():
            role[id(p)] = ("quantizers", wd.quantizer_params)
    for m in pl_module.modules():
        if isinstance(m, QuantizedLayer) and m.weight_quantizer is not None:
            bits = m.weight_quantizer.bits
            role[id(m.weight)] = (f"weights_{bits}bit", wd.effective_weight_decay(bits))
    groups: dict[tuple[str, int], dict] = {}
    for p in pl_module.parameters():
        if not p.requires_grad:
            continue
        name, decay = role.get(id(p), ("fp", wd.base))
        if name == "fp" and p.ndim <= 1:
            name, decay = "one_d", (wd.base if wd.one_d_params else 0.0)
        key = (name, owner.get(id(p), 0))
        if key not in groups:
            groups[key] = {**options[key[1]], "params": [], "weight_decay": decay,
                           "name": name if len(options) == 1 else f"{name}/{key[1]}"}
        groups[key]["params"].append(p)
    return list(groups.values()), [origin for _, origin in groups]


def apply_optimizer_policy(recipe: Recipe, trainer, pl_module) -> torch.optim.Optimizer:
    """``replace``: a new optimizer of the recipe over :func:`param_groups` (the user's
    optimizers and schedulers are dropped); ``keep``: the user's single optimizer regrouped in
    place, its schedulers' per-group lists kept consistent. Returns the optimizer."""
    spec = recipe.optimizer
    if spec.policy == "replace":
        groups, _ = param_groups(recipe, pl_module, [{}], {})
        if spec.name == "sgd":
            opt = torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum,
                                  nesterov=spec.nesterov)
        else:
            opt = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps)
        trainer.strategy.optimizers = [opt]
        trainer.strategy.lr_scheduler_configs = []
        return opt
    if len(trainer.optimizers) != 1:
        raise RecipeError("optimizer.policy",
            f"optimizer.policy='keep' needs exactly one optimizer, but the module's "
            f"configure_optimizers returned {len(trainer.optimizers)}; use "
            "optimizer.policy='replace' or a single optimizer")
    opt = trainer.optimizers[0]
    old = opt.param_groups
    options = [{k: v for k, v in g.items() if k != "params"} for g in old]
    owner = {id(p): i for i, g in enumerate(old) for p in g["params"]}
    groups, origin = param_groups(recipe, pl_module, options, owner)
    opt.param_groups = []
    for g in groups:
        opt.add_param_group(g)
    for config in trainer.lr_scheduler_configs:  # keep the user's schedulers consistent
        sched = config.scheduler
        for attr, value in vars(sched).items():
            if isinstance(value, list) and len(value) == len(old) and attr != "optimizer":
                setattr(sched, attr, [value[i] for i in origin])
    return opt


def install_lr_schedule(recipe: Recipe, trainer, optimizer, total_steps: int) -> None:
    """Install the recipe's warm-up + cosine/constant schedule (stepped per optimizer step) in
    place of the Trainer's schedulers; ``lr_schedule.name: keep`` leaves them."""
    sched = recipe.lr_schedule
    if sched.name == "keep":
        return
    steps_per_epoch = total_steps / recipe.phases.epochs
    factor = WarmupCosine(total_steps, round(sched.warmup_epochs * steps_per_epoch),
                          sched.warmup_start_factor, sched.floor, sched.name)
    for g in optimizer.param_groups:
        g.pop("initial_lr", None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    trainer.strategy.lr_scheduler_configs = [
        LRSchedulerConfig(scheduler, name="qat-lr", interval="step", frequency=1)]


__all__ = ["apply_optimizer_policy", "install_lr_schedule", "param_groups"]
