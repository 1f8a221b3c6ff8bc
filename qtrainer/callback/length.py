"""How long a QAT run is: the recipe's phases fitted to the Trainer (``phases.fit``).

``auto``: the run is as long as the Trainer's: ``max_epochs``, or ``ceil(max_steps / optimizer
steps per epoch)`` when that ends first; the recipe is rescaled to it
(:func:`~qtrainer.recipes.scale_epochs`) and the step-based schedules span the Trainer's total
steps. ``strict``: the recipe's ``phases.epochs`` must fit in ``max_epochs`` and the schedules
end there.
"""

from __future__ import annotations

import math
import warnings

from ..recipes import Recipe, RecipeError, scale_epochs


def steps_per_epoch(trainer) -> int | None:
    """Optimizer steps per epoch (one per ``accumulate_grad_batches`` batches, the last partial
    accumulation included); None when the training loader has no length."""
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches <= 0:
        return None
    return math.ceil(batches / max(trainer.accumulate_grad_batches, 1))


def trainer_epochs(trainer) -> int | None:
    """The epochs the Trainer runs: ``max_epochs``, or fewer when ``max_steps`` ends the run
    first; None when unbounded or unknown."""
    max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 \
        else None
    per_epoch = steps_per_epoch(trainer)
    if trainer.max_steps is not None and trainer.max_steps > 0 and per_epoch:
        by_steps = math.ceil(trainer.max_steps / per_epoch)
        return by_steps if max_epochs is None else min(max_epochs, by_steps)
    return max_epochs


def fit_length(recipe: Recipe, trainer, mode: str) -> tuple[Recipe, int | None]:
    """``(recipe fitted to the Trainer, total optimizer steps of its schedules)`` for
    ``phases.fit`` = ``mode``; the total is None when the Trainer's length in steps is unknown.

    Raises:
        RecipeError: ``strict`` and the Trainer stops before ``phases.epochs``.
    """
    if trainer.train_dataloader is None:  # what estimated_stepping_batches does, max_steps or not
        trainer.fit_loop.setup_data()
    epochs = trainer_epochs(trainer)
    per_epoch = steps_per_epoch(trainer)
    p = recipe.phases
    if mode == "auto":
        if epochs is None:
            warnings.warn(f"the Trainer's length is unbounded or unknown: recipe "
                          f"{recipe.name!r} keeps its {p.epochs} epochs (phases.fit auto needs "
                          "max_epochs, or max_steps with a training loader of known length)",
                          stacklevel=3)
        else:
            recipe = scale_epochs(recipe, epochs)
    elif epochs is not None and p.epochs > epochs:
        raise RecipeError("phases.epochs", f"phases.epochs={p.epochs} of recipe {recipe.name!r} "
                          f"exceeds the {epochs} epochs the Trainer runs (max_epochs="
                          f"{trainer.max_epochs}, max_steps={trainer.max_steps}) and phases.fit is "
                          f"'strict'; set Trainer(max_epochs={p.epochs}), or phases.fit 'auto' "
                          "(QuantizationCallback(fit='auto')) to scale the recipe to the Trainer")
    elif epochs is not None and epochs > p.epochs:
        warnings.warn(f"the Trainer runs {epochs} epochs, more than the recipe's phases.epochs="
                      f"{p.epochs} (phases.fit 'strict'): the schedules end at epoch "
                      f"{p.epochs}", stacklevel=3)
    if per_epoch is None:
        total = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 \
            else None
    else:
        total = per_epoch * recipe.phases.epochs
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
    return recipe, total if total is None else max(int(total), 1)


__all__ = ["fit_length", "steps_per_epoch", "trainer_epochs"]
