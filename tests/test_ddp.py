"""2-process DDP on CPU (gloo): every rank holds identical quantizer parameters after
initialization (statistics averaged across ranks) and after training steps."""

import os
import sys
from pathlib import Path

import procs
import pytest
import torch
from ddp_worker import assert_ranks_agree

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lsq-4bit", "nipq-4bit"])
def test_ranks_hold_identical_quantizer_state(tmp_path, recipe):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.run([sys.executable, str(WORKER), str(tmp_path), recipe], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # BN buffers are per rank between DDP's buffer broadcasts
    assert_ranks_agree(tmp_path, skip=lambda k: "running_" in k or "num_batches" in k)
    init = torch.load(tmp_path / "rank0_init.pt", weights_only=True)
    end = torch.load(tmp_path / "rank0_end.pt", weights_only=True)
    params = [k for k in init if k.endswith(".step") or k.endswith(".theta_a")]
    assert params and any(not torch.equal(init[k], end[k]) for k in params)  # training moved them
