"""Run files: one YAML file that says what to train, on what, how long and where to write it.

Schema (``recipe``, ``model`` and ``data`` are required; everything else is optional)::

    seed: 0                      # model init, shuffling, noise; also data.seed when not given
    num_threads: 1               # torch CPU threads for this run (default: torch's choice)
    output_dir: runs/my-run      # default runs/<run file name>; relative to the working dir
    recipe: lsq-4bit             # a recipe name or path, or a mapping (inline or `extends:`)
    compare: [nipq-mp-4bit]      # more recipes, each trained from the same FP model
    model:                       # a built-in or torchvision name with constructor kwargs ...
      name: resnet20
      checkpoint: fp.ckpt        # start from these FP weights (skips `pretrain`)
    # model: {class_path: my_pkg.models.Net, init_args: {width: 64}}   # ... or your class
    pretrain:                    # train full precision first when no checkpoint is given
      epochs: 200
      lr: 0.1
      optimizer: sgd             # sgd | adamw
      momentum: 0.9
      nesterov: false
      weight_decay: 5.0e-4       # on conv/linear weights (0 on 1-D parameters)
      schedule: cosine           # cosine | constant (per step, after the warm-up)
      warmup_epochs: 0
      label_smoothing: 0.0
    data: {name: npz-jpeg, batch_size: 128}   # qtrainer.data.build_data's keys
    trainer:                     # lightning.pytorch.Trainer arguments
      max_epochs: 90             # QAT epochs: sets every recipe's phases.epochs (warm-up and
                                 # NIPQ hard epochs scaled alike); default: the recipe's
      accelerator: auto
      precision: 32-true
    export: [int, onnx]          # formats written after training (default [int]; [] for none)

Problems are :class:`RunFileError` (a :class:`~qtrainer.recipes.RecipeError`) naming the key
path (``trainer.max_epoch``, ``recipe.bits.weight``, ``compare[1].method.name``); unknown keys
come with the closest allowed one. Nothing here reads data or builds models.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .recipes import Recipe, RecipeError, apply_overrides, load_recipe
from .recipes.checks import Bool, Float, Int, Nullable, OneOf, Text
from .recipes.errors import ROOT, did_you_mean, show
from .recipes.io import is_path_reference, read_recipe_file
from .recipes.schema import _f, _parse_section
from .recipes.yaml_codec import dump_yaml_text

try:  # the export package defines the formats; keep validation working without it
    from .export import FORMATS as EXPORT_FORMATS
except ImportError:  # pragma: no cover
    EXPORT_FORMATS = ("int", "onnx", "torchscript", "exported_program")

TOP_KEYS = ("seed", "num_threads", "output_dir", "recipe", "compare", "model", "pretrain", "data", "trainer",
            "export")
REQUIRED = ("recipe", "model", "data")
RUN_FILE_MARKERS = ("recipe", "model", "data", "trainer", "pretrain", "compare", "output_dir")


class RunFileError(RecipeError):
    """A run file is invalid; ``key_path`` names the offending key (``data.batch_size``)."""

    def with_source(self, source: str) -> RunFileError:
        if self.source is not None:
            return self
        return RunFileError(self.key_path, self.detail, source=source)


# ----------------------------------------------------------------------------- sections


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

    epochs: int = _f(Int(1, 100_000))
    lr: float = _f(Float(0.0, 10.0, lo_open=True), 0.1)
    optimizer: str = _f(OneOf(("sgd", "adamw")), "sgd")
    momentum: float = _f(Float(0.0, 1.0, hi_open=True), 0.9)
    nesterov: bool = _f(Bool(), False)
    weight_decay: float = _f(Float(0.0, 1.0), 5e-4)
    schedule: str = _f(OneOf(("cosine", "constant")), "cosine")
    warmup_epochs: int = _f(Int(0, 100_000), 0)
    label_smoothing: float = _f(Float(0.0, 1.0, hi_open=True), 0.0)

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

_TRAINER_RESERVED = {
    "callbacks": "qtrainer adds its own callbacks",
    "logger": "qtrainer writes metrics.csv and TensorBoard logs itself",
    "default_root_dir": "use output_dir",
    "enable_checkpointing": "qtrainer always saves last and best checkpoints",
    "min_epochs": "the recipe fixes the length", "max_steps": "use trainer.max_epochs",
    "min_steps": "use trainer.max_epochs", "max_time": "use trainer.max_epochs",
    "fast_dev_run": "use trainer.max_epochs=1 and limit_train_batches",
    "model_registry": "not supported",
    "plugins": "qtrainer sets its own checkpoint I/O (atomic writes)",
}


class _Number:
    """An int >= lo, or (when ``fraction``) a float in (0, 1]: Lightning's limit_* values."""

    def __init__(self, lo: int = 0, fraction: bool = True):
        self.lo, self.fraction = lo, fraction
        self.allowed = f"an integer >= {lo}" + (" or a fraction in (0, 1]" if fraction else "")

    def __call__(self, value: object, path: str) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFileError(path, f"{path}: expected {self.allowed}, got {show(value)}")
        if isinstance(value, int) and value >= self.lo:
            return value
        if isinstance(value, float) and self.fraction and 0.0 < value <= 1.0:
            return value
        raise RunFileError(path, f"{path}: {show(value)} is out of range; allowed: {self.allowed}")


