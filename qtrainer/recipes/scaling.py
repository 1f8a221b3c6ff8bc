"""Fitting a recipe's schedule to another number of epochs, and saying what was run."""

from __future__ import annotations

from .schema import Recipe


def scale_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """``recipe`` with ``phases.epochs = epochs``; its warm-up and NIPQ hard epochs scaled by
    the same factor (rounded; a nonzero hard phase keeps at least one epoch when ``epochs``
    > 1, and leaves at least one noise epoch).

    These are all the recipe's lengths: the schedules stepped per optimizer step (the cosine
    learning rate, tempering's ``lambda_0 * exp(-k t / T)``) span the run's total steps ``T``,
    so they follow the new length by themselves.
    """
    p, s = recipe.phases, recipe.lr_schedule
    if epochs == p.epochs:
        return recipe
    factor = epochs / p.epochs
    hard = 0
    if p.hard_epochs:
        hard = min(max(round(p.hard_epochs * factor), 1), epochs - 1) if epochs > 1 else 0
    warmup = min(round(s.warmup_epochs * factor), max(epochs - 1, 0))
    d = recipe.to_dict()
    d["phases"] = {**d["phases"], "epochs": epochs, "hard_epochs": hard}
    d["lr_schedule"] = {**d["lr_schedule"], "warmup_epochs": warmup}
    return Recipe.from_dict(d)


def describe_length(original: Recipe, run: Recipe, warmup: bool = True) -> str:
    """One line saying how long ``run`` (``original`` fitted to a Trainer) trains, e.g.
    ``nipq-4bit: 43 epochs scaled to 10: 9 noise + 1 hard, warm-up 1``; ``warmup=False`` leaves
    out the warm-up (the recipe's LR schedule is not applied)."""
    before, p = original.phases.epochs, run.phases
    text = f"{run.name}: {before} epochs" + (f" scaled to {p.epochs}" if p.epochs != before
                                             else " as the recipe states")
    if run.method.name == "nipq":
        text += f": {p.epochs - p.hard_epochs} noise + {p.hard_epochs} hard"
    if warmup and run.lr_schedule.name != "keep":
        text += f", warm-up {run.lr_schedule.warmup_epochs}"
    return text


__all__ = ["describe_length", "scale_epochs"]
