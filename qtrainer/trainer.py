"""Keras-style QAT in a few lines, and the runner behind ``qtrainer run``.

    qt = qtrainer.QTrainer(model, recipe="lsq-4bit")
    qt.fit(train_data, val_data, epochs=10)
    qt.evaluate(test_data)          # {"acc": ..., "acc_top5": ..., "loss": ...}
    qt.export("model.safetensors")  # integer weights (format="onnx" | "torchscript" | ...)
    qt.summary()                    # FP vs quantized accuracy, bits per layer, size, GBOPs

``QTrainer`` wraps a plain ``nn.Module`` in :class:`~qtrainer.lit_module.ClassificationModule`
and trains it with a ``lightning.pytorch.Trainer`` and the
:class:`~qtrainer.callback.QuantizationCallback`. :func:`run` executes a validated run file
(:mod:`qtrainer.runfile`): FP pretraining or a checkpoint, one QAT job per recipe, summaries,
plots and exports, resumable after an interruption.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .atomic import atomic_write, write_text_atomic
from .callback import QuantizationCallback, batch_input

try:
    from .callback import peek_batch
except ImportError:  # pragma: no cover - older callback module
    def peek_batch(loader, n: int = 8):
        return next(iter(loader))
from .lit_module import ClassificationModule
from .models import load_error_reason
from .nn import QuantizedLayer
from .recipes import Recipe, RecipeError, load_recipe
from .resources import summarize
from .runfile import RunConfig, RunFileError, scale_epochs
from .versions import package_versions

TASKS = ("classification",)
DEFAULT_TRAINER_ARGS = {"num_sanity_val_steps": 0, "enable_model_summary": False,
                        "log_every_n_steps": 10}
_QUIET = (r".*does not have many workers.*", r".*The number of training batches.*",
          r".*exists and is not empty.*", r".*GPU available but not used.*",
          r".*Checkpoint directory .* exists and is not empty.*",
          r".*`training_step` returned `None`.*", r".*Starting from v1.9.0.*tensorboardX.*",
          r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


# ----------------------------------------------------------------------------- plumbing


DIGEST_KEY = "sha256"
"""Key of ``checkpoint["qtrainer"]`` holding :func:`checkpoint_digest`."""


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checkpoint_digest(checkpoint: Mapping) -> str:
    """sha256 of everything in a checkpoint (weights, optimizer and loop states, RNG...) but
    the digest itself: names, dtypes, shapes and bytes of every tensor. (torch's zip reader
    checks no CRC: a flipped byte in a tensor loads silently.)"""
    import hashlib

    meta = checkpoint.get("qtrainer")
    if isinstance(meta, Mapping):
        checkpoint = {**checkpoint, "qtrainer": {k: v for k, v in meta.items() if k != DIGEST_KEY}}
    h = hashlib.sha256()
    _feed(h, checkpoint)
    return h.hexdigest()


def check_checkpoint_digest(checkpoint: Any, path) -> None:
    """Raise ``ValueError`` naming ``path`` when a checkpoint differs from the digest written
    with it (checkpoints without one, e.g. from other tools, pass)."""
    meta = checkpoint.get("qtrainer") if isinstance(checkpoint, dict) else None
    expected = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
    if expected is not None and checkpoint_digest(checkpoint) != expected:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match the checksum written "
                         "with it: it was modified or damaged after it was saved")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose local writes are atomic (:mod:`qtrainer.atomic`): a
    checkpoint file is always either the previous complete one or the new complete one. Its
    :func:`checkpoint_digest` goes into ``checkpoint["qtrainer"]["sha256"]`` and is checked on
    load, which reads the file with ``weights_only=True``.

    (Lightning's own ``_atomic_save`` writes through an fsspec transaction into a temporary file
    in the system temp folder and then moves it, which is a copy, not a rename, when that folder
    is another file system, and it never fsyncs.) Remote URLs fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        target = os.fspath(path)
        if "://" in target and not target.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        target = target.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if isinstance(checkpoint.get("state_dict"), Mapping):  # a Lightning checkpoint
            meta = checkpoint.get("qtrainer")
            meta = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
                    if k != DIGEST_KEY}
            checkpoint["qtrainer"] = meta  # the digest covers the checkpoint as it is loaded
            meta[DIGEST_KEY] = checkpoint_digest(checkpoint)
        with atomic_write(target) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict:
        """Read a checkpoint as untrusted data: ``weights_only=True`` unless asked otherwise
        (tensors, numbers, strings and containers; nothing is unpickled into code), and a
        truncated, damaged or tampered file is a ``ValueError`` naming it."""
        try:
            checkpoint = super().load_checkpoint(
                path, map_location=map_location,
                weights_only=True if weights_only is None else weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - zip, pickle, torch and OS errors alike
            raise ValueError(f"could not read checkpoint {os.fspath(path)!r} (truncated, damaged "
                             f"or not a checkpoint of weights): {load_error_reason(e)}") from None
        check_checkpoint_digest(checkpoint, path)
        return checkpoint


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``range(n)`` anew each epoch from ``(seed, epoch)`` alone, so a run resumed at
    epoch ``e`` sees exactly the batches the uninterrupted run saw (Lightning calls
    :meth:`set_epoch` at each epoch start). Iterating advances the epoch by one."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist())


class _EpochSync(Callback):
    """Sets the epoch of the training loader's sampler (or of a DeviceLoader) at each epoch
    start, after the other callbacks (NIPQ's BN re-estimation iterates the loader)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        for obj in (loader, getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if obj is not None and callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(trainer.current_epoch)


class _Interrupt(Callback):
    """Raise ``KeyboardInterrupt`` at the start of epoch ``epoch`` (0-based): a Ctrl-C, for
    tests of resuming."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch:
            raise KeyboardInterrupt


def _is_loader(data) -> bool:
    return isinstance(data, DataLoader) or (
        not isinstance(data, Dataset) and isinstance(data, Iterable) and hasattr(data, "__len__"))


class _Batches:
    """A list of batches as one loader (Lightning would take a list for several loaders)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(data, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0):
    """A loader for ``data``: DataLoaders and other iterables of batches are used as they are
    (a list or tuple of batches as one loader); a Dataset gets a DataLoader (training:
    :class:`EpochShuffleSampler`)."""
    if isinstance(data, (list, tuple)):
        return _Batches(data)
    if data is None or _is_loader(data):
        return data
    if not isinstance(data, Dataset):
        raise TypeError(f"expected a DataLoader, a Dataset, an iterable of batches or a "
                        f"LightningDataModule, got {type(data).__name__}")
    sampler = EpochShuffleSampler(len(data), seed) if train else None
    return DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


def _first_input(loader) -> Any:
    """The model input of a small first batch, leaving the loader's order and RNG untouched."""
    if isinstance(loader, pl.LightningDataModule):
        loader = loader.train_dataloader()
    return batch_input(peek_batch(loader))


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_cpu(v) for v in x)
    return x