class _Choice:
    """A value from a fixed list of strings, or (``ints``) a positive int, or a list of ints."""

    def __init__(self, words: tuple[str, ...], ints: bool = False, int_list: bool = False):
        self.words, self.ints, self.int_list = words, ints, int_list
        parts = [" or ".join(f"'{w}'" for w in words)]
        if ints:
            parts.append("a positive integer")
        if int_list:
            parts.append("a list of device indices")
        self.allowed = ", or ".join(p for p in parts if p)

    def __call__(self, value: object, path: str) -> object:
        if isinstance(value, str) and value in self.words:
            return value
        if self.ints and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if self.int_list and isinstance(value, list) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return value
        hint = did_you_mean(value, self.words) if isinstance(value, str) else ""
        raise RunFileError(path, f"{path}: invalid value {show(value)}; allowed: "
                                 f"{self.allowed}{hint}")


PRECISIONS = ("64", "32", "16", "bf16", "transformer-engine", "transformer-engine-float16",
              "16-true", "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true")

_TRAINER_CHECKS = {
    "max_epochs": Int(1, 100_000),
    "accelerator": _Choice(("auto", "cpu", "gpu", "cuda", "mps", "tpu")),
    "devices": _Choice(("auto",), ints=True, int_list=True),
    "num_nodes": Int(1, 100_000),
    "accumulate_grad_batches": Int(1, 1 << 20),
    "gradient_clip_val": Nullable(Float(0.0, 1e9)),
    "gradient_clip_algorithm": OneOf(("norm", "value")),
    "log_every_n_steps": Int(1, 1 << 30),
    "check_val_every_n_epoch": Nullable(Int(1, 100_000)),
    "num_sanity_val_steps": Int(-1, 1 << 30),
    "enable_progress_bar": Bool(),
    "enable_model_summary": Bool(),
    "benchmark": Nullable(Bool()),
    "inference_mode": Bool(),
    "detect_anomaly": Bool(),
    "sync_batchnorm": Bool(),
    "limit_train_batches": Nullable(_Number(1)),
    "limit_val_batches": Nullable(_Number(0)),
    "limit_test_batches": Nullable(_Number(1)),
}


def _trainer_keys() -> list[str]:
    import lightning.pytorch as pl

    return [p for p in inspect.signature(pl.Trainer.__init__).parameters if p != "self"]


# Precision accepts ints too (16, 32, 64): let _Choice compare them as words.
class _Precision(_Choice):
    def __call__(self, value: object, path: str) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in PRECISIONS:
            return value
        return super().__call__(value, path)


