"""Rebuilding a model from a checkpoint for ``qtrainer eval``/``export``: a run's checkpoint
with its run file, or any QAT checkpoint with the user's own module class (``--model-class``)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint_files import read_checkpoint
from ..lit_module import ClassificationModule
from ..quantized import load_quantized, qat_entry
from .errors import RunFileError
from .runfile import RunConfig
from .runner import prepare
from .sections import check_data


def find_run_file(ckpt: str | os.PathLike) -> Path:
    """The ``run.yaml`` of the run a checkpoint belongs to: in the checkpoint's folder or up to
    three folders above it."""
    here = Path(ckpt).resolve().parent
    for folder in [here, *list(here.parents)[:3]]:
        if (folder / "run.yaml").is_file():
            return folder / "run.yaml"
    raise FileNotFoundError(f"no run.yaml next to or above {ckpt}; pass --run-file")


def load_checkpoint_model(ckpt: str | os.PathLike, cfg: RunConfig):
    """Rebuild a run's model from a checkpoint: a QAT checkpoint gives the quantized model
    (surgery per the run's recipe, then the weights and quantizer parameters), a plain state
    dict such as ``fp.ckpt`` the FP model. Returns ``(module, bundle, quantized)``."""
    from ..surgery import quantize_model

    bundle, model = prepare(RunConfig(**{**cfg.__dict__, "model": {
        k: v for k, v in cfg.model.items() if k != "checkpoint"}}))
    state = read_checkpoint(ckpt)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {ckpt} holds no state dict")
    quantized = any(".weight_quantizer." in k or ".input_quantizer." in k for k in state)
    module = ClassificationModule(model, bundle.num_classes, example_input=bundle.example_input,
                                  eval_fp32=cfg.eval_precision == "32-true")
    if quantized:
        quantize_model(module, **cfg.recipe.surgery_kwargs(), example_input=bundle.example_input)
    if not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("train_", "val_", "test_"))]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} does not match the run's model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return module, bundle, quantized


def import_class(path: str, option: str = "--model-class") -> type:
    """The class at ``pkg.mod:Class`` (or ``pkg.mod.Class``), importing that module only;
    modules are looked up in the current folder and the installed packages."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RunFileError(option, f"{option} {path!r} must look like 'package.module:Class'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RunFileError(option, f"{option} {path!r}: cannot import {module_name!r} "
                                   f"({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RunFileError(option, f"{option} {path!r}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise RunFileError(option, f"{option} {path!r} is a {type(obj).__name__}, not a class")
    return obj


def load_class_checkpoint(ckpt: str | os.PathLike, class_path: str, init_args: Mapping):
    """A QAT checkpoint as the quantized module of the user's class (``class_path``, built with
    ``init_args`` or the checkpoint's saved hyperparameters) in eval mode, and its qtrainer
    entry (recipe, layer plan, input shapes)."""
    cls = import_class(class_path)
    try:
        module = load_quantized(cls, ckpt, **dict(init_args))
    except TypeError as e:
        raise RunFileError("--init-arg", f"{class_path}: {e}") from None
    return module, qat_entry(read_checkpoint(ckpt), os.fspath(ckpt))


def data_bundle(items: Mapping, seed: int = 0):
    """The data bundle of a ``data:`` section (``--data KEY=VALUE`` items, or a run file's);
    ``seed`` orders the batches (the split follows ``data.seed``)."""
    from ..data import build_data

    try:
        return build_data(check_data(dict(items)), seed=seed)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        raise RunFileError("data", f"--data: {e}") from None


def as_classifier(module, num_classes: int) -> ClassificationModule:
    """``module`` (whose ``forward(x)`` gives logits) wrapped for :func:`evaluate_module`."""
    return ClassificationModule(module, num_classes)


__all__ = ["as_classifier", "data_bundle", "find_run_file", "import_class",
           "load_checkpoint_model", "load_class_checkpoint"]
