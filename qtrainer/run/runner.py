"""``qtrainer run``: execute a validated run file.

FP pretraining (or a checkpoint, or a reused ``fp.ckpt``), then one QAT job per recipe through
:class:`~qtrainer.trainer.QTrainer`, each with its summary, plots and exports, and the run's
``summary.json``; resumable after an interruption (``resume=True``).
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import Dataset

from ..atomic import atomic_write, write_text_atomic
from ..checkpoint_io import AtomicCheckpointIO
from ..lightning_setup import (WallClock, checkpoint_callbacks, evaluate_module, loggers,
                               quiet_warnings, trainer_args, validation_step_off)
from ..lit_module import ClassificationModule
from ..loaders import EpochSync, make_loader
from ..recipes import Recipe, RecipeError
from ..trainer import QTrainer
from .runfile import RunConfig, RunFileError


@dataclass
class JobResult:
    """What one QAT job of a run produced (its ``summary.json``)."""

    name: str
    dir: Path
    summary: dict[str, Any]
    skipped: bool = False


@dataclass
class RunResult:
    """A finished run: the FP baseline and one :class:`JobResult` per recipe."""

    output_dir: Path
    fp: dict[str, Any] | None
    jobs: list[JobResult] = field(default_factory=list)
    wall_time_s: float = 0.0

    def rows(self) -> list[dict[str, Any]]:
        return [j.summary for j in self.jobs]


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def is_main_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which must not write the
    run's files: Lightning starts them with ``LOCAL_RANK``/``NODE_RANK``/``RANK`` set."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def write_json(path: Path, data: Any) -> None:
    """Atomically write ``data`` as JSON (main process only)."""
    if is_main_process():
        write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _write_text(path: Path, text: str) -> None:
    if is_main_process():
        write_text_atomic(path, text)


def _fp_key(cfg: RunConfig) -> dict[str, Any]:
    """What the FP model depends on: reusing fp.ckpt needs these to match."""
    return {"model": cfg.model, "data": cfg.data, "seed": cfg.seed,
            "pretrain": None if cfg.pretrain is None else cfg.pretrain.to_dict()}


def _seed(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)


def bundle_loaders(bundle, seed: int):
    """(train, val, test) loaders of a DataBundle; Datasets get an :class:`EpochShuffleSampler`
    so that resumed runs repeat the uninterrupted run's batches."""
    def loader(data, train):
        if not isinstance(data, Dataset):
            return data  # a DeviceLoader (set_epoch is called by _EpochSync)
        return make_loader(data, bundle.batch_size, train, seed, bundle.num_workers)

    val = bundle.val if bundle.val is not None else None
    return loader(bundle.train, True), None if val is None else loader(val, False), \
        loader(bundle.test, False)


def prepare(cfg: RunConfig):
    """Build the data bundle and the (untrained, or checkpoint-loaded) FP model of a run, and
    check the recipes' layer patterns against the model. Problems with the data or model
    section, or a pattern that matches no layer, are :class:`RunFileError`\\ s (raised before
    any training)."""
    from ..data import build_data
    from ..models import build_model, load_checkpoint_weights
    from .layers import check_layer_patterns

    try:
        bundle = build_data(cfg.data, seed=cfg.seed)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        raise RunFileError("data", f"data: {e}") from None
    spec = {k: v for k, v in cfg.model.items() if k != "checkpoint"}
    try:
        model = build_model(spec, num_classes=bundle.num_classes, input_shape=bundle.input_shape)
    except (ValueError, TypeError, ImportError) as e:
        raise RunFileError("model", f"model: {e}") from None
    if cfg.model.get("checkpoint"):
        try:
            load_checkpoint_weights(model, cfg.model["checkpoint"])
        except (ValueError, FileNotFoundError) as e:
            raise RunFileError("model.checkpoint", f"model.checkpoint: {e}") from None
    check_layer_patterns(cfg.recipes, model)
    return bundle, model


