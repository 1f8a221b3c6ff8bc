"""Layer patterns of a run's recipes (``include``, ``exclude``, ``overrides``) checked against
its model before anything trains.

The prefix rule: in a run file (and with :class:`~qtrainer.trainer.QTrainer`) your model is the
``model`` attribute of qtrainer's LightningModule, and patterns match module names relative to
that LightningModule, so they start with ``model.``: ``model.features.0``, ``model.layer4.*``.
With your own LightningModule and the callback, they are relative to your LightningModule.
"""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

from ..nn import QUANTIZED_TYPES
from ..recipes import Recipe
from ..surgery import TYPE_PREFIX, module_kinds
from .errors import RunFileError

PREFIX = "model."
"""What module names start with inside qtrainer's LightningModule."""

def layer_names(model: nn.Module) -> list[str]:
    """The quantizable layers of ``model`` as recipes name them in a run (``model.<name>``)."""
    return [PREFIX + n for n, m in model.named_modules() if type(m) in QUANTIZED_TYPES]


def layer_kinds(model: nn.Module) -> list[str]:
    """The class names that ``type:<Class>`` patterns can match in ``model``."""
    return sorted(set().union(*(module_kinds(m) for m in model.modules()
                                if type(m) in QUANTIZED_TYPES)))


def _check(pattern: object, names: list[str], key: str, kinds: list[str] = ()) -> None:
    if not isinstance(pattern, str):
        raise RunFileError(key, f"{key}: a layer pattern must be a string, got {pattern!r}")
    if pattern.startswith(TYPE_PREFIX):
        kind = pattern[len(TYPE_PREFIX):]
        if kind in kinds:
            return
        close = difflib.get_close_matches(kind, kinds, n=1)
        hint = f"; did you mean '{TYPE_PREFIX}{close[0]}'?" if close else ""
        raise RunFileError(key, f"{key}: pattern '{pattern}' matches no quantizable layer "
                                f"type{hint} (types: {', '.join(kinds)})")
    if any(fnmatch.fnmatchcase(n, pattern) for n in names):
        return
    if any(fnmatch.fnmatchcase(n, PREFIX + pattern) for n in names):
        hint = (f"; layer names in a run start with '{PREFIX}' (your model is the 'model' of "
                f"qtrainer's LightningModule): write '{PREFIX}{pattern}'")
    else:
        close = difflib.get_close_matches(pattern, names, n=3)
        hint = f"; close layer names: {', '.join(close)}" if close else ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise RunFileError(key, f"{key}: pattern '{pattern}' matches no quantizable layer{hint} "
                            f"(layers: {shown})")


def check_layer_patterns(recipes: list[Recipe], model: nn.Module) -> int:
    """Raise :class:`RunFileError` (key ``recipe.include[0]``, ``compare[1].overrides.<p>``...)
    for the first pattern that matches no quantizable layer (or layer type) of ``model``, or a
    ``first_last.first``/``last`` that names none. Returns the number of quantizable layers."""
    names, kinds = layer_names(model), layer_kinds(model)
    for index, recipe in enumerate(recipes):
        prefix = "recipe" if index == 0 else f"compare[{index - 1}]"
        kwargs = recipe.surgery_kwargs()
        for key in ("include", "exclude"):
            for i, pattern in enumerate(kwargs.get(key) or []):
                _check(pattern, names, f"{prefix}.{key}[{i}]", kinds)
        for pattern in kwargs.get("overrides") or {}:
            _check(pattern, names, f"{prefix}.overrides.{pattern}", kinds)
        for key in ("first", "last"):
            name = getattr(recipe.first_last, key)
            if name is not None and name not in names:
                _check(name, names, f"{prefix}.first_last.{key}")  # an error with close names
    return len(names)


def check_without_data(cfg) -> str:
    """What ``qtrainer validate`` checks beyond the schema, without loading data: the classes
    that ``model.class_path`` and ``data.class_path`` name import, and, when the data's shape
    is known from the section alone (:func:`qtrainer.data.data_shape`), the model builds and
    every layer pattern matches a layer. Returns a note on what was checked; raises
    :class:`RunFileError` naming the key."""
    from ..class_path import import_class
    from ..data import data_shape
    from ..models import build_model

    for section in ("model", "data"):
        spec = getattr(cfg, section)
        if "class_path" in spec:
            try:
                import_class(spec["class_path"], f"{section}.class_path")
            except ValueError as e:
                raise RunFileError(f"{section}.class_path", str(e)) from None
    shape = data_shape(cfg.data)
    if shape is None:
        return "layer patterns not checked (the data gives the model's input shape; they are " \
               "checked when the run starts, before training)"
    spec = {k: v for k, v in cfg.model.items() if k != "checkpoint"}
    try:
        model = build_model(spec, num_classes=shape[0], input_shape=shape[1])
    except (ValueError, TypeError, ImportError) as e:
        raise RunFileError("model", f"model: {e}") from None
    count = check_layer_patterns(cfg.recipes, model)
    return f"layer patterns checked against the model ({count} quantizable layers)"


__all__ = ["PREFIX", "check_layer_patterns", "check_without_data", "layer_kinds", "layer_names"]
