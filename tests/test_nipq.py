"""NIPQ (docs/algorithms.md section 2): noise-phase output and gradients for alpha and the bit-width,
histogram noise, hard quantization on the grid, stochastic rounding of the bit-width."""

import math

import pytest
import torch
import torch.nn.functional as F

from qtrainer.quantizers import NIPQQuantizer
from qtrainer.quantizers.nipq import inverse_softplus


def _q(bits=4, signed=True, **kw):
    q = NIPQQuantizer(bits, signed, **kw)
    q.theta_a.data.fill_(1.3)
    q._mark_initialized()
    q.train()
    return q


@pytest.mark.parametrize("signed", [True, False])
def test_noise_phase_output_and_alpha_gradient(signed):
    q = _q(3, signed, noise="uniform")
    q.generator = torch.Generator().manual_seed(11)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 3 if signed else 7
    delta = alpha / n
    v = (torch.randn(2000) * alpha).requires_grad_()
    w = torch.randn_like(v)
    y = q(v)
    (y * w).sum().backward()
    z = torch.rand(v.shape, generator=torch.Generator().manual_seed(11)) - 0.5
    lo = -alpha if signed else 0.0
    vd = v.detach()
    above, below = vd >= alpha, vd <= lo
    inside = ~above & ~below
    expected = torch.where(above, torch.tensor(alpha), torch.where(below, torch.tensor(lo), vd + z * delta))
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.equal(v.grad, w * inside)
    dalpha = (w * torch.where(above, 1.0, torch.where(below, -1.0 if signed else 0.0, z / n))).double().sum()
    assert q.theta_a.grad.item() == pytest.approx(dalpha.item() * torch.sigmoid(torch.tensor(1.3)).item(), rel=1e-5)
    assert q.theta_b.grad is None  # fixed bits: frozen


def test_exact_zeros_after_relu_stay_zero():
    q = _q(2, False, noise="histogram")
    v = torch.relu(torch.randn(5000))
    y = q(v)
    assert torch.equal(y[v == 0], torch.zeros(int((v == 0).sum())))


def test_learned_bit_width_gradient():
    q = _q(4, True, learn_bits=True, noise="uniform")
    q.theta_b.data.fill_(-0.4)
    q.generator = torch.Generator().manual_seed(5)
    v = (torch.randn(3000) * 2).requires_grad_()
    w = torch.randn_like(v)
    (q(v) * w).sum().backward()
    gen = torch.Generator().manual_seed(5)
    u = torch.rand(1, generator=gen).item() - 0.5
    z = torch.rand(v.shape, generator=gen) - 0.5
    b_c = 2 + 12 * torch.sigmoid(torch.tensor(-0.4)).item()
    b = round(b_c + u)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 2 ** (b - 1) - 1
    ddelta_db = -alpha * math.log(2) * 2 ** (b - 1) / n**2
    inside = (v.detach() < alpha) & (v.detach() > -alpha)
    db = (w * z * inside).double().sum().item() * ddelta_db
    dtheta_b = db * 12 * torch.sigmoid(torch.tensor(-0.4)).item() * (1 - torch.sigmoid(torch.tensor(-0.4)).item())
    assert q.theta_b.grad.item() == pytest.approx(dtheta_b, rel=1e-4)


def test_bit_width_stochastic_rounding_mean():
    q = _q(4, True, learn_bits=True)
    q.theta_b.data.fill_(math.log(0.11 / 0.89))  # b_c = 2 + 12 * 0.11 = 3.32
    torch.manual_seed(0)
    draws = torch.cat([q._noise_bits() for _ in range(20000)])
    assert set(draws.tolist()) == {3.0, 4.0}
    assert draws.mean().item() == pytest.approx(3.32, abs=0.01)
    q.eval()
    assert q.bits == 3


def test_histogram_noise_reproduces_rounding_error_distribution():
    q = _q(4, True, noise="histogram")
    alpha = F.softplus(torch.tensor(1.3)).item()
    delta = alpha / 7
    g = torch.Generator().manual_seed(0)
    # errors concentrated around -0.3 and +0.1 (two clusters), not uniform
    k = torch.randint(-5, 6, (60_000,), generator=g).float()
    off = torch.where(torch.rand(60_000, generator=g) < 0.7, torch.tensor(0.3), torch.tensor(-0.1))
    v = (k + off + 0.02 * torch.randn(60_000, generator=g)) * delta
    q.generator = torch.Generator().manual_seed(1)
    z = q._sample_z(v, torch.tensor([alpha]), torch.tensor([delta]))
    err = torch.round(v / delta) - v / delta
    for qq in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(z, qq).item() == pytest.approx(torch.quantile(err, qq).item(), abs=0.01)
    assert z.min() >= -0.5 and z.max() <= 0.5
    # uniform noise for comparison would fail the same check
    assert abs(torch.quantile(torch.rand(60_000) - 0.5, 0.25).item() - torch.quantile(err, 0.25).item()) > 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_hard_phase_lands_on_grid_with_gradients(bits, signed):
    q = _q(bits, signed)
    q.set_hard(True)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    v = (torch.randn(3000) * alpha).requires_grad_()
    y = q(v)
    w = torch.randn_like(v)
    (y * w).sum().backward()
    codes = y.detach() / (q.alpha / n)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= (-n if signed else 0) and codes.round().max() <= n
    vd = v.detach()
    lo = -alpha if signed else 0.0
    above, below = vd >= alpha, vd <= lo
    inside = ~above & ~below
    assert torch.allclose(v.grad, w * inside, rtol=1e-6, atol=0)
    da = torch.where(above, 1.0, torch.where(below, -1.0 if signed else 0.0, (y.detach() - vd) / alpha))
    expected = (w * da).double().sum().item() * torch.sigmoid(torch.tensor(1.3)).item()
    assert q.theta_a.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_init_weights_and_activations():
    w = torch.randn(64, 3, 3, 3)
    q = NIPQQuantizer(4, True, role="weight")
    q.initialize(w)
    assert q.alpha.item() == pytest.approx(w.abs().max().item(), rel=1e-5)
    q = NIPQQuantizer(4, True, role="weight", weight_init="official")
    q.initialize(w)
    assert q.alpha.item() == pytest.approx(F.softplus(w.max()).item(), rel=1e-6)
    assert NIPQQuantizer(4, False).theta_a.item() == 6.0
    assert NIPQQuantizer(4, True).theta_a.item() == 3.0
    assert inverse_softplus(torch.tensor(50.0)).item() == pytest.approx(50.0)
    # learnable bits: theta_b = logit((B - 2) / 12); 8 bits -> 0
    assert NIPQQuantizer(8, True, learn_bits=True).theta_b.item() == pytest.approx(0.0, abs=1e-6)


def test_freeze_bits_and_state_round_trip():
    q = _q(4, True, learn_bits=True)
    q.theta_b.data.fill_(math.log(0.26 / 0.74))  # b_c = 5.12
    assert q.freeze_bits() == 5
    assert not q.theta_b.requires_grad and q.bits == 5
    r = NIPQQuantizer(4, True, learn_bits=True)
    r.load_state_dict(q.state_dict())
    assert r.bits == 5 and not r.learn_bits and not r.theta_b.requires_grad


@pytest.mark.parametrize("kwargs,word", [({"bits": 20}, "bits"), ({"noise": "hist"}, "histogram"),
                                         ({"b_min": 8, "b_max": 4}, "b_min"),
                                         ({"bits": 2, "learn_bits": True}, "strictly")])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        NIPQQuantizer(**kwargs)