def fp_module(model: nn.Module, bundle, cfg: RunConfig) -> ClassificationModule:
    """The classification module that evaluates a full-precision model of the run."""
    return ClassificationModule(model, bundle.num_classes,
                                eval_fp32=cfg.eval_precision == "32-true")


def _trainer_kwargs(cfg: RunConfig) -> dict:
    return {k: v for k, v in cfg.trainer.items() if k != "max_epochs"}


def pretrain(model: nn.Module, bundle, cfg: RunConfig, out: Path, resume: bool = False,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``model`` in full precision per ``cfg.pretrain``, or reuse ``out/fp.ckpt``.

    Writes ``fp.ckpt`` (the model's state dict) and ``fp.json`` (test accuracy, epochs, wall
    time, what it depends on). Returns the FP record. A pretraining run is resumable from
    ``out/pretrain/checkpoints/last.ckpt``.
    """
    ckpt, record_path = out / "fp.ckpt", out / "fp.json"
    key = json.loads(json.dumps(_fp_key(cfg), default=_json_default))
    train, val, test = bundle_loaders(bundle, cfg.seed)
    if ckpt.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("depends_on") != key:
            raise RunFileError("pretrain", f"{ckpt} was trained for another model/data/pretrain/"
                                           "seed setting; delete it (and fp.json) or choose "
                                           "another output_dir")
        from ..models import load_checkpoint_weights

        load_checkpoint_weights(model, ckpt)
        echo(f"reusing the full-precision model {ckpt} (test accuracy {record['acc']:.4f})")
        return record
    p = cfg.pretrain
    echo(f"pretraining in full precision: {p.epochs} epochs")
    module = ClassificationModule(model, bundle.num_classes, optimizer=p.optimizer_config(),
                                  eval_fp32=cfg.eval_precision == "32-true",
                                  label_smoothing=p.label_smoothing,
                                  example_input=bundle.example_input)
    stage = out / "pretrain"
    last = stage / "checkpoints" / "last.ckpt"
    clock = WallClock()
    args = trainer_args(_trainer_kwargs(cfg), max_epochs=p.epochs, logger=loggers(stage),
                        callbacks=[*checkpoint_callbacks(stage / "checkpoints", val is not None),
                                   *_extra_callbacks(), EpochSync(), clock],
                        enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                        default_root_dir=str(stage))
    quiet_warnings()
    trainer = pl.Trainer(**args)
    with validation_step_off(module, val is None):
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val,
                    ckpt_path=str(last) if resume and last.is_file() else None)
    seconds = clock.seconds  # every attempt's training up to its checkpoint, plus this one
    metrics = evaluate_module(module, test, _trainer_kwargs(cfg))
    from ..report import merge_metrics

    if is_main_process():
        merge_metrics(stage)
        with atomic_write(ckpt) as f:
            torch.save(model.state_dict(), f)
    record = {**metrics, "source": "pretrain", "epochs": p.epochs, "wall_time_s": seconds,
              "depends_on": key}
    write_json(record_path, record)
    echo(f"full-precision test accuracy {metrics['acc']:.4f} ({seconds:.1f} s), saved {ckpt}")
    return record


EXTRA_CALLBACKS: list[Callable[[], Callback]] = []
"""Factories of further callbacks added to every training stage of :func:`run` (tests add
an interruption here)."""


def _extra_callbacks() -> list[Callback]:
    return [make() for make in EXTRA_CALLBACKS]


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
        allow_recipe_change: bool = False, echo: Callable[[str], None] = print) -> RunResult:
    """Execute a validated run: FP model (checkpoint, reused ``fp.ckpt``, or pretraining), then
    each recipe's QAT job, its summary, plots and exports, and the run's ``summary.json``.

    Args:
        resume: continue an interrupted run from each job's ``checkpoints/last.ckpt``; jobs
            that finished are kept as they are.
        overwrite: start again even though the output folder holds checkpoints of a run.
        allow_recipe_change: resume checkpoints written under another recipe (a run whose
            recipes, or only its ``trainer.max_epochs``, changed since it was interrupted).

    Raises:
        RunFileError: bad input (data, model, an output folder holding another run).
    """
    if not is_main_process():
        def echo(_text: str) -> None:
            return None
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, resume, overwrite, echo, allow_recipe_change)
    finally:
        torch.set_num_threads(threads)


def _recipe_changes_only(old: dict, new: dict, changed: list[str]) -> bool:
    """Whether two resolved run files differ only in their recipes (and in
    ``trainer.max_epochs``, which rewrites the recipes' epochs)."""
    if not set(changed) <= {"recipe", "compare", "trainer"}:
        return False
    a, b = old.get("trainer") or {}, new.get("trainer") or {}
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)} <= {"max_epochs"}


