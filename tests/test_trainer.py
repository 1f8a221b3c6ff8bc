"""The Keras-style API: QTrainer fit/evaluate/summary/export on digits with asserted accuracy,
the distillation loss against its formula, data in every accepted form, epochs and Trainer
arguments passed through, atomic checkpoints, per-epoch shuffling that resumes exactly."""

import copy
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from run_helpers import train_digits_cnn

from qtrainer.data import load_digits_split
from qtrainer.lit_module import ClassificationModule, distillation_loss, soft_cross_entropy
from qtrainer.models import SmallCNN
from qtrainer.nn import QuantizedLayer
from qtrainer.checkpoint_io import AtomicCheckpointIO
from qtrainer.loaders import EpochShuffleSampler
from qtrainer.resources import layer_table
from qtrainer.trainer import QTrainer

QUIET = {"enable_progress_bar": False, "accelerator": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits_split(seed=0)
    return train, test


@pytest.fixture(scope="module")
def fp_model(digits):
    """A SmallCNN trained in full precision on digits (plain loop, ~2 s)."""
    return train_digits_cnn(width=16, epochs=12, weight_decay=5e-4, one_cycle=True)


def _accuracy(model, dataset, batch_size: int = 128):
    """Top-1 accuracy in the batches QTrainer evaluates in (its default batch_size): a
    convolution's float rounding may depend on the batch size (the BLAS picks its blocking by
    shape), and a quantized model turns such rounding at a tie into a whole step."""
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                   for i in range(0, len(y), batch_size))
    return hits / len(y)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_fit_evaluate_summary_export_on_digits(digits, fp_model, tmp_path):
    from qtrainer.export import load_int

    train, test = digits
    fp_acc = _accuracy(fp_model, test)
    assert fp_acc >= 0.95

    model = copy.deepcopy(fp_model)
    qt = QTrainer(model, "lsq-4bit", overrides={"weight_decay.base": 5e-4}, batch_size=64,
                  output_dir=tmp_path / "run", **QUIET)
    history = qt.fit(train, test, epochs=3)
    assert qt.recipe.phases.epochs == 3 and qt.trainer.max_epochs == 3
    assert qt.fp_metrics["acc"] == pytest.approx(fp_acc, abs=1e-6)  # measured before surgery
    assert "train_loss_epoch" in history and "qat/avg_weight_bits" in history
    assert qt.quantized and qt.model is model  # quantized in place

    metrics = qt.evaluate(test)
    assert metrics["acc"] >= fp_acc - 0.02, (metrics, fp_acc)
    assert metrics["acc"] == pytest.approx(_accuracy(model, test), abs=1e-6)
    assert metrics["acc_top5"] >= metrics["acc"]

    s = qt.summary()
    assert s["fp_acc"] == pytest.approx(fp_acc, abs=1e-6)
    assert s["quantized_acc"] == metrics["acc"]
    assert s["recipe"] == "lsq-4bit" and len(s["recipe_hash"]) == 16
    assert [(r["name"], r["weight_bits"], r["act_bits"]) for r in s["layers"]] == [
        ("features.0", 8, 8), ("features.3", 4, 4), ("features.6", 4, 4), ("fc", 8, 8)]
    n = [r["weight_numel"] for r in s["layers"]]
    assert s["avg_weight_bits"] == pytest.approx((8 * n[0] + 4 * n[1] + 4 * n[2] + 8 * n[3]) / sum(n))
    fp_params = [p for k, p in model.named_parameters() if "_quantizer." not in k]
    assert s["fp_size_mb"] == pytest.approx(sum(p.numel() for p in fp_params) * 4 / 1e6)
    assert s["quantized_weight_share"] == 1.0  # every conv/linear weight
    assert s["size_mb"] < s["fp_size_mb"] / 6
    assert s["gbops"] > 0 and s["wall_time_s"] > 0 and s["versions"]["torch"]
    assert all(r["weight_step"] > 0 and r["act_step"] > 0 for r in s["layers"])

    # checkpoints and logs went to output_dir
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2  # refreshed every epoch, whatever the validation accuracy did
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "run" / "logs" / "csv" / "0" / "metrics.csv").is_file()

    model.train()
    report = qt.export(tmp_path / "model.safetensors")
    assert report["format"] == "int" and os.path.getsize(tmp_path / "model.safetensors") > 0
    assert model.training  # the user's mode is restored
    rebuilt = load_int(tmp_path / "model.safetensors", SmallCNN(in_channels=1, num_classes=10,
                                                                width=16))
    model.eval()
    x = test.tensors[0][:64]
    with torch.no_grad():
        assert torch.equal(rebuilt(x).argmax(1), model(x).argmax(1))


