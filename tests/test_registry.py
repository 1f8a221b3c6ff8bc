"""Quantization methods as plug-ins (qtrainer/quantizers/registry.py): the built-ins come through
the ``qtrainer.methods`` entry points (or the explicit fallback, once), declarations are plain
data, unknown names get a close match, and a toy method defined in this test module is built by
``make_quantizer`` and ``quantize_model`` and trains."""

from __future__ import annotations

import json
import math
import warnings
from importlib.metadata import EntryPoint

import pytest
import torch
from torch import nn

import qtrainer
from lightning import pytorch as pl
from qtrainer.quantizers import (LSQQuantizer, METHODS, NIPQQuantizer, Param, Quantizer,
                                 TemperingQuantizer, describe_methods, get_method, make_quantizer,
                                 method_names, register_method, registry, round_ste)


class ToyQuantizer(Quantizer):
    """A toy method: symmetric (or non-negative) uniform quantization on ``[-r, r]`` with a
    learned range ``r`` (``log_r`` is the parameter), STE on round, its own autograd."""

    method_name = "toy"
    params = (Param("init_range", "float", 3.0, "Initial range r (units of the input).",
                    low=0.0, low_open=True),)

    def __init__(self, bits: int = 4, signed: bool = True, init_range: float = 3.0):
        super().__init__(signed)
        self._bits = bits
        self.log_r = nn.Parameter(torch.tensor([math.log(self.param("init_range")
                                                         .check(init_range))]))

    @property
    def bits(self) -> int:
        return self._bits

    @property
    def code_range(self):
        n = 2 ** (self._bits - 1) - 1 if self.signed else 2**self._bits - 1
        return (-n if self.signed else 0), n

    @property
    def step_size(self):
        return self.log_r.exp() / self.code_range[1]

    def initialize(self, x):
        self._mark_initialized()

    def int_codes(self, x):
        lo, hi = self.code_range
        s = self.step_size.detach()
        return torch.clamp(torch.round(x / s), lo, hi), s

    def quantize(self, x):
        lo, hi = self.code_range
        s = self.step_size
        return torch.clamp(round_ste(x / s), lo, hi) * s


@pytest.fixture
def toy():
    """The registry with the toy method; restored afterwards."""
    saved = dict(registry._ensure_loaded())
    register_method(ToyQuantizer)
    yield ToyQuantizer
    registry._METHODS.clear()
    registry._METHODS.update(saved)


def test_builtins_come_from_the_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert {"lsq", "nipq", "tempering"} <= set(eps)  # pyproject.toml, installed
    for name, cls in (("lsq", LSQQuantizer), ("nipq", NIPQQuantizer),
                      ("tempering", TemperingQuantizer)):
        assert eps[name].load() is cls is get_method(name) is METHODS[name]
    assert method_names() == ("lsq", "nipq", "tempering")


def test_fallback_without_metadata_registers_each_builtin_once(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_LOADED", [])
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert method_names() == ("lsq", "nipq", "tempering")
    assert get_method("lsq") is LSQQuantizer
    register_method(LSQQuantizer)  # the same class again: nothing happens
    assert len(METHODS) == 3


def test_a_broken_plugin_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_LOADED", [])
    broken = EntryPoint("broken", "no_such_module_qtrainer:Thing", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [broken])
    with pytest.warns(RuntimeWarning, match="broken"):
        assert "lsq" in method_names()
    assert "broken" not in METHODS


def test_unknown_method_close_match_and_conflicts():
    with pytest.raises(ValueError, match="unknown quantization method 'lsqq'.*did you mean 'lsq'"):
        make_quantizer("lsqq", 4, True, "input")

    class Other(LSQQuantizer):
        method_name = "lsq"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Other)

    class Bad(LSQQuantizer):
        method_name = "bad"
        params = (Param("missing", "int", 1, "not a constructor argument"),)

    with pytest.raises(ValueError, match="missing"):
        register_method(Bad)
    with pytest.raises(TypeError):
        register_method(nn.Linear)


def test_declarations_are_plain_data():
    described = describe_methods()
    assert json.loads(json.dumps(described)) == described  # no torch objects
    assert described["nipq"]["hard_phase"] and described["nipq"]["learnable_bits"]
    assert not described["lsq"]["hard_phase"]
    params = {p["name"]: p for p in described["tempering"]["params"]}
    assert params["lambda_0"]["target"] == params["k"]["target"] == "schedule"
    assert params["noise"]["choices"] == ["error", "uniform_step"]
    assert params["grad_scale"]["target"] == "quantizer"
    lsq = {p.name: p for p in LSQQuantizer.params}
    assert lsq["init_percentile"].describe_range() == "(0.0, 100.0]"
    with pytest.raises(ValueError, match="init_percentile"):
        lsq["init_percentile"].check(0.0)
    assert lsq["init_percentile"].check(50) == 50.0
    with pytest.raises(ValueError, match="per_channel"):
        lsq["per_channel"].check(1)
    # every declared quantizer parameter builds a quantizer with its default
    for name in method_names():
        cls = get_method(name)
        defaults = {p.name: p.default for p in cls.params if p.target == "quantizer"}
        assert isinstance(make_quantizer(name, 4, True, "weight", 8, **defaults), cls)