def quiet_lightning() -> None:
    """Hide Lightning's informational log lines (hardware, tips); warnings stay."""
    import logging

    import lightning.fabric  # noqa: F401 - set the levels after Lightning set its own
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet():
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def _float_metrics(values: Mapping) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer: name, kind, position, weight/input bits and step sizes
    (mean over channels for per-channel steps; None where a side is full precision)."""
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantizedLayer):
            continue
        report = getattr(m, "qreport", None)
        wq, aq = m.weight_quantizer, m.input_quantizer
        rows.append({
            "name": name.removeprefix("model."),
            "kind": type(m).__name__,
            "position": getattr(report, "position", ""),
            "weight_bits": None if wq is None else int(wq.bits),
            "act_bits": None if aq is None else int(aq.bits),
            "weight_step": None if wq is None else float(wq.step_size.detach().float().mean()),
            "act_step": None if aq is None else float(aq.step_size.detach().float().mean()),
            "weight_numel": int(m.weight.numel()),
            "act_numel": int(getattr(m, "act_numel", 0)),
            "macs": int(getattr(m, "macs", 0)),
            "signed_input": None if aq is None else bool(aq.signed),
        })
    return rows


def checkpoint_callbacks(dirpath: Path, validation: bool) -> list[ModelCheckpoint]:
    """``last.ckpt`` written at the end of every epoch (what ``--resume`` continues from) and,
    with validation data, ``best.ckpt`` (highest ``val_acc``). Two callbacks, because
    Lightning's ``save_last`` only refreshes ``last.ckpt`` in epochs that save a top-k file."""
    out = [ModelCheckpoint(dirpath=str(dirpath), filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, enable_version_counter=False)]
    if validation:
        out.append(ModelCheckpoint(dirpath=str(dirpath), filename="best", monitor="val_acc",
                                   mode="max", save_top_k=1, every_n_epochs=1,
                                   enable_version_counter=False))
    return out


def trainer_args(trainer_kwargs: Mapping, **extra) -> dict:
    """``lightning.pytorch.Trainer`` arguments: qtrainer's defaults, then ``extra``, then the
    user's ``trainer_kwargs``."""
    args = {**DEFAULT_TRAINER_ARGS, "logger": False, "enable_checkpointing": False}
    args.update(extra)
    args.update(trainer_kwargs)
    return args