_TRAINER_CHECKS["precision"] = _Precision(PRECISIONS)


class _Strategy:
    """A strategy name Lightning knows (``auto``, ``ddp``, ``fsdp``, ...); a run file cannot
    hold a Strategy object."""

    allowed = "'auto' or a Lightning strategy name such as 'ddp'"

    def __call__(self, value: object, path: str) -> str:
        from lightning.pytorch.strategies import StrategyRegistry

        names = ["auto", *StrategyRegistry.available_strategies()]
        if isinstance(value, str) and value in names:
            return value
        hint = did_you_mean(value, names) if isinstance(value, str) else ""
        raise RunFileError(path, f"{path}: invalid value {show(value)}; allowed: "
                                 f"{', '.join(names)}{hint}")


class _Fraction:
    """A float in [0, 1] or an int >= 0 (``overfit_batches``: 0 / 0.0 is off)."""

    allowed = "an integer >= 0 or a fraction in [0, 1]"

    def __call__(self, value: object, path: str) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunFileError(path, f"{path}: expected {self.allowed}, got {show(value)}")
        if (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0):
            return value
        raise RunFileError(path, f"{path}: {show(value)} is out of range; allowed: {self.allowed}")


class _Interval(_Number):
    """``val_check_interval``: batches (int >= 1), a fraction of the epoch in (0, 1], or a
    time ``"DD:HH:MM:SS"``."""

    def __init__(self):
        super().__init__(1)
        self.allowed += ", or a time 'DD:HH:MM:SS'"

    def __call__(self, value: object, path: str) -> int | float | str:
        import re

        if isinstance(value, str) and re.fullmatch(r"\d{1,5}:\d{1,2}:\d{1,2}:\d{1,2}", value):
            return value
        return super().__call__(value, path)


class _Deterministic:
    allowed = "true, false, null or 'warn'"

    def __call__(self, value: object, path: str) -> bool | str | None:
        if value is None or isinstance(value, bool) or value == "warn":
            return value
        raise RunFileError(path, f"{path}: invalid value {show(value)}; allowed: {self.allowed}")


_TRAINER_CHECKS.update({
    "strategy": _Strategy(),
    "limit_predict_batches": Nullable(_Number(1)),
    "overfit_batches": _Fraction(),
    "val_check_interval": Nullable(_Interval()),
    "deterministic": _Deterministic(),
    "use_distributed_sampler": Bool(),
    "profiler": Nullable(OneOf(("simple", "advanced", "pytorch", "xla"))),
    "barebones": Bool(),
    "reload_dataloaders_every_n_epochs": Int(0, 1 << 30),
    "enable_autolog_hparams": Bool(),
})


# ----------------------------------------------------------------------------- helpers


def _err(path: str, detail: str) -> RunFileError:
    return RunFileError(path, detail)


def _mapping(raw: object, path: str) -> Mapping:
    if not isinstance(raw, Mapping):
        raise _err(path, f"{path}: expected a mapping, got {show(raw)} ({type(raw).__name__})")
    return raw


def _unknown(key: object, allowed, path: str) -> RunFileError:
    full = f"{path}.{key}" if path else str(key)
    where = f"'{path}'" if path else "a run file"
    return _err(full, f"unknown key '{full}'{did_you_mean(key, list(allowed))} (allowed keys "
                      f"in {where}: {', '.join(allowed)})")


def _as_run_error(err: RecipeError, prefix: str) -> RunFileError:
    """A recipe problem, re-addressed under ``prefix`` (``recipe``, ``compare[1]``)."""
    if err.key_path == ROOT or (err.key_path == "name" and not err.detail.startswith("name:")):
        # the whole recipe, or its reference (an unknown or clashing recipe name)
        where = f" ({err.source})" if err.source else ""
        return RunFileError(prefix, f"{prefix}{where}: {err.detail}")
    key = f"{prefix}.{err.key_path}"
    detail = err.detail.replace(f"'{err.key_path}'", f"'{key}'")
    if detail.startswith(f"{err.key_path}:"):
        detail = f"{prefix}.{detail}"
    elif not detail.startswith(("unknown key", "missing required key")) or key not in detail:
        detail = f"{prefix}: {detail}"
    if err.source:
        detail += f" (in {err.source})"
    return RunFileError(key, detail)