@pytest.mark.slow
def test_nipq_mixed_precision_and_datamodule(digits, fp_model):
    train, test = digits

    class Digits(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(train, batch_size=64, shuffle=True,
                              generator=torch.Generator().manual_seed(0))

        def val_dataloader(self):
            return DataLoader(test, batch_size=256)

        def test_dataloader(self):
            return DataLoader(test, batch_size=256)

    model = copy.deepcopy(fp_model)
    qt = QTrainer(model, "nipq-mp-4bit",
                  overrides={"optimizer.lr": 0.01, "phases.bn_reestimation_batches": 5},
                  **QUIET)
    qt.fit(Digits(), epochs=4)  # 3 noise epochs + 1 hard
    assert (qt.recipe.phases.epochs, qt.recipe.phases.hard_epochs) == (4, 1)
    metrics = qt.evaluate(Digits())
    fp_acc = _accuracy(fp_model, test)
    assert metrics["acc"] >= fp_acc - 0.03
    s = qt.summary()
    # the bits moved from 8 to the 4-bit average target
    assert abs(s["avg_weight_bits"] - 4.0) <= 0.1 and abs(s["avg_act_bits"] - 4.0) <= 0.1


# ----------------------------------------------------------------------------- distillation


def test_distillation_loss_equals_the_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    T, w = 2.0, 0.7
    p_t = torch.softmax(teacher / T, 1)
    soft = -(p_t * torch.log_softmax(student / T, 1)).sum(1).mean()
    expected = F.cross_entropy(student, y) + w * soft
    assert soft_cross_entropy(student, teacher, T).item() == pytest.approx(soft.item(), rel=1e-6)
    assert distillation_loss(student, y, teacher, T, w).item() == pytest.approx(expected.item(),
                                                                                 rel=1e-6)
    # identical logits at T=1: the soft term is the teacher's entropy
    ent = -(torch.softmax(teacher, 1) * torch.log_softmax(teacher, 1)).sum(1).mean()
    assert soft_cross_entropy(teacher, teacher).item() == pytest.approx(ent.item(), rel=1e-6)


def test_module_loss_with_teacher_on_a_fixed_batch():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        teacher[1].weight.add_(0.3)
    module = ClassificationModule(net, 10, teacher=teacher, distill_temperature=3.0,
                                  distill_weight=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    logits = module(x)
    with torch.no_grad():
        t = teacher(x)
    expected = F.cross_entropy(logits, y) + 0.5 * (
        -(torch.softmax(t / 3, 1) * torch.log_softmax(logits / 3, 1)).sum(1).mean())
    module.log = lambda *a, **k: None  # outside a Trainer
    assert module.loss(logits, y, x).item() == pytest.approx(expected.item(), rel=1e-6)
    # the teacher is frozen and not part of the module (not quantized, not saved, not optimized)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_teacher") for k in module.state_dict())
    assert len(list(module.parameters())) == 2


@pytest.mark.slow
def test_qtrainer_distills_from_a_frozen_fp_copy(digits, fp_model):
    train, test = digits
    model = copy.deepcopy(fp_model)
    qt = QTrainer(model, "lsq-4bit", overrides={"distillation.enabled": True,
                                                "distillation.temperature": 2.0,
                                                "weight_decay.base": 5e-4},
                  batch_size=64, **QUIET)
    reference = {k: v.clone() for k, v in qt.teacher.state_dict().items()}
    qt.fit(train, epochs=1)
    teacher = qt.module.teacher
    assert teacher is qt.teacher and teacher is not model
    assert not any(isinstance(m, QuantizedLayer) for m in teacher.modules())
    assert all(torch.equal(reference[k], v) for k, v in teacher.state_dict().items())
    assert "train_distill_loss" in qt.history
    assert qt.evaluate(test)["acc"] >= _accuracy(fp_model, test) - 0.03


# ----------------------------------------------------------------------------- plumbing


def test_data_forms_and_trainer_arguments(digits, fp_model):
    train, test = digits
    small = TensorDataset(*(t[:256] for t in train.tensors))
    loader = DataLoader(small, batch_size=64)
    qt = QTrainer(copy.deepcopy(fp_model), "lsq-4bit", accumulate_grad_batches=2,
                  limit_val_batches=1, **QUIET)
    qt.fit(loader, DataLoader(test, batch_size=128), epochs=1)
    assert qt.trainer.accumulate_grad_batches == 2
    assert qt.trainer.global_step == 2  # 4 batches, 2 per optimizer step
    assert qt.num_classes == 10
    # a Dataset works for evaluate too; a list of batches as well
    a = qt.evaluate(test)["acc"]
    b = qt.evaluate([(test.tensors[0][i:i + 100], test.tensors[1][i:i + 100])
                     for i in range(0, len(test), 100)])["acc"]
    assert a == pytest.approx(b, abs=1e-6)
    with pytest.raises(TypeError, match="fit\\(epochs"):
        QTrainer(fp_model, "lsq-4bit", max_epochs=3)
    with pytest.raises(ValueError, match="task"):
        QTrainer(fp_model, "lsq-4bit", task="detection")
    with pytest.raises(RuntimeError, match="fit"):
        QTrainer(copy.deepcopy(fp_model)).export("never.safetensors")


def test_evaluate_before_fit_is_the_fp_model(digits, fp_model):
    _, test = digits
    qt = QTrainer(copy.deepcopy(fp_model), "lsq-4bit", **QUIET)
    assert qt.evaluate(test)["acc"] == pytest.approx(_accuracy(fp_model, test), abs=1e-6)
    assert not qt.quantized and qt.summary()["fp_acc"] == qt.fp_metrics["acc"]


def test_eval_precision_evaluates_a_bf16_trained_model_in_fp32(digits, fp_model, tmp_path):
    """eval_precision='32-true' under bf16-mixed: validation and evaluate() compute the fp32
    model's loss and accuracy exactly (one batch, so no averaging order is involved), where
    bf16 autocast changes the loss."""
    _, test = digits
    x, y = test.tensors[:2]
    x, y = x[:128], y[:128]
    model = copy.deepcopy(fp_model).eval()
    with torch.no_grad():
        fp32_loss = F.cross_entropy(model(x), y).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss = F.cross_entropy(model(x).float(), y).item()
    assert abs(bf16_loss - fp32_loss) > 1e-4  # bf16 really changes it
    batch = [(x, y)]
    plain = QTrainer(copy.deepcopy(fp_model), "lsq-4bit", precision="bf16-mixed", **QUIET)
    assert plain.evaluate(batch)["loss"] == pytest.approx(bf16_loss, rel=1e-6)
    qt = QTrainer(copy.deepcopy(fp_model), "lsq-4bit", precision="bf16-mixed",
                  eval_precision="32-true", **QUIET)
    assert qt.evaluate(batch)["loss"] == pytest.approx(fp32_loss, rel=1e-6)
    # validation during fit too: a model whose quantizers are off is the FP model
    from qtrainer.surgery import set_quantizers

    class QuantizersOff(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            set_quantizers(pl_module, enabled=False)

    qt.fit(batch, batch, epochs=1, callbacks=[QuantizersOff()])
    qt.model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(qt.model(x), y).item()
    assert qt.history["val_loss"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="eval_precision='bf16'.*'32-true'"):
        QTrainer(fp_model, "lsq-4bit", eval_precision="bf16")


def test_epoch_shuffle_sampler_depends_on_seed_and_epoch_only():
    a, b = EpochShuffleSampler(50, seed=3), EpochShuffleSampler(50, seed=3)
    first = list(a)
    second = list(a)  # iterating advances the epoch
    assert sorted(first) == list(range(50)) and first != second
    b.set_epoch(1)
    assert list(b) == second
    b.set_epoch(0)
    assert list(b) == first
    assert list(EpochShuffleSampler(50, seed=4)) != first


def test_atomic_checkpoint_io_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"a": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))  # the previous one, intact
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left


def test_layer_table_names_every_quantized_layer(fp_model):
    from qtrainer.surgery import quantize_model

    model = copy.deepcopy(fp_model)
    quantize_model(model, method="lsq", weight_bits=3, act_bits=4,
                   example_input=torch.randn(2, 1, 8, 8))
    rows = layer_table(model)
    assert [r["name"] for r in rows] == ["features.0", "features.3", "features.6", "fc"]
    assert [r["weight_bits"] for r in rows] == [8, 3, 3, 8]
    assert rows[0]["position"] == "first" and rows[-1]["position"] == "last"
