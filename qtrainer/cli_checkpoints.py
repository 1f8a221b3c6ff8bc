"""What ``qtrainer eval`` and ``qtrainer export`` do with a checkpoint: rebuild the model (from
its run's ``run.yaml``, or as the user's ``--model-class`` quantized by the plan saved in the
checkpoint), then evaluate or export it. Bad input raises :class:`~qtrainer.cli_errors.BadInput`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from .cli_errors import BadInput
from .cli_errors import overrides as _overrides

MODEL_CLASS_HELP = ("Your module's class, 'package.module:Class' (imported from the current "
                    "folder or the installed packages), for a checkpoint written under "
                    "QuantizationCallback; its layers are rebuilt from the plan saved in it.")
INIT_ARG_HELP = ("A constructor argument of --model-class (repeatable; values are YAML). "
                 "Default: the hyperparameters saved in the checkpoint.")


def _checkpoint_config(ckpt: str, run_file: Optional[str]):
    from .run import find_run_file, load_run_file

    if not Path(ckpt).is_file():
        raise BadInput(f"checkpoint {ckpt!r} does not exist")
    path = Path(run_file) if run_file else find_run_file(ckpt)
    if not path.is_file():
        raise BadInput(f"run file {str(path)!r} does not exist")
    return load_run_file(path)


def _init_args(items: Optional[List[str]]) -> dict:
    args = _overrides(items)
    dotted = [k for k in args if "." in k]
    if dotted:
        raise BadInput(f"--init-arg {dotted[0]!r}: give constructor arguments as name=value")
    return args


def _class_model(ckpt: str, model_class: str, init_arg: Optional[List[str]]):
    """(quantized module in eval mode, its checkpoint's qtrainer entry) for --model-class."""
    from .run.checkpoints import load_class_checkpoint

    if not Path(ckpt).is_file():
        raise BadInput(f"checkpoint {ckpt!r} does not exist")
    return load_class_checkpoint(ckpt, model_class, _init_args(init_arg))


def _class_data(ckpt: str, data: Optional[List[str]], run_file: Optional[str]):
    """The data bundle for --model-class: --data items, else the run file's data section."""
    from .run.checkpoints import data_bundle

    if data:
        return data_bundle(_overrides(data))
    if run_file:
        cfg = _checkpoint_config(ckpt, run_file)
        return data_bundle(cfg.data, cfg.seed)
    raise BadInput("--model-class needs data to evaluate on: --data name=... (the keys of a run "
                   "file's data section, e.g. --data name=digits) or --run-file FILE")


def evaluate_checkpoint(ckpt: str, run_file: Optional[str], split: str,
                        model_class: Optional[str], init_arg: Optional[List[str]],
                        data: Optional[List[str]]) -> tuple[dict, str | None]:
    """``(figures, recipe name)``: accuracy, loss and (quantized) resources of ``ckpt`` on
    ``split`` of its data."""
    from .lightning_setup import evaluate_module
    from .run import bundle_loaders, load_checkpoint_model

    if split not in ("test", "val"):
        raise BadInput(f"--split {split!r}: allowed: test, val")
    trainer_args = {"enable_progress_bar": False}
    if model_class is not None:
        from .run.checkpoints import as_classifier

        model, entry = _class_model(ckpt, model_class, init_arg)
        bundle = _class_data(ckpt, data, run_file)
        module, quantized, recipe_name = as_classifier(model, bundle.num_classes), True, \
            entry.get("recipe_name")
        seed = bundle.seed
    else:
        if init_arg or data:
            raise BadInput("--init-arg and --data go with --model-class")
        cfg = _checkpoint_config(ckpt, run_file)
        module, bundle, quantized = load_checkpoint_model(ckpt, cfg)
        recipe_name, seed = cfg.recipe.name, cfg.seed
        trainer_args.update({k: v for k, v in cfg.trainer.items() if k == "accelerator"})
    _, val, test = bundle_loaders(bundle, seed)
    loader = test if split == "test" else val
    if loader is None:
        raise BadInput("the data has no validation split (data.val_size is 0)")
    metrics = evaluate_module(module, loader, trainer_args)
    out = {"checkpoint": ckpt, "split": split, "quantized": quantized, **metrics}
    if quantized:
        from .resources import summarize

        out.update(summarize(module).to_dict())
    return out, recipe_name


def export_checkpoint(ckpt: str, format: str, output: Optional[str], run_file: Optional[str],
                      fold_bn: bool, model_class: Optional[str],
                      init_arg: Optional[List[str]]) -> tuple[Path, dict]:
    """Export ``ckpt`` in ``format``; returns the written path and the export report."""
    from .export import export as export_model
    from .run import EXPORT_FORMATS, load_checkpoint_model

    if format not in EXPORT_FORMATS:
        raise BadInput(f"--format {format!r}: allowed: {', '.join(EXPORT_FORMATS)}")
    ext = {"int": "safetensors", "onnx": "onnx", "torchscript": "ts.pt",
           "exported_program": "pt2"}[format]
    if model_class is not None:
        from .quantized import example_from_spec

        model, entry = _class_model(ckpt, model_class, init_arg)
        spec = entry.get("input_spec")
        example = example_from_spec(spec) if isinstance(spec, dict) else None
        if isinstance(example, dict):
            raise BadInput("the checkpoint's forward takes keyword arguments, which the traced "
                           "exports cannot pass; export with --format int")
        if example is None and format != "int":
            raise BadInput(f"--format {format}: the checkpoint holds no example input shapes; "
                           "use --format int")
        default_dir = Path(ckpt).parent / "export"
        meta = {"recipe": entry.get("recipe_name"), "recipe_hash": entry.get("recipe_hash")}
    else:
        if init_arg:
            raise BadInput("--init-arg goes with --model-class")
        cfg = _checkpoint_config(ckpt, run_file)
        module, bundle, quantized = load_checkpoint_model(ckpt, cfg)
        if not quantized:
            raise BadInput(f"{ckpt} is a full-precision checkpoint; export takes a QAT checkpoint")
        model, example = module.model, bundle.example_input
        default_dir = Path(cfg.output_dir) / "export"
        meta = {"recipe": cfg.recipe.name, "recipe_hash": cfg.recipe.content_hash()}
    path = Path(output) if output else default_dir / f"model.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta["checkpoint"] = os.path.abspath(ckpt)
    model.eval()
    try:
        report = export_model(model, path, format=format, example_input=example, fold_bn=fold_bn,
                              metadata=meta)
    except ModuleNotFoundError as e:
        raise BadInput(f"--format {format} needs the {e.name} package, which is not installed: "
                       f"pip install {e.name}") from None
    return path, report


__all__ = ["INIT_ARG_HELP", "MODEL_CLASS_HELP", "evaluate_checkpoint", "export_checkpoint"]