def test_make_quantizer_per_role():
    w = make_quantizer("lsq", 4, True, "weight", 8, per_channel=True, grad_scale="per_sample")
    assert w.per_channel and w.step.shape == (8,) and w.grad_scale == "numel"
    a = make_quantizer("lsq", 4, False, "input", per_channel=True, grad_scale="per_sample")
    assert not a.per_channel and a.grad_scale == "per_sample"
    assert make_quantizer("nipq", 4, True, "weight").role == "weight"


def test_toy_method_builds_and_trains(toy):
    assert "toy" in method_names() and METHODS["toy"] is toy
    q = make_quantizer("toy", 3, False, "input", init_range=2.0)
    assert isinstance(q, toy) and q.code_range == (0, 7)
    assert not toy.has_fused_plan()  # its own autograd: the plain layers run it

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    report = qtrainer.quantize_model(model, method="toy", weight_bits=4, act_bits=4,
                                     first_last_bits="same", method_kwargs={"init_range": 2.0},
                                     example_input=x[:4])
    assert [r.method for r in report] == ["toy", "toy"]
    quantizers = [q for _, q in qtrainer.named_quantizers(model)]
    assert len(quantizers) == 4 and all(isinstance(q, toy) for q in quantizers)
    qtrainer.initialize_quantizers(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert any(q.log_r.grad is not None and q.log_r.grad.abs().item() > 0 for q in quantizers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="init_range"):
            qtrainer.quantize_model(nn.Sequential(nn.Linear(2, 2)), method="toy",
                                    method_kwargs={"init_range": -1.0}, example_input=x[:1, :2])


class MLPClassifier(pl.LightningModule):
    """What a user writes: an MLP, Adam, a StepLR schedule, accuracy logged."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)]


def _installed_plugin(tmp_path, monkeypatch) -> None:
    """Install this module's ToyQuantizer as a third-party distribution would: a dist-info
    folder on sys.path whose entry point (group ``qtrainer.methods``) names the class; the
    registry is emptied so that it loads every entry point again."""
    dist = tmp_path / "toy_quant_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-quant-plugin\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\ntoy = {ToyQuantizer.__module__}:ToyQuantizer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_METHODS", {})
    monkeypatch.setattr(registry, "_LOADED", [])


def test_a_plugin_method_trains_through_a_recipe(tmp_path, monkeypatch):
    """A method from outside the package (an entry point of another distribution) is a recipe
    choice like the built-ins: its declared parameters are validated with the recipe's errors,
    land in the resolved recipe and reach every quantizer, and the callback trains with it."""
    from lightning import pytorch as pl_
    from torch.utils.data import DataLoader, TensorDataset

    from qtrainer import QuantizationCallback
    from qtrainer.recipes import RecipeError, load_recipe

    _installed_plugin(tmp_path, monkeypatch)
    assert get_method("toy").__name__ == "ToyQuantizer"
    base = {"extends": "lsq-4bit", "name": "toy-w4a4",
            "method": {"name": "toy", "init_range": 1.5}}  # lsq-4bit's bits, phases, LR
    with pytest.raises(RecipeError) as bad:
        load_recipe({**base, "method": {"name": "toy", "init_range": 0}})
    assert bad.value.key_path == "method.init_range" and "(0, inf]" in str(bad.value)
    with pytest.raises(RecipeError, match=r"did you mean 'init_range'\? \(allowed keys in 'method': name, init_range\)"):
        load_recipe({**base, "method": {"name": "toy", "init_rang": 1.0}})
    with pytest.raises(RecipeError, match=r"parameter of lsq and tempering"):
        load_recipe({**base, "method": {"name": "toy", "grad_scale": "numel"}})
    recipe = load_recipe(base)
    assert recipe.to_dict()["method"] == {"name": "toy", "init_range": 1.5}
    assert recipe.surgery_kwargs()["method_kwargs"] == {"init_range": 1.5}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(768, 8, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()  # XOR of two signs: needs the hidden layers
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    val = DataLoader(TensorDataset(x[512:], y[512:]), batch_size=256)
    torch.manual_seed(0)
    module = MLPClassifier()
    trainer = pl_.Trainer(max_epochs=10, callbacks=[QuantizationCallback(recipe=recipe)],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    trainer.fit(module, train, val)
    quantizers = dict(qtrainer.named_quantizers(module))
    assert len(quantizers) == 6 and all(type(q).__name__ == "ToyQuantizer"
                                        for q in quantizers.values())
    inner = [q for name, q in quantizers.items() if name.startswith("net.2.")]
    assert [q.bits for q in inner] == [4, 4]  # the middle layer; first and last at 8
    assert all(abs(q.log_r.item() - math.log(1.5)) > 1e-4 for q in inner)  # r was learned
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)  # the user's optimizer kept
    # a 1-in-2 task: an MLP that learned it is far above 0.5 (chance); 256 validation points
    # put the binomial standard deviation of a 0.5 guesser at 0.031, so 0.75 is 8 sigma above
    assert trainer.callback_metrics["val_acc"].item() > 0.75
