"""``qtrainer eval``/``export`` on a checkpoint of a user's own LightningModule (issue #11):
``--model-class pkg.mod:Class`` with ``--init-arg`` and ``--data``; the figures match the module
loaded with ``qtrainer.load_quantized`` and evaluated by hand."""

from __future__ import annotations

import json

import pytest
import torch
from lightning import pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from run_helpers import invoke
from torch.utils.data import DataLoader
from user_modules import AdamStepLR

import qtrainer
from qtrainer.callback import QuantizationCallback
from qtrainer.data import build_data
from qtrainer.export import load_int


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A user's AdamStepLR(in_channels=1) trained 2 epochs on digits under nipq-4bit."""
    folder = tmp_path_factory.mktemp("user")
    bundle = build_data({"name": "digits", "seed": 0, "batch_size": 64})
    pl.seed_everything(0)
    save = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    t = pl.Trainer(max_epochs=2, callbacks=[QuantizationCallback("nipq-4bit"), save],
                   logger=False, enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0)
    t.fit(AdamStepLR(lr=0.01, in_channels=1), bundle.train_loader())
    return folder / "last.ckpt", bundle


def test_eval_with_the_users_class_matches_the_module_evaluated_by_hand(checkpoint):
    ckpt, bundle = checkpoint
    r = invoke("eval", ckpt, "--model-class", "user_modules:AdamStepLR", "--data", "name=digits",
               "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    module = qtrainer.load_quantized(AdamStepLR, ckpt)  # in_channels=1 from the saved hparams
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(bundle.test, batch_size=100):
            correct += int((module(x).argmax(1) == y).sum())
            total += len(y)
    assert out["quantized"] is True and out["acc"] == pytest.approx(correct / total, abs=1e-6)
    assert out["avg_weight_bits"] == 4.0
    r = invoke("eval", ckpt, "--model-class", "user_modules:AdamStepLR", "--init-arg",
               "in_channels=1", "--init-arg", "width=8", "--data", "name=digits")
    assert r.exit_code == 0 and "quantized (nipq-4bit), test top-1" in r.output, r.output


def test_export_with_the_users_class_uses_the_saved_input_shapes(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    r = invoke("export", ckpt, "--model-class", "user_modules:AdamStepLR", "-o",
               tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    module = qtrainer.load_quantized(AdamStepLR, ckpt)
    rebuilt = load_int(tmp_path / "m.safetensors", AdamStepLR(in_channels=1))
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
    r = invoke("export", ckpt, "--model-class", "user_modules:AdamStepLR", "--format", "onnx",
               "-o", tmp_path / "m.onnx")
    assert r.exit_code == 0, r.output
    import onnx

    graph = onnx.load(tmp_path / "m.onnx").graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 8, 8]  # the traced input: the saved example's shape


def test_model_class_mistakes_are_bad_input(checkpoint):
    ckpt, _ = checkpoint
    cases = [
        (["--model-class", "user_modules:Nope", "--data", "name=digits"], "has no 'Nope'"),
        (["--model-class", "no_such_module:X", "--data", "name=digits"], "cannot import"),
        (["--model-class", "user_modules:AdamStepLR"], "--data name=..."),
        (["--model-class", "user_modules:AdamStepLR", "--init-arg", "colour=2", "--data",
          "name=digits"], "unexpected keyword argument 'colour'"),
        (["--init-arg", "width=8"], "go with --model-class"),
    ]
    for args, text in cases:
        r = invoke("eval", ckpt, *args)
        assert r.exit_code == 2 and text in r.output, (args, r.output)
