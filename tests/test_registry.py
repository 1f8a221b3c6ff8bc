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
