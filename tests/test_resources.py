"""NIPQ's resource loss in its two forms (relative: model-size independent; official: /2^23)
against their formulas, values and gradients; the final bit-widths fitted to a target; the
least-MSE truncation boundaries of alpha_init mse."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtrainer.bit_targets import TOLERANCE, fit_bits_to_target
from qtrainer.nn import QuantizedLayer
from qtrainer.quantizers.nipq import least_mse_alpha, nipq_levels
from qtrainer.resources import RELATIVE_BETA, resource_loss, summarize
from qtrainer.surgery import initialize_quantizers, quantize_model


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def learned(width: int, bits: dict[int, tuple[float, float]] | None = None):
    """An MLP with NIPQ learned bits everywhere (first/last layer too) and its layers; ``bits``
    sets layer index -> (weight b_c, input b_c)."""
    torch.manual_seed(0)
    model = mlp(width)
    quantize_model(model, method="nipq", weight_bits=8, act_bits=8, first_last_bits="same",
                   method_kwargs={"learn_bits": True}, example_input=torch.randn(1, 16))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    for i, (wb, ab) in (bits or {}).items():
        for q, b in ((layers[i].weight_quantizer, wb), (layers[i].input_quantizer, ab)):
            p = (b - q.b_min) / (q.b_max - q.b_min)
            q.theta_b.data.fill_(math.log(p / (1 - p)))
    return model, layers


BITS = {0: (6.2, 5.0), 1: (3.4, 2.8), 2: (7.0, 4.3)}


def _sums(layers, side):
    pairs = [(round(getattr(m, f"{side}_quantizer").continuous_bits().item()),
              m.weight.numel() if side == "weight" else m.act_numel) for m in layers]
    return sum(b * n for b, n in pairs), sum(n for _, n in pairs)


def test_relative_avg_bits_loss_and_gradient_follow_the_formula():
    model, layers = learned(32, BITS)
    target = 3.0
    loss = resource_loss(model, "avg_bits", target, w_scale=2.0, a_scale=0.5)
    expected, slopes = 0.0, {}
    for side, scale in (("weight", 2.0), ("input", 0.5)):
        bits, total = _sums(layers, side)
        r = bits / (target * total)
        d = r - 1.0
        expected += scale * (abs(d) - RELATIVE_BETA / 2 if abs(d) >= RELATIVE_BETA
                             else d * d / (2 * RELATIVE_BETA))
        slopes[side] = scale * (math.copysign(1.0, d) if abs(d) >= RELATIVE_BETA
                                else d / RELATIVE_BETA) / (target * total)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    for m in layers:  # STE through round(b_c); b_c = 2 + 12 sigmoid(theta_b)
        for side, n in (("weight", m.weight.numel()), ("input", m.act_numel)):
            q = getattr(m, f"{side}_quantizer")
            s = torch.sigmoid(q.theta_b.detach()).item()
            assert q.theta_b.grad.item() == pytest.approx(slopes[side] * n * 12 * s * (1 - s),
                                                          rel=1e-5)
            assert q.theta_a.grad is None or q.theta_a.grad.abs().item() == 0.0  # bits only


def test_official_form_is_the_element_count_over_2_to_23():
    model, layers = learned(32, BITS)
    loss = resource_loss(model, "avg_bits", 3.0, w_scale=2.0, a_scale=0.5, form="official")
    expected = 0.0
    for side, scale in (("weight", 2.0), ("input", 0.5)):
        bits, total = _sums(layers, side)
        d = bits - 3.0 * total  # SmoothL1 (beta 1) on element counts
        expected += scale * (abs(d) - 0.5 if abs(d) >= 1 else d * d / 2) / 2**23
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="form='paper'.*relative, official"):
        resource_loss(model, "avg_bits", 3.0, form="paper")


def test_relative_loss_does_not_depend_on_the_model_size():
    """Same bit-widths, 64x more elements: the relative loss and each layer's pull per share of
    the model are unchanged; the official loss grows with the element counts."""
    small, _ = learned(8, BITS)
    large, _ = learned(512, BITS)
    rel = [resource_loss(m, "avg_bits", 3.0).item() for m in (small, large)]
    off = [resource_loss(m, "avg_bits", 3.0, form="official").item() for m in (small, large)]
    w_small, w_large = (summarize(m).avg_weight_bits for m in (small, large))
    assert w_small != w_large  # the middle layer's share differs: a real comparison follows
    assert off[1] / off[0] > 50
    # scale-free: a loss of the same order for both, set by how far each is from the target
    for m, value in ((small, rel[0]), (large, rel[1])):
        s = summarize(m)
        dw, da = s.avg_weight_bits / 3 - 1, s.avg_act_bits / 3 - 1
        assert value == pytest.approx(abs(dw) + abs(da) - RELATIVE_BETA, rel=1e-5)


def test_gbops_loss_relative_and_official():
    model, layers = learned(32, BITS)
    g = sum(m.macs * round(m.weight_quantizer.continuous_bits().item())
            * round(m.input_quantizer.continuous_bits().item()) for m in layers) / 1e9
    assert g == pytest.approx(summarize(model).gbops, rel=1e-9)
    target = g / 1.5
    assert resource_loss(model, "gbops", target, bops_scale=2.0).item() == pytest.approx(
        2.0 * (0.5 - RELATIVE_BETA / 2), rel=1e-5)
    d = g - target
    assert resource_loss(model, "gbops", target, bops_scale=3.0, form="official").item() == \
        pytest.approx(3.0 * (d * d / 2 if abs(d) < 1 else abs(d) - 0.5), rel=1e-5)


@pytest.mark.parametrize("target", [2.5, 3.0, 4.2])
def test_fit_bits_to_target_meets_an_average_bit_target(target):
    model, layers = learned(32, BITS)
    before = {id(m): (m.weight_quantizer.continuous_bits().item(),
                      m.input_quantizer.continuous_bits().item()) for m in layers}
    chosen = fit_bits_to_target(model, "avg_bits", target)
    assert len(chosen) == 6
    s = summarize(model)
    # within the tolerance, or within half a step of the finest move (one bit of the smallest
    # layer: 128 of 1664 weights, 16 of 80 input elements) where the floor of 2 bits binds
    assert abs(s.avg_weight_bits - target) <= max(TOLERANCE * target, 0.5 * 128 / 1664 + 1e-9)
    assert abs(s.avg_act_bits - target) <= max(TOLERANCE * target, 0.5 * 16 / 80 + 1e-9)
    for m in layers:  # b_c now sits on the chosen integer: freezing keeps it
        for q, c in zip((m.weight_quantizer, m.input_quantizer), before[id(m)]):
            assert q.continuous_bits().item() == pytest.approx(q.bits, abs=1e-4)
            assert abs(q.bits - c) < 6  # moved from where it was learned, not reset


def test_fit_bits_takes_the_cheapest_moves_per_unit_of_deviation():
    """Weights 512, 1024, 128 (1664) at b_c = (6.2, 3.4, 7.4): round gives (6, 3, 7), average
    7040/1664 = 4.23 for a target of 4.0. Moves, cost = growth of (b - b_c)^2 per unit of
    relative deviation removed: the big layer 3 -> 2 (3.62) overshoots: refused; 6 -> 5
    (cost 1.40, average 3.92) beats 7 -> 6 (cost 1.80, 4.15); then 3.92 is below the target
    by more than the tolerance and 7 -> 8 (cost 0.20) lands on 4.0 exactly: (5, 3, 8)."""
    model, layers = learned(32, {0: (6.2, 5.0), 1: (3.4, 2.8), 2: (7.4, 4.3)})
    fit_bits_to_target(model, "avg_bits", 4.0)
    assert [m.weight_quantizer.bits for m in layers] == [5, 3, 8]
    assert summarize(model).avg_weight_bits == pytest.approx(4.0, abs=1e-12)


def test_fit_bits_to_a_gbops_target():
    model, layers = learned(32, BITS)
    g0 = summarize(model).gbops
    fit_bits_to_target(model, "gbops", g0 * 0.6)
    assert abs(summarize(model).gbops / (g0 * 0.6) - 1) <= TOLERANCE


def test_fixed_bit_layers_count_but_do_not_move():
    torch.manual_seed(0)
    model = mlp(32)
    quantize_model(model, method="nipq", weight_bits=8, act_bits=8, first_last_bits=8,
                   method_kwargs={"learn_bits": True}, example_input=torch.randn(1, 16))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    fixed = [(m.weight_quantizer.learn_bits, m.input_quantizer.learn_bits) for m in layers]
    assert fixed == [(False, False), (True, True), (False, False)]
    fit_bits_to_target(model, "avg_bits", 5.0)
    assert [m.weight_quantizer.bits for m in (layers[0], layers[2])] == [8, 8]
    # the middle layer alone: (8*512 + b*1024 + 8*128)/1664 = 5 -> b = 3.375 -> 3 or 4
    assert layers[1].weight_quantizer.bits in (3, 4)


# ----------------------------------------------------------------------------- alpha_init mse


def _hard_mse(x, alpha, bits, signed):
    n = nipq_levels(bits, signed)
    lo = -1.0 if signed else 0.0
    return (alpha / n * torch.round(n * torch.clamp(x / alpha, lo, 1.0)) - x).square().mean()


@pytest.mark.parametrize("bits, signed", [(2, True), (2, False), (4, True), (8, False)])
def test_least_mse_alpha_beats_every_boundary_on_a_fine_grid(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(20000, generator=g)
    x = x.relu() if not signed else x
    alpha = least_mse_alpha(x[None], bits, signed)
    assert alpha.shape == (1,)
    best = _hard_mse(x, alpha, bits, signed)
    top = x.abs().max()
    grid = [top * k / 400 for k in range(4, 401)]
    assert best <= min(_hard_mse(x, a, bits, signed) for a in grid) * 1.002
    assert best < _hard_mse(x, top, bits, signed)  # better than max|x| (official weights)


def test_least_mse_alpha_fits_each_row_on_its_own():
    """Per channel or group: each row's alpha is the one it gets alone."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, 300, generator=g) * torch.tensor([0.1, 1.0, 3.0, 0.5, 10.0])[:, None]
    together = least_mse_alpha(rows, 3, True)
    alone = torch.cat([least_mse_alpha(r[None], 3, True) for r in rows])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_alpha_init_mse_sets_weights_and_inputs_and_keeps_buffers(granularity):
    """method.alpha_init: mse through the regular initialization: weight boundaries from the
    weights, input boundaries from what each layer receives on the first batch (hard
    quantization, layer order), BatchNorm statistics untouched; official keeps max|W| and 6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(16, 3, 12, 12)
    model(x)
    official = __import__("copy").deepcopy(model)
    kwargs = {"granularity": granularity}
    quantize_model(model, method="nipq", weight_bits=2, act_bits=2, first_last_bits="same",
                   method_kwargs={**kwargs, "alpha_init": "mse"}, example_input=x[:1])
    quantize_model(official, method="nipq", weight_bits=2, act_bits=2, first_last_bits="same",
                   method_kwargs=kwargs, example_input=x[:1])
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    inputs = {}
    conv2 = model[3]
    conv2.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
    assert initialize_quantizers(model, x) == 6
    initialize_quantizers(official, x)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v)
    wq = conv2.weight_quantizer
    rows = conv2.weight.detach().reshape(wq.alpha.numel(), -1)
    torch.testing.assert_close(wq.alpha, least_mse_alpha(rows, 2, True), rtol=1e-5, atol=0)
    aq = conv2.input_quantizer
    assert not aq.signed
    torch.testing.assert_close(aq.alpha, least_mse_alpha(inputs["x"].reshape(1, -1), 2, False),
                               rtol=1e-5, atol=0)
    assert bool((wq.alpha < rows.abs().amax(1)).all())  # tighter than max|W| at 2 bits
    torch.testing.assert_close(official[3].weight_quantizer.alpha, rows.abs().amax(1),
                               rtol=1e-5, atol=0)
    assert official[3].input_quantizer.alpha.item() == pytest.approx(F.softplus(
        torch.tensor(6.0)).item())
    assert not aq.hard  # the hard switch is restored
