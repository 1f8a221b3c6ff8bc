"""The fused op contracts (qtrainer/quantizers/ops, formulas.py, kernels/) against the closed
forms of tests/closed_forms.py: forward bit for bit given the noise drawn, grad_x exactly,
parameter gradients within the fp32 accumulation bound; noise regenerated from its seed with
the right statistics; Triton launches per training step.

The same checks run twice: in this process through the torch formulas, and through the Triton
kernels in Triton's interpreter (``test_interp_*`` and the ``backend`` parametrization, run by
``test_triton_interpreter`` in a subprocess with ``TRITON_INTERPRET=1``, since another test
module may already have imported triton without it). A CUDA machine repeats them in
``benchmarks/speed.py --check``.
"""

from __future__ import annotations

import math
import os
import procs
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from closed_forms import (assert_fp32_sum, lsq_forward, lsq_grad_x, lsq_step_terms,
                          nipq_alpha_terms, nipq_hard_alpha_terms, nipq_hard_forward,
                          nipq_noise_forward, nipq_noise_masks, same_bits)
from quant_harness import run
from qtrainer.quantizers import (LSQQuantizer, NIPQQuantizer, TemperingQuantizer, formulas,
                                 kernels, ops)
from qtrainer.quantizers.formulas import HIST_BINS, LUT_SIZE

ROOT = Path(__file__).resolve().parents[1]
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interp_only(test):
    """Collect ``test`` only in the ``TRITON_INTERPRET=1`` subprocess of
    :func:`test_triton_interpreter` (the only place with a Triton device to run it on)."""
    return test if INTERP else None


BACKENDS = ["triton"] if INTERP else ["torch"]
SIG = torch.sigmoid(torch.tensor(1.3)).item()  # d alpha / d theta_a at theta_a = 1.3