def loggers(output_dir: Path) -> list:
    """A CSV logger (and a TensorBoard one when installed) under ``output_dir/logs``, one
    version folder per attempt (a resumed run adds one; :func:`qtrainer.report.merge_metrics`
    joins them)."""
    from lightning.pytorch.loggers import CSVLogger

    logs = Path(output_dir) / "logs"
    attempt = 0
    while (logs / "csv" / str(attempt)).exists():
        attempt += 1
    out = [CSVLogger(str(logs), name="csv", version=str(attempt))]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        out.append(TensorBoardLogger(str(logs), name="tensorboard", version=str(attempt),
                                     default_hp_metric=False))
    except ImportError:
        pass
    return out


def evaluate_module(module: pl.LightningModule, loader, trainer_kwargs: Mapping | None = None
                ) -> dict[str, float]:
    """``acc``, ``acc_top5``, ``loss`` of a :class:`ClassificationModule` on ``loader`` (one
    device; no quantization callback: the model is evaluated as it is)."""
    args = {k: v for k, v in dict(trainer_kwargs or {}).items()
            if k in ("accelerator", "precision", "enable_progress_bar", "inference_mode")}
    args.update(logger=False, enable_checkpointing=False, enable_model_summary=False,
                callbacks=[], devices=1)
    tester = pl.Trainer(**args)
    kwargs = {"datamodule": loader} if isinstance(loader, pl.LightningDataModule) \
        else {"dataloaders": loader}
    result = tester.test(module, verbose=False, **kwargs)[0]
    return {"acc": float(result["test_acc"]), "acc_top5": float(result["test_acc_top5"]),
            "loss": float(result["test_loss"])}


