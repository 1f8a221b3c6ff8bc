"""Run files: one YAML file that says what to train, on what, how long and where to write it.

Schema (``recipe``, ``model`` and ``data`` are required; everything else is optional)::

    seed: 0                      # model init, batch order, augmentation, noise (not the split)
    num_threads: 1               # torch CPU threads for this run (default: torch's choice)
    eval_precision: 32-true      # validation and test in fp32 while trainer.precision is a
                                 # mixed precision (default: null, the training precision)
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
    data: {name: npz-jpeg, batch_size: 128}   # qtrainer.data.build_data's keys; seed: the split
    # data: {class_path: my_pkg.data.MyDataModule, init_args: {batch_size: 64}}  # or yours
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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..recipes import Recipe, RecipeError, apply_overrides, load_recipe
from ..recipes.checks import Int, Nullable, OneOf, Text
from ..recipes.errors import ROOT, show
from ..recipes.io import is_path_reference, read_recipe_file
from ..recipes.scaling import scale_epochs
from ..recipes.fields import parse_section
from ..recipes.yaml_codec import dump_yaml_text
from .errors import RunFileError, err, mapping, unknown
from .sections import EXPORT_FORMATS, Pretrain, check_data, check_export, check_model
from .trainer_keys import check_trainer

TOP_KEYS = ("seed", "num_threads", "eval_precision", "output_dir", "recipe", "compare", "model",
            "pretrain", "data", "trainer", "export")
REQUIRED = ("recipe", "model", "data")
RUN_FILE_MARKERS = ("recipe", "model", "data", "trainer", "pretrain", "compare", "output_dir")


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
            raise err(path, f"{path}: expected a recipe name, a .yaml path or a mapping, got ''")
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
    raise err(path, f"{path}: expected a recipe name, a .yaml path or a mapping, got "
                     f"{show(value)} ({type(value).__name__})")


def _load_recipe(value: object, base_dir: Path | None, path: str, epochs: int | None) -> Recipe:
    source = _recipe_source(value, base_dir, path)
    try:
        recipe = load_recipe(source)
        return scale_epochs(recipe, epochs) if epochs is not None else recipe
    except RecipeError as e:
        raise _as_run_error(e, path) from None


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
        eval_precision: None (validation and test at ``trainer.precision``) or ``32-true``.
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
    eval_precision: str | None = None
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
                         export=list(self.export), eval_precision=self.eval_precision,
                         source=self.source)

    def to_dict(self) -> dict[str, Any]:
        """The resolved run file (recipes fully spelled out): what ``run.yaml`` holds;
        :func:`validate_run` of it gives an equal config."""
        d: dict[str, Any] = {"seed": self.seed}
        if self.num_threads is not None:
            d["num_threads"] = self.num_threads
        if self.eval_precision is not None:
            d["eval_precision"] = self.eval_precision
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
    raw = mapping(raw, ROOT)
    for key in raw:
        if key not in TOP_KEYS:
            raise unknown(key, TOP_KEYS, "")
    for key in REQUIRED:
        if key not in raw:
            raise err(key, f"missing required key '{key}'")
    seed = Int(0, 2**32 - 1)(raw.get("seed", 0), "seed")
    num_threads = Nullable(Int(1, 1024))(raw.get("num_threads"), "num_threads")
    from ..trainer import EVAL_PRECISIONS

    eval_precision = Nullable(OneOf(EVAL_PRECISIONS))(raw.get("eval_precision"), "eval_precision")
    default_dir = f"runs/{Path(source).stem}" if source else "runs/run"
    output_dir = Path(Text(what="a folder path")(raw.get("output_dir", default_dir), "output_dir"))
    trainer = check_trainer({} if raw.get("trainer") is None else raw["trainer"])
    epochs = trainer.get("max_epochs")
    recipe = _load_recipe(raw["recipe"], base_dir, "recipe", epochs)
    compare_raw = [] if raw.get("compare") is None else raw["compare"]
    if not isinstance(compare_raw, list):
        raise err("compare", f"compare: expected a list of recipes, got {show(compare_raw)}")
    compare = [_load_recipe(v, base_dir, f"compare[{i}]", epochs)
               for i, v in enumerate(compare_raw)]
    model = check_model(raw["model"])
    if model.get("checkpoint") is not None and base_dir is not None \
            and not os.path.isabs(model["checkpoint"]):
        model["checkpoint"] = str((base_dir / model["checkpoint"]).resolve())
    pretrain = None
    if raw.get("pretrain") is not None:
        pretrain = parse_section(Pretrain, raw["pretrain"], "pretrain")
        if pretrain.warmup_epochs > pretrain.epochs:
            raise err("pretrain.warmup_epochs", f"pretrain.warmup_epochs: {pretrain.warmup_epochs}"
                                                 f" is greater than pretrain.epochs "
                                                 f"({pretrain.epochs})")
    data = check_data(raw["data"])
    export = check_export(raw.get("export", ["int"]))
    return RunConfig(recipe=recipe, compare=compare, model=model, pretrain=pretrain, data=data,
                     seed=seed, num_threads=num_threads, output_dir=output_dir,
                     trainer=trainer, export=export, eval_precision=eval_precision,
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
            raise err(show(key), f"override key {show(key)} must be a dotted key path")
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
                raise err(f"compare[{index}]", f"cannot set '{key}': compare has no item {index}")
            if not sub:
                items[int(index)] = value
                continue
            item = items[int(index)]
            if isinstance(item, str):
                item = {"extends": _recipe_source(item, base, f"compare[{index}]")}
            items[int(index)] = _recipe_overrides(item, sub, value, f"compare[{index}]")
            continue
        if head in ("model", "data") and rest in ("class_path", "name") \
                and isinstance(out.get(head), Mapping):
            out[head] = _switch_kind(out[head], rest, value, head)
            continue
        node = out
        parts = key.split(".")
        if any(not p for p in parts):
            raise err(key, f"override key {show(key)} must be a dotted key path like "
                            "'trainer.max_epochs'")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            if not isinstance(child, Mapping):
                prefix = ".".join(parts[: depth + 1])
                raise err(key, f"cannot set '{key}': '{prefix}' is {show(child)}, not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


def _switch_kind(section: Mapping, key: str, value: object, head: str) -> dict:
    """``model.class_path=...`` on a section that names a built-in (or ``name=...`` on one
    with a class_path): the new kind replaces the old one with its arguments; a model keeps
    its ``checkpoint``, a data section its ``init_args`` or its keys when the kind is unchanged."""
    old_kind = "class_path" if "class_path" in section else "name"
    if key == old_kind:
        return {**section, key: value}
    keep = {k: v for k, v in section.items() if k == "checkpoint"}
    return {key: value, **keep}


def _recipe_overrides(recipe: object, key: str, value: object, prefix: str) -> dict:
    if not isinstance(recipe, Mapping):
        raise err(prefix, f"{prefix}: expected a recipe name, path or mapping, got {show(recipe)}")
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
