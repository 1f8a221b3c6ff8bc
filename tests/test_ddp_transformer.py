"""A quantized transformer under Lightning's DDP on 2 CPU processes (gloo): surgery happens in
``setup`` before DDP wraps the module, every rank holds identical quantizer state after
initialization and after training, and the checkpoint loads on one process with
``qtrainer.load_quantized`` as the module the ranks trained."""

import os
import sys
from pathlib import Path

import procs
import pytest
import torch
from ddp_transformer_worker import LitTextEncoder
from ddp_worker import assert_ranks_agree

import qtrainer
from qtrainer.data.sequences import majority_token_dataset

WORKER = Path(__file__).with_name("ddp_transformer_worker.py")


@pytest.mark.slow
def test_ddp_transformer_ranks_agree_and_checkpoint_loads_on_one_process(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.run([sys.executable, str(WORKER), str(tmp_path), "ddp"], env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_ranks_agree(tmp_path)  # no BatchNorm: every entry, buffers included
    init = torch.load(tmp_path / "rank0_init.pt", weights_only=True)
    end = torch.load(tmp_path / "rank0_end.pt", weights_only=True)
    assert any(k.startswith("encoder.layers.0.self_attn.weight_quantizer") for k in init)
    assert any(not torch.equal(init[k], end[k]) for k in init)  # training moved them

    model = qtrainer.load_quantized(LitTextEncoder, tmp_path / "last.ckpt")
    trained = torch.load(tmp_path / "rank0_model.pt", weights_only=True)
    state = model.state_dict()
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in state)
    data = majority_token_dataset(200, seed=1)
    with torch.no_grad():
        acc = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
    assert acc >= 0.5, acc  # 16 steps of 2 x 32 sequences; chance is 25%
