"""LSQ forward values, the three gradient branches for v and s (with g), and the init formula,
against the closed forms of ALGORITHMS.md section 1."""

import math

import pytest
import torch

from qtrainer.quantizers import LSQQuantizer, lsq_levels


def closed_form(v, s, q_n, q_p, g):
    """Reference (fp32, the module's own precision): output, d/dv, d/ds per element."""
    s = torch.tensor(s, dtype=torch.float32)
    r = v / s
    out = torch.round(r.clamp(-q_n, q_p)) * s
    inside = (r > -q_n) & (r < q_p)
    dv = inside.float()
    ds = torch.where(inside, torch.round(r) - r,
                     torch.where(r <= -q_n, torch.full_like(r, -q_n), torch.full_like(r, q_p)))
    return out, dv, ds


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_levels(bits, signed):
    q_n, q_p = lsq_levels(bits, signed)
    if signed:
        assert (q_n, q_p) == (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    else:
        assert (q_n, q_p) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("grad_scale", ["numel", "per_sample", "none"])
def test_forward_and_gradients_match_closed_form(bits, signed, grad_scale):
    torch.manual_seed(bits)
    q = LSQQuantizer(bits, signed, grad_scale=grad_scale)
    q_n, q_p = q.levels
    s = 0.37
    q.step.data.fill_(s)
    q._mark_initialized()
    # values spread over all three branches, plus exact boundary points
    v = torch.randn(4, 3, 5, 5) * s * q_p
    v.view(-1)[:4] = torch.tensor([-q_n * s, q_p * s, (q_p + 3) * s, -(q_n + 3) * s - 1])
    v.requires_grad_(True)
    w = torch.randn_like(v)  # upstream gradient
    out = q(v)
    (out * w).sum().backward()

    ref_out, dv, ds = closed_form(v.detach(), s, q_n, q_p, None)
    n = v.numel() // (4 if grad_scale == "per_sample" else 1)
    g = 1.0 if grad_scale == "none" else 1.0 / math.sqrt(n * q_p)
    assert torch.equal(out, ref_out)
    assert torch.equal(v.grad, w * dv)
    ref_ds = (w.double() * ds).sum() * g
    assert q.step.grad.item() == pytest.approx(ref_ds.item(), rel=1e-5, abs=1e-6)
    # every branch is exercised
    r = v.detach() / s
    assert ((r > -q_n) & (r < q_p)).any() and (r >= q_p).any()
    if signed:
        assert (r <= -q_n).any()


def test_boundary_branches_exactly():
    q = LSQQuantizer(2, True, grad_scale="none")
    q.step.data.fill_(1.0)
    q._mark_initialized()
    v = torch.tensor([-2.0, -2.5, 1.0, 1.5, 0.3], requires_grad=True)
    out = q(v)
    out.sum().backward()
    assert out.tolist() == [-2.0, -2.0, 1.0, 1.0, 0.0]
    assert v.grad.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    # -Q_N, -Q_N, Q_P, Q_P, round(0.3) - 0.3
    assert q.step.grad.item() == pytest.approx(-2 - 2 + 1 + 1 - 0.3, abs=1e-6)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_init_formula(bits, signed):
    torch.manual_seed(0)
    x = torch.randn(1000).abs() if not signed else torch.randn(1000)
    q = LSQQuantizer(bits, signed)
    q.initialize(x)
    expected = 2 * x.abs().mean() / math.sqrt(lsq_levels(bits, signed)[1])
    assert q.step.item() == pytest.approx(expected.item(), rel=1e-6)
    assert bool(q.initialized)


def test_lazy_init_on_first_forward():
    q = LSQQuantizer(4, True)
    x = torch.randn(64)
    q(x)
    assert q.step.item() == pytest.approx((2 * x.abs().mean() / math.sqrt(7)).item(), rel=1e-6)


def test_per_channel_steps_and_gradients():
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    q = LSQQuantizer(4, True, per_channel=True, channels=3)
    q.initialize(w.detach())
    expected = 2 * w.detach().abs().reshape(3, -1).mean(1) / math.sqrt(7)
    assert torch.allclose(q.step.data, expected)
    out = q(w)
    out.sum().backward()
    for c in range(3):
        _, _, ds = closed_form(w.detach()[c], q.step[c].item(), 8, 7, None)
        g = 1 / math.sqrt(w[c].numel() * 7)
        assert q.step.grad[c].item() == pytest.approx(ds.sum().item() * g, rel=1e-5, abs=1e-7)


def test_minmax_init_uses_full_range():
    x = torch.tensor([-3.0, 0.5, 1.4])
    q = LSQQuantizer(4, True, init="minmax")
    q.initialize(x)
    assert q.step.item() == pytest.approx(3.0 / 8)
    codes, _ = q.int_codes(x)
    assert codes.tolist()[0] == -8


def test_bf16_input_quantized_in_fp32():
    q = LSQQuantizer(4, True)
    q.step.data.fill_(0.1)
    q._mark_initialized()
    x = torch.randn(100)
    out = q(x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = q(x.bfloat16().float())
    assert torch.equal(out, ref.bfloat16())


@pytest.mark.parametrize("kwargs,word", [({"bits": 1}, "bits"), ({"bits": 17}, "bits"),
                                         ({"bits": True}, "bits"), ({"grad_scale": "nume"}, "numel"),
                                         ({"init": "mse2"}, "init")])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        LSQQuantizer(**kwargs)
