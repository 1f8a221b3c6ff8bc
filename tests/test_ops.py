"""The fused-op layer around the contracts: switches, custom ops (opcheck, same results as the
eager autograd functions), plans of plug-in classes, and the recomputing layers
(qtrainer/recompute.py): same outputs and gradients as the plain layers, and saved-for-backward
memory at most 1.05x the full-precision model by default (every method, on CPU)."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from closed_forms import same_bits
from quant_harness import recompute_pair, run, saved_bytes
from qtrainer.models import resnet20
from qtrainer.nn import QUANTIZED_TYPES, QuantConv2d, QuantLinear
from qtrainer.quantizers import LSQQuantizer, NIPQQuantizer, TemperingQuantizer, ops
from qtrainer.quantizers.formulas import LUT_SIZE
from qtrainer.recompute import set_recompute
from qtrainer.surgery import initialize_quantizers, quantize_model

ROOT = Path(__file__).resolve().parents[1]
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["triton"] if INTERP else ["torch"]


def _nipq(bits, signed, **kw):
    q = NIPQQuantizer(bits, signed, **kw)
    q.theta_a.data.fill_(1.3)
    q._mark_initialized()
    return q


# -- recompute layers ------------------------------------------------------------------------

def _layer(kind, method):
    torch.manual_seed(0)
    fp = nn.Conv2d(3, 4, 3, padding=1, stride=2) if kind == "conv" else nn.Linear(6, 5)
    cls = QuantConv2d if kind == "conv" else QuantLinear
    if method == "lsq":
        wq, aq = LSQQuantizer(4, True, per_channel=True, channels=fp.weight.shape[0]), \
            LSQQuantizer(4, False)
    elif method == "tempering":
        wq, aq = TemperingQuantizer(4, True, lambda_=0.5), \
            TemperingQuantizer(3, True, noise="uniform_step", lambda_=0.3)
    else:
        wq, aq = NIPQQuantizer(4, True, role="weight"), NIPQQuantizer(4, False, noise="histogram")
    layer = cls.from_float(fp, wq, aq)
    x = torch.randn(2, 3, 8, 8) if kind == "conv" else torch.randn(2, 3, 6)
    if method == "nipq":
        x = torch.relu(x)
    with torch.no_grad():
        layer(x)  # lazy initialization
    return layer, x


def _same_results(a, b):
    assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
    assert set(a[2]) == set(b[2])
    for name in a[2]:  # parameter gradients: the same terms, summed by other ops
        assert torch.allclose(a[2][name], b[2][name], rtol=1e-6, atol=1e-7), name


# Under the interpreter the linear case runs for LSQ only: the same kernels as the conv case.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,method", [
    (kind, method) for kind in ("conv", "linear") for method in ("lsq", "tempering", "nipq")
    if not (INTERP and kind == "linear" and method != "lsq")])
def test_recompute_layer_matches_plain_layer(backend, kind, method):
    layer, x = _layer(kind, method)
    w = torch.randn(layer(x).shape)
    layer.recompute = False
    plain = run(layer, x, w, "on", backend, seed=3)
    layer.recompute = True
    _same_results(plain, run(layer, x, w, "on", backend, seed=3))


@pytest.mark.parametrize("method", ["lsq", "tempering", "nipq"])
def test_default_path_equals_the_plain_reference(method):
    """The default (recomputing layers, fused ops' torch path) and ``fused="off"`` (plain
    layers) draw the same noise from the same seed: identical results whichever ran."""
    layer, x = _layer("conv", method)
    w = torch.randn(layer(x).shape)
    layer.recompute = None
    _same_results(run(layer, x, w, "off", "torch", seed=5),
                  run(layer, x, w, "auto", "auto", seed=5))


@pytest.mark.parametrize("make", [
    lambda: (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), (2, 4, 7, 7)),
    lambda: (nn.Conv1d(3, 6, 5, stride=2, padding=1, groups=3), (2, 3, 11)),
    lambda: (nn.Linear(5, 3), (5,)),
], ids=["depthwise-dilated", "conv1d-grouped", "linear-1d-input"])
def test_recompute_layer_shapes(make):
    torch.manual_seed(0)
    fp, shape = make()
    layer = QUANTIZED_TYPES[type(fp)].from_float(fp, LSQQuantizer(3, True), LSQQuantizer(4, True))
    x = torch.randn(shape)
    w = torch.randn(layer(x).shape)
    outs = []
    for flag in (False, True):
        layer.recompute = flag
        outs.append(run(layer, x, w, "on", "torch"))
    _same_results(*outs)


def test_recompute_under_bf16_autocast():
    layer, x = _layer("conv", "lsq")
    (y0, gx0, g0), (y1, gx1, g1) = recompute_pair(layer, x.to(memory_format=torch.channels_last))
    assert y0.dtype == torch.bfloat16
    assert same_bits(y0, y1) and same_bits(gx0, gx1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["lsq", "tempering", "nipq"])
def test_recompute_saves_only_the_input(method):
    layer, _ = _layer("conv", method)
    x = torch.randn(4, 3, 16, 16)
    if method == "nipq":
        x = x.relu()
    with ops.options(backend="torch"):
        layer.recompute = False
        plain = saved_bytes(layer, x.clone().requires_grad_(True), fused="on")
        layer.recompute = True
        recompute = saved_bytes(layer, x.clone().requires_grad_(True), fused="on")
    # the small tensors only (seeds, step sizes, alpha/delta, the 64 KiB noise tables)
    table = 2 * LUT_SIZE if method == "nipq" else 0  # histogram noise on both sides
    assert recompute <= table + 256
    assert plain >= x.numel() * 4  # x_hat


@pytest.mark.parametrize("method,kwargs", [("lsq", {}), ("tempering", {}),
                                           ("nipq", {"noise": "uniform"}),
                                           ("nipq", {"noise": "histogram"})])
def test_default_saved_memory_at_most_1_05x_full_precision(method, kwargs):
    """CIFAR ResNet-20, W4A4 with 8-bit first/last layers, CPU defaults: the bytes autograd
    keeps for backward are within 5% of the full-precision model's (the quantized input is
    recomputed, the noise regenerated from its seed). Histogram noise adds a fixed 64 KiB table
    per quantizer (2.6 MB here, 2.7% at batch 64)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    fp = resnet20(num_classes=10).train()
    q = resnet20(num_classes=10).train()
    quantize_model(q, method=method, method_kwargs=kwargs, example_input=x[:2])
    initialize_quantizers(q, x)
    ratio = saved_bytes(q, x) / saved_bytes(fp, x)
    assert 0.95 <= ratio <= 1.05, ratio


