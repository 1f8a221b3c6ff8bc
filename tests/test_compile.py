"""torch.compile of quantized models through the fused ops (qtrainer/quantizers/ops): the
custom ops' fake implementations and registered autograd let Dynamo capture forward and backward
in one graph (``fullgraph=True`` raises on any graph break), with the eager results.

CPU only (``backend="aot_eager"``: Dynamo + AOTAutograd, no code generation), through the ops'
torch formulas (and the Triton kernels under ``TRITON_INTERPRET=1``, run from
tests/test_kernels.py); the GPU benchmark compiles with Inductor and CUDA graphs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from qtrainer.nn import named_quantizers
from qtrainer.quantizers import ops
from qtrainer.recompute import set_recompute
from qtrainer.surgery import initialize_quantizers, quantize_model


def _model(method, kw):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    x = torch.randn(4, 3, 8, 8)
    quantize_model(model, method=method, method_kwargs=kw, example_input=x)
    initialize_quantizers(model, x)
    return model, x


def _step(model, x, seed, autocast=False):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    y.float().square().sum().backward()
    return y.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                        for n, p in model.named_parameters() if p.grad is not None}


INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
# (fused, backend): the default path, the plain reference path, and the Triton kernels
PATHS = [("on", "triton")] if INTERP else [("on", "torch"), ("off", "torch")]


@pytest.mark.parametrize("fused,backend", PATHS)
@pytest.mark.parametrize("method,kw,recompute,autocast", [
    ("lsq", {"per_channel": True}, None, True),
    ("nipq", {"noise": "histogram", "learn_bits": True}, None, False),
    ("nipq", {"noise": "histogram"}, False, False),
])
def test_fullgraph_compile_matches_eager(fused, backend, method, kw, recompute, autocast):
    """Every path traces without a graph break, NIPQ's histogram noise included (its table
    and noise are custom ops fed by a seed tensor, no torch.Generator in the graph)."""
    model, x = _model(method, kw)
    set_recompute(model, recompute)
    with ops.options(fused=fused, backend=backend):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        y0, g0 = _step(model, x, 1, autocast)
        y1, g1 = _step(compiled, x, 1, autocast)
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
    assert y1.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys() and any("quantizer" in k for k in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-6, atol=1e-7), name


@pytest.mark.skipif(INTERP, reason="the Triton kernels stay behind their custom ops")
@pytest.mark.parametrize("method,kw", [("lsq", {}), ("tempering", {"noise_dist": "gaussian"})])
def test_compile_traces_the_step_formulas(method, kw):
    """On the torch backend the step contract (LSQ, tempering) is traced, forward and backward,
    as aten ops that Inductor can fuse with the conv/BN/ReLU around it, rather than called as
    an opaque custom op; only tempering's noise draw stays one. Forward bit-identical to
    eager, gradients within fp32 rounding, no graph break."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    targets = set()

    def record(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    model, x = _model(method, kw)
    with ops.options(fused="on", backend="torch"):
        torch._dynamo.reset()
        counters.clear()
        backend = aot_autograd(fw_compiler=record, bw_compiler=record)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        y0, g0 = _step(model, x, 1)
        y1, g1 = _step(compiled, x, 1)
        assert not counters["graph_break"]
    assert not any("step_fake_quant" in t for t in targets)
    assert any("tempering_noise" in t for t in targets) == (method == "tempering")
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-6, atol=1e-7), name


def test_tempering_schedule_does_not_recompile_with_a_lambda_tensor():
    """A quantizer carrying ``lambda_tensor`` (kept equal to ``lambda_``) lets the schedule
    change the noise weight every step without recompiling (or re-recording a CUDA graph)."""
    model, x = _model("tempering", {"noise_dist": "gaussian"})
    set_recompute(model, False)  # the plain layers here (the other tests recompute)
    for _, q in named_quantizers(model):
        q.register_buffer("lambda_tensor", torch.ones(1), persistent=False)
    with ops.options(fused="on", backend="torch"):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        for step, lam in enumerate([1.0, 0.6, 0.0, 0.3]):
            for _, q in named_quantizers(model):
                q.set_lambda(lam)
                q.lambda_tensor.fill_(lam)
            y1, g1 = _step(compiled, x, step)
            y0, g0 = _step(model, x, step)
            assert torch.equal(y0, y1)
            for name in g0:
                assert torch.allclose(g0[name], g1[name], rtol=1e-6, atol=1e-7), name
        assert counters["stats"]["unique_graphs"] == 1


def test_compiled_recompute_keeps_no_quantized_activation():
    """Under torch.compile, AOTAutograd's partitioner decides what the forward saves. The
    recomputing layers mark everything but the conv/linear product must-recompute (selective
    checkpointing), so the compiled model saves what the eager recomputing layers save: no
    quantized input or weight; the plain layers keep both."""
    from quant_harness import saved_bytes

    saved = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(8, 8, 3, padding=1))
        x = torch.randn(2, 3, 6, 6, requires_grad=True)
        quantize_model(model, method="lsq", example_input=x, first_last_bits="same")
        initialize_quantizers(model, x)
        set_recompute(model, recompute)
        with ops.options(fused="on", backend="torch"):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
            saved[recompute] = saved_bytes(compiled, x), saved_bytes(model, x)
            compiled(x).sum().backward()
        assert x.grad is not None
    quantized = 4 * (2 * 3 * 36 + 8 * 3 * 9 + 2 * 8 * 36 + 8 * 8 * 9)  # x_hat, w_hat, 2 layers
    assert saved[True][0] == saved[True][1] == 4 * 2 * 8 * 36  # the ReLU output only
    assert saved[False][0] >= saved[True][0] + quantized
