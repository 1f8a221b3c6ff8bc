"""Fused fake quantization (qtrainer/quantizers/ops.py, kernels/, recompute.py) against the
reference quantizers, with numbers: forward bit-identical, grad_x exact, parameter gradients
within relative 1e-5 of fp64, noise regenerated from its seed with the right statistics.

The same checks run twice: in this process through the ops' torch implementation, and through
the Triton kernels in Triton's interpreter (``test_interp_*``, run by
``test_triton_interpreter`` in a subprocess with ``TRITON_INTERPRET=1``, since another test
module may already have imported triton without it). A CUDA machine repeats them in
``benchmarks/speed.py --check``.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import procs
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrainer.nn import QuantConv2d, QuantLinear
from qtrainer.quantizers import LSQFunction, LSQQuantizer, NIPQQuantizer, TemperingQuantizer, ops
from qtrainer.quantizers import kernels
from qtrainer.quantizers.nipq import HIST_BINS, LUT_SIZE
from qtrainer.recompute import set_recompute

ROOT = Path(__file__).resolve().parents[1]
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not INTERP, reason="runs in the TRITON_INTERPRET=1 subprocess")
BACKENDS = ["triton"] if INTERP else ["torch"]

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (sign of zero and NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = INT_VIEW[a.dtype]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def rel_close(got: torch.Tensor, ref64: torch.Tensor, rel=1e-5, l1=None) -> bool:
    """Within ``rel`` of the fp64 reference; where the sum cancels (``l1``, the fp64 sum of the
    terms' magnitudes, much larger than the result) fp32 accumulation can only promise a few
    ulps of ``l1``, so ``3e-8 * l1`` is allowed on top."""
    got, ref64 = got.double().reshape(-1), ref64.double().reshape(-1)
    slack = 0.0 if l1 is None else 3e-8 * l1.double().reshape(-1)
    return bool(((got - ref64).abs() <= rel * ref64.abs() + slack + 1e-12).all())


def run(module, x, w, fused: bool, backend: str, seed: int = 0):
    """Forward + backward of ``module`` on a fresh leaf copy of ``x`` with upstream grad ``w``."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    with ops.options(fused=fused, backend=backend):
        torch.manual_seed(seed)
        y = module(x)
        (y.float() * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


# -- LSQ -------------------------------------------------------------------------------------

def _lsq_case(bits, signed, per_channel, dtype=torch.float32, channels_last=False):
    torch.manual_seed(bits * 7 + signed)
    q = LSQQuantizer(bits, signed, per_channel=per_channel, channels=4 if per_channel else None)
    q_n, q_p = q.levels
    steps = torch.tensor([0.3, 0.37, 0.5, 0.21]) if per_channel else torch.tensor([0.37])
    q.step.data.copy_(steps)
    q._mark_initialized()
    x = torch.randn(4, 6, 9, 9) * 0.4 * q_p
    # all branches and the exact boundaries
    s0 = float(steps[0])
    x.view(-1)[:5] = torch.tensor([-q_n * s0, q_p * s0, (q_p + 3) * s0, -(q_n + 3) * s0, -0.01])
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return q, x.to(dtype), torch.randn(x.shape)


def _lsq_grad_s_fp64(q, x, w):
    """Closed form of docs/algorithms.md 1 for d/ds, summed in fp64 (per channel when needed)."""
    q_n, q_p = q.levels
    s = q._step_view(x.float()).detach()
    r = x.float() / s
    inside = (r > -q_n) & (r < q_p)
    term = torch.where(inside, torch.round(r) - r,
                       torch.where(r <= -q_n, float(-q_n), float(q_p)))
    prod = w.to(x.dtype).double() * term.double()  # the upstream grad arrives in x's dtype
    rows = prod.reshape(prod.shape[0] if q.per_channel else 1, -1)
    g = q.grad_scale_value(x)
    return rows.sum(1) * g, rows.abs().sum(1) * g


def check_lsq(backend, bits, signed, per_channel, dtype=torch.float32, channels_last=False):
    q, x, w = _lsq_case(bits, signed, per_channel, dtype, channels_last)
    y0, gx0, _ = run(q, x, w, "off", backend)
    y1, gx1, g1 = run(q, x, w, "on", backend)
    assert same_bits(y1, y0)
    assert y1.stride() == y0.stride()
    assert same_bits(gx1, gx0)
    ref, l1 = _lsq_grad_s_fp64(q, x, w)
    assert rel_close(g1["step"], ref, l1=l1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_ops_match_reference(backend, bits, signed):
    check_lsq(backend, bits, signed, per_channel=False)
    check_lsq(backend, bits, signed, per_channel=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lsq_half_inputs_channels_last(backend, dtype):
    check_lsq(backend, 4, True, per_channel=False, dtype=dtype, channels_last=True)
    check_lsq(backend, 3, False, per_channel=True, dtype=dtype, channels_last=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN and inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_lsq_special_values(backend):
    q = LSQQuantizer(4, True, grad_scale="none")
    q.step.data.fill_(0.3)
    q._mark_initialized()
    x = torch.tensor([float("nan"), -0.0, 0.0, -0.01, 0.01, float("inf"), -float("inf"),
                      0.45, -0.45, 0.15, -0.15])  # +-0.45, +-0.15: ties at 1.5 and 0.5 steps
    w = torch.ones_like(x)
    y0, gx0, _ = run(q, x, w, "off", backend)
    y1, gx1, _ = run(q, x, w, "on", backend)
    assert same_bits(y1, y0)
    assert same_bits(gx1, gx0)


# -- tempering -------------------------------------------------------------------------------

def _drawn_noise(backend, code, seed, x, s, q_n, q_p, lam):
    """The noise the op draws from ``seed``: the kernel's debug output or the torch stream."""
    if backend == "triton":
        return kernels.lsq().lsq_forward(x, s, q_n, q_p, lam, code, seed, return_noise=True)[1]
    return ops._tempering_noise_torch(code, seed, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise,dist,code", [("error", "uniform", 1), ("error", "gaussian", 2),
                                             ("uniform_step", "uniform", 3)])
def test_tempering_noise_from_seed_matches_closed_form(backend, noise, dist, code):
    lam, s, q_n, q_p = 0.8, 0.21, 4, 3
    q = TemperingQuantizer(3, True, noise=noise, noise_dist=dist, lambda_=lam)
    q.step.data.fill_(s)
    q._mark_initialized()
    q.train()
    torch.manual_seed(1)
    x = torch.randn(3, 400) * 1.2
    w = torch.randn_like(x)
    y, gx, grads = run(q, x, w, "on", backend, seed=5)
    y_again, _, _ = run(q, x, w, "on", backend, seed=5)
    y_other, _, _ = run(q, x, w, "on", backend, seed=6)
    assert torch.equal(y, y_again)  # deterministic for a fixed seed
    assert not torch.equal(y, y_other)

    torch.manual_seed(5)
    seed = ops.draw_seed(x)  # the seed the quantizer drew
    xi = _drawn_noise(backend, code, seed, x, q.step.detach(), q_n, q_p, lam)
    # the reference autograd function with that noise: identical output and x-gradient
    xr = x.clone().requires_grad_(True)
    sr = torch.tensor([s], requires_grad=True)
    g = q.grad_scale_value(x)
    yr = LSQFunction.apply(xr, sr, q_n, q_p, g, xi, lam, noise)
    (yr * w).sum().backward()
    assert same_bits(y, yr.detach())
    assert same_bits(gx, xr.grad)
    # d/ds in fp64 from the closed form
    r = x / torch.tensor(s)
    inside = (r > -q_n) & (r < q_p)
    frac = torch.round(r) - r
    term = torch.where(inside, frac, torch.where(r <= -q_n, -4.0, 3.0)).double()
    term = term + (lam * xi.double() * (frac * inside).double() if noise == "error"
                   else lam * xi.double())
    prod = w.double() * term
    assert rel_close(grads["step"], prod.sum() * g, l1=prod.abs().sum() * g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", [1, 2, 3])
def test_tempering_noise_statistics(backend, code):
    """Zero mean and unit variance (``U(-1/2, 1/2)`` for ``uniform_step``) on 8192 draws
    (tolerances about 5 standard errors); another seed draws uncorrelated values."""
    step = torch.tensor([0.1])
    a = _drawn_noise(backend, code, torch.tensor([12345]), torch.zeros(8192), step, 8, 7, 1.0)
    c = _drawn_noise(backend, code, torch.tensor([777]), torch.zeros(2048), step, 8, 7, 1.0)
    assert abs(torch.corrcoef(torch.stack([a[:2048], c]))[0, 1].item()) < 0.1
    if code == 3:
        assert a.min() >= -0.5 and a.max() < 0.5
        assert abs(a.mean().item()) < 0.016 and a.var().item() == pytest.approx(1 / 12, rel=0.05)
    else:
        assert abs(a.mean().item()) < 0.05 and a.var().item() == pytest.approx(1.0, abs=0.05)
        if code == 1:
            assert a.abs().max() <= math.sqrt(3)
            assert a.abs().max() > 1.7  # covers the whole range
        else:
            assert (a.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.0025)


# -- NIPQ ------------------------------------------------------------------------------------

def _nipq(bits, signed, **kw):
    q = NIPQQuantizer(bits, signed, **kw)
    q.theta_a.data.fill_(1.3)
    q._mark_initialized()
    q.train()
    return q


def _drawn_z(backend, seed, lut, x, alpha, delta, signed):
    if backend == "triton":
        return kernels.nipq().noise_forward(x, alpha, delta, seed, lut, signed, return_z=True)[1]
    return ops._nipq_z_torch(seed, lut, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("noise", ["uniform", "histogram"])
def test_nipq_noise_phase_matches_closed_form(backend, signed, noise):
    q = _nipq(3, signed, noise=noise)
    alpha = F.softplus(torch.tensor([1.3]))
    n = 3 if signed else 7
    delta = alpha / n
    torch.manual_seed(2)
    x = torch.randn(1200) * alpha
    x[:3] = torch.tensor([alpha.item(), -alpha.item(), 0.0])
    if not signed:
        x = torch.relu(x)
    w = torch.randn_like(x)
    y, gx, grads = run(q, x, w, "on", backend, seed=9)
    y_again, _, _ = run(q, x, w, "on", backend, seed=9)
    assert torch.equal(y, y_again)

    torch.manual_seed(9)
    seed = ops.draw_seed(x)
    lut = ops.nipq_noise_lut(x, alpha, delta, signed) if noise == "histogram" else None
    z = _drawn_z(backend, seed, lut, x, alpha, delta, signed)
    assert z.min() >= -0.5 and z.max() < 0.5
    lo = -alpha if signed else torch.zeros_like(alpha)
    above, below = x >= alpha, x <= lo
    expected = torch.where(above, alpha, torch.where(below, lo, x + z * delta))
    assert same_bits(y, expected)
    inside = ~above & ~below
    assert same_bits(gx, torch.where(inside, w, 0.0))
    if not signed:
        assert torch.equal(y[x == 0], torch.zeros(int((x == 0).sum())))
    prod = w.double() * torch.where(above, 1.0, torch.where(below, -1.0 if signed else 0.0,
                                                            z / n)).double()
    sig = torch.sigmoid(torch.tensor(1.3)).double()
    assert rel_close(grads["theta_a"], prod.sum() * sig, l1=prod.abs().sum() * sig)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nipq_learned_bits_gradient(backend):
    q = _nipq(4, True, learn_bits=True, noise="uniform")
    q.theta_b.data.fill_(-0.4)
    torch.manual_seed(0)
    x = torch.randn(3000) * 2
    w = torch.randn_like(x)
    _, _, grads = run(q, x, w, "on", backend, seed=4)
    torch.manual_seed(4)
    u = torch.rand(1).item() - 0.5  # the stochastic bit rounding, drawn before the seed
    seed = ops.draw_seed(x)
    b_c = 2 + 12 * torch.sigmoid(torch.tensor(-0.4)).item()
    b = round(b_c + u)
    alpha = F.softplus(torch.tensor([1.3]))
    n = 2 ** (b - 1) - 1
    z = _drawn_z(backend, seed, None, x, alpha, alpha / n, True)
    ddelta_db = -alpha.item() * math.log(2) * 2 ** (b - 1) / n**2
    inside = (x < alpha) & (x > -alpha)
    sig = torch.sigmoid(torch.tensor(-0.4)).item()
    prod = w.double() * z.double() * inside * ddelta_db * 12 * sig * (1 - sig)
    assert rel_close(grads["theta_b"], prod.sum(), l1=prod.abs().sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nipq_histogram_table(backend):
    """The per-tensor rounding-error histogram, its sampling table, and the z it produces."""
    torch.manual_seed(3)
    alpha = torch.tensor([1.5])
    delta = alpha / 3
    # values near grid points: a peaked rounding-error histogram
    x = delta * (torch.round(torch.randn(8192) * 1.5) + 0.15 * torch.randn(8192))
    with ops.options(backend=backend):
        lut = ops.nipq_noise_lut(x, alpha, delta, True)
    r = x / delta
    valid = (x > -alpha) & (x < alpha)
    err = torch.where(valid, torch.round(r) - r, 2.0)
    hist = torch.histc(err, bins=HIST_BINS, min=-0.5, max=0.5)
    if backend == "triton":
        lut_k, hist_k = kernels.nipq().noise_lut(x, alpha, delta, True, return_hist=True)
        assert torch.equal(lut_k, lut)
        assert (hist_k.float() - hist).abs().sum() <= 2  # torch.histc's own bin edges
    assert torch.equal(lut, ops._nipq_lut_torch(x, alpha, delta, True))  # torch == kernel
    # the reference's table (fp32 CDF, searchsorted) differs at most in a few tied cells
    cdf = torch.cumsum(hist, 0) / hist.sum()
    grid = (torch.arange(LUT_SIZE) + 0.5) / LUT_SIZE
    ref = torch.searchsorted(cdf, grid, right=True).clamp_(max=HIST_BINS - 1)
    assert (ref != lut.long()).sum() <= 8
    # z follows the histogram: total variation distance of the frequencies in 16 groups of
    # 16 bins (about 0.02 expected from sampling alone; uniform z would give 0.4 here)
    z = _drawn_z(backend, torch.tensor([99]), lut, x, alpha, delta, True)
    bins = ((z + 0.5) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    freq = torch.bincount(bins, minlength=HIST_BINS).double().reshape(16, 16).sum(1) / z.numel()
    prob = (hist.double() / hist.sum()).reshape(16, 16).sum(1)
    assert 0.5 * (freq - prob).abs().sum().item() < 0.05
    assert 0.5 * (prob - 1 / 16).abs().sum().item() > 0.3  # the histogram is not flat
    # an empty histogram (everything clipped) samples uniformly
    with ops.options(backend=backend):
        flat = ops.nipq_noise_lut(torch.full((64,), 9.0), alpha, delta, True)
    assert torch.equal(flat.long(), torch.arange(LUT_SIZE) // (LUT_SIZE // HIST_BINS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_nipq_hard_matches_reference(backend, bits, signed):
    q = _nipq(bits, signed, noise="uniform")
    q.set_hard(True)
    alpha = F.softplus(torch.tensor(1.3)).item()
    torch.manual_seed(bits)
    x = torch.randn(2500) * alpha
    x[:4] = torch.tensor([alpha, -alpha, 0.0, 2 * alpha])
    w = torch.randn_like(x)
    y0, gx0, g0 = run(q, x, w, "off", backend)
    y1, gx1, g1 = run(q, x, w, "on", backend)
    assert same_bits(y1, y0)
    assert same_bits(gx1, gx0)
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    a = torch.tensor(alpha)
    r = x / a
    inside = (r > (-1.0 if signed else 0.0)) & (r < 1.0)
    if ops.clamp_grad_inclusive():
        inside = (r >= (-1.0 if signed else 0.0)) & (r <= 1.0)
    code = torch.round(n * r.clamp(-1.0 if signed else 0.0, 1.0))
    term = code.double() / n - torch.where(inside, r, 0.0).double()
    prod = w.double() * term * torch.sigmoid(torch.tensor(1.3)).double()
    assert rel_close(g1["theta_a"], prod.sum(), l1=prod.abs().sum())


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


def check_recompute(backend, kind, method, fused="on"):
    layer, x = _layer(kind, method)
    w = torch.randn(layer(x).shape)
    layer.recompute = False
    a = run(layer, x, w, fused, backend, seed=3)
    layer.recompute = True
    b = run(layer, x, w, fused, backend, seed=3)
    assert same_bits(a[0], b[0])
    assert same_bits(a[1], b[1])
    assert set(a[2]) == set(b[2])
    for name in a[2]:
        assert torch.allclose(a[2][name], b[2][name], rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("method", ["lsq", "tempering", "nipq"])
def test_recompute_layer_matches_plain_layer(backend, kind, method):
    if INTERP and kind == "linear" and method != "lsq":
        pytest.skip("same kernels as the conv case; keeps the interpreter run short")
    check_recompute(backend, kind, method)


def test_recompute_against_reference_quantizers():
    """recompute=True on CPU (ops, torch implementation) vs the plain layer on the reference
    quantizer code (fused off)."""
    for kind in ("conv", "linear"):
        layer, x = _layer(kind, "lsq")
        w = torch.randn(layer(x).shape)
        layer.recompute = False
        a = run(layer, x, w, "off", "torch")
        layer.recompute = True
        b = run(layer, x, w, "off", "torch")
        assert same_bits(a[0], b[0]) and same_bits(a[1], b[1])
        for name in a[2]:
            assert torch.allclose(a[2][name], b[2][name], rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("make", [
    lambda: (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), (2, 4, 7, 7)),
    lambda: (nn.Conv1d(3, 6, 5, stride=2, padding=1, groups=3), (2, 3, 11)),
    lambda: (nn.Linear(5, 3), (5,)),
], ids=["depthwise-dilated", "conv1d-grouped", "linear-1d-input"])
def test_recompute_layer_shapes(make):
    from qtrainer.nn import QUANTIZED_TYPES

    torch.manual_seed(0)
    fp, shape = make()
    layer = QUANTIZED_TYPES[type(fp)].from_float(fp, LSQQuantizer(3, True), LSQQuantizer(4, True))
    x = torch.randn(shape)
    w = torch.randn(layer(x).shape)
    outs = []
    for flag in (False, True):
        layer.recompute = flag
        outs.append(run(layer, x, w, "on", "torch"))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert same_bits(y0, y1) and same_bits(gx0, gx1) and g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-6, atol=1e-7), name


def test_recompute_under_bf16_autocast():
    layer, x = _layer("conv", "lsq")
    x = x.to(memory_format=torch.channels_last)
    outs = []
    for flag in (False, True):
        layer.recompute = flag
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y0, gx0, g0), (y1, gx1, g1) = outs
    assert same_bits(y0, y1) and same_bits(gx0, gx1)
    for a, b in zip(g0, g1):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def _saved_bytes(module, x) -> int:
    """Bytes of distinct storages the autograd graph keeps for one forward."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in (p.untyped_storage().data_ptr()
                                                  for p in module.parameters()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x.requires_grad_(True))
    return sum(seen.values())


@pytest.mark.parametrize("method", ["lsq", "tempering", "nipq"])
def test_recompute_saves_only_the_input(method):
    layer, _ = _layer("conv", method)
    x = torch.randn(4, 3, 16, 16)
    if method == "nipq":
        x = x.relu()
    with ops.options(fused="on", backend="torch"):
        layer.recompute = False
        plain = _saved_bytes(layer, x.clone())
        layer.recompute = True
        recompute = _saved_bytes(layer, x.clone())
    assert recompute < plain
    # x itself plus the small tensors (seeds, step sizes, alpha/delta, the 64 KiB noise table)
    table = 2 * LUT_SIZE if method == "nipq" else 0  # histogram noise on both sides
    assert recompute <= x.numel() * 4 + table + 256
    assert plain >= 2 * x.numel() * 4  # x and x_hat


def test_set_recompute_and_unsupported_layers():
    from qtrainer import recompute
    from qtrainer.surgery import quantize_model

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
    s = torch.tensor([0.3])
    sc = torch.tensor([0.3, 0.2, 0.4])
    seed = torch.tensor([7])
    lam = torch.tensor([0.6])
    a = torch.tensor([1.5])
    d = a / 7
    lut = ops.nipq_noise_lut(x, a, d, True)
    g = torch.randn_like(x)
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        (ops.lsq_fake_quant, (req(x), req(s), 8, 7, 0.1, None, 0, None)),
        (ops.lsq_fake_quant, (req(x.bfloat16()), req(sc), 4, 3, 0.1, lam, 1, seed)),
        (ops.lsq_fake_quant_backward, (g, x, s, 8, 7, 0.1, lam, 3, seed, True, False)),
        (ops.nipq_noise_lut, (x, a, d, True)),
        (ops.nipq_noise_fake_quant, (req(x), req(a), req(d), seed, lut, True)),
        (ops.nipq_noise_fake_quant_backward, (g, x, a, seed, None, False, True, True)),
        (ops.nipq_hard_fake_quant, (req(x), req(a), 7, True)),
        (ops.nipq_hard_fake_quant_backward, (g, x, a, 15, False, False, True)),
    ]


def test_eager_path_equals_custom_op_path():
    """Eager code calls the implementations through plain autograd functions; traced code calls
    the registered custom ops: same values and gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 40)
    w = torch.randn_like(x)
    quantizers = [LSQQuantizer(4, True, per_channel=True, channels=3),
                  TemperingQuantizer(3, False, lambda_=0.7),
                  _nipq(4, True, noise="histogram"), _nipq(3, False, noise="uniform")]
    hard = _nipq(4, True)
    hard.set_hard(True)
    for q in quantizers + [hard]:
        q._mark_initialized()
        results = []
        for tracing in (False, True):
            for p in q.parameters():
                p.grad = None
            xi = x.clone().requires_grad_(True)
            with ops.options(fused="on", backend="torch"):
                torch.manual_seed(1)
                orig = ops._tracing
                ops._tracing = lambda: tracing  # noqa: B023
                try:
                    y = q(xi)
                finally:
                    ops._tracing = orig
            (y * w).sum().backward()
            results.append((y.detach(), xi.grad, [p.grad for p in q.parameters()
                                                  if p.grad is not None]))
        (y0, gx0, g0), (y1, gx1, g1) = results
        assert same_bits(y0, y1) and same_bits(gx0, gx1)
        assert len(g0) == len(g1) > 0
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_opcheck():
    with ops.options(backend="torch"):
        for op, args in _op_samples():
            torch.library.opcheck(op, args)


def test_options_and_errors():
    with pytest.raises(ValueError, match="fused"):
        ops.set_fused("sometimes")
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")
    before = ops.get_options()
    with ops.options(fused=True, backend="torch"):
        assert ops.get_options() == {"fused": "on", "backend": "torch"}
        assert ops.fused_enabled(torch.zeros(1))
    assert ops.get_options() == before
    assert ops.fused_enabled(torch.zeros(1)) == (before["fused"] == "on")
    q = LSQQuantizer(4, True, per_channel=True, channels=3)
    q._mark_initialized()
    with ops.options(fused=True, backend=BACKENDS[0]):
        with pytest.raises((ValueError, RuntimeError), match="dim 0|shape|size"):
            q(torch.randn(5, 2))


def test_subclass_with_own_quantize_keeps_its_code():
    class Custom(LSQQuantizer):
        def quantize(self, x):
            return super().quantize(x) * 2

    q = Custom(4, True)
    q.step.data.fill_(0.5)
    q._mark_initialized()
    assert not ops.plan_supported(q)
    x = torch.randn(10)
    with ops.options(fused=True, backend="torch"):
        y = q(x)
    assert torch.equal(y, 2 * torch.round(torch.clamp(x / 0.5, -8, 7)) * 0.5)


# -- Triton interpreter ----------------------------------------------------------------------

@pytest.mark.skipif(INTERP, reason="this is the driver of the interpreter run")
@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_triton_interpreter():
    """Every backend-parametrized test above, through the Triton kernels on CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = procs.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
         "-k", "triton or interp", "--no-header"],
        cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = int(proc.stdout.rsplit(" passed", 1)[0].rsplit("\n", 1)[-1].split()[-1])
    assert passed >= 25, proc.stdout[-2000:]


@interp_only
def test_interp_quantizers_really_use_the_kernels(monkeypatch):
    calls = []
    real = kernels.lsq().lsq_forward
    monkeypatch.setattr(kernels.lsq(), "lsq_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    check_lsq("triton", 4, True, per_channel=False)
    assert calls


_PTR = {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "gx_ptr": "*bf16", "seed_ptr": "*i64",
        "lut_ptr": "*u8", "hist_ptr": "*i32"}
_INT = {"inner", "nblk", "n", "ncol"}
_FLOAT = {"q_n", "q_p", "n_f", "scale"}


def _signature(fn, constexprs):
    names = fn.arg_names
    return {a: "constexpr" if a in constexprs else _PTR.get(a) or (
        "i32" if a in _INT else "fp32" if a in _FLOAT else "*fp32") for a in names}


@pytest.mark.skipif(INTERP or not kernels.available(), reason="needs triton, not interpreting")
def test_ptx_compile_for_sm90():
    """Every kernel compiles to PTX for an H100 (sm_90) without a GPU: catches what the
    interpreter accepts but the compiler does not. IEEE division (div.rn) and the round-half-
    even adder pair (+-1.5*2^23, add.rn: never fused or reassociated) are in the code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K, N = kernels.lsq(), kernels.nipq()
    cases = [
        (K._lsq_fwd_kernel, {"NOISE": 1, "WRITE_NOISE": True, "BLOCK": 1024}),
        (K._lsq_fwd_kernel, {"NOISE": 2, "WRITE_NOISE": False, "BLOCK": 1024}),
        (K._lsq_bwd_kernel, {"NOISE": 3, "NEED_X": True, "NEED_S": True, "BLOCK": 1024}),
        (K.sum_rows_kernel, {"BLOCK": 1024}),
        (N._noise_fwd_kernel, {"SIGNED": True, "HIST": True, "WRITE_Z": True, "BLOCK": 1024}),
        (N._noise_bwd_kernel, {"SIGNED": False, "HIST": True, "NEED_X": True, "NEED_P": True,
                               "BLOCK": 1024}),
        (N._hist_kernel, {"SIGNED": True, "BINS": 256, "BLOCK": 1024}),
        (N._lut_kernel, {"L": 65536, "BINS": 256, "BLOCK": 64}),
        (N._hard_fwd_kernel, {"LO": -1.0, "BLOCK": 1024}),
        (N._hard_bwd_kernel, {"LO": 0.0, "INCL": False, "NEED_X": True, "NEED_A": True,
                              "BLOCK": 1024}),
    ]
    target = GPUTarget("cuda", 90, 32)
    for fn, constexprs in cases:
        src = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
        ptx = triton.compile(src, target=target,
                             options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
        if fn in (K._lsq_fwd_kernel, K._lsq_bwd_kernel, N._hard_fwd_kernel):
            assert "div.rn.f32" in ptx
            assert "0f4B400000" in ptx and "0fCB400000" in ptx  # +-1.5 * 2**23


# -- the benchmark script --------------------------------------------------------------------

def test_benchmark_cpu_quick(tmp_path, monkeypatch, capsys):
    """``benchmarks/speed.py --device cpu --quick`` as a script (run in this process: a fresh
    interpreter would spend most of the time importing)."""
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", [
        "speed.py", "--device", "cpu", "--quick", "--batch", "2", "--size", "8", "--warmup", "0",
        "--iters", "1", "--threads", "1", "--json", str(out)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "benchmarks" / "speed.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed[-3000:]
    assert "ms/step" in printed and "x FP" in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    variants = {r["variant"] for r in rows}
    assert {"fp", "textbook_lsq", "lsq_w4a4", "tempering_w4a4", "nipq_uniform_w4a4",
            "nipq_histogram_w4a4"} <= variants
    for r in rows:
        assert r["model"] == "resnet20" and r["mode"] == "eager"
        assert r["ms_per_step"] > 0 and r["time_ratio_vs_fp"] > 0
        assert "mem_ratio_vs_fp" in r and "saved_mb" in r
    fp = next(r for r in rows if r["variant"] == "fp")
    assert fp["time_ratio_vs_fp"] == 1.0
    assert data["config"]["device"] == "cpu"
    assert {m["case"] for m in data["micro"]} >= {"textbook_lsq", "lsq_fused",
                                                  "nipq_histogram_fused"}
    assert all(m["ms_fwd_bwd"] > 0 for m in data["micro"])