def is_run_file(raw: Mapping) -> bool:
    """Whether a parsed YAML mapping is a run file (has ``recipe``/``model``/``data``/...)
    rather than a recipe (``name``/``method``/...)."""
    return any(k in raw for k in RUN_FILE_MARKERS)


# ----------------------------------------------------------------------------- recipes


def _recipe_source(value: object, base_dir: Path | None, path: str) -> object:
    """What ``load_recipe`` gets for a ``recipe:`` value: names as they are, relative paths
    (and relative ``extends`` paths of mappings) made absolute against the run file's folder."""
    if isinstance(value, str):
        if not value:
            raise _err(path, f"{path}: expected a recipe name, a .yaml path or a mapping, got ''")
        if is_path_reference(value) and base_dir is not None and not os.path.isabs(value):
            return str((base_dir / value).resolve())
        return value
    if isinstance(value, Mapping):
        out = dict(value)
        ext = out.get("extends")
        if isinstance(ext, str) and is_path_reference(ext) and base_dir is not None \
                and not os.path.isabs(ext):
            out["extends"] = str((base_dir / ext).resolve())
        return out
    raise _err(path, f"{path}: expected a recipe name, a .yaml path or a mapping, got "
                     f"{show(value)} ({type(value).__name__})")


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


def _load_recipe(value: object, base_dir: Path | None, path: str, epochs: int | None) -> Recipe:
    source = _recipe_source(value, base_dir, path)
    try:
        recipe = load_recipe(source)
        return scale_epochs(recipe, epochs) if epochs is not None else recipe
    except RecipeError as e:
        raise _as_run_error(e, path) from None


# ----------------------------------------------------------------------------- model


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
                raise _err(path, f"{path}: expected a positive integer or a non-empty list of "
                                 f"them, got {show(value)}") from None


def _check_model(raw: object) -> dict:
    from .models import BUILTIN_MODELS

    spec = dict(_mapping(raw, "model"))
    ckpt = spec.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise _err("model.checkpoint", f"model.checkpoint: expected a file path, got {show(ckpt)}")
    if "class_path" in spec:
        allowed = ("class_path", "init_args", "checkpoint")
        for key in spec:
            if key not in allowed:
                raise _unknown(key, allowed, "model")
        if not isinstance(spec["class_path"], str) or "." not in spec["class_path"]:
            raise _err("model.class_path", f"model.class_path: expected 'package.module.Class', "
                                           f"got {show(spec['class_path'])}")
        init_args = spec.get("init_args")
        if init_args is not None and not isinstance(init_args, Mapping):
            raise _err("model.init_args", f"model.init_args: expected a mapping, got "
                                          f"{show(init_args)}")
        return spec
    if "name" not in spec:
        raise _err("model.name", "missing required key 'model.name' (a built-in such as "
                                 f"{', '.join(BUILTIN_MODELS)}, a torchvision model such as "
                                 "resnet18, or give model.class_path)")
    name = spec["name"]
    if not isinstance(name, str):
        raise _err("model.name", f"model.name: expected a model name, got {show(name)}")
    if name in BUILTIN_MODELS:
        params = inspect.signature(BUILTIN_MODELS[name]).parameters
        allowed = ["name", "checkpoint", *params]
        for key in spec:
            if key not in allowed:
                raise _unknown(key, allowed, "model")
            if key in params:
                _check_model_arg(spec[key], str(params[key].annotation), f"model.{key}")
        return spec
    from .models import _torchvision_models

    known = _torchvision_models()
    if name not in known:
        raise _err("model.name", f"model.name: unknown model {show(name)}"
                                 f"{did_you_mean(name, [*BUILTIN_MODELS, *known])}; allowed: "
                                 f"{', '.join(BUILTIN_MODELS)}, a torchvision classification "
                                 "model (resnet18, mobilenet_v2, ...), or give model.class_path")
    if "weights" in spec:
        raise _err("model.weights", "model.weights: not supported (no downloads); give a local "
                                    "model.checkpoint instead")
    return spec


