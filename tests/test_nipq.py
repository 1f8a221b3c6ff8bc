"""NIPQ (docs/algorithms.md section 2): noise-phase output and gradients for alpha and the bit-width,
histogram noise, hard quantization on the grid, stochastic rounding of the bit-width, against the
closed forms (tests/closed_forms.py). The noise is regenerated here from the seed the quantizer
drew from its generator (qtrainer.quantizers.formulas.nipq_z)."""

import math

import pytest
import torch
import torch.nn.functional as F

from closed_forms import (assert_fp32_sum, nipq_alpha_terms, nipq_hard_alpha_terms,
                          nipq_hard_forward, nipq_noise_forward, nipq_noise_masks, same_bits)
from qtrainer.quantizers import NIPQQuantizer, formulas, ops
from qtrainer.quantizers.nipq import inverse_softplus


def _q(bits=4, signed=True, **kw):
    q = NIPQQuantizer(bits, signed, **kw)
    q.theta_a.data.fill_(1.3)
    q._mark_initialized()
    q.train()
    return q


def _z(gen_seed, x, lut=None, skip_bits=False):
    """The z a quantizer with ``generator = Generator().manual_seed(gen_seed)`` drew for ``x``
    (after the bit-width draw when bits are learned)."""
    gen = torch.Generator().manual_seed(gen_seed)
    if skip_bits:
        torch.rand(1, generator=gen)
    return formulas.nipq_z(ops.draw_seed(x, gen), lut, x)


@pytest.mark.parametrize("signed", [True, False])
def test_noise_phase_output_and_alpha_gradient(signed):
    q = _q(3, signed, noise="uniform")
    q.generator = torch.Generator().manual_seed(11)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 3 if signed else 7
    delta = q.alpha.detach() / n
    v = torch.randn(2000) * alpha
    v[:5] = torch.tensor([alpha, -alpha, 0.0, 2 * alpha, -2 * alpha])  # on and beyond the bounds
    v.requires_grad_()
    w = torch.randn_like(v)
    y = q(v)
    (y * w).sum().backward()
    vd = v.detach()
    z = _z(11, vd)
    assert z.min() >= -0.5 and z.max() < 0.5
    assert same_bits(y.detach(), nipq_noise_forward(vd, alpha, delta, z, signed))
    _, _, inside = nipq_noise_masks(vd, alpha, signed)
    assert same_bits(v.grad, torch.where(inside, w, 0.0))
    # exactly on a bound counts as outside (gradient 0); 0 is a bound of unsigned data only
    assert not inside[[0, 1, 3, 4]].any() and bool(inside[2]) == signed
    # d/d theta_a = (direct alpha term + z/n inside) * sigmoid(theta_a)
    terms = nipq_alpha_terms(vd, alpha, signed, w) + w.double() * (z.double() / n) * inside
    assert_fp32_sum(q.theta_a.grad, terms, scale=torch.sigmoid(torch.tensor(1.3)).item())
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
    u = torch.rand(1, generator=torch.Generator().manual_seed(5)).item() - 0.5
    z = _z(5, v.detach(), skip_bits=True)
    b_c = 2 + 12 * torch.sigmoid(torch.tensor(-0.4)).item()
    b = round(b_c + u)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 2 ** (b - 1) - 1
    ddelta_db = -alpha * math.log(2) * 2 ** (b - 1) / n**2
    inside = (v.detach() < alpha) & (v.detach() > -alpha)
    sig = torch.sigmoid(torch.tensor(-0.4)).item()
    terms = w.double() * z.double() * inside
    assert_fp32_sum(q.theta_b.grad, terms, scale=ddelta_db * 12 * sig * (1 - sig))


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
    alpha = F.softplus(torch.tensor([1.3]))
    delta = alpha / 7
    g = torch.Generator().manual_seed(0)
    # errors concentrated around -0.3 and +0.1 (two clusters), not uniform
    k = torch.randint(-5, 6, (60_000,), generator=g).float()
    off = torch.where(torch.rand(60_000, generator=g) < 0.7, torch.tensor(0.3), torch.tensor(-0.1))
    v = (k + off + 0.02 * torch.randn(60_000, generator=g)) * delta
    lut = ops.nipq_lut(v, alpha, delta, True)
    z = formulas.nipq_z(torch.tensor([1]), lut, v)
    err = torch.round(v / delta) - v / delta
    for qq in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(z, qq).item() == pytest.approx(torch.quantile(err, qq).item(), abs=0.01)
    assert z.min() >= -0.5 and z.max() < 0.5
    # uniform noise for comparison would fail the same check
    assert abs(torch.quantile(torch.rand(60_000) - 0.5, 0.25).item() - torch.quantile(err, 0.25).item()) > 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_hard_phase_lands_on_grid_with_gradients(bits, signed):
    q = _q(bits, signed)
    q.set_hard(True)
    alpha = F.softplus(torch.tensor(1.3)).item()
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    v = torch.randn(3000) * alpha
    v[:5] = torch.tensor([alpha, -alpha, 0.0, 2 * alpha, -2 * alpha])  # on and beyond the bounds
    v.requires_grad_()
    y = q(v)
    w = torch.randn_like(v)
    (y * w).sum().backward()
    vd = v.detach()
    assert same_bits(y.detach(), nipq_hard_forward(vd, alpha, n, signed))
    codes = y.detach() / (q.alpha.detach() / n)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= (-n if signed else 0) and codes.round().max() <= n
    c = torch.clamp(vd / alpha, -1.0 if signed else 0.0, 1.0)
    inside = (c > (-1.0 if signed else 0.0)) & (c < 1.0)
    assert same_bits(v.grad, torch.where(inside, w, 0.0))
    terms, slack = nipq_hard_alpha_terms(vd, alpha, n, signed, w)
    assert_fp32_sum(q.theta_a.grad, terms, scale=torch.sigmoid(torch.tensor(1.3)).item(),
                    slack=slack)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("hard", [False, True])
def test_inputs_exactly_on_the_bounds(signed, hard):
    """Issue #12: at ``x = alpha``, ``x = -alpha`` (signed) and ``x = 0`` (unsigned) exactly the
    input gradient is 0 and alpha gets +1, -1 and 0 (official ``F.hardtanh`` behaviour, on
    every torch version), in the noise phase and in hard quantization; one ulp inside the
    gradient passes."""
    q = _q(4, signed, noise="uniform")
    q.set_hard(hard)
    alpha = q.alpha.item()
    sig = torch.sigmoid(torch.tensor(1.3)).item()
    below = -alpha if signed else 0.0
    cases = [(alpha, 0.0, 1.0), (below, 0.0, -1.0 if signed else 0.0)]
    for value, grad_x, grad_alpha in cases:
        q.theta_a.grad = None
        v = torch.tensor([value], requires_grad=True)
        q(v).sum().backward()
        assert v.grad.item() == grad_x, value
        assert q.theta_a.grad.item() == pytest.approx(grad_alpha * sig, abs=1e-7), value
        inner = torch.nextafter(torch.tensor([value]), torch.tensor([0.0 if signed else 1.0]))
        inner.requires_grad_()
        q(inner).sum().backward()
        assert inner.grad.item() == 1.0, value


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
