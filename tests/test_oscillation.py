"""Weight oscillation (docs/algorithms.md section 4): the tracker's EMA on hand-made codes, a
weight driven back and forth across a rounding boundary counted and a monotonic one not,
dampening's gradient against its formula, freezing through steps, resume and export, the
recipe section's checks, and the figures a run reports (summary, table, plot)."""

import math

import pytest
import torch
from lightning import pytorch as pl
from lit_helpers import LitCNN, cifar_tensors, loaders
from lit_helpers import quiet_trainer as trainer
from torch import nn
from user_modules import ManualAdam

from qtrainer import LSQQuantizer
from qtrainer.callback import QuantizationCallback
from qtrainer.export import export, read_header
from qtrainer.export.int_format import CODES, decode_codes, read_int
from qtrainer.nn import QuantConv2d, QuantLinear
from qtrainer.oscillation import (OscillationTracker, add_dampening_gradient, boundary_distance,
                                  dampening_loss, flip_step)
from qtrainer.recipes import RecipeError, load_recipe
from qtrainer.report import format_table, make_plots, merge_metrics


# ----------------------------------------------------------------------------- the tracker


def test_flip_step_gives_the_stated_ema_on_hand_made_codes():
    # columns: back and forth every step; monotonic; reversals with pauses in between
    seq = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 2, 1], [1, 3, 0], [0, 4, 0], [1, 5, 1]],
                       dtype=torch.float32)
    m = 0.1
    prev, direction, freq = seq[0].to(torch.int16), torch.zeros(3, dtype=torch.int8), torch.zeros(3)
    counts = torch.zeros(3)
    for codes in seq[1:]:
        counts += flip_step(prev, direction, freq, codes, m)
    # f = m*osc + (1-m)*f by hand: column 0 oscillates at steps 2..5: 1 - 0.9^4;
    # column 2 at step 3 (f = 0.1), not at 4 (0.09), at 5 (0.1 + 0.9*0.09)
    assert freq.tolist() == pytest.approx([1 - 0.9**4, 0.0, 0.1 + 0.9 * 0.09], abs=1e-7)
    assert counts.tolist() == [4, 0, 2]
    assert prev.tolist() == [1, 5, 1] and direction.tolist() == [-1, -1, -1]


def layer_with_step(weights, bits=2, step=1.0):
    """A QuantLinear (1 output row) whose LSQ weight quantizer has step ``step``."""
    q = LSQQuantizer(bits=bits, signed=True)
    with torch.no_grad():
        q.step.fill_(step)
    q._mark_initialized()
    fp = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        fp.weight.copy_(torch.tensor([weights]))
    return QuantLinear.from_float(fp, q, None)


def drive(layer, targets, steps, tracker=None, lr=0.05):
    """SGD on ``sum((w_hat - targets)^2)`` through the STE, the tracker after every step (Nagel
    et al.'s toy problem: a target on a rounding boundary makes its weight oscillate)."""
    opt = torch.optim.SGD([layer.weight], lr=lr)
    if tracker is not None:
        opt.register_step_post_hook(lambda *_: tracker.update())
    history = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (layer.quantized_weight() - targets).square().sum()
        loss.backward()
        if tracker is not None:
            tracker.mask_gradients()
        opt.step()
        history.append(layer.weight_quantizer.int_codes(layer.weight.detach())[0][0].clone())
    return torch.stack(history)


def test_weight_driven_across_a_boundary_is_counted_a_monotonic_one_is_not():
    # element 0: target 0.5 (the boundary between codes 0 and 1); element 1: starts at 0 and is
    # pulled to 1.0 (within reach: codes only rise), element 2: already at its target
    layer = layer_with_step([0.40, -1.2, -1.0])
    tracker = OscillationTracker(nn.Sequential(layer), momentum=0.01, threshold=0.05)
    codes = drive(layer, torch.tensor([[0.5, 1.0, -1.0]]), 200, tracker)
    stats = tracker.stats()["0"]
    freq = tracker.state["0"].freq[0]
    assert (codes[1:, 1] >= codes[:-1, 1]).all() and codes[-1, 1] == 1  # monotonic, then still
    assert freq[1] == 0 and freq[2] == 0
    flips = (codes[1:, 0] != codes[:-1, 0]).sum()
    assert flips > 50  # the first element oscillates: each flip after the first reverses one
    assert stats["oscillations"] == flips - 1
    assert freq[0] > 0.05 and stats["oscillating"] == pytest.approx(1 / 3)
    # 200 steps of an EMA with m = 0.01 reach 1 - 0.99^(flips) at most
    assert freq[0] <= 1 - 0.99 ** int(flips)