# ----------------------------------------------------------------------------- data, trainer


def _check_data(raw: object, seed: int) -> dict:
    from .data import DATA_KEYS

    spec = dict(_mapping(raw, "data"))
    if "name" not in spec:
        raise _err("data.name", f"missing required key 'data.name' (one of "
                                f"{', '.join(DATA_KEYS)})")
    name = spec["name"]
    if not isinstance(name, str) or name not in DATA_KEYS:
        raise _err("data.name", f"data.name: invalid value {show(name)}; allowed: "
                                f"{', '.join(DATA_KEYS)}{did_you_mean(name, DATA_KEYS)}")
    allowed = sorted(DATA_KEYS[name])
    for key, value in spec.items():
        if key not in DATA_KEYS[name]:
            raise _err(f"data.{key}", f"unknown key 'data.{key}' for data.name '{name}'"
                                      f"{did_you_mean(key, allowed)} (allowed keys: "
                                      f"{', '.join(allowed)})")
        check = _DATA_CHECKS.get(key)
        if check is not None:
            spec[key] = check(value, f"data.{key}")
    spec.setdefault("seed", seed)
    return spec


def _check_trainer(raw: object) -> dict:
    spec = dict(_mapping(raw, "trainer"))
    allowed = [k for k in _trainer_keys() if k not in _TRAINER_RESERVED]
    for key, value in spec.items():
        if key in _TRAINER_RESERVED:
            raise _err(f"trainer.{key}", f"trainer.{key}: cannot be set in a run file "
                                         f"({_TRAINER_RESERVED[key]})")
        if key not in allowed:
            raise _unknown(key, allowed, "trainer")
        check = _TRAINER_CHECKS.get(key)
        if check is not None:
            spec[key] = check(value, f"trainer.{key}")
    return spec


