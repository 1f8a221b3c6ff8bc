"""QAT recipes: typed, validated descriptions of how to quantize and train a model.

A recipe is YAML (or a dict) validated into a frozen :class:`Recipe` (``schema.py``; its sections
in ``methods.py`` and ``sections.py``, each field with its default and unit), read and merged by
``io.py``; ``registry.py`` says where named recipes come from.

    from qtrainer.recipes import load_recipe
    recipe = load_recipe("lsq-4bit", overrides={"bits.weight": 3})
    quantize_model(model, **recipe.surgery_kwargs())

Nothing here imports torch.
"""

from .errors import RecipeError
from .io import apply_overrides, dump_recipe, parse_overrides
from .registry import (
    ENTRY_POINT_GROUP,
    RECIPE_PATH_ENV,
    RecipeInfo,
    get_recipe,
    list_recipes,
    load_recipe,
    register_recipe,
    unregister_recipe,
)
from .methods import method_section
from .oscillation import Dampening, Freezing, Oscillation
from .scaling import describe_length, scale_epochs
from .schema import Recipe
from .sections import (Bits, Distillation, Faults, FirstLast, LayerOverride, LRSchedule,
                       MixedPrecision, Optimizer, Phases, WeightDecay)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RECIPE_PATH_ENV",
    "Bits",
    "Dampening",
    "Distillation",
    "Faults",
    "FirstLast",
    "Freezing",
    "LRSchedule",
    "LayerOverride",
    "MixedPrecision",
    "Optimizer",
    "Oscillation",
    "Phases",
    "Recipe",
    "RecipeError",
    "RecipeInfo",
    "WeightDecay",
    "apply_overrides",
    "describe_length",
    "dump_recipe",
    "get_recipe",
    "list_recipes",
    "load_recipe",
    "method_section",
    "parse_overrides",
    "register_recipe",
    "scale_epochs",
    "unregister_recipe",
]