# ----------------------------------------------------------------------------- QTrainer


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
        **trainer_kwargs: passed to ``lightning.pytorch.Trainer`` (``accelerator``,
            ``devices``, ``precision``, ``strategy``, ``accumulate_grad_batches``, ...);
            ``max_epochs`` is the recipe's ``phases.epochs`` (see :meth:`fit`'s ``epochs``).
    """

    def __init__(self, model: nn.Module, recipe: str | os.PathLike | Mapping | Recipe = "lsq-4bit",
                 task: str = "classification", *, overrides: Mapping | None = None,
                 teacher: nn.Module | None = None, num_classes: int | None = None,
                 example_input=None, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 output_dir: str | os.PathLike | None = None, allow_recipe_change: bool = False,
                 label_smoothing: float = 0.0, **trainer_kwargs):
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
            example = _cpu(example)
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
                label_smoothing=self.label_smoothing, example_input=example)
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
        _quiet()
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
        example = self.example_input if self.example_input is not None else _first_input(train_loader)
        module = self._module(example)
        if measure_fp and self.fp_metrics is None and val_loader is not None and not self.quantized:
            self.fp_metrics = self._test(module, val_loader)
        self.callback = QuantizationCallback(self.recipe, example_input=_cpu(example),
                                             allow_recipe_change=self.allow_recipe_change)
        cbs: list = [self.callback]
        logger: Any = False
        if self.output_dir is not None:
            saving = checkpoint_callbacks(self.output_dir / "checkpoints", val_loader is not None)
            self.checkpoint = saving[-1]
            cbs += saving
            logger = self._loggers() or False
        cbs += list(callbacks or [])
        cbs.append(_EpochSync())
        args = self._trainer_args(max_epochs=self.recipe.phases.epochs, callbacks=cbs,
                                  logger=logger, enable_checkpointing=self.output_dir is not None,
                                  plugins=[AtomicCheckpointIO()],
                                  default_root_dir=str(self.output_dir or "."))
        self.trainer = pl.Trainer(**args)
        start = time.perf_counter()
        if datamodule is not None:
            self.trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        else:
            self.trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader,
                             ckpt_path=ckpt_path)
        self.fit_seconds += time.perf_counter() - start
        self.history = _float_metrics(self.trainer.callback_metrics)
        return self.history

    # ------------------------------------------------------------------ evaluate
    def _test(self, module: ClassificationModule, loader) -> dict[str, float]:
        return evaluate_module(module, loader, self.trainer_kwargs)

    def evaluate(self, data) -> dict[str, float]:
        """Top-1 accuracy ``acc``, top-5 ``acc_top5`` and mean cross-entropy ``loss`` of the
        model (quantized after :meth:`fit`, full precision before) on ``data`` (a DataLoader,
        Dataset, iterable of batches, or a LightningDataModule's test split)."""
        _quiet()
        if isinstance(data, pl.LightningDataModule):
            data.prepare_data()
            data.setup("test")
            loader = data.test_dataloader()
        else:
            loader = self._loaders(data, train=False)
        example = self.example_input if self.example_input is not None else _first_input(loader)
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
            return export_model(self.model, path, format=format, example_input=_cpu(example),
                                metadata=meta, **kwargs)
        finally:
            self.model.train(was_training)

    def summary(self) -> dict[str, Any]:
        """Figures of the run: FP and quantized accuracy (from :meth:`fit`'s baseline and the
        last :meth:`evaluate`), per-layer bits and step sizes, average bits, model size (MB, FP
        and quantized, over the quantized layers' weights), GBOPs, training wall time, recipe
        name and hash, package versions."""
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
            out.update(avg_weight_bits=s.avg_weight_bits, avg_act_bits=s.avg_act_bits,
                       size_mb=s.size_mb, gbops=s.gbops,
                       fp_size_mb=sum(r["weight_numel"] for r in layers) * 4 / 1e6,
                       layers=layers)
        return out


# ----------------------------------------------------------------------------- runs


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


def _bundle_loaders(bundle, seed: int):
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
    """Build the data bundle and the (untrained, or checkpoint-loaded) FP model of a run.
    Problems with the data or model section are :class:`RunFileError`\\ s."""
    from .data import build_data
    from .models import build_model, load_checkpoint_weights

    try:
        bundle = build_data(cfg.data)
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
    return bundle, model


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
    train, val, test = _bundle_loaders(bundle, cfg.seed)
    if ckpt.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("depends_on") != key:
            raise RunFileError("pretrain", f"{ckpt} was trained for another model/data/pretrain/"
                                           "seed setting; delete it (and fp.json) or choose "
                                           "another output_dir")
        from .models import load_checkpoint_weights

        load_checkpoint_weights(model, ckpt)
        echo(f"reusing the full-precision model {ckpt} (test accuracy {record['acc']:.4f})")
        return record
    p = cfg.pretrain
    echo(f"pretraining in full precision: {p.epochs} epochs")
    module = ClassificationModule(model, bundle.num_classes, optimizer=p.optimizer_config(),
                                  label_smoothing=p.label_smoothing,
                                  example_input=bundle.example_input)
    stage = out / "pretrain"
    last = stage / "checkpoints" / "last.ckpt"
    args = trainer_args(_trainer_kwargs(cfg), max_epochs=p.epochs, logger=loggers(stage),
                                callbacks=[*checkpoint_callbacks(stage / "checkpoints", val is not None),
                                           *_extra_callbacks(), _EpochSync()],
                                enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
                                default_root_dir=str(stage))
    _quiet()
    start = time.perf_counter()
    trainer = pl.Trainer(**args)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val,
                ckpt_path=str(last) if resume and last.is_file() else None)
    seconds = time.perf_counter() - start
    metrics = evaluate_module(module, test, _trainer_kwargs(cfg))
    from .report import merge_metrics

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
    from . import report

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
    train, val, test = _bundle_loaders(bundle, cfg.seed)
    fp: dict[str, Any] | None
    if cfg.model.get("checkpoint"):
        fp = {**evaluate_module(ClassificationModule(model, bundle.num_classes), test,
                            _trainer_kwargs(cfg)),
              "source": f"checkpoint {cfg.model['checkpoint']}"}
    elif cfg.pretrain is not None:
        fp = pretrain(model, bundle, cfg, out, resume=resume, echo=echo)
    else:
        warnings.warn("the run has neither model.checkpoint nor pretrain: QAT starts from a "
                      "randomly initialized model", stacklevel=2)
        fp = {**evaluate_module(ClassificationModule(model, bundle.num_classes), test,
                            _trainer_kwargs(cfg)),
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
    from . import report

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
                  allow_recipe_change=allow_recipe_change, **_trainer_kwargs(cfg))
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


# ----------------------------------------------------------------------------- eval/export


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
    from .surgery import quantize_model

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    bundle, model = prepare(RunConfig(**{**cfg.__dict__, "model": {
        k: v for k, v in cfg.model.items() if k != "checkpoint"}}))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"could not read checkpoint {ckpt} (truncated, damaged or not a "
                         f"checkpoint of weights): {load_error_reason(e)}") from None
    check_checkpoint_digest(state, ckpt)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {ckpt} holds no state dict")
    quantized = any(".weight_quantizer." in k or ".input_quantizer." in k for k in state)
    module = ClassificationModule(model, bundle.num_classes, example_input=bundle.example_input)
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


__all__ = ["AtomicCheckpointIO", "EpochShuffleSampler", "JobResult", "QTrainer", "RunResult",
           "check_checkpoint_digest", "checkpoint_digest", "find_run_file", "layer_table",
           "load_checkpoint_model", "make_loader", "prepare", "pretrain", "run"]