def _check_export(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise _err("export", f"export: expected a list of formats ({', '.join(EXPORT_FORMATS)}), "
                             f"got {show(raw)}")
    out = []
    for i, item in enumerate(raw):
        fmt = OneOf(tuple(EXPORT_FORMATS))(item, f"export[{i}]")
        if fmt not in out:
            out.append(fmt)
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class RunConfig:
    """A validated run file.

    Attributes:
        recipe: the main QAT recipe (epochs already set from ``trainer.max_epochs``).
        compare: further recipes trained from the same FP model, each in
            ``output_dir/compare/<name>/``.
        model: the ``model:`` mapping (``checkpoint`` made absolute).
        pretrain: the FP training stage, or None.
        data: the ``data:`` mapping for :func:`qtrainer.data.build_data` (``seed`` filled).
        trainer: ``lightning.pytorch.Trainer`` arguments (``max_epochs`` included if given).
        export: formats to export after training.
        source: the file it came from, if any.
    """

    recipe: Recipe
    model: dict
    data: dict
    seed: int = 0
    num_threads: int | None = None
    output_dir: Path = Path("runs/run")
    compare: list[Recipe] = field(default_factory=list)
    pretrain: Pretrain | None = None
    trainer: dict = field(default_factory=dict)
    export: list[str] = field(default_factory=lambda: ["int"])
    source: str | None = None

    @property
    def recipes(self) -> list[Recipe]:
        return [self.recipe, *self.compare]

    def job_dirs(self) -> list[Path]:
        """Output folder of each recipe: ``output_dir`` for the main one, ``compare/<name>``
        (``<name>-2``... on repeats) for the others."""
        dirs, seen = [self.output_dir], {}
        for r in self.compare:
            seen[r.name] = seen.get(r.name, 0) + 1
            suffix = "" if seen[r.name] == 1 else f"-{seen[r.name]}"
            dirs.append(self.output_dir / "compare" / f"{r.name}{suffix}")
        return dirs

    def job(self, index: int) -> RunConfig:
        """The run of recipe ``index`` alone, writing to its own folder (its ``run.yaml``)."""
        return RunConfig(recipe=self.recipes[index], model=dict(self.model), data=dict(self.data),
                         seed=self.seed, num_threads=self.num_threads,
                         output_dir=self.job_dirs()[index], compare=[],
                         pretrain=self.pretrain, trainer=dict(self.trainer),
                         export=list(self.export), source=self.source)

    def to_dict(self) -> dict[str, Any]:
        """The resolved run file (recipes fully spelled out): what ``run.yaml`` holds;
        :func:`validate_run` of it gives an equal config."""
        d: dict[str, Any] = {"seed": self.seed}
        if self.num_threads is not None:
            d["num_threads"] = self.num_threads
        d.update(output_dir=str(self.output_dir), recipe=self.recipe.to_dict())
        if self.compare:
            d["compare"] = [r.to_dict() for r in self.compare]
        d["model"] = copy.deepcopy(self.model)
        if self.pretrain is not None:
            d["pretrain"] = self.pretrain.to_dict()
        d["data"] = copy.deepcopy(self.data)
        d["trainer"] = copy.deepcopy(self.trainer)
        d["export"] = list(self.export)
        return d

    def to_yaml(self) -> str:
        return dump_yaml_text(self.to_dict())


def validate_run(raw: object, *, source: str | None = None,
                 base_dir: str | os.PathLike | None = None) -> RunConfig:
    """Validate a run-file mapping. Relative recipe paths and ``model.checkpoint`` resolve
    against ``base_dir`` (the run file's folder; default the working directory); a relative
    ``output_dir`` and data ``root`` stay relative to the working directory.

    Raises:
        RunFileError: naming the key path of the first problem.
    """
    try:
        return _validate(raw, source, Path(base_dir) if base_dir is not None else None)
    except RecipeError as e:  # RunFileError, or a checker from the recipe schema
        err = e if isinstance(e, RunFileError) else RunFileError(e.key_path, e.detail)
        raise (err.with_source(source) if source else err) from None


def _validate(raw: object, source: str | None, base_dir: Path | None) -> RunConfig:
    raw = _mapping(raw, ROOT)
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, "")
    for key in REQUIRED:
        if key not in raw:
            raise _err(key, f"missing required key '{key}'")
    seed = Int(0, 2**32 - 1)(raw.get("seed", 0), "seed")
    num_threads = Nullable(Int(1, 1024))(raw.get("num_threads"), "num_threads")
    default_dir = f"runs/{Path(source).stem}" if source else "runs/run"
    output_dir = Path(Text(what="a folder path")(raw.get("output_dir", default_dir), "output_dir"))
    trainer = _check_trainer({} if raw.get("trainer") is None else raw["trainer"])
    epochs = trainer.get("max_epochs")
    recipe = _load_recipe(raw["recipe"], base_dir, "recipe", epochs)
    compare_raw = [] if raw.get("compare") is None else raw["compare"]
    if not isinstance(compare_raw, list):
        raise _err("compare", f"compare: expected a list of recipes, got {show(compare_raw)}")
    compare = [_load_recipe(v, base_dir, f"compare[{i}]", epochs)
               for i, v in enumerate(compare_raw)]
    model = _check_model(raw["model"])
    if model.get("checkpoint") is not None and base_dir is not None \
            and not os.path.isabs(model["checkpoint"]):
        model["checkpoint"] = str((base_dir / model["checkpoint"]).resolve())
    pretrain = None
    if raw.get("pretrain") is not None:
        pretrain = _parse_section(Pretrain, raw["pretrain"], "pretrain")
        if pretrain.warmup_epochs > pretrain.epochs:
            raise _err("pretrain.warmup_epochs", f"pretrain.warmup_epochs: {pretrain.warmup_epochs}"
                                                 f" is greater than pretrain.epochs "
                                                 f"({pretrain.epochs})")
    data = _check_data(raw["data"], seed)
    export = _check_export(raw.get("export", ["int"]))
    return RunConfig(recipe=recipe, compare=compare, model=model, pretrain=pretrain, data=data,
                     seed=seed, num_threads=num_threads, output_dir=output_dir,
                     trainer=trainer, export=export,
                     source=source)