def drawn_seed(x, seed):
    """The seed a quantizer draws from the default generator after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    return ops.draw_seed(x)


# -- step contract (LSQ) -------------------------------------------------------------------

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


def check_lsq(backend, bits, signed, per_channel, dtype=torch.float32, channels_last=False):
    q, x, w = _lsq_case(bits, signed, per_channel, dtype, channels_last)
    q_n, q_p = q.levels
    y0, gx0, _ = run(q, x, w, "off", "torch")
    y1, gx1, g1 = run(q, x, w, "on", backend)
    steps = q.step.detach()
    assert same_bits(y1, lsq_forward(x, steps, q_n, q_p).to(dtype))
    assert same_bits(y1, y0) and y1.stride() == y0.stride()
    wq = w.to(dtype)  # the upstream gradient arrives in x's dtype
    assert same_bits(gx1, lsq_grad_x(x, steps, q_n, q_p, wq).to(dtype))
    assert same_bits(gx1, gx0)
    terms = lsq_step_terms(x, steps, q_n, q_p, wq)
    rows = 4 if per_channel else 1
    assert_fp32_sum(g1["step"], terms, rows=rows, scale=q.grad_scale_value(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_ops_match_closed_form(backend, bits, signed):
    check_lsq(backend, bits, signed, per_channel=False)
    check_lsq(backend, bits, signed, per_channel=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lsq_half_inputs_channels_last(backend, dtype):
    check_lsq(backend, 4, True, per_channel=False, dtype=dtype, channels_last=True)
    check_lsq(backend, 3, False, per_channel=True, dtype=dtype, channels_last=True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN and inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_special_values(backend, signed):
    """NaN, infinities, signed zeros and rounding ties: the kernel and the torch formula agree
    bit for bit (NaN gets its gradient like ``aten.hardtanh_backward``: it is not beyond a
    bound)."""
    q = LSQQuantizer(4, signed, grad_scale="none")
    q.step.data.fill_(0.3)
    q._mark_initialized()
    x = torch.tensor([float("nan"), -0.0, 0.0, -0.01, 0.01, float("inf"), -float("inf"),
                      0.45, -0.45, 0.15, -0.15])  # +-0.45, +-0.15: ties at 1.5 and 0.5 steps
    w = -torch.ones_like(x)
    y0, gx0, _ = run(q, x, w, "off", "torch")
    y1, gx1, _ = run(q, x, w, "on", backend)
    assert same_bits(y1, y0) and same_bits(gx1, gx0)
    assert gx1[0].item() == -1.0 and gx1[5].item() == 0.0 and gx1[6].item() == 0.0


# -- step contract, one step per group -------------------------------------------------------

GROUP_CASES = [((8, 4, 3, 3), 12), ((6, 96), 32), ((2, 4096), 2048)]  # the last: 2 blocks a row


def _group_case(shape, group_size, bits, signed, **kw):
    """A group-wise quantizer with distinct steps per group, and ``x`` with the exact bounds
    and a tie in group 0."""
    torch.manual_seed(bits + len(shape))
    q = (TemperingQuantizer if kw else LSQQuantizer)(
        bits, signed, granularity="group", group_size=group_size, shape=shape, **kw)
    q_n, q_p = q.levels
    steps = 0.15 + 0.3 * torch.rand(q.step.numel())
    q.step.data.copy_(steps)
    q._mark_initialized()
    x = torch.randn(shape) * 0.3 * q_p
    s0 = float(steps[0])
    x.view(-1)[:4] = torch.tensor([-q_n * s0, q_p * s0, (q_p + 2) * s0, 1.5 * s0])
    return q, x, torch.randn(shape), steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,group_size", GROUP_CASES)
@pytest.mark.parametrize("bits,signed", [(4, True), (3, False)])
def test_lsq_group_ops_match_closed_form(backend, shape, group_size, bits, signed):
    """One step per group of ``group_size`` consecutive input elements: the forward and
    grad_x bit for bit against the closed form on ``x`` read as ``[groups, group_size]``, the
    fused path equal to the unfused one, each group's step gradient within the fp32 bound,
    with ``g = 1 / sqrt(group_size * Q_P)`` (``grad_scale_count: per_step``)."""
    q, x, w, steps = _group_case(shape, group_size, bits, signed)
    q_n, q_p = q.levels
    rows = steps.numel()
    xr, wr = x.reshape(rows, -1), w.reshape(rows, -1)
    y0, gx0, _ = run(q, x, w, "off", "torch")
    y1, gx1, g1 = run(q, x, w, "on", backend)
    assert same_bits(y1, lsq_forward(xr, steps, q_n, q_p).reshape(shape)) and same_bits(y1, y0)
    assert same_bits(gx1, lsq_grad_x(xr, steps, q_n, q_p, wr).reshape(shape))
    assert same_bits(gx1, gx0)
    assert q.grad_scale_value(x) == 1 / math.sqrt(group_size * q_p)
    assert_fp32_sum(g1["step"], lsq_step_terms(xr, steps, q_n, q_p, wr), rows=rows,
                    scale=q.grad_scale_value(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,group_size", GROUP_CASES[:2])
def test_tempering_group_ops_match_closed_form(backend, shape, group_size):
    """Error-aware tempering noise with one step per group: output bit for bit given the
    noise drawn, each group's step gradient (noise term included) within the fp32 bound."""
    q, x, w, steps = _group_case(shape, group_size, 4, True, noise="error", lambda_=0.7)
    q.train()
    q_n, q_p = q.levels
    rows = steps.numel()
    y, gx, grads = run(q, x, w, "on", backend, seed=5)
    xr, wr = x.reshape(rows, -1), w.reshape(rows, -1)
    xil = drawn_noise(backend, 1, drawn_seed(x, 5), xr, steps, torch.tensor([0.7]))
    sv = steps.reshape(-1, 1)
    c = torch.clamp(xr / sv, -q_n, q_p)
    codes = torch.round(c)
    assert same_bits(y, ((codes + (codes - c) * xil) * sv).reshape(shape))
    assert same_bits(gx, lsq_grad_x(xr, steps, q_n, q_p, wr).reshape(shape))
    terms = lsq_step_terms(xr, steps, q_n, q_p, wr, 1.0, xil, "error")
    assert_fp32_sum(grads["step"], terms, rows=rows, scale=q.grad_scale_value(x))