def test_a_change_of_learned_bits_is_not_an_oscillation():
    """NIPQ with learned bits: when round(b_c) moves, every code changes by the new scale; the
    tracker starts that layer again instead of counting the rescaling as flips, and keeps
    counting real reversals at the new bit-width (bits saved with the state)."""
    from qtrainer import NIPQQuantizer

    q = NIPQQuantizer(bits=4, signed=True, learn_bits=True, role="weight", channels=1,
                      shape=(1, 64))
    fp = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        fp.weight.copy_(torch.linspace(-0.9, 0.9, 64)[None])
    layer = QuantLinear.from_float(fp, q, None)
    q.initialize(layer.weight.detach())
    tracker = OscillationTracker(nn.Sequential(layer), momentum=0.5, threshold=0.05)

    def set_bits(b):
        with torch.no_grad():
            q.theta_b.fill_(math.log((b - q.b_min) / (q.b_max - b)))
        assert q.bits == b

    for b in (4, 5, 4, 5, 4):  # the bit-width moves back and forth, the weights do not
        set_bits(b)
        tracker.update()
        assert tracker.state["0"].bits == b
    assert int(tracker.state["0"].count) == 0 and float(tracker.state["0"].freq.max()) == 0
    # at a fixed bit-width a weight pushed across a boundary and back is counted
    step = float(q.step_size)
    w0 = layer.weight.detach().clone()
    for k in range(4):
        with torch.no_grad():
            layer.weight.copy_(w0 + (step if k % 2 == 0 else 0.0))
        tracker.update()
    assert int(tracker.state["0"].count) > 0
    restored = OscillationTracker(nn.Sequential(layer))
    restored.load_state_dict(tracker.state_dict())
    assert restored.state["0"].bits == 4


def test_tracking_memory_and_boundary_distance():
    layer = layer_with_step([0.0, 0.25, 0.5, 0.74, 5.0], bits=3)
    # inside the range (-4, 3): distances to the nearest k + 1/2 are 0.5, 0.25, 0, 0.24
    assert boundary_distance(layer) == pytest.approx((0.5 + 0.25 + 0.0 + 0.24) / 4, abs=1e-6)
    tracker = OscillationTracker(nn.Sequential(layer), freezing=True)
    tracker.update()
    st = tracker.state["0"]
    track_bytes = sum(t.element_size() for t in (st.prev_code, st.prev_dir, st.freq))
    freeze_bytes = sum(t.element_size() for t in (st.ema_code, st.frozen, st.frozen_code))
    assert (track_bytes, freeze_bytes) == (7, 7)  # per weight, as the docs state


# ----------------------------------------------------------------------------- dampening