def _run(cfg: RunConfig, resume: bool, overwrite: bool, echo,
         allow_recipe_change: bool = False) -> RunResult:
    from .. import report

    start = time.perf_counter()
    out = cfg.output_dir
    run_yaml = out / "run.yaml"
    dirs = cfg.job_dirs()
    if run_yaml.is_file() and not overwrite:
        from .runfile import read_run_file, validate_run

        try:
            old = validate_run(read_run_file(run_yaml)).to_dict()
        except RecipeError:
            old = None
        if old is not None and old != cfg.to_dict():
            changed = sorted(k for k in set(old) | set(cfg.to_dict())
                             if old.get(k) != cfg.to_dict().get(k))
            recipes_only = _recipe_changes_only(old, cfg.to_dict(), changed)
            if allow_recipe_change and recipes_only:
                echo(f"{out}: the recipes changed ({', '.join(changed)}); continuing under the "
                     "new ones (--allow-recipe-change)")
            elif resume or any((d / "checkpoints" / "last.ckpt").is_file() for d in dirs):
                hint = (", or --allow-recipe-change to continue its checkpoints under the changed "
                        "recipe" if recipes_only else "")
                raise RunFileError(changed[0] if changed else "output_dir",
                                   f"{out} holds a run with a different configuration (changed: "
                                   f"{', '.join(changed)}); use the same run file and overrides, "
                                   f"another output_dir, or --overwrite{hint}")
    if not resume and not overwrite:
        started = [d for d in dirs if (d / "checkpoints" / "last.ckpt").is_file()]
        if started:
            raise RunFileError("output_dir", f"{started[0]} already holds checkpoints of a run; "
                                             "continue it with --resume, or pass --overwrite "
                                             "or choose another output_dir")
    if overwrite:
        for d in dirs:
            for name in ("checkpoints", "logs", "summary.json", "metrics.csv"):
                _remove(d / name)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(run_yaml, cfg.to_yaml())

    _seed(cfg.seed)
    bundle, model = prepare(cfg)
    train, val, test = bundle_loaders(bundle, cfg.seed)
    fp: dict[str, Any] | None
    if cfg.model.get("checkpoint"):
        fp = {**evaluate_module(fp_module(model, bundle, cfg), test, _trainer_kwargs(cfg)),
              "source": f"checkpoint {cfg.model['checkpoint']}"}
    elif cfg.pretrain is not None:
        fp = pretrain(model, bundle, cfg, out, resume=resume, echo=echo)
    else:
        warnings.warn("the run has neither model.checkpoint nor pretrain: QAT starts from a "
                      "randomly initialized model", stacklevel=2)
        fp = {**evaluate_module(fp_module(model, bundle, cfg), test, _trainer_kwargs(cfg)),
              "source": "random init"}
    fp_model = copy.deepcopy(model).cpu()

    result = RunResult(out, {k: v for k, v in fp.items() if k != "depends_on"})
    for index, recipe in enumerate(cfg.recipes):
        job_cfg = cfg.job(index)
        result.jobs.append(_run_job(index, job_cfg, recipe, fp_model, bundle, (train, val, test),
                                    result.fp, resume, echo, allow_recipe_change))
    result.wall_time_s = time.perf_counter() - start
    run_summary = {**result.jobs[0].summary,
                   "compare": [j.summary for j in result.jobs[1:]],
                   "run_wall_time_s": result.wall_time_s}
    write_json(out / "summary.json", run_summary)
    echo("")
    echo(report.format_table(result.rows(), result.fp))
    return result


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _run_job(index: int, cfg: RunConfig, recipe: Recipe, fp_model: nn.Module, bundle, loaders, fp,
             resume: bool, echo, allow_recipe_change: bool = False) -> JobResult:
    from .. import report

    out = cfg.output_dir
    summary_path = out / "summary.json"
    last = out / "checkpoints" / "last.ckpt"
    if resume and summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if done.get("completed") and done.get("recipe_hash") == recipe.content_hash():
            echo(f"{recipe.name}: already finished ({summary_path})")
            return JobResult(recipe.name, out, done, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    if index:  # a compare job's own folder gets its own run.yaml (the main one is the run's)
        _write_text(out / "run.yaml", cfg.to_yaml())
    train, val, test = loaders
    _seed(cfg.seed)
    model = copy.deepcopy(fp_model)
    teacher = copy.deepcopy(fp_model) if recipe.distillation.enabled else None
    qt = QTrainer(model, recipe, teacher=teacher, num_classes=bundle.num_classes,
                  example_input=bundle.example_input, seed=cfg.seed, output_dir=out,
                  allow_recipe_change=allow_recipe_change, eval_precision=cfg.eval_precision,
                  **_trainer_kwargs(cfg))
    qt.fp_metrics = {k: fp[k] for k in ("acc", "acc_top5", "loss") if k in fp}
    ckpt = str(last) if resume and last.is_file() else None
    echo(f"{recipe.name}: {'resuming from ' + str(last) if ckpt else 'quantization-aware training'}"
         f" ({recipe.method.name}, {recipe.phases.epochs} epochs)")
    try:
        qt.fit(train, val, ckpt_path=ckpt, callbacks=_extra_callbacks())
    except RecipeError as e:  # the checkpoint's recipe is not this run's: name the file
        raise (e.with_source(ckpt) if ckpt and e.key_path == "recipe" else e) from None
    qt.evaluate(test)
    summary = qt.summary()
    summary.update(fp_source=fp.get("source"), data=cfg.data.get("name"),
                   model=cfg.model.get("name") or cfg.model.get("class_path"),
                   split="test", output_dir=str(out), seed=cfg.seed)
    exports = {}
    for fmt in cfg.export if is_main_process() else []:
        ext = {"int": "safetensors", "onnx": "onnx", "torchscript": "pt",
               "exported_program": "pt2"}[fmt]
        path = out / "export" / f"model.{fmt}.{ext}" if fmt in ("torchscript",
                                                                "exported_program") \
            else out / "export" / f"model.{ext}"
        try:
            rep = qt.export(path, format=fmt)
            exports[fmt] = {"path": str(path), "file_bytes": rep.get("file_bytes")}
        except ModuleNotFoundError as e:  # an install without a default dependency
            exports[fmt] = {"skipped": f"{e.name} is not installed"}
            echo(f"{recipe.name}: export {fmt} skipped: the {e.name} package is not installed "
                 f"(pip install {e.name})")
        except Exception as e:  # noqa: BLE001 - an export failure must not lose the run
            exports[fmt] = {"error": f"{type(e).__name__}: {e}"}
            echo(f"{recipe.name}: export {fmt} failed: {type(e).__name__}: {e}")
    summary["exports"] = exports
    summary["completed"] = True
    if is_main_process():
        report.merge_metrics(out)
        write_json(summary_path, summary)
        try:
            summary["plots"] = [str(p) for p in report.make_plots(out)]
            write_json(summary_path, summary)
        except report.PlotsUnavailable as e:
            echo(f"{recipe.name}: no plots ({e})")
    return JobResult(recipe.name, out, summary)


__all__ = ["EXTRA_CALLBACKS", "JobResult", "RunResult", "bundle_loaders", "fp_module",
           "is_main_process", "prepare", "pretrain", "run", "write_json"]