# ----------------------------------------------------------------------------- overrides


def apply_run_overrides(raw: Mapping, overrides: Mapping[str, Any],
                        base_dir: str | os.PathLike | None = None) -> dict:
    """Set dotted key paths across a run file (``trainer.max_epochs``, ``data.root``,
    ``recipe.bits.weight``, ``compare.1.bits.weight``). A ``recipe`` given by name or path
    becomes ``{extends: <it>}`` so that recipe keys can be set in it; a relative path is made
    absolute against ``base_dir`` first (the ``extends`` of a mapping would resolve against the
    working directory)."""
    out = copy.deepcopy(dict(raw))
    base = Path(base_dir) if base_dir is not None else None
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise _err(show(key), f"override key {show(key)} must be a dotted key path")
        head, _, rest = key.partition(".")
        if head == "recipe" and rest:
            current = out.get("recipe")
            if isinstance(current, str):
                current = {"extends": _recipe_source(current, base, "recipe")}
            elif current is None:
                current = {}
            out["recipe"] = _recipe_overrides(current, rest, value, "recipe")
            continue
        if head == "compare" and rest:
            index, _, sub = rest.partition(".")
            items = out.get("compare")
            if not isinstance(items, list) or not index.isdigit() or int(index) >= len(items):
                raise _err(f"compare[{index}]", f"cannot set '{key}': compare has no item {index}")
            if not sub:
                items[int(index)] = value
                continue
            item = items[int(index)]
            if isinstance(item, str):
                item = {"extends": _recipe_source(item, base, f"compare[{index}]")}
            items[int(index)] = _recipe_overrides(item, sub, value, f"compare[{index}]")
            continue
        node = out
        parts = key.split(".")
        if any(not p for p in parts):
            raise _err(key, f"override key {show(key)} must be a dotted key path like "
                            "'trainer.max_epochs'")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, Mapping):
                prefix = ".".join(parts[: depth + 1])
                raise _err(key, f"cannot set '{key}': '{prefix}' is {show(child)}, not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


def _recipe_overrides(recipe: object, key: str, value: object, prefix: str) -> dict:
    if not isinstance(recipe, Mapping):
        raise _err(prefix, f"{prefix}: expected a recipe name, path or mapping, got {show(recipe)}")
    try:
        return apply_overrides(recipe, {key: value})
    except RecipeError as e:
        raise _as_run_error(e, prefix) from None


def read_run_file(path: str | os.PathLike) -> dict:
    """The raw top-level mapping of a YAML file (run file or recipe)."""
    try:
        return read_recipe_file(path)
    except RecipeError as e:
        raise RunFileError(e.key_path, e.detail, source=e.source) from None


def load_run_file(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read, override and validate a run file."""
    path = Path(path)
    raw = read_run_file(path)
    if not is_run_file(raw):
        raise RunFileError(ROOT, "this is not a run file (no recipe/model/data keys); a recipe "
                                 "file is run through a run file's 'recipe:' key",
                           source=str(path))
    if overrides:
        try:
            raw = apply_run_overrides(raw, overrides, base_dir=path.parent)
        except RunFileError as e:
            raise e.with_source(str(path)) from None
    return validate_run(raw, source=str(path), base_dir=path.parent)


__all__ = ["EXPORT_FORMATS", "Pretrain", "RunConfig", "RunFileError", "apply_run_overrides",
           "is_run_file", "load_run_file", "read_run_file", "scale_epochs", "validate_run"]
