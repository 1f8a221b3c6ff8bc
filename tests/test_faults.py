"""Numerical faults are detected at the step they happen: the run stops with a message naming
the layer, the parameter, the value and the step (or skips the step when the recipe allows),
and the last good checkpoint stays intact."""

import math

import pytest
import torch
from lightning import pytorch as pl
from lit_helpers import LitCNN, cifar_tensors, loaders

from qtrainer import named_quantizers
from qtrainer.callback import QuantizationCallback, QuantizationFault


class Faulty(LitCNN):
    """Injects one fault at optimizer step ``at`` inside training_step."""

    def __init__(self, kind, at=3):
        super().__init__(width=8)
        self.kind, self.at = kind, at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.at:
            q = dict(named_quantizers(self))
            if self.kind == "nan_loss":
                loss = loss * float("nan")
            elif self.kind == "negative_step":
                q["net.features.3.weight_quantizer"].step.data.fill_(-0.25)
            elif self.kind == "inf_alpha":
                q["net.features.3.input_quantizer"].theta_a.data.fill_(float("inf"))
            elif self.kind == "nan_bits":
                q["net.features.6.weight_quantizer"].theta_b.data.fill_(float("nan"))
        return loss


@pytest.fixture(scope="module")
def small():
    return cifar_tensors("train", 32), cifar_tensors("test", 10)


def run(module, recipe, small, tmp_path, **over):
    pl.seed_everything(0)
    overrides = {"phases.epochs": 2, "lr_schedule.warmup_epochs": 0, **over}
    if recipe.startswith("nipq"):
        overrides.update({"phases.hard_epochs": 1, "phases.bn_reestimation_batches": 1})
    cb = QuantizationCallback(recipe, overrides=overrides)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    t = pl.Trainer(max_epochs=2, callbacks=[cb, ckpt], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0)
    t.fit(module, loaders(*small, batch_size=64)[0])  # 5 steps per epoch
    return t, cb


@pytest.mark.parametrize("kind,recipe,words", [
    ("nan_loss", "lsq-4bit", ["non-finite gradient of net.", "nan", "optimizer step 6"]),
    ("negative_step", "lsq-4bit", ["net.features.3.weight_quantizer", "step", "-0.25", "step 6"]),
    ("inf_alpha", "nipq-4bit", ["net.features.3.input_quantizer", "theta_a", "inf", "step 6"]),
    ("nan_bits", "nipq-mp-4bit", ["net.features.6.weight_quantizer", "theta_b", "nan", "step 6"]),
])
def test_fault_stops_with_named_parameter_and_keeps_last_checkpoint(kind, recipe, words, small, tmp_path):
    with pytest.raises(QuantizationFault) as err:
        run(Faulty(kind, at=6), recipe, small, tmp_path)  # epoch 0 ends at step 5
    for w in words:
        assert w in str(err.value)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_skip_policy_skips_only_the_bad_step(small, tmp_path):
    module = Faulty("nan_loss", at=3)
    before = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                before.update({k: v.clone() for k, v in pl_module.named_parameters()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4 and before:  # right after the skipped step
                after = dict(pl_module.named_parameters())
                before["same"] = all(torch.equal(before[k], after[k]) for k in after if k in before)

    pl.seed_everything(0)
    cb = QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 2, "faults.on_nonfinite": "skip"})
    t = pl.Trainer(max_epochs=2, callbacks=[cb, Snap()], logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="step skipped"):
        t.fit(module, loaders(*small, batch_size=64)[0])
    assert cb.skipped_steps == [3]
    assert before["same"] is True
    assert t.global_step == 10 and all(math.isfinite(p.sum().item()) for p in module.parameters())
