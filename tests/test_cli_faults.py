"""Numerical faults through ``qtrainer run`` (issue #6): exit code 1 with the callback's named
message and no traceback (unless ``--debug``), the previous epoch's last.ckpt intact and
loadable; ``faults.on_nonfinite: skip`` finishes the run.

Detection itself (non-finite loss and gradients, non-positive step sizes, inf alpha, nan bits;
the message naming layer, parameter, value and step) is tests/test_faults.py's. The divergence
here comes from tests/fault_models.py's NaNAt model, named in the run file by class_path.
"""

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qtrainer.cli import app

runner = CliRunner()
STEPS_PER_EPOCH = 21  # digits: 1,295 training images in batches of 64


@pytest.fixture(autouse=True)
def restore_threads_and_sigint():
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, handler)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def fault_run(folder: Path, **model_args) -> Path:
    raw = {"seed": 0, "num_threads": 1, "output_dir": str(folder / "out"),
           "recipe": {"extends": "lsq-4bit", "name": "fault-lsq", "optimizer": {"lr": 0.01},
                      "phases": {"epochs": 3}},
           "model": {"class_path": "fault_models.NaNAt",
                     "init_args": {"width": 8, "at": STEPS_PER_EPOCH + 9, **model_args}},
           "data": {"name": "digits", "batch_size": 64},
           "trainer": {"enable_progress_bar": False}, "export": []}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the run has neither")
def test_a_fault_exits_1_with_the_named_message_and_keeps_the_previous_epoch(tmp_path):
    path = fault_run(tmp_path)  # the loss turns NaN in epoch 1 and stays NaN
    r = invoke("run", path)
    out = r.output
    assert r.exit_code == 1, out
    assert "failed: QuantizationFault: non-finite gradient of model." in out, out
    assert "the last checkpoint is intact" in out and "faults.on_nonfinite=skip" in out, out
    assert "(run with --debug for the traceback)" in out and "Traceback" not in out, out
    step = int(re.search(r"at optimizer step (\d+)", out).group(1))

    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)
    assert step > saved["global_step"]  # the fault came after the checkpoint of epoch 0
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "out" / "summary.json").exists()
    r = invoke("eval", last, "--json")  # the intact checkpoint is usable
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output[r.output.index("{"):])
    assert metrics["quantized"] and math.isfinite(metrics["loss"]) and metrics["acc"] > 0.2  # one epoch from random init

    r = invoke("--debug", "run", path, "-o", tmp_path / "debug")
    assert r.exit_code == 1
    assert "Traceback" in r.output and "QuantizationFault" in r.output


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the run has neither")
def test_skip_policy_finishes_the_run(tmp_path):
    path = fault_run(tmp_path, count=1)  # one NaN loss, in epoch 1
    with pytest.warns(UserWarning, match="step skipped"):
        r = invoke("run", path, "recipe.faults.on_nonfinite=skip")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["completed"] and math.isfinite(summary["quantized"]["loss"])
    saved = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
