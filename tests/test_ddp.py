"""2-process DDP on CPU (gloo): every rank holds identical quantizer parameters after
initialization (statistics averaged across ranks) and after training steps."""

import os
import sys
from pathlib import Path

import procs
import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["lsq-4bit", "nipq-4bit"])
def test_ranks_hold_identical_quantizer_state(tmp_path, recipe):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.run([sys.executable, str(WORKER), str(tmp_path), recipe], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for when in ("init", "end", "model"):
        r0 = torch.load(tmp_path / f"rank0_{when}.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"rank1_{when}.pt", weights_only=True)
        assert r0.keys() == r1.keys() and len(r0) > 0
        for k in r0:
            if "running_" in k or "num_batches" in k:
                continue  # BN buffers are per rank between DDP's buffer broadcasts
            assert torch.equal(r0[k], r1[k]), (when, k)
    init = torch.load(tmp_path / "rank0_init.pt", weights_only=True)
    end = torch.load(tmp_path / "rank0_end.pt", weights_only=True)
    params = [k for k in init if k.endswith(".step") or k.endswith(".theta_a")]
    assert params and any(not torch.equal(init[k], end[k]) for k in params)  # training moved them
