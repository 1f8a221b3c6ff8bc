"""Fitting a recipe's schedule to another number of epochs."""

from __future__ import annotations

from .schema import Recipe


def scale_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """``recipe`` with ``phases.epochs = epochs``; its warm-up and NIPQ hard epochs scaled by
    the same factor (rounded; a nonzero hard phase keeps at least one epoch when ``epochs``
    > 1, and leaves at least one noise epoch)."""
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


__all__ = ["scale_epochs"]
