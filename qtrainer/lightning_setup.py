"""How qtrainer sets up ``lightning.pytorch.Trainer``: default arguments, the checkpoint
callbacks, loggers, quieter logs, and evaluation of a module on a loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

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


__all__ = ["DEFAULT_TRAINER_ARGS", "checkpoint_callbacks", "evaluate_module", "float_metrics",
           "loggers", "quiet_lightning", "quiet_warnings", "trainer_args"]
