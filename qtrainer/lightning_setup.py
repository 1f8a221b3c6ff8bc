"""How qtrainer sets up ``lightning.pytorch.Trainer``: default arguments, the progress display,
the checkpoint callbacks, loggers, quieter logs, and evaluation of a module on a loader.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar

DEFAULT_TRAINER_ARGS = {"num_sanity_val_steps": 0, "enable_model_summary": False,
                        "log_every_n_steps": 10}
_QUIET = (r".*does not have many workers.*", r".*The number of training batches.*",
          r".*exists and is not empty.*", r".*GPU available but not used.*",
          r".*Checkpoint directory .* exists and is not empty.*",
          r".*`training_step` returned `None`.*", r".*Starting from v1.9.0.*tensorboardX.*",
          r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def quiet_lightning() -> None:
    """Hide Lightning's informational log lines (hardware, tips); warnings stay."""
    import logging

    import lightning.fabric  # noqa: F401 - set the levels after Lightning set its own
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_warnings():
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def float_metrics(values: Mapping) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


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


def in_terminal() -> bool:
    """Whether standard output is a terminal (not a file, a pipe, a CI log or ``nohup``)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


class EpochLines(Callback):
    """The progress display outside a terminal: one line per epoch, printed when it ends::

        epoch 3/8  loss 0.4123  acc 88.20%  val_loss 0.3811  val_acc 90.12%  bits W 3.91 A 4.02  phase noise  lambda 0.0821  osc 0.12%

    ``bits`` (average weight/activation bits), ``phase``, ``lambda`` and ``osc`` (the fraction
    of oscillating weights, ``oscillation.track``) appear in QAT (lambda only for noise
    tempering); ``phase`` is ``fp`` in full-precision training, ``noise`` or
    ``hard`` for NIPQ and ``qat`` otherwise. Rank 0 prints; nothing is printed per batch.
    """

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = float_metrics(trainer.callback_metrics)
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key, label, pct in (("train_loss_epoch", "loss", False), ("train_acc", "acc", True),
                                ("val_loss", "val_loss", False), ("val_acc", "val_acc", True)):
            if key in m and math.isfinite(m[key]):
                parts.append(f"{label} {100 * m[key]:.2f}%" if pct else f"{label} {m[key]:.4f}")
        if "qat/avg_weight_bits" in m:
            parts.append(f"bits W {m['qat/avg_weight_bits']:.2f} A {m['qat/avg_act_bits']:.2f}")
        quant = next((c for c in trainer.callbacks if hasattr(c, "phase")), None)
        if quant is None:
            parts.append("phase fp")
        else:
            parts.append(f"phase {quant.phase if getattr(quant, 'is_nipq', False) else 'qat'}")
        if "qat/lambda" in m:
            parts.append(f"lambda {m['qat/lambda']:.4g}")
        if "qat/osc_fraction" in m:
            parts.append(f"osc {100 * m['qat/osc_fraction']:.2f}%")
        print("  ".join(parts), flush=True)


class WallClock(Callback):
    """Training wall time that survives a resume: the seconds of every fit of this run, kept
    in the checkpoints (``seconds`` after a resumed fit counts the earlier attempts up to the
    checkpoint it resumed from, plus this one)."""

    def __init__(self):
        self.seconds, self._start = 0.0, None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter() - self.seconds

    def _now(self) -> float:
        return self.seconds if self._start is None else time.perf_counter() - self._start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = self._now()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.seconds = self._now()

    def state_dict(self) -> dict:
        return {"seconds": self._now()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seconds = float(state_dict.get("seconds", 0.0))
        self._start = time.perf_counter() - self.seconds


def progress_display(trainer_kwargs: Mapping, callbacks: list) -> tuple[list, dict]:
    """The progress display that fits where the run's output goes: ``(callbacks to add,
    Trainer arguments)``. In a terminal, Lightning's rich progress bar (its tqdm bar when rich
    is missing); elsewhere :class:`EpochLines`. Nothing when the user set
    ``enable_progress_bar`` or passed a progress bar callback."""
    if "enable_progress_bar" in trainer_kwargs or any(isinstance(c, ProgressBar) for c in callbacks):
        return [], {}
    if not in_terminal():
        return [EpochLines()], {"enable_progress_bar": False}
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        return [RichProgressBar(leave=True)], {}
    except (ImportError, ModuleNotFoundError):  # rich not installed
        return [], {}


def trainer_args(trainer_kwargs: Mapping, **extra) -> dict:
    """``lightning.pytorch.Trainer`` arguments: qtrainer's defaults, then ``extra``, then the
    user's ``trainer_kwargs``; plus the progress display (:func:`progress_display`)."""
    args = {**DEFAULT_TRAINER_ARGS, "logger": False, "enable_checkpointing": False}
    args.update(extra)
    args.update(trainer_kwargs)
    shown, display_args = progress_display(trainer_kwargs, list(args.get("callbacks") or []))
    args["callbacks"] = [*(args.get("callbacks") or []), *shown]
    args.update(display_args)
    return args


@contextlib.contextmanager
def validation_step_off(module: pl.LightningModule, off: bool):
    """Hide ``module.validation_step`` from Lightning while ``off`` (a fit without validation
    data), so that Lightning does not warn about a validation step without a loader at every
    stage; the module is as before afterwards."""
    if not off or "validation_step" in vars(module):
        yield module
        return
    module.validation_step = None  # Lightning's is_overridden() treats None as not defined
    try:
        yield module
    finally:
        del module.validation_step


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
    args.setdefault("enable_progress_bar", in_terminal())
    args.update(logger=False, enable_checkpointing=False, enable_model_summary=False,
                callbacks=[], devices=1)
    tester = pl.Trainer(**args)
    kwargs = {"datamodule": loader} if isinstance(loader, pl.LightningDataModule) \
        else {"dataloaders": loader}
    result = tester.test(module, verbose=False, **kwargs)[0]
    return {"acc": float(result["test_acc"]), "acc_top5": float(result["test_acc_top5"]),
            "loss": float(result["test_loss"])}


__all__ = ["DEFAULT_TRAINER_ARGS", "EpochLines", "WallClock", "checkpoint_callbacks", "evaluate_module",
           "float_metrics", "in_terminal", "loggers", "progress_display", "quiet_lightning",
           "quiet_warnings", "trainer_args", "validation_step_off"]