def test_set_recompute_and_unsupported_layers():
    from qtrainer import recompute

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 36, 3))
    x = torch.randn(2, 3, 6, 6)
    quantize_model(model, method="lsq", example_input=x)
    assert not recompute.supported(model[0]) and recompute.supported(model[3])
    assert set_recompute(model, True) == 2
    with pytest.raises(ValueError, match="recompute"):
        set_recompute(model, "yes")
    outs = []
    for flag in (False, True):  # 'same' padding keeps the plain path, the linear recomputes
        set_recompute(model, flag)
        outs.append(run(model, x, torch.ones(2, 3), "on", "torch"))
    assert same_bits(outs[0][0], outs[1][0]) and same_bits(outs[0][1], outs[1][1])


# -- the ops themselves ----------------------------------------------------------------------

def _op_samples():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5)
    s, sc = torch.tensor([0.3]), torch.tensor([0.3, 0.2, 0.4])
    seed, lam = torch.tensor([7]), torch.tensor([0.6])
    a = torch.tensor([1.5])
    d = a / 7
    lut = ops.nipq_noise_lut(x, a, d, True)
    g = torch.randn_like(x)
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (ops.step_fake_quant, (req(x), req(s), None, None, 8, 7, 0.1, 0)),
        (ops.step_fake_quant, (req(x.bfloat16()), req(sc), seed, lam, 4, 3, 0.1, 1)),
        (ops.step_fake_quant_backward, (g, x, s, seed, lam, 8, 7, 0.1, 3, True, False)),
        (ops.nipq_noise_lut, (x, a, d, True)),
        (ops.nipq_noise_fake_quant, (req(x), req(a), req(d), seed, lut, True)),
        (ops.nipq_noise_fake_quant_backward, (g, x, a, d, seed, None, False, True, True)),
        (ops.nipq_hard_fake_quant, (req(x), req(a), 7, True)),
        (ops.nipq_hard_fake_quant_backward, (g, x, a, 15, False, False, True)),
    ]


