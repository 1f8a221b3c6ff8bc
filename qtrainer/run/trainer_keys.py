"""The ``trainer:`` section of a run file: which ``lightning.pytorch.Trainer`` arguments a run
file may set, and the checker of each value (Lightning itself would only fail at run time)."""

from __future__ import annotations

import inspect

from ..recipes.checks import Bool, Float, Int, Nullable, OneOf
from ..recipes.errors import did_you_mean, show
from .errors import RunFileError, err, mapping, unknown


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


def check_trainer(raw: object) -> dict:
    spec = dict(mapping(raw, "trainer"))
    allowed = [k for k in _trainer_keys() if k not in _TRAINER_RESERVED]
    for key, value in spec.items():
        if key in _TRAINER_RESERVED:
            raise err(f"trainer.{key}", f"trainer.{key}: cannot be set in a run file "
                                         f"({_TRAINER_RESERVED[key]})")
        if key not in allowed:
            raise unknown(key, allowed, "trainer")
        check = _TRAINER_CHECKS.get(key)
        if check is not None:
            spec[key] = check(value, f"trainer.{key}")
    return spec


__all__ = ["PRECISIONS", "check_trainer"]