# -- step contract with tempering noise ------------------------------------------------------

def drawn_noise(backend, code, seed, x, s, lam):
    """``lambda * xi`` as the op draws it from ``seed``: the kernel's debug output times
    ``lam``, or the torch stream."""
    if backend == "triton":
        return lam * kernels.step().forward(x, s, 4, 3, lam, code, seed, return_noise=True)[1]
    return formulas.tempering_noise(code, seed, x, lam)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise,dist,code", [("error", "uniform", 1), ("error", "gaussian", 2),
                                             ("uniform_step", "uniform", 3)])
def test_tempering_noise_from_seed_matches_closed_form(backend, noise, dist, code):
    lam, q_n, q_p = 0.8, 4, 3
    q = TemperingQuantizer(3, True, noise=noise, noise_dist=dist, lambda_=lam)
    q.step.data.fill_(0.21)
    q._mark_initialized()
    q.train()
    torch.manual_seed(1)
    x = torch.randn(3, 400) * 1.2
    x.view(-1)[:2] = torch.tensor([-q_n * 0.21, q_p * 0.21])
    w = torch.randn_like(x)
    y, gx, grads = run(q, x, w, "on", backend, seed=5)
    y_again, _, _ = run(q, x, w, "on", backend, seed=5)
    y_other, _, _ = run(q, x, w, "on", backend, seed=6)
    assert torch.equal(y, y_again)  # deterministic for a fixed seed
    assert not torch.equal(y, y_other)

    s, lam_t = q.step.detach(), torch.tensor([lam])
    xil = drawn_noise(backend, code, drawn_seed(x, 5), x, s, lam_t)  # lambda * xi
    c = torch.clamp(x / s, -q_n, q_p)
    codes = torch.round(c)
    # q + lambda s u, q + lambda xi (q - c s): as s (code + ...), evaluated in this order
    expected = ((codes + xil) * s if noise == "uniform_step"
                else (codes + (codes - c) * xil) * s)
    assert same_bits(y, expected)
    assert same_bits(gx, lsq_grad_x(x, s, q_n, q_p, w))
    terms = lsq_step_terms(x, s, q_n, q_p, w, 1.0, xil, noise)
    assert_fp32_sum(grads["step"], terms, scale=q.grad_scale_value(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", [1, 2, 3])
def test_tempering_noise_statistics(backend, code):
    """Zero mean and unit variance (``U(-1/2, 1/2)`` for ``uniform_step``) on 8192 draws
    (tolerances about 5 standard errors); another seed draws uncorrelated values."""
    step, lam = torch.tensor([0.1]), torch.tensor([1.0])
    a = drawn_noise(backend, code, torch.tensor([12345]), torch.zeros(8192), step, lam)
    c = drawn_noise(backend, code, torch.tensor([777]), torch.zeros(2048), step, lam)
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


# -- NIPQ contracts ------------------------------------------------------------------------

def _nipq(bits, signed, **kw):
    q = NIPQQuantizer(bits, signed, **kw)
    q.theta_a.data.fill_(1.3)
    q._mark_initialized()
    q.train()
    return q


def drawn_z(backend, seed, lut, x, alpha, delta, signed):
    if backend == "triton":
        return kernels.nipq().noise_forward(x, alpha, delta, seed, lut, signed, return_z=True)[1]
    return formulas.nipq_z(seed, lut, x)


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

    seed = drawn_seed(x, 9)
    with ops.options(backend=backend):
        lut = ops.nipq_lut(x, alpha, delta, signed) if noise == "histogram" else None
    z = drawn_z(backend, seed, lut, x, alpha, delta, signed)
    assert z.min() >= -0.5 and z.max() < 0.5
    assert same_bits(y, nipq_noise_forward(x, alpha.item(), delta, z, signed))
    _, _, inside = nipq_noise_masks(x, alpha.item(), signed)
    assert same_bits(gx, torch.where(inside, w, 0.0))
    if not signed:
        assert same_bits(y[x == 0], torch.zeros(int((x == 0).sum())))  # +0, not -0
    terms = nipq_alpha_terms(x, alpha.item(), signed, w) + w.double() * z.double() / n * inside
    assert_fp32_sum(grads["theta_a"], terms, scale=SIG)


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
    b = round(2 + 12 * torch.sigmoid(torch.tensor(-0.4)).item() + u)
    alpha = F.softplus(torch.tensor([1.3]))
    n = 2 ** (b - 1) - 1
    z = drawn_z(backend, seed, None, x, alpha, alpha / n, True)
    ddelta_db = -alpha.item() * math.log(2) * 2 ** (b - 1) / n**2
    inside = (x < alpha) & (x > -alpha)
    sig = torch.sigmoid(torch.tensor(-0.4)).item()
    assert_fp32_sum(grads["theta_b"], w.double() * z.double() * inside,
                    scale=ddelta_db * 12 * sig * (1 - sig))


def reference_lut(x, alpha, delta, signed):
    """The lookup table from its definition, in float64 and Python integers: bins by the
    documented rule, then cell j = number of bins with 2 L C <= (2 j + 1) N."""
    r = x / delta
    e = torch.round(r) - r  # exact in fp32
    lo = -alpha if signed else 0.0
    valid = (x > lo) & (x < alpha)
    v = e * HIST_BINS + (HIST_BINS // 2 + 1)  # fp32, as documented
    bins = (torch.clamp(v[valid].trunc(), max=HIST_BINS) - 1).long()
    cum = torch.bincount(bins, minlength=HIST_BINS).cumsum(0).tolist()
    total = cum[-1]
    j = torch.arange(LUT_SIZE, dtype=torch.long)
    cnt = torch.tensor([sum(2 * LUT_SIZE * c <= (2 * k + 1) * total for c in cum)
                        for k in range(0, LUT_SIZE, 257)])  # a sample of the cells
    return torch.clamp(cnt, max=HIST_BINS - 1), j[::257], bins


@pytest.mark.parametrize("backend", BACKENDS)
def test_nipq_histogram_table(backend):
    """The per-tensor rounding-error histogram, its sampling table, and the z it produces."""
    torch.manual_seed(3)
    alpha = torch.tensor([1.5])
    delta = alpha / 3
    # values near grid points: a peaked rounding-error histogram
    x = delta * (torch.round(torch.randn(8192) * 1.5) + 0.15 * torch.randn(8192))
    with ops.options(backend=backend):
        lut = ops.nipq_lut(x, alpha, delta, True)
    assert torch.equal(lut, formulas.nipq_lut(formulas.nipq_error_bins(x, alpha, delta, True)))
    cells, idx, bins = reference_lut(x, 1.5, delta, True)
    assert torch.equal(lut[idx].long(), cells)
    if backend == "triton":
        _, hist_k = kernels.nipq().noise_lut(x, alpha, delta, True, return_hist=True)
        assert torch.equal(hist_k.long(), torch.bincount(bins, minlength=HIST_BINS))
    # z follows the histogram: total variation distance of the frequencies in 16 groups of
    # 16 bins (about 0.02 expected from sampling alone; uniform z would give 0.4 here)
    z = drawn_z(backend, torch.tensor([99]), lut, x, alpha, delta, True)
    zb = ((z + 0.5) * HIST_BINS).long().clamp(0, HIST_BINS - 1)
    freq = torch.bincount(zb, minlength=HIST_BINS).double().reshape(16, 16).sum(1) / z.numel()
    hist = torch.bincount(bins, minlength=HIST_BINS).double()
    prob = (hist / hist.sum()).reshape(16, 16).sum(1)
    assert 0.5 * (freq - prob).abs().sum().item() < 0.05
    assert 0.5 * (prob - 1 / 16).abs().sum().item() > 0.3  # the histogram is not flat
    # an empty histogram (everything clipped) samples uniformly
    with ops.options(backend=backend):
        flat = ops.nipq_lut(torch.full((64,), 9.0), alpha, delta, True)
    assert torch.equal(flat.long(), torch.arange(LUT_SIZE) // (LUT_SIZE // HIST_BINS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_nipq_hard_matches_closed_form(backend, bits, signed):
    q = _nipq(bits, signed, noise="uniform")
    q.set_hard(True)
    alpha = F.softplus(torch.tensor(1.3)).item()
    torch.manual_seed(bits)
    x = torch.randn(2500) * alpha
    x[:5] = torch.tensor([alpha, -alpha, 0.0, 2 * alpha, -2 * alpha])
    w = torch.randn_like(x)
    y0, gx0, _ = run(q, x, w, "off", "torch")
    y1, gx1, g1 = run(q, x, w, "on", backend)
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    assert same_bits(y1, nipq_hard_forward(x, alpha, n, signed)) and same_bits(y1, y0)
    c = torch.clamp(x / torch.tensor(alpha), -1.0 if signed else 0.0, 1.0)
    inside = (c > (-1.0 if signed else 0.0)) & (c < 1.0)
    assert same_bits(gx1, torch.where(inside, w, 0.0)) and same_bits(gx1, gx0)
    terms, slack = nipq_hard_alpha_terms(x, alpha, n, signed, w)
    assert_fp32_sum(g1["theta_a"], terms, scale=SIG, slack=slack)


# -- NIPQ with one alpha per channel or per group --------------------------------------------

def _nipq_rows(shape, granularity, group_size=32, signed=True, **kw):
    """A 3-bit weight quantizer with distinct alphas per row, ``(q, x, w, theta, alpha,
    rows)``: ``x`` holds row 0's exact bounds."""
    torch.manual_seed(len(shape) + group_size)
    q = NIPQQuantizer(3, signed, role="weight", granularity=granularity, group_size=group_size,
                      shape=shape, **kw)
    theta = 0.6 + torch.rand(q.theta_a.numel())
    q.theta_a.data.copy_(theta)
    q._mark_initialized()
    q.train()
    alpha = F.softplus(theta)
    x = torch.randn(shape) * 1.3
    x.view(-1)[:2] = torch.tensor([alpha[0].item(), -alpha[0].item()])
    return q, x, torch.randn(shape), theta, alpha, theta.numel()


ROW_CASES = [((6, 96), "group", 32), ((2, 4096), "group", 2048), ((5, 3, 2, 2), "channel", 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", ["uniform", "histogram"])
@pytest.mark.parametrize("shape,granularity,group_size,signed",
                         [(*c, True) for c in ROW_CASES] + [(*ROW_CASES[0], False)])
def test_nipq_rows_noise_phase_matches_closed_form(backend, noise, shape, granularity,
                                                   group_size, signed):
    """Per row (channel or group) of its own ``alpha``: output bit for bit given ``z``, grad_x
    inside that row's bounds, and that row's ``theta_a`` gradient within the fp32 bound; the
    histogram pools every row's rounding errors in units of the row's delta."""
    q, x, w, theta, alpha, rows = _nipq_rows(shape, granularity, group_size, signed, noise=noise)
    n = 3 if signed else 7
    delta = alpha / n
    y, gx, grads = run(q, x, w, "on", backend, seed=9)
    seed = drawn_seed(x, 9)
    with ops.options(backend=backend):
        lut = ops.nipq_lut(x, alpha, delta, signed) if noise == "histogram" else None
    if lut is not None:
        bins = formulas.nipq_error_bins(x, alpha, delta, signed)
        assert torch.equal(lut, formulas.nipq_lut(bins))
    z = drawn_z(backend, seed, lut, x, alpha, delta, signed).reshape(rows, -1)
    xr, wr, yr, gxr = (t.reshape(rows, -1) for t in (x, w, y, gx))
    for r in range(rows):
        a = alpha[r].item()
        assert same_bits(yr[r], nipq_noise_forward(xr[r], a, delta[r], z[r], signed))
        _, _, inside = nipq_noise_masks(xr[r], a, signed)
        assert same_bits(gxr[r], torch.where(inside, wr[r], 0.0))
        terms = (nipq_alpha_terms(xr[r], a, signed, wr[r])
                 + wr[r].double() * z[r].double() / n * inside)
        sig = torch.sigmoid(theta[r]).item()
        assert_fp32_sum(grads["theta_a"][r], terms, scale=sig)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,granularity,group_size", ROW_CASES)
def test_nipq_rows_hard_matches_closed_form(backend, shape, granularity, group_size):
    q, x, w, theta, alpha, rows = _nipq_rows(shape, granularity, group_size, noise="uniform")
    q.set_hard(True)
    y0, gx0, _ = run(q, x, w, "off", "torch")
    y1, gx1, g1 = run(q, x, w, "on", backend)
    assert same_bits(y1, y0) and same_bits(gx1, gx0)
    xr, wr, yr, gxr = (t.reshape(rows, -1) for t in (x, w, y1, gx1))
    for r in range(rows):
        a = alpha[r].item()
        assert same_bits(yr[r], nipq_hard_forward(xr[r], a, 3, True))
        c = torch.clamp(xr[r] / torch.tensor(a), -1.0, 1.0)
        assert same_bits(gxr[r], torch.where((c > -1.0) & (c < 1.0), wr[r], 0.0))
        terms, slack = nipq_hard_alpha_terms(xr[r], a, 3, True, wr[r])
        assert_fp32_sum(g1["theta_a"][r], terms, scale=torch.sigmoid(theta[r]).item(),
                        slack=slack)


# -- launches per training step (through the interpreter) ----------------------------------

def count_launches(fn) -> int:
    """Triton kernel launches while ``fn`` runs (interpreter: each ``kernel[grid](...)``)."""
    from triton.runtime.interpreter import InterpretedFunction

    calls = []
    real = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    InterpretedFunction.run = counted
    try:
        fn()
    finally:
        InterpretedFunction.run = real
    return len(calls)


@interp_only
@pytest.mark.parametrize("make,launches,limit", [
    (lambda: LSQQuantizer(4, True), 3, 3), (lambda: TemperingQuantizer(4, True), 3, 3),
    (lambda: NIPQQuantizer(4, True, noise="uniform"), 3, 4),
    (lambda: NIPQQuantizer(4, True, noise="histogram"), 5, 5),
], ids=["lsq", "tempering", "nipq_uniform", "nipq_histogram"])
def test_interp_launches_per_quantizer_per_training_step(make, launches, limit):
    """One quantizer in a recomputing layer, one training step (forward, recomputed forward,
    backward with the in-kernel final sum): LSQ and tempering 3 launches, NIPQ uniform 3
    (<= 4), NIPQ histogram 5 (2 for its table)."""
    from qtrainer.nn import QuantLinear

    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(64, 8), None, make())
    x = torch.randn(32, 64, requires_grad=True)
    with torch.no_grad():
        layer(x)  # lazy initialization
    layer.train()

    def step():
        with ops.options(fused="on", backend="triton"):
            layer(x).square().sum().backward()

    assert count_launches(step) == launches <= limit
    assert x.grad is not None
    assert all(p.grad is not None for p in layer.input_quantizer.parameters() if p.requires_grad)


# -- the interpreter run and the GPU compiler ------------------------------------------------

@pytest.mark.skipif(INTERP, reason="this is the driver of the interpreter run")
@pytest.mark.skipif(not kernels.available(), reason="triton is not installed")
def test_triton_interpreter():
    """Every backend-parametrized test, through the Triton kernels on CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    files = [__file__, str(ROOT / "tests" / "test_ops.py"), str(ROOT / "tests" / "test_compile.py")]
    proc = procs.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-x", "-p", "no:cacheprovider",
         "-k", "triton or interp", "--no-header"],
        cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed = int(proc.stdout.rsplit(" passed", 1)[0].rsplit("\n", 1)[-1].split()[-1])
    assert passed >= 35, proc.stdout[-2000:]


@interp_only
def test_interp_quantizers_really_use_the_kernels():
    calls = count_launches(lambda: check_lsq("triton", 4, True, per_channel=False))
    assert calls >= 2


_PTR = {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "gx_ptr": "*bf16", "seed_ptr": "*i64",
        "lut_ptr": "*u8", "hist_ptr": "*i32", "ticket_ptr": "*i32"}
_INT = {"inner", "nblk", "n", "ncol", "rows"}
_FLOAT = {"lo", "hi", "n_f", "scale"}


def _signature(fn, constexprs):
    names = fn.arg_names
    return {a: "constexpr" if a in constexprs else _PTR.get(a) or (
        "i32" if a in _INT else "fp32" if a in _FLOAT else "*fp32") for a in names}


@pytest.mark.skipif(INTERP or not kernels.available(), reason="needs triton, not interpreting")
def test_ptx_compile_for_sm90():
    """Every kernel compiles to PTX for an H100 (sm_90) without a GPU: catches what the
    interpreter accepts but the compiler does not. IEEE division (div.rn), the round-half-
    even adder pair (+-1.5*2^23, add.rn: never fused or reassociated) and the final sum's
    acquire-release ticket are in the code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K, N = kernels.step(), kernels.nipq()
    cases = [
        (K._step_fwd_kernel, {"NOISE": 1, "WRITE_NOISE": True, "BLOCK": 1024}),
        (K._step_fwd_kernel, {"NOISE": 2, "WRITE_NOISE": False, "BLOCK": 1024}),
        (K._step_bwd_kernel, {"NOISE": 3, "NEED_X": True, "NEED_S": True, "BLOCK": 1024,
                              "SUM_BLOCK": 1024}),
        (N._noise_fwd_kernel, {"SIGNED": True, "HIST": True, "WRITE_Z": True, "BLOCK": 1024}),
        (N._noise_bwd_kernel, {"SIGNED": False, "HIST": True, "NEED_X": True, "NEED_P": True,
                               "BLOCK": 1024, "SUM_BLOCK": 1024}),
        (N._hist_kernel, {"SIGNED": True, "BINS": 256, "BLOCK": 1024}),
        (N._lut_kernel, {"L": 65536, "BINS": 256, "BLOCK": 64}),
        (N._hard_fwd_kernel, {"LO": -1.0, "BLOCK": 1024}),
        (N._hard_bwd_kernel, {"LO": 0.0, "NEED_X": True, "NEED_A": True, "BLOCK": 1024,
                              "SUM_BLOCK": 1024}),
    ]
    target = GPUTarget("cuda", 90, 32)
    for fn, constexprs in cases:
        src = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
        ptx = triton.compile(src, target=target,
                             options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
        if fn in (K._step_fwd_kernel, K._step_bwd_kernel, N._hard_fwd_kernel):
            assert "div.rn.f32" in ptx
            assert "0f4B400000" in ptx and "0fCB400000" in ptx  # +-1.5 * 2**23
        if "SUM_BLOCK" in constexprs:
            assert "atom" in ptx and "acq_rel" in ptx
