"""Inference from QAT checkpoints and the stages around fit (issue #11): ``qtrainer.prepare``
(surgery without Lightning), ``qtrainer.load_quantized`` (the trained module, bit for bit, from
the plan saved in the checkpoint), ``validate``/``test``/``predict`` before fit in full precision
and from a QAT checkpoint quantized as saved; clear errors."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning import pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_helpers import cifar_tensors, loaders
from torch.utils.data import DataLoader
from user_modules import AdamStepLR, ConvNet

import qtrainer
from qtrainer import QuantizedLayer, named_quantizers
from qtrainer.callback import QuantizationCallback
from qtrainer.checkpoint_io import AtomicCheckpointIO


@pytest.fixture(scope="module")
def data():
    return cifar_tensors("train", 16), cifar_tensors("test", 5)


def trainer(callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      deterministic=True, **kw)


def train(data, folder, recipe, overrides=None, epochs=2, lr=0.01):
    """A user's AdamStepLR trained under the callback; its last checkpoint written atomically
    with qtrainer's digest. Returns (module in eval mode, checkpoint path)."""
    pl.seed_everything(0)
    module = AdamStepLR(lr=lr)
    save = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    t = trainer([QuantizationCallback(recipe, overrides=overrides), save], max_epochs=epochs,
                enable_checkpointing=True, plugins=[AtomicCheckpointIO()], limit_val_batches=0)
    t.fit(module, loaders(*data, batch_size=32)[0])
    return module.eval(), folder / "last.ckpt"


def images(data):
    return data[1].tensors[0]


MP = {"mixed_precision.w_scale": 3e5, "mixed_precision.a_scale": 3e5,
      "phases.bn_reestimation_batches": 2}


@pytest.mark.parametrize("recipe, overrides, lr", [
    ("lsq-2bit", None, 0.01), ("tempering-3bit", None, 0.01), ("nipq-mp-4bit", MP, 0.1)])
def test_load_quantized_is_the_trained_module_bit_for_bit(recipe, overrides, lr, data, tmp_path):
    module, ckpt = train(data, tmp_path, recipe, overrides, lr=lr)
    x = images(data)
    with torch.no_grad():
        expected = module(x)
    loaded = qtrainer.load_quantized(AdamStepLR, ckpt)  # built from the saved hyperparameters
    assert not loaded.training and loaded.hparams.lr == lr
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    bits = [q.bits for _, q in named_quantizers(module)]
    assert [q.bits for _, q in named_quantizers(loaded)] == bits
    if recipe.startswith("nipq-mp"):
        assert set(bits) != {8}  # learned bit-widths, not the plan's initial 8
    again = qtrainer.load_quantized(AdamStepLR(lr=lr), ckpt)  # a fresh instance works too
    with torch.no_grad():
        assert torch.equal(again(x), expected)


def test_prepare_then_load_state_dict_is_the_documented_two_step_path(data, tmp_path):
    module, ckpt = train(data, tmp_path, "lsq-4bit", epochs=1)
    fresh, report = qtrainer.prepare(AdamStepLR(), "lsq-4bit",
                                     example_input=data[0].tensors[0][:8])
    assert [r.to_dict() for r in report] == [m.qreport.to_dict() for m in module.modules()
                                             if isinstance(m, QuantizedLayer)]
    fresh.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    x = images(data)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), module(x))


def test_prepare_and_load_quantized_need_no_lightning(data, tmp_path):
    _, ckpt = train(data, tmp_path, "lsq-4bit", epochs=1)
    # AdamStepLR's layers in a plain nn.Module (state dict keys net.*), importable without Lightning
    (tmp_path / "plain_net.py").write_text(
        "from torch import nn\n\n\n" + inspect.getsource(ConvNet) + textwrap.dedent("""

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = ConvNet()

            def forward(self, x):
                return self.net(x)
        """))
    code = textwrap.dedent(f"""
        import sys, torch, qtrainer
        from torch import nn
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        qtrainer.prepare(net, "nipq-4bit", example_input=torch.randn(2, 3, 8, 8))
        assert isinstance(net[0], qtrainer.QuantizedLayer)
        from plain_net import Net
        loaded = qtrainer.load_quantized(Net, {str(ckpt)!r})
        assert isinstance(loaded.net.head, qtrainer.QuantizedLayer) and not loaded.training
        assert not any(m.startswith("lightning") for m in sys.modules), "lightning imported"
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_load_quantized_refuses_what_it_cannot_load_with_clear_errors(data, tmp_path):
    _, ckpt = train(data, tmp_path / "q", "lsq-4bit", epochs=1)
    pl.seed_everything(0)
    fp = tmp_path / "fp.ckpt"
    t = trainer([], max_epochs=1, limit_val_batches=0, limit_train_batches=1)
    t.fit(AdamStepLR(), loaders(*data, batch_size=32)[0])
    t.save_checkpoint(fp)
    with pytest.raises(ValueError, match=r"fp.ckpt holds no 'qtrainer' entry: it was not written "
                                         r"under QuantizationCallback"):
        qtrainer.load_quantized(AdamStepLR, fp)
    with pytest.raises(ValueError, match=r"last.ckpt does not fit AdamStepLR: layer 'net.body.0': "
                                         r"432 weights in the model, 216 in the plan"):
        qtrainer.load_quantized(AdamStepLR, ckpt, width=16)
    with pytest.raises(ValueError, match=r"layer 'net.body.0' of the plan is not in ConvNet; "
                                         r"close: 'body.0'"):
        qtrainer.load_quantized(ConvNet(), ckpt)
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["net.head.weight"][0, 0] += 1.0  # edited after saving
    torch.save(state, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match="does not match the checksum written with it"):
        qtrainer.load_quantized(AdamStepLR, tmp_path / "edited.ckpt")
    with pytest.raises(FileNotFoundError):
        qtrainer.load_quantized(AdamStepLR, tmp_path / "missing.ckpt")


def test_validate_test_predict_before_fit_stay_full_precision(data):
    pl.seed_everything(0)
    module = AdamStepLR()
    _, val = loaders(*data, batch_size=32)
    x = DataLoader(images(data), batch_size=50)
    plain = trainer([]).validate(module, val, verbose=False)[0]
    plain_test = trainer([]).test(module, val, verbose=False)[0]
    plain_out = torch.cat(trainer([]).predict(module, x))
    cb = QuantizationCallback("lsq-2bit")
    t = trainer([cb])
    assert t.validate(module, val, verbose=False)[0] == plain
    assert t.test(module, val, verbose=False)[0] == plain_test
    assert torch.equal(torch.cat(t.predict(module, x)), plain_out)
    assert not any(isinstance(m, QuantizedLayer) for m in module.modules())
    assert "on_load_checkpoint" not in vars(module)  # the restore hook is gone after each stage


def test_a_stage_restoring_a_qat_checkpoint_quantizes_as_saved(data, tmp_path):
    module, ckpt = train(data, tmp_path, "nipq-mp-4bit", MP, lr=0.1)
    x = DataLoader(images(data), batch_size=50)
    with torch.no_grad():
        expected = module(images(data))
    fresh = AdamStepLR(lr=0.1)
    out = trainer([QuantizationCallback("nipq-mp-4bit")]).predict(fresh, x, ckpt_path=ckpt)
    assert torch.equal(torch.cat(out), expected)
    assert [q.bits for _, q in named_quantizers(fresh)] == [q.bits for _, q in named_quantizers(module)]
