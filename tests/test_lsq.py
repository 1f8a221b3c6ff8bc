"""LSQ forward values, the three gradient branches for v and s (with g), and the init formula,
against the closed forms of docs/algorithms.md section 1 (tests/closed_forms.py: forward bit for
bit, grad_x exactly, grad_s within the fp32 accumulation bound)."""

import math

import pytest
import torch

from closed_forms import assert_fp32_sum, lsq_forward, lsq_grad_x, lsq_step_terms, same_bits
from qtrainer.quantizers import LSQQuantizer, lsq_levels


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

    step = torch.tensor([s])
    n = v.numel() // (4 if grad_scale == "per_sample" else 1)
    g = 1.0 if grad_scale == "none" else 1.0 / math.sqrt(n * q_p)
    assert same_bits(out.detach(), lsq_forward(v.detach(), step, q_n, q_p))
    assert same_bits(v.grad, lsq_grad_x(v.detach(), step, q_n, q_p, w))
    assert_fp32_sum(q.step.grad, lsq_step_terms(v.detach(), step, q_n, q_p, w), scale=g)
    # every branch is exercised
    r = v.detach() / s
    assert ((r > -q_n) & (r < q_p)).any() and (r >= q_p).any()
    if signed:
        assert (r <= -q_n).any()


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_inputs_exactly_on_the_bounds(bits, signed):
    """At ``v/s = -Q_N`` and ``v/s = Q_P`` exactly (and beyond) the input gradient is 0 and the
    step gets ``-Q_N`` / ``Q_P``; one ulp inside, the gradient passes (issue #12: explicit
    masks, not the clamp gradient of the running torch version)."""
    q = LSQQuantizer(bits, signed, grad_scale="none")
    q.step.data.fill_(0.5)
    q._mark_initialized()
    q_n, q_p = q.levels
    lo, hi = -q_n * 0.5, q_p * 0.5
    inner_hi = torch.nextafter(torch.tensor(hi), torch.tensor(0.0)).item()
    values = [hi, hi + 1.0, inner_hi]
    if signed:
        values += [lo, lo - 1.0, torch.nextafter(torch.tensor(lo), torch.tensor(0.0)).item()]
    else:
        values += [0.0, -1.0]  # the lower bound of unsigned codes is 0
    for value in values:
        q.step.grad = None
        v = torch.tensor([value], requires_grad=True)
        q(v).sum().backward()
        r = value / 0.5
        inside = -q_n < r < q_p
        assert v.grad.item() == (1.0 if inside else 0.0), value
        expected = round(r) - r if inside else (float(-q_n) if r <= -q_n else float(q_p))
        assert q.step.grad.item() == pytest.approx(expected, abs=1e-6), value


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
    steps = q.step.detach().clone()
    assert same_bits(out.detach(), lsq_forward(w.detach(), steps, 8, 7))
    terms = lsq_step_terms(w.detach(), steps, 8, 7, torch.ones_like(w))
    assert_fp32_sum(q.step.grad, terms, rows=3, scale=1 / math.sqrt(w[0].numel() * 7))


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


# ----------------------------------------------------------------------------- mse, percentile


def _quant_mse(q: LSQQuantizer, x: torch.Tensor) -> float:
    codes, s = q.int_codes(x)
    return float((codes * s.detach() - x).square().mean())


def _initialized(x: torch.Tensor, bits: int, signed: bool, init: str, **kw) -> LSQQuantizer:
    q = LSQQuantizer(bits, signed, init=init, **kw)
    q.initialize(x)
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["gaussian", "relu_gaussian"])
def test_mse_init_has_the_least_quantization_error(bits, kind):
    torch.manual_seed(bits)
    x = torch.randn(50_000)  # large enough for the fitted step at 8 bits (Q_P * g <= 0.1)
    signed = kind == "gaussian"
    if not signed:
        x = torch.relu(x)
    errors = {init: _quant_mse(_initialized(x, bits, signed, init), x)
              for init in ("mse", "lsq", "minmax")}
    assert errors["mse"] <= errors["lsq"] * (1 + 1e-6)
    assert errors["mse"] <= errors["minmax"] * (1 + 1e-6)
    # a strict improvement over both in these cases: the grid finds a better clipping point
    assert errors["mse"] < 0.99 * min(errors["lsq"], errors["minmax"])


def test_mse_init_known_values():
    # A unit Gaussian at 2 bits, signed codes {-2,-1,0,1}: the least-MSE step is near 0.9
    # (the paper's init gives 2 mean|x| = 1.6, minmax about 2 max|x|/... ~ 2); at 8 bits the
    # first-layer case of the issue: inputs in +-2 get a step near 2/127, not LSQ's ~0.14.
    torch.manual_seed(0)
    x = torch.randn(50_000)
    s2 = _initialized(x, 2, True, "mse").step.item()
    assert 0.7 < s2 < 1.1
    image = torch.rand(8, 3, 32, 32) * 4 - 2
    s8 = _initialized(image, 8, True, "mse").step.item()
    lsq8 = _initialized(image, 8, True, "lsq").step.item()
    assert s8 == pytest.approx(2 / 127, rel=0.1)
    assert lsq8 > 5 * s8
    codes, _ = _initialized(image, 8, True, "mse").int_codes(image)
    assert len(torch.unique(codes)) > 200  # uses the 8-bit grid; LSQ's init uses ~28 codes


