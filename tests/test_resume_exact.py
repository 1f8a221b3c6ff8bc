"""A run interrupted at an epoch boundary and resumed from its last checkpoint ends exactly where
the uninterrupted run ends (issue #11): weights, quantizer state, BatchNorm statistics, optimizer
and scheduler state, RNG; for every built-in recipe family (LSQ, tempering, NIPQ with fixed bits,
NIPQ mixed precision after its bit-widths moved) and at NIPQ's switch to hard quantization, with
the user's optimizers (keep) and the recipe's (replace).

The training data is qtrainer's DeviceLoader (augmentation drawn from (seed, epoch); the loader of
``qtrainer run``), whose epoch a fresh process does not know: BatchNorm re-estimation at the
switch must set it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning import pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from user_modules import AdamStepLR

from qtrainer import named_quantizers
from qtrainer.callback import QuantizationCallback
from qtrainer.data import default_cifar10_jpeg_root, load_npz_jpeg, stratified_indices
from qtrainer.data.images import DeviceLoader
from qtrainer.loaders import EpochSync
from qtrainer.quantized import quantize_as_saved
from qtrainer.recipes import RecipeError

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.261)
TOLERANCE = 1e-6  # float32 values that should be equal: any difference is a resume bug


class Stop(Exception):
    """The interruption."""


class StopAt(pl.Callback):
    """Raise :class:`Stop` at the start of epoch ``epoch``, before any other callback runs."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Stop


@pytest.fixture(scope="module")
def images():
    """160 CIFAR-10 training images, uint8 N x H x W x C, and labels."""
    path = default_cifar10_jpeg_root() / "train.npz"
    with np.load(path) as npz:
        labels = npz["labels"]
    x, y, _ = load_npz_jpeg(path, stratified_indices(labels, 16, 0))
    return x, y


def run(images, folder, recipe, overrides, epochs, stop_at=None, resume=False, lr=0.01):
    """One fit of a fresh AdamStepLR(lr); returns (trainer, callback, module, RNG state after)."""
    pl.seed_everything(0)
    module = AdamStepLR(lr=lr)
    cb = QuantizationCallback(recipe, overrides=overrides)
    save = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                           every_n_epochs=1, enable_version_counter=False)
    callbacks = ([StopAt(stop_at)] if stop_at is not None else []) + [cb, save, EpochSync()]
    t = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, limit_val_batches=0,
                   enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    loader = DeviceLoader(*images, 32, MEAN, STD, train=True, seed=0)
    try:
        t.fit(module, loader, ckpt_path=folder / "last.ckpt" if resume else None)
    except Stop:
        assert stop_at is not None
    return t, cb, module, torch.get_rng_state()


def differences(a, b, path="") -> list[str]:
    """Where two nested states (dicts, lists, tensors, numbers) differ by more than TOLERANCE."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{path}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"]
        diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        return [f"{path}: differs by {diff:.3g}"] if diff > TOLERANCE else []
    if callable(a) and callable(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def trained_state(t, cb, module, rng) -> dict:
    return {"module": module.state_dict(), "rng": rng, "phase": cb.phase,
            "optimizers": [o.state_dict() for o in t.optimizers],
            "schedulers": [c.scheduler.state_dict() for c in t.lr_scheduler_configs],
            "global_step": t.global_step}


MP = {"mixed_precision.w_scale": 3e5, "mixed_precision.a_scale": 3e5,
      "phases.bn_reestimation_batches": 3}
CASES = {
    # family: (recipe, overrides, epochs, interrupted at the start of epoch, the user's Adam lr)
    "lsq-keep": ("lsq-2bit", {}, 3, 1, 0.01),
    "tempering-replace": ("tempering-4bit", {"optimizer.policy": "replace"}, 3, 2, 0.01),
    "nipq-keep-at-the-switch": ("nipq-4bit", {"phases.bn_reestimation_batches": 3}, 3, 2, 0.01),
    "nipq-replace-at-the-switch": ("nipq-3bit", {"optimizer.policy": "replace",
                                                 "phases.bn_reestimation_batches": 3}, 3, 2, 0.01),
    "nipq-mp-replace-bits-moved": ("nipq-mp-4bit", {"optimizer.policy": "replace", **MP}, 4, 2,
                                   0.01),
    # Adam moves theta_b by ~lr per step: 0.1 for ten steps takes some layers below 8 bits
    "nipq-mp-keep-bits-moved": ("nipq-mp-4bit", MP, 4, 2, 0.1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_resumed_run_ends_as_the_uninterrupted_one(case, images, tmp_path):
    recipe, overrides, epochs, stop, lr = CASES[case]
    full = trained_state(*run(images, tmp_path / "a", recipe, overrides, epochs, lr=lr))
    run(images, tmp_path / "b", recipe, overrides, epochs, stop_at=stop, lr=lr)
    saved = torch.load(tmp_path / "b" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == stop - 1  # the last complete epoch before the interruption
    if "bits-moved" in case:
        moved = [k for k, v in saved["state_dict"].items() if k.endswith("theta_b") and v.item() != 0.0]
        assert moved  # theta_b = 0 is 8 bits: the checkpoint holds learned, moved bit-widths
        bits = {q.bits for _, q in named_quantizers(_module_with(saved))}
        assert bits != {8}, bits
    t, cb, module, rng = run(images, tmp_path / "b", recipe, overrides, epochs, resume=True, lr=lr)
    resumed = trained_state(t, cb, module, rng)
    assert differences(full, resumed) == []
    if "nipq" in case:
        assert resumed["phase"] == "hard"


def _module_with(checkpoint):
    """A quantized AdamStepLR holding a checkpoint's state (its bits as trained)."""
    module = AdamStepLR()
    quantize_as_saved(module, checkpoint["qtrainer"])
    module.load_state_dict(checkpoint["state_dict"])
    return module


def test_resuming_with_another_trainer_length_is_another_recipe(images, tmp_path):
    run(images, tmp_path, "lsq-4bit", {}, 2)
    with pytest.raises(RecipeError, match="as fitted to this Trainer's length"):
        pl.Trainer(max_epochs=3, callbacks=[QuantizationCallback("lsq-4bit")], logger=False,
                   enable_progress_bar=False, enable_checkpointing=False).fit(
            AdamStepLR(), DeviceLoader(*images, 32, MEAN, STD, train=True),
            ckpt_path=tmp_path / "last.ckpt")


def test_resuming_into_layers_quantized_otherwise_is_refused(images, tmp_path):
    """The same recipe traced on an all-positive example input makes the first layer's input
    unsigned; resuming that checkpoint with a signed trace would load the step sizes silently."""
    x = DeviceLoader(*images, 32, MEAN, STD, train=True).example_batch(8)[0]

    def fit(example, ckpt=None, max_epochs=1):
        save = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, save_top_k=1,
                               enable_version_counter=False)
        t = pl.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                       callbacks=[QuantizationCallback("lsq-4bit", fit="strict",
                                                       overrides={"phases.epochs": 1},
                                                       example_input=example), save])
        t.fit(AdamStepLR(), DeviceLoader(*images, 32, MEAN, STD, train=True), ckpt_path=ckpt)

    fit(x.abs())
    with pytest.raises(RecipeError, match=r"layer 'net.body.0' was quantized as \['Conv2d', 8, 8, "
                                          r"False\], this run's 'net.body.0' as \['Conv2d', 8, 8, "
                                          r"True\] .*; resume with the first run's example input"):
        fit(x, tmp_path / "last.ckpt", max_epochs=2)
