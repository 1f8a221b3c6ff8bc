"""The ``pretrain``, ``model``, ``data`` and ``export`` sections of a run file."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..recipes.checks import Bool, Float, Int, Nullable, OneOf, Text
from ..recipes.errors import RecipeError, did_you_mean, show
from ..recipes.fields import checked_field
from .errors import err, mapping, unknown

try:  # the export package defines the formats; keep validation working without it
    from ..export import FORMATS as EXPORT_FORMATS
except ImportError:  # pragma: no cover
    EXPORT_FORMATS = ("int", "onnx", "torchscript", "exported_program")


@dataclass(frozen=True, kw_only=True)
class Pretrain:
    """Full-precision training before QAT (when the model has no checkpoint).

    Attributes:
        epochs: passes over the training split.
        lr: peak learning rate.
        optimizer: ``sgd`` or ``adamw``.
        momentum, nesterov: SGD's.
        weight_decay: on conv/linear weights; 1-D parameters get none.
        schedule: ``cosine`` (to 0) or ``constant``, stepped per batch after the warm-up.
        warmup_epochs: linear warm-up from ``lr / steps`` to ``lr``.
        label_smoothing: of the cross-entropy.
    """

    epochs: int = checked_field(Int(1, 100_000))
    lr: float = checked_field(Float(0.0, 10.0, lo_open=True), 0.1)
    optimizer: str = checked_field(OneOf(("sgd", "adamw")), "sgd")
    momentum: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.9)
    nesterov: bool = checked_field(Bool(), False)
    weight_decay: float = checked_field(Float(0.0, 1.0), 5e-4)
    schedule: str = checked_field(OneOf(("cosine", "constant")), "cosine")
    warmup_epochs: int = checked_field(Int(0, 100_000), 0)
    label_smoothing: float = checked_field(Float(0.0, 1.0, hi_open=True), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def optimizer_config(self) -> dict[str, Any]:
        """The :class:`~qtrainer.lit_module.ClassificationModule` ``optimizer`` mapping."""
        return {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                "nesterov": self.nesterov, "weight_decay": self.weight_decay,
                "schedule": self.schedule, "warmup_epochs": self.warmup_epochs}

_DATA_CHECKS = {
    "name": Text(), "batch_size": Int(1, 1 << 20), "num_workers": Int(0, 1024),
    "seed": Int(0, 2**32 - 1), "val_size": Int(0, 10**9), "drop_last": Bool(),
    "root": Nullable(Text()), "subset_per_class": Nullable(Int(1, 10**9)),
    "test_per_class": Nullable(Int(1, 10**9)), "device_resident": Bool(),
    "device": Nullable(Text()), "channels_last": Bool(), "download": Bool(),
    "test_fraction": Float(0.0, 1.0, lo_open=True, hi_open=True),
}


def _image_size(value: object, path: str) -> object:
    size = Int(1, 1 << 16)
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2:
        return [size(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        return size(value, path)
    raise err(path, f"{path}: expected a positive integer, [height, width] or null (the images' "
                    f"own size), got {show(value)}")


def _channels(value: object, path: str) -> object:
    if value in ("auto", 1, 3) and not isinstance(value, bool):
        return value
    raise err(path, f"{path}: invalid value {show(value)}; allowed: 'auto', 1, 3")


def _per_channel(value: object, path: str) -> object:
    if value is None:
        return None
    if isinstance(value, list) and 1 <= len(value) <= 4:
        return [Float(-1e3, 1e3)(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise err(path, f"{path}: expected a list of one number per channel (units of the [0, 1] "
                    f"pixel), got {show(value)}")


_DATA_CHECKS.update(image_size=_image_size, channels=_channels, mean=_per_channel,
                    std=_per_channel)

def _check_model_arg(value: object, annotation: str, path: str) -> None:
    """Sizes of the built-in models: a positive int (``width``), or a list of them where the
    constructor takes ``int | Sequence[int]`` (the MLP's ``hidden``)."""
    size = Int(1, 1 << 20)
    if annotation == "int":
        size(value, path)
    elif annotation == "int | Sequence[int]":
        if isinstance(value, list) and value:
            for i, item in enumerate(value):
                size(item, f"{path}[{i}]")
        else:
            try:
                size(value, path)
            except RecipeError:
                raise err(path, f"{path}: expected a positive integer or a non-empty list of "
                                 f"them, got {show(value)}") from None


def check_model(raw: object) -> dict:
    from ..models import BUILTIN_MODELS

    spec = dict(mapping(raw, "model"))
    ckpt = spec.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise err("model.checkpoint", f"model.checkpoint: expected a file path, got {show(ckpt)}")
    if "class_path" in spec:
        return _check_class_path(spec, "model", ("class_path", "init_args", "checkpoint"))
    if "name" not in spec:
        raise err("model.name", "missing required key 'model.name' (a built-in such as "
                                 f"{', '.join(BUILTIN_MODELS)}, a torchvision model such as "
                                 "resnet18, or give model.class_path)")
    name = spec["name"]
    if not isinstance(name, str):
        raise err("model.name", f"model.name: expected a model name, got {show(name)}")
    if name in BUILTIN_MODELS:
        params = inspect.signature(BUILTIN_MODELS[name]).parameters
        allowed = ["name", "checkpoint", *params]
        for key in spec:
            if key not in allowed:
                raise unknown(key, allowed, "model")
            if key in params:
                _check_model_arg(spec[key], str(params[key].annotation), f"model.{key}")
        return spec
    from ..models import _torchvision_models

    known = _torchvision_models()
    if name not in known:
        raise err("model.name", f"model.name: unknown model {show(name)}"
                                 f"{did_you_mean(name, [*BUILTIN_MODELS, *known])}; allowed: "
                                 f"{', '.join(BUILTIN_MODELS)}, a torchvision classification "
                                 "model (resnet18, mobilenet_v2, ...), or give model.class_path")
    if "weights" in spec:
        raise err("model.weights", "model.weights: not supported (no downloads); give a local "
                                    "model.checkpoint instead")
    return spec

def check_data(raw: object) -> dict:
    """The ``data:`` section: a ``name`` with its keys, or a LightningDataModule's
    ``class_path`` and ``init_args``. ``seed`` (the split's) defaults to 0, whatever the run's
    ``seed``: changing the run's seed changes batch order, augmentation and noise, not the
    split."""
    from ..data import DATA_KEYS

    spec = dict(mapping(raw, "data"))
    if "class_path" in spec:
        return _check_class_path(spec, "data", ("class_path", "init_args"))
    if "name" not in spec:
        raise err("data.name", f"missing required key 'data.name' (one of "
                                f"{', '.join(DATA_KEYS)})")
    name = spec["name"]
    if not isinstance(name, str) or name not in DATA_KEYS:
        raise err("data.name", f"data.name: invalid value {show(name)}; allowed: "
                                f"{', '.join(DATA_KEYS)}{did_you_mean(name, DATA_KEYS)}")
    allowed = sorted(DATA_KEYS[name])
    for key, value in spec.items():
        if key not in DATA_KEYS[name]:
            raise err(f"data.{key}", f"unknown key 'data.{key}' for data.name '{name}'"
                                      f"{did_you_mean(key, allowed)} (allowed keys: "
                                      f"{', '.join(allowed)})")
        check = _DATA_CHECKS.get(key)
        if check is not None:
            spec[key] = check(value, f"data.{key}")
    spec.setdefault("seed", 0)
    return spec


def _check_class_path(spec: dict, section: str, allowed: tuple[str, ...]) -> dict:
    """A ``{class_path, init_args}`` section (LightningCLI's form); the class is not imported
    here (``qtrainer validate`` and the runner do that)."""
    for key in spec:
        if key not in allowed:
            raise unknown(key, allowed, section)
    if not isinstance(spec["class_path"], str) or "." not in spec["class_path"]:
        raise err(f"{section}.class_path", f"{section}.class_path: expected "
                                            f"'package.module.Class', got {show(spec['class_path'])}")
    init_args = spec.get("init_args")
    if init_args is not None and not isinstance(init_args, Mapping):
        raise err(f"{section}.init_args", f"{section}.init_args: expected a mapping, got "
                                           f"{show(init_args)}")
    return spec

def check_export(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise err("export", f"export: expected a list of formats ({', '.join(EXPORT_FORMATS)}), "
                             f"got {show(raw)}")
    out = []
    for i, item in enumerate(raw):
        fmt = OneOf(tuple(EXPORT_FORMATS))(item, f"export[{i}]")
        if fmt not in out:
            out.append(fmt)
    return out


__all__ = ["EXPORT_FORMATS", "Pretrain", "check_data", "check_export", "check_model"]