def test_mse_init_per_channel_picks_each_channel():
    torch.manual_seed(3)
    w = torch.randn(4, 64, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(4, 1, 1, 1)
    q = _initialized(w, 3, True, "mse", per_channel=True, channels=4)
    for c in range(4):
        one = _initialized(w[c], 3, True, "mse")
        assert q.step[c].item() == pytest.approx(one.step.item(), rel=1e-5)
    ratios = q.step.detach() / torch.tensor([0.01, 0.1, 1.0, 10.0])
    assert float(ratios.max() / ratios.min()) < 1.5


def test_mse_init_large_tensor_and_zeros():
    x = torch.zeros(1000)
    q = _initialized(x, 4, False, "mse")
    assert q.step.item() > 0 and bool(q.initialized)
    big = torch.randn((1 << 20) + 4096)
    q = _initialized(big, 4, True, "mse")
    assert 0.2 < q.step.item() < 0.5  # Gaussian 4-bit least-MSE step is ~0.33


@pytest.mark.parametrize("signed", [True, False])
def test_percentile_init_uses_that_percentile_of_abs(signed):
    # nearest-rank percentile: the smallest |x| with at least pct% of the values at or below it
    torch.manual_seed(0)
    x = torch.randn(10_000)
    x = x if signed else x.relu()
    for pct in (99.9, 99.0, 90.0, 100.0):
        q = _initialized(x, 4, signed, "percentile", init_percentile=pct)
        q_p = lsq_levels(4, signed)[1]
        rank = round(pct * len(x) / 100)  # integral for these sizes
        expected = x.abs().sort().values[rank - 1].item() / q_p
        assert q.step.item() == pytest.approx(expected, rel=1e-6)
    assert _initialized(x, 4, signed, "percentile", init_percentile=100.0).step.item() == \
        pytest.approx(x.abs().max().item() / lsq_levels(4, signed)[1], rel=1e-6)


def test_percentile_default_and_per_channel():
    torch.manual_seed(0)
    w = torch.randn(3, 20_000)
    q = _initialized(w, 8, True, "percentile", per_channel=True, channels=3)
    assert q.init_percentile == 99.9
    for c in range(3):
        expected = w[c].abs().sort().values[19_980 - 1].item() / 127
        assert q.step[c].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("init", ["mse", "percentile"])
def test_fitted_inits_keep_the_paper_step_where_one_clipped_element_dominates(init):
    # 8-bit weights of a small layer (ResNet-20's fc: 640): Q_P * g = sqrt(127/640) ~ 0.45 > 0.1,
    # where a tight step is driven negative by the gradients of the few clipped weights
    torch.manual_seed(0)
    fc = torch.randn(10, 64) * 0.1
    q = _initialized(fc, 8, True, init)
    assert q.step.item() == pytest.approx(_initialized(fc, 8, True, "lsq").step.item(), rel=1e-6)
    assert 127 * q.grad_scale_value(fc) > 0.1
    # the same values as a large tensor (an activation batch, or a big layer) get the fitted step
    big = fc.repeat(40, 1)
    assert 127 * q.grad_scale_value(big) <= 0.1
    fitted = _initialized(big, 8, True, init).step.item()
    assert fitted < 0.5 * _initialized(big, 8, True, "lsq").step.item()
    # 2-bit weights of the same small layer: Q_P * g = sqrt(1/640) ~ 0.04, fitted
    assert _initialized(fc, 2, True, "mse").step.item() != pytest.approx(
        _initialized(fc, 2, True, "lsq").step.item(), rel=1e-3)


@pytest.mark.parametrize("value", [0, -1, 100.5, True, "99"])
def test_bad_init_percentile(value):
    with pytest.raises(ValueError, match="init_percentile"):
        LSQQuantizer(4, True, init="percentile", init_percentile=value)


@pytest.mark.parametrize("base", ["lsq-2bit", "tempering-4bit"])
@pytest.mark.parametrize("init", ["mse", "percentile"])
def test_recipes_accept_the_new_inits(base, init):
    from qtrainer.recipes import RecipeError, load_recipe
    from qtrainer.surgery import initialize_quantizers, quantize_model

    recipe = load_recipe(base, overrides={"method.init": init})
    assert recipe.method.init == init
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    x = torch.randn(2, 3, 8, 8)
    quantize_model(model, **recipe.surgery_kwargs(), example_input=x)
    initialize_quantizers(model, x)
    assert model[0].weight_quantizer.init == init
    assert model[3].input_quantizer.step.item() > 0
    with pytest.raises(RecipeError, match="method.init"):
        load_recipe(base, overrides={"method.init": "mse2"})