@pytest.mark.parametrize("aggregation", ["kernel_mean", "sum", "mean"])
def test_dampening_gradient_matches_its_formula(aggregation):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    q = LSQQuantizer(bits=2, signed=True, per_channel=True, channels=4)
    q.initialize(conv.weight.detach())
    layer = QuantConv2d.from_float(conv, q, None)
    with torch.no_grad():  # a few weights far outside the range: no pull on them
        layer.weight[0, 0, 0, :] = torch.tensor([5.0, -5.0, 0.0])
    lam = 0.37
    # the formula, written out: lambda * agg((sg(w_hat) - clip(w, -Q_N s, Q_P s))^2)
    w = layer.weight
    s = q.step.detach().view(-1, 1, 1, 1)
    w_hat = (torch.round(torch.clamp(w.detach() / s, -2, 1)) * s)
    sq = (w_hat - torch.clamp(w, -2 * s, 1 * s)).square()
    expected_loss = lam * {"sum": sq.sum(), "mean": sq.mean(), "kernel_mean": sq.sum(0).mean()}[
        aggregation]
    (expected_grad,) = torch.autograd.grad(expected_loss, w)
    assert float(dampening_loss(layer, aggregation).detach()) * lam == pytest.approx(
        float(expected_loss), rel=1e-6)
    value = add_dampening_gradient(layer, lam, aggregation)
    assert float(value) == pytest.approx(float(expected_loss), rel=1e-5)
    torch.testing.assert_close(layer.weight.grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert layer.weight.grad[0, 0, 0, :2].abs().max() == 0  # clipped: untouched
    assert q.step.grad is None  # range learning untouched


def test_group_wise_steps_track_and_dampen_per_element():
    """With one step per group of input elements (granularity: group) the tracker, the boundary
    distance and dampening's gradient use each element's own group step."""
    torch.manual_seed(1)
    lin = nn.Linear(32, 8)
    q = LSQQuantizer(bits=2, signed=True, granularity="group", group_size=16, shape=(8, 32))
    q.initialize(lin.weight.detach())
    layer = QuantLinear.from_float(lin, q, None)
    s = q.step.detach().view(8, 2, 1).expand(8, 2, 16).reshape(8, 32)  # each element's step
    v = layer.weight.detach() / s
    inside = (v > -2) & (v < 1)
    expected = (0.5 - (v - torch.round(v)).abs())[inside].mean()
    assert boundary_distance(layer) == pytest.approx(float(expected), abs=1e-6)
    w = layer.weight
    w_hat = torch.round(torch.clamp(w.detach() / s, -2, 1)) * s
    loss = 0.5 * (w_hat - torch.clamp(w, -2 * s, s)).square().sum(0).mean()
    (expected_grad,) = torch.autograd.grad(loss, w)
    add_dampening_gradient(layer, 0.5)
    torch.testing.assert_close(layer.weight.grad, expected_grad, rtol=1e-6, atol=1e-9)
    tracker = OscillationTracker(nn.Sequential(layer))
    tracker.update()
    assert tracker.state["0"].prev_code.shape == (8, 32)


# ----------------------------------------------------------------------------- freezing


def test_frozen_weights_do_not_change_through_further_steps():
    # element 0 oscillates around its boundary target; element 1 sits still at code 0
    layer = layer_with_step([0.40, 0.0])
    tracker = OscillationTracker(nn.Sequential(layer), momentum=0.01, freezing=True)
    targets = torch.tensor([[0.5, 0.0]])
    opt = torch.optim.SGD([layer.weight], lr=0.05, momentum=0.9, weight_decay=0.1)
    opt.register_step_post_hook(lambda *_: tracker.update(freeze_threshold=0.03))
    frozen_at = None
    for step in range(300):
        opt.zero_grad()
        (layer.quantized_weight() - targets).square().sum().backward()
        tracker.mask_gradients()
        opt.step()
        st = tracker.state["0"]
        if frozen_at is None and st.frozen is not None and st.frozen[0, 0]:
            frozen_at, value = step, layer.weight[0, 0].item()
            code = int(st.frozen_code[0, 0])
            assert code in (0, 1)  # one of the two codes it oscillated between
        if frozen_at is not None:
            assert layer.weight[0, 0].item() == value  # momentum and weight decay undone
            assert layer.weight_quantizer.int_codes(layer.weight.detach())[0][0, 0] == code
            assert step == frozen_at or layer.weight.grad[0, 0] == 0  # masked once frozen
    assert frozen_at is not None and not st.frozen[0, 1]


# ----------------------------------------------------------------------------- with Lightning


@pytest.fixture(scope="module")
def data():
    return cifar_tensors("train", 40), cifar_tensors("test", 10)


W2 = {"bits.weight": 2, "bits.activation": 2, "first_last.bits": "same", "optimizer.lr": 0.01,
      "lr_schedule.warmup_epochs": 0, "phases.epochs": 3}
FREEZE = {**W2, "oscillation.momentum": 0.1, "oscillation.freezing.enabled": True,
          "oscillation.freezing.threshold_start": 0.05,
          "oscillation.freezing.threshold_final": 0.02,
          "oscillation.dampening.enabled": True}


def frozen_state(cb):
    return {n: (st.frozen.clone(), st.frozen_code.clone())
            for n, st in cb.oscillation.tracker.state.items()}


def test_freezing_survives_resume_and_export_and_the_run_reports_it(tmp_path, data):
    def run(ckpt_dir, ckpt_path=None):
        pl.seed_everything(0)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1,
                                            filename="{epoch}")
        cb = QuantizationCallback("lsq-4bit", overrides=FREEZE)
        module = LitCNN(lr=0.01)
        t = trainer(3, [cb, ckpt], enable_checkpointing=True)
        t.fit(module, *loaders(*data, batch_size=64), ckpt_path=ckpt_path)
        return t, cb, module

    t, cb, full = run(tmp_path / "a")
    m = t.callback_metrics
    for key in ("qat/osc_fraction", "qat/osc_freq", "qat/osc_boundary_distance", "qat/osc_count",
                "qat/osc_frozen", "qat/dampening_weight", "qat/dampening_loss",
                "qat_osc/net.features.3"):
        assert key in m, key
    assert m["qat/dampening_weight"] == pytest.approx(0.1, rel=1e-6)  # cosine 0 -> 0.1, ended
    assert m["qat/osc_freeze_threshold"] == pytest.approx(0.02, rel=1e-6)
    frozen = frozen_state(cb)
    assert sum(int(f.sum()) for f, _ in frozen.values()) > 0
    layers = dict(full.named_modules())
    for name, (mask, codes) in frozen.items():  # the quantizer emits the frozen codes
        got, _ = layers[name].weight_quantizer.int_codes(layers[name].weight.detach())
        assert torch.equal(got[mask], codes[mask].float()), name

    # elements frozen at the end of epoch 1 kept their codes through epoch 2
    state = torch.load(tmp_path / "a" / "epoch=1.ckpt", weights_only=True)
    saved = state["callbacks"]["QuantizationCallback"]["oscillation"]
    for name, entry in saved.items():
        earlier = entry["frozen"]
        assert torch.equal(frozen[name][1][earlier], entry["frozen_code"][earlier])
        assert (frozen[name][0] | ~earlier).all()  # frozen stays frozen

    # resume from epoch 0 equals the uninterrupted run, frozen state included
    _, cb_b, resumed = run(tmp_path / "b", ckpt_path=tmp_path / "a" / "epoch=0.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    for name, (mask, codes) in frozen_state(cb_b).items():
        assert torch.equal(mask, frozen[name][0]) and torch.equal(codes, frozen[name][1])

    # export: the int file's codes are the frozen codes
    export(full, tmp_path / "m.safetensors")
    tensors, header = read_int(tmp_path / "m.safetensors")
    entries = {e["name"]: e for e in read_header(tmp_path / "m.safetensors")["layers"]}
    for name, (mask, codes) in frozen.items():
        stored = decode_codes(tensors[name + CODES], entries[name]["weight"], list(mask.shape))
        assert torch.equal(stored[mask], codes[mask].float()), name


def test_manual_optimization_gets_dampening_and_tracking(data):
    pl.seed_everything(0)
    cb = QuantizationCallback("lsq-4bit", overrides={
        **W2, "phases.epochs": 1, "oscillation.dampening.enabled": True,
        "oscillation.dampening.schedule": "constant", "oscillation.dampening.weight": 0.5})
    module = ManualAdam()
    t = trainer(1, [cb])
    t.fit(module, *loaders(*data, batch_size=64))
    m = t.callback_metrics
    assert m["qat/dampening_weight"] == pytest.approx(0.5) and m["qat/dampening_loss"] > 0
    assert m["qat/osc_count"] >= 0 and cb.oscillation.tracker.state  # stepped and tracked


def test_summary_table_and_plot_report_oscillation(tmp_path, data, capsys):
    from qtrainer import QTrainer
    from qtrainer.models import SmallCNN

    pl.seed_everything(0)
    qt = QTrainer(SmallCNN(width=8), "lsq-4bit", overrides={**W2, "phases.epochs": 2},
                  output_dir=tmp_path)
    qt.fit(*loaders(*data, batch_size=64))
    lines = [s for s in capsys.readouterr().out.splitlines() if s.startswith("epoch ")]
    assert len(lines) == 2 and all(" osc " in s and s.endswith("%") for s in lines), lines
    summary = qt.summary()
    osc = summary["oscillation"]
    assert set(osc) >= {"threshold", "oscillating", "mean_freq", "boundary_distance", "layers"}
    layers = osc["layers"]
    n = sum(v["elements"] for v in layers.values())
    assert osc["oscillating"] == pytest.approx(
        sum(v["oscillating"] * v["elements"] for v in layers.values()) / n)
    assert 0 < osc["boundary_distance"] <= 0.5
    worst = max(layers, key=lambda k: layers[k]["oscillating"])
    table = format_table([summary])
    assert "osc" in table.splitlines()[0] and f"{worst} " in table.splitlines()[-1]
    (tmp_path / "summary.json").write_text(__import__("json").dumps(summary))
    merge_metrics(tmp_path)
    assert (tmp_path / "plots" / "oscillation.png") in make_plots(tmp_path)


def test_tracking_off_and_recipe_checks():
    base = load_recipe("lsq-4bit")
    assert "oscillation" not in base.to_dict()  # defaults: left out, hashes unchanged
    on = load_recipe("lsq-4bit", {"oscillation.freezing.enabled": True})
    assert on.to_dict()["oscillation"]["freezing"] == {
        "enabled": True, "threshold_start": 0.1, "threshold_final": 0.01, "begin": 0.0}
    assert on.content_hash() != base.content_hash()
    assert load_recipe(on.to_dict()) == on
    with pytest.raises(RecipeError, match=r"did you mean 'threshold_start'"):
        load_recipe("lsq-4bit", {"oscillation.freezing.treshold_start": 0.2})
    with pytest.raises(RecipeError, match=r"did you mean 'kernel_mean'"):
        load_recipe("lsq-4bit", {"oscillation.dampening.aggregation": "kernel"})
    with pytest.raises(RecipeError, match=r"oscillation.freezing.enabled.*oscillation.track"):
        load_recipe("lsq-4bit", {"oscillation.track": False, "oscillation.freezing.enabled": True})
    with pytest.raises(RecipeError, match=r"threshold_final: 0.2 is greater"):
        load_recipe("lsq-4bit", {"oscillation.freezing.enabled": True,
                                 "oscillation.freezing.threshold_final": 0.2})
    with pytest.raises(RecipeError, match=r"oscillation.momentum"):
        load_recipe("lsq-4bit", {"oscillation.momentum": 1.5})
    assert math.isclose(load_recipe("lsq-4bit", {"oscillation.momentum": 0.5}).oscillation.momentum,
                        0.5)


def test_nipq_treats_oscillation_in_its_hard_phase_only(data):
    seen = []

    class Epochs(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((cb.phase, dict(cb.oscillation.metrics(per_layer=False))))

    pl.seed_everything(0)
    cb = QuantizationCallback("nipq-4bit", overrides={
        "phases.epochs": 2, "phases.hard_epochs": 1, "phases.bn_reestimation_batches": 2,
        "lr_schedule.warmup_epochs": 0, "oscillation.dampening.enabled": True,
        "oscillation.dampening.schedule": "constant", "oscillation.freezing.enabled": True,
        "oscillation.freezing.threshold_start": 0.01, "oscillation.freezing.threshold_final": 0.01})
    t = trainer(2, [Epochs(), cb])  # Epochs reads (and resets) the figures before cb logs
    t.fit(LitCNN(lr=0.01), *loaders(*data, batch_size=64))
    (noise_phase, noise), (hard_phase, hard) = seen
    assert (noise_phase, hard_phase) == ("noise", "hard")
    assert "qat/dampening_loss" not in noise and noise["qat/osc_frozen"] == 0  # tracked only
    assert "qat/osc_fraction" in noise
    assert hard["qat/dampening_loss"] > 0


def test_telemetry_leaves_training_unchanged_and_switches_off(data):
    def run(track):
        pl.seed_everything(0)
        cb = QuantizationCallback("lsq-4bit", overrides={**W2, "phases.epochs": 1,
                                                         "oscillation.track": track})
        module = LitCNN(lr=0.01)
        t = trainer(1, [cb])
        t.fit(module, *loaders(*data, batch_size=64))
        return t.callback_metrics, cb, module.state_dict()

    on, cb_on, weights_on = run(True)
    off, cb_off, weights_off = run(False)
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)
    assert "qat/osc_fraction" in on and not any("osc" in k for k in off)
    assert cb_off.oscillation.summary() == {} and not cb_off.oscillation._handles


def test_tempering_freezes_under_its_noise(data):
    pl.seed_everything(0)
    cb = QuantizationCallback("tempering-4bit", overrides={
        **W2, "phases.epochs": 2, "oscillation.momentum": 0.1,
        "oscillation.freezing.enabled": True, "oscillation.freezing.threshold_start": 0.05,
        "oscillation.freezing.threshold_final": 0.05})
    module = LitCNN(lr=0.01)
    trainer(2, [cb]).fit(module, *loaders(*data, batch_size=64))
    layers = dict(module.named_modules())
    frozen = frozen_state(cb)
    assert sum(int(mask.sum()) for mask, _ in frozen.values()) > 0
    for name, (mask, codes) in frozen.items():
        got, _ = layers[name].weight_quantizer.int_codes(layers[name].weight.detach())
        assert torch.equal(got[mask], codes[mask].float()), name
