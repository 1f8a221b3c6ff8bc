"""Noise tempering (docs/algorithms.md section 3): lambda = 0 is LSQ exactly, the noise is
error-aware and its gradient reaches s as stated (closed forms of tests/closed_forms.py, the
noise regenerated from the seed the quantizer drew), and the decay schedule's values."""

import math

import pytest
import torch

from closed_forms import assert_fp32_sum, lsq_grad_x, lsq_step_terms, same_bits
from qtrainer.quantizers import LSQQuantizer, TemperingQuantizer, formulas, ops
from qtrainer.schedules import ExponentialDecay


def _noise(q, x, seed=None, lam=None):
    """The noise ``q`` draws for ``x`` (from ``Generator().manual_seed(seed)`` when given),
    scaled by ``lam`` as the quantizer uses it when given."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return formulas.tempering_noise(q.noise_code, ops.draw_seed(x, gen), x, lam)


def _pair(bits=3, signed=True, **kw):
    lsq, tmp = LSQQuantizer(bits, signed), TemperingQuantizer(bits, signed, **kw)
    for q in (lsq, tmp):
        q.step.data.fill_(0.21)
        q._mark_initialized()
    return lsq, tmp


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lambda_zero_equals_lsq_exactly(bits):
    lsq, tmp = _pair(bits, lambda_=0.0)
    v = torch.randn(8, 16) * 2
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    w = torch.randn_like(v)
    ya, yb = lsq(a), tmp(b)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert torch.equal(ya, yb)
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(lsq.step.grad, tmp.step.grad)


def test_error_noise_output_and_gradients():
    lam = 0.8
    _, q = _pair(3, lambda_=lam)
    q.generator = torch.Generator().manual_seed(7)
    q.train()
    v = torch.randn(4, 50) * 1.2
    v.view(-1)[:4] = torch.tensor([-4 * 0.21, 3 * 0.21, 9.0, -9.0])  # on and beyond the bounds
    v.requires_grad_()
    w = torch.randn_like(v)
    y = q(v)
    (y * w).sum().backward()

    xil = _noise(q, v.detach(), seed=7, lam=torch.tensor([lam]))  # lambda * xi
    s, q_n, q_p = torch.tensor([0.21]), 4, 3
    c = torch.clamp(v.detach() / s, -q_n, q_p)
    code = torch.round(c)
    # y = q + lambda xi e = s (code + (code - c) lambda xi), evaluated in this order in fp32
    assert same_bits(y.detach(), (code + (code - c) * xil) * s)
    assert same_bits(v.grad, lsq_grad_x(v.detach(), s, q_n, q_p, w))
    terms = lsq_step_terms(v.detach(), s, q_n, q_p, w, 1.0, xil, "error")
    assert_fp32_sum(q.step.grad, terms, scale=1 / math.sqrt(v.numel() * q_p))
    # noise statistics: zero mean, unit variance (uniform on +-sqrt 3)
    big = _noise(q, torch.empty(200_000))
    assert big.mean().abs() < 0.01 and big.var().item() == pytest.approx(1.0, abs=0.01)
    assert big.abs().max() <= math.sqrt(3)


def test_noise_magnitude_scales_with_error():
    _, q = _pair(4, lambda_=1.0)
    q.train()
    torch.manual_seed(3)
    v = torch.rand(100_000) * 0.21 * 6  # inside the range
    y = q(v)
    r = v / torch.tensor(0.21)
    e = (torch.round(r) - r) * 0.21
    dev = (y - torch.round(r) * 0.21).abs()
    small, large = e.abs() < 0.02, e.abs() > 0.09
    # |noise| = lambda * |xi| * |e|, E|xi| = sqrt(3)/2 for U(-sqrt3, sqrt3)
    assert dev[small].mean() < 0.2 * dev[large].mean()
    ratio = (dev[large] / e[large].abs()).mean().item()
    assert ratio == pytest.approx(math.sqrt(3) / 2, rel=0.03)
    on_grid = torch.arange(-7, 8, dtype=torch.float32) * torch.tensor(0.21)
    assert torch.equal(q(on_grid), on_grid)


def test_uniform_step_noise_is_error_unaware_and_gaussian_option():
    _, q = _pair(4, lambda_=0.5, noise="uniform_step")
    q.train()
    on_grid = torch.arange(-7, 8, dtype=torch.float32).repeat(5000) * torch.tensor(0.21)
    dev = q(on_grid) - on_grid
    assert dev.abs().max() <= 0.5 * 0.21 * 0.5 + 1e-6
    assert dev.std().item() == pytest.approx(0.5 * 0.21 / math.sqrt(12), rel=0.03)
    g = _noise(TemperingQuantizer(4, True, noise_dist="gaussian"), torch.empty(200_000))
    assert g.mean().abs() < 0.01 and g.std().item() == pytest.approx(1.0, abs=0.01)
    assert g.abs().max() > math.sqrt(3)  # not uniform


def test_eval_and_hard_modes_are_plain_lsq():
    lsq, q = _pair(2, lambda_=1.0)
    v = torch.randn(1000)
    q.eval()
    assert torch.equal(q(v), lsq(v))
    q.train()
    q.set_hard(True)
    assert torch.equal(q(v), lsq(v))
    with pytest.raises(ValueError, match="lambda"):
        q.set_lambda(-1)


def test_decay_schedule_values():
    sched = ExponentialDecay(lambda_0=1.0, k=5.0, total_steps=1000)
    assert sched(0) == 1.0
    assert sched(1000) == pytest.approx(math.exp(-5))
    assert sched(1000) == pytest.approx(0.0067, abs=1e-4)
    assert sched(500) == pytest.approx(math.exp(-2.5))
    assert ExponentialDecay(0.0, 5.0, 10)(3) == 0.0