def test_opcheck():
    with ops.options(backend="torch"):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_eager_path_equals_custom_op_path(monkeypatch):
    """Eager code runs a plan through a plain autograd function; traced code calls the
    registered custom ops: same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 40)
    w = torch.randn_like(x)
    hard = _nipq(4, True)
    hard.set_hard(True)
    for q in [LSQQuantizer(4, True, per_channel=True, channels=3),
              TemperingQuantizer(3, False, lambda_=0.7), _nipq(4, True, noise="histogram"),
              _nipq(3, False, noise="uniform"), hard]:
        q._mark_initialized()
        results = []
        for tracing in (False, True):
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: tracing)  # noqa: B023
            results.append(run(q, x, w, "on", "torch", seed=1))
        monkeypatch.undo()
        _same_results(*results)
        assert results[0][2]


def test_options_and_errors():
    with pytest.raises(ValueError, match="fused"):
        ops.set_fused("sometimes")
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")
    before = ops.get_options()
    with ops.options(fused=False, backend="torch"):
        assert ops.get_options() == {"fused": "off", "backend": "torch"}
        assert not ops.fused_enabled(torch.zeros(1))
    assert ops.get_options() == before
    q = LSQQuantizer(4, True, per_channel=True, channels=3)
    q._mark_initialized()
    with ops.options(fused=True, backend=BACKENDS[0]):
        with pytest.raises(ValueError, match="dim 0"):
            q(torch.randn(5, 2))


def test_subclass_with_own_quantize_keeps_its_code():
    class Custom(LSQQuantizer):
        def quantize(self, x):
            return super().quantize(x) * 2

    class Planned(LSQQuantizer):
        def fused_plan(self, x):
            return super().fused_plan(x)

    assert not Custom.has_fused_plan() and Planned.has_fused_plan()
    assert LSQQuantizer.has_fused_plan() and NIPQQuantizer.has_fused_plan()
    q = Custom(4, True)
    q.step.data.fill_(0.5)
    q._mark_initialized()
    x = torch.randn(10)
    layer = QuantLinear.from_float(nn.Linear(10, 2), None, q)
    with ops.options(fused=True, backend="torch"):
        assert torch.equal(q(x), 2 * torch.round(torch.clamp(x / 0.5, -8, 7)) * 0.5)
        layer.recompute = True  # asked for, but the plan would not be Custom's code
        assert torch.equal(layer(x), nn.functional.linear(q(x), layer.weight, layer.bias))


# -- the benchmark script --------------------------------------------------------------------

def test_benchmark_cpu_quick(tmp_path, monkeypatch, capsys):
    """``benchmarks/speed.py --device cpu --quick`` as a script (run in this process: a fresh
    interpreter would spend most of the time importing)."""
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", [
        "speed.py", "--device", "cpu", "--quick", "--batch", "2", "--size", "8", "--warmup", "0",
        "--rounds", "1", "--threads", "1", "--no-launches", "--profile", "--json", str(out)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "benchmarks" / "speed.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed[-3000:]
    assert "x FP" in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    variants = {r["variant"] for r in rows}
    assert {"fp", "textbook_lsq", "lsq_w4a4", "tempering_w4a4", "nipq_uniform_w4a4",
            "nipq_histogram_w4a4"} <= variants
    for r in rows:
        assert r["model"] == "resnet20" and r["mode"] == "eager"
        assert r["time_ratio_vs_fp"] > 0 and r["aten_ops"] > 0 and r["saved_mb"] > 0
    fp = next(r for r in rows if r["variant"] == "fp")
    assert fp["time_ratio_vs_fp"] == 1.0 and fp["saved_ratio_vs_fp"] == 1.0
    lsq = next(r for r in rows if r["variant"] == "lsq_w4a4")
    assert lsq["saved_ratio_vs_fp"] <= 1.05
    assert data["config"]["device"] == "cpu"
    assert {m["case"] for m in data["micro"]} >= {"textbook_lsq", "lsq_fused",
                                                  "nipq_histogram_fused"}
    profile = data["profile"]["resnet20"]
    assert set(profile) == variants
    for ranked in profile.values():  # the top operators, by falling share of the step
        shares = [r["share"] for r in ranked]
        assert 0 < sum(shares) <= 1 + 1e-9 and shares == sorted(shares, reverse=True)
    assert any(r["op"] == "aten::convolution_backward" for r in profile["fp"])


@pytest.mark.skipif(INTERP, reason="starts its own interpreter subprocess")
def test_benchmark_counts_launches_through_the_interpreter():
    from qtrainer.quantizers import kernels

    if not kernels.available():
        pytest.skip("triton is not installed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speed_lib import count_launches

    counts = count_launches(["fp", "lsq_w4a4"])
    assert counts["fp"]["launches"] == 0
    lsq = counts["lsq_w4a4"]
    assert lsq["quantizers"] == 40 and lsq["launches"] == 3 * 40
