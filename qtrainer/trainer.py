"""Keras-style QAT in a few lines.

    qt = qtrainer.QTrainer(model, recipe="lsq-4bit")
    qt.fit(train_data, val_data, epochs=10)
    qt.evaluate(test_data)          # {"acc": ..., "acc_top5": ..., "loss": ...}
    qt.export("model.safetensors")  # integer weights (format="onnx" | "torchscript" | ...)
    qt.summary()                    # FP vs quantized accuracy, bits per layer, size, GBOPs

``QTrainer`` wraps a plain ``nn.Module`` in :class:`~qtrainer.lit_module.ClassificationModule`
and trains it with a ``lightning.pytorch.Trainer`` and the
:class:`~qtrainer.callback.QuantizationCallback`. The run files of ``qtrainer run`` are
executed by :mod:`qtrainer.run`, which uses this class for each QAT job.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from .callback import QuantizationCallback
from .checkpoint_io import AtomicCheckpointIO
from .lightning_setup import (WallClock, checkpoint_callbacks, evaluate_module, float_metrics,
                              loggers, quiet_warnings, trainer_args, validation_step_off)
from .lit_module import ClassificationModule
from .loaders import EpochSync, first_input, make_loader, to_cpu
from .nn import QuantizedLayer, named_quantizers
from .recipes import Recipe, RecipeError, load_recipe
from .recipes.scaling import scale_epochs
from .resources import layer_table, summarize
from .versions import package_versions

TASKS = ("classification",)


EVAL_PRECISIONS = ("32-true",)


def check_eval_precision(value: str | None) -> str | None:
    """``None`` (the training precision) or ``"32-true"``; anything else is a ValueError."""
    if value is not None and value not in EVAL_PRECISIONS:
        raise ValueError(f"eval_precision={value!r} is not allowed; allowed: None (the training "
                         f"precision), {', '.join(map(repr, EVAL_PRECISIONS))}")
    return value


class QTrainer:
    """Quantization-aware training of a plain ``nn.Module`` with a recipe.

    Args:
        model: the full-precision model (trained, ideally); it is quantized **in place** on the
            first :meth:`fit` (``qt.model`` is then the quantized model).
        recipe: a recipe name, YAML path, mapping or :class:`~qtrainer.recipes.Recipe`.
        task: ``classification`` (cross-entropy, top-1/top-5 accuracy).
        overrides: dotted recipe overrides (``{"bits.weight": 2}``).
        teacher: the distillation teacher; default a frozen copy of ``model`` taken now, when
            the recipe's ``distillation.enabled`` is true.
        num_classes: default: the size of the model's output on the first batch.
        example_input: an input batch for tracing the layers (default: the first training batch).
        batch_size, num_workers, seed: for Datasets given to :meth:`fit`/:meth:`evaluate`
            (shuffling seeded by ``seed``).
        output_dir: where checkpoints (``checkpoints/last.ckpt``, ``best.ckpt``) and logs
            (``logs/csv``, ``logs/tensorboard``) go; None (default) writes nothing.
        allow_recipe_change: resume from a checkpoint written under another recipe.
        label_smoothing: of the cross-entropy term.
        eval_precision: None (default): validation and :meth:`evaluate` run at the training
            ``precision``; ``"32-true"``: in fp32 (autocast off) while training runs under a
            mixed precision such as ``bf16-mixed`` (bf16 evaluation of a 2-bit model moves
            its accuracy by tenths of a point).
        **trainer_kwargs: passed to ``lightning.pytorch.Trainer`` (``accelerator``,
            ``devices``, ``precision``, ``strategy``, ``accumulate_grad_batches``, ...);
            ``max_epochs`` is the recipe's ``phases.epochs`` (see :meth:`fit`'s ``epochs``).
    """

    def __init__(self, model: nn.Module, recipe: str | os.PathLike | Mapping | Recipe = "lsq-4bit",
                 task: str = "classification", *, overrides: Mapping | None = None,
                 teacher: nn.Module | None = None, num_classes: int | None = None,
                 example_input=None, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 output_dir: str | os.PathLike | None = None, allow_recipe_change: bool = False,
                 label_smoothing: float = 0.0, eval_precision: str | None = None,
                 **trainer_kwargs):
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(TASKS)}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for key in ("max_epochs", "callbacks"):
            if key in trainer_kwargs:
                raise TypeError(f"{key} is not a QTrainer argument: use fit(epochs=...) and "
                                "fit(callbacks=[...])")
        self.model = model
        self.recipe = recipe if isinstance(recipe, Recipe) and not overrides \
            else load_recipe(recipe, overrides=overrides)
        self.task = task
        if teacher is None and self.recipe.distillation.enabled:
            teacher = copy.deepcopy(model)
        self.teacher = teacher
        self.num_classes = num_classes
        self.example_input = example_input
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.allow_recipe_change = allow_recipe_change
        self.label_smoothing = label_smoothing
        self.eval_precision = check_eval_precision(eval_precision)
        self.trainer_kwargs = trainer_kwargs
        self.module: ClassificationModule | None = None
        self.callback: QuantizationCallback | None = None
        self.trainer: pl.Trainer | None = None
        self.fp_metrics: dict[str, float] | None = None
        self.metrics: dict[str, float] | None = None
        self.history: dict[str, float] = {}
        self.fit_seconds = 0.0
        self.checkpoint: ModelCheckpoint | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def quantized(self) -> bool:
        return any(isinstance(m, QuantizedLayer) for m in self.model.modules())

    def _module(self, example) -> ClassificationModule:
        if self.module is None:
            example = to_cpu(example)
            if self.num_classes is None:
                was = self.model.training
                self.model.eval()
                with torch.no_grad():
                    out = self.model(example)
                self.model.train(was)
                self.num_classes = int(out.shape[-1])
            d = self.recipe.distillation
            self.module = ClassificationModule(
                self.model, self.num_classes, teacher=self.teacher if d.enabled else None,
                distill_temperature=d.temperature, distill_weight=d.weight,
                label_smoothing=self.label_smoothing, example_input=example,
                eval_fp32=self.eval_precision == "32-true")
        return self.module

    def _loaders(self, data, train: bool):
        if isinstance(data, pl.LightningDataModule):
            return data
        return make_loader(data, self.batch_size, train, self.seed, self.num_workers)

    def _trainer_args(self, **extra) -> dict:
        return trainer_args(self.trainer_kwargs, **extra)

    def _loggers(self) -> list:
        return [] if self.output_dir is None else loggers(self.output_dir)

    # ------------------------------------------------------------------ fit
    def fit(self, train_data, val_data=None, epochs: int | None = None, *,
            ckpt_path: str | os.PathLike | None = None, callbacks: list | None = None,
            measure_fp: bool = True) -> dict[str, float]:
        """Quantize (first call) and train.

        Args:
            train_data, val_data: DataLoaders, Datasets, iterables of ``(x, y)`` batches, or a
                ``LightningDataModule`` as ``train_data`` (then ``val_data`` must be None).
            epochs: QAT epochs; default the recipe's ``phases.epochs``. Another value rewrites
                the recipe (``phases.epochs``; warm-up and NIPQ hard epochs scaled alike).
            ckpt_path: resume from this checkpoint (``"last"`` for the newest in
                ``output_dir``).
            callbacks: further Lightning callbacks.
            measure_fp: evaluate the model on ``val_data`` before quantizing it, as the FP
                baseline of :meth:`summary` (skipped when ``fp_metrics`` is already set).

        Returns the last logged metrics (``train_loss``, ``val_acc``, ``qat/avg_weight_bits``...).
        """
        quiet_warnings()
        if epochs is not None and epochs != self.recipe.phases.epochs:
            try:
                self.recipe = scale_epochs(self.recipe, int(epochs))
            except RecipeError as e:
                raise ValueError(f"epochs={epochs}: {e}") from None
        datamodule = train_data if isinstance(train_data, pl.LightningDataModule) else None
        if datamodule is not None and val_data is not None:
            raise ValueError("pass val_data through the LightningDataModule")
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
            train_loader, val_loader = datamodule.train_dataloader(), None
            try:
                val_loader = datamodule.val_dataloader()
            except Exception:  # noqa: BLE001 - a datamodule without validation data
                val_loader = None
        else:
            train_loader = self._loaders(train_data, train=True)
            val_loader = self._loaders(val_data, train=False)
        example = self.example_input if self.example_input is not None else first_input(train_loader)
        module = self._module(example)
        if measure_fp and self.fp_metrics is None and val_loader is not None and not self.quantized:
            self.fp_metrics = self._test(module, val_loader)
        # QTrainer built the module's optimizer itself: optimizer.policy auto replaces it
        self.callback = QuantizationCallback(self.recipe, example_input=to_cpu(example),
                                             allow_recipe_change=self.allow_recipe_change,
                                             auto_policy="replace")
        cbs: list = [self.callback]
        logger: Any = False
        if self.output_dir is not None:
            saving = checkpoint_callbacks(self.output_dir / "checkpoints", val_loader is not None)
            self.checkpoint = saving[-1]
            cbs += saving
            logger = self._loggers() or False
        cbs += list(callbacks or [])
        clock = WallClock()  # its seconds travel in checkpoints: a resumed fit counts them all
        cbs += [EpochSync(), clock]
        args = self._trainer_args(max_epochs=self.recipe.phases.epochs, callbacks=cbs,
                                  logger=logger, enable_checkpointing=self.output_dir is not None,
                                  plugins=[AtomicCheckpointIO()],
                                  default_root_dir=str(self.output_dir or "."))
        self.trainer = pl.Trainer(**args)
        with validation_step_off(module, val_loader is None):
            if datamodule is not None:
                self.trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            else:
                self.trainer.fit(module, train_dataloaders=train_loader,
                                 val_dataloaders=val_loader, ckpt_path=ckpt_path)
        self.fit_seconds += clock.seconds
        self.history = float_metrics(self.trainer.callback_metrics)
        return self.history

    # ------------------------------------------------------------------ evaluate
    def _test(self, module: ClassificationModule, loader) -> dict[str, float]:
        return evaluate_module(module, loader, self.trainer_kwargs)

    def evaluate(self, data) -> dict[str, float]:
        """Top-1 accuracy ``acc``, top-5 ``acc_top5`` and mean cross-entropy ``loss`` of the
        model (quantized after :meth:`fit`, full precision before) on ``data`` (a DataLoader,
        Dataset, iterable of batches, or a LightningDataModule's test split)."""
        quiet_warnings()
        if isinstance(data, pl.LightningDataModule):
            data.prepare_data()
            data.setup("test")
            loader = data.test_dataloader()
        else:
            loader = self._loaders(data, train=False)
        example = self.example_input if self.example_input is not None else first_input(loader)
        metrics = self._test(self._module(example), loader)
        if self.quantized:
            self.metrics = metrics
        elif self.fp_metrics is None:
            self.fp_metrics = metrics
        return metrics

    # ------------------------------------------------------------------ export, summary
    def export(self, path: str | os.PathLike, format: str = "int", **kwargs) -> dict:
        """Export the quantized model with :func:`qtrainer.export.export` (``int``, ``onnx``,
        ``torchscript``, ``exported_program``); the recipe's name and hash and the measured
        accuracy go into the file's metadata. Returns export's report."""
        from .export import export as export_model

        if not self.quantized:
            raise RuntimeError("nothing to export yet: call fit() first")
        example = kwargs.pop("example_input", None)
        if example is None and self.module is not None:
            example = self.module.example_input_array
        meta = {"recipe": self.recipe.name, "recipe_hash": self.recipe.content_hash(),
                "method": self.recipe.method.name, **(kwargs.pop("metadata", None) or {})}
        if self.metrics:
            meta["accuracy"] = self.metrics.get("acc")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        was_training = self.model.training
        self.model.eval()  # what is exported is the eval model; say so by exporting it in eval
        try:
            return export_model(self.model, path, format=format, example_input=to_cpu(example),
                                metadata=meta, **kwargs)
        finally:
            self.model.train(was_training)

    def summary(self) -> dict[str, Any]:
        """Figures of the run: FP and quantized accuracy (from :meth:`fit`'s baseline and the
        last :meth:`evaluate`), per-layer bits and step sizes, average bits, model size (MB, FP
        and quantized, every parameter; share of weight elements quantized), GBOPs, training
        wall time, recipe name and hash, package versions; ``oscillation``: the weights'
        oscillation at the end of training
        (:meth:`qtrainer.callback.oscillation.OscillationControl.summary`; empty with
        ``oscillation.track: false``)."""
        out: dict[str, Any] = {
            "recipe": self.recipe.name, "method": self.recipe.method.name,
            "recipe_hash": self.recipe.content_hash(), "epochs": self.recipe.phases.epochs,
            "fp": self.fp_metrics, "quantized": self.metrics,
            "fp_acc": None if self.fp_metrics is None else self.fp_metrics["acc"],
            "quantized_acc": None if self.metrics is None else self.metrics["acc"],
            "wall_time_s": round(self.fit_seconds, 3), "versions": package_versions(),
        }
        if self.quantized:
            s = summarize(self.model)
            layers = layer_table(self.model)
            quantizer_params = {id(p) for _, q in named_quantizers(self.model)
                                for p in q.parameters()}
            out.update(avg_weight_bits=s.avg_weight_bits, avg_act_bits=s.avg_act_bits,
                       size_mb=s.size_mb, gbops=s.gbops,
                       quantized_weight_share=s.quantized_weight_share,
                       fp_size_mb=sum(p.numel() * p.element_size() for p in self.model.parameters()
                                      if id(p) not in quantizer_params) / 1e6,
                       layers=layers)
        control = self.callback.oscillation if self.callback is not None else None
        out["oscillation"] = control.summary() if control is not None else {}
        return out


__all__ = ["EVAL_PRECISIONS", "QTrainer", "TASKS", "check_eval_precision"]
