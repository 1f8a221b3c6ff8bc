"""Model surgery on torchvision resnet18 / mobilenet_v2, an MLP, a Conv1d model and a model
whose forward takes several inputs and keyword arguments."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import qtrainer
from qtrainer import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear
from qtrainer.surgery import fp_state_dict, initialize_quantizers, quantize_model, set_quantizers


class MultiInput(nn.Module):
    """Registered head-first, runs stem-first: first/last must come from execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 5)
        self.side = nn.Linear(3, 8)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, image, extra, *, scale=1.0):
        h = torch.relu(self.stem(image)).mean(dim=(2, 3))
        h = torch.cat([h, torch.relu(self.side(extra))], dim=1) * scale
        return self.head(h)


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def test_resnet18_counts_first_last_report():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    report = quantize_model(model, example_input=torch.randn(2, 3, 64, 64))
    assert len(report) == 21 and count(model, QuantConv2d) == 20 and count(model, QuantLinear) == 1
    by_name = {r.name: r for r in report}
    assert by_name["conv1"].position == "first" and by_name["fc"].position == "last"
    assert (by_name["conv1"].weight_bits, by_name["conv1"].act_bits) == (8, 8)
    assert (by_name["fc"].weight_bits, by_name["fc"].act_bits) == (8, 8)
    assert by_name["conv1"].signed_input is True  # normalized image
    assert by_name["layer1.0.conv1"].signed_input is False  # after ReLU
    assert by_name["layer1.0.conv2"].signed_input is False
    assert by_name["layer2.0.downsample.0"].signed_input is False
    assert all((r.weight_bits, r.act_bits) == (4, 4) for r in report if not r.position)
    assert by_name["conv1"].weight_numel == 3 * 64 * 7 * 7
    assert by_name["conv1"].macs == 3 * 64 * 49 * 32 * 32  # 64px input -> 32x32 output
    assert by_name["fc"].act_numel == 512
    assert isinstance(model.conv1.input_quantizer, qtrainer.LSQQuantizer)
    assert model.conv1.input_quantizer.signed and not model.layer1[0].conv1.input_quantizer.signed


def test_mobilenet_v2_depthwise_and_nipq_same_first_last():
    model = torchvision.models.mobilenet_v2(num_classes=10)
    n_conv = count(model, nn.Conv2d)
    groups = [m.groups for m in model.modules() if isinstance(m, nn.Conv2d)]
    report = quantize_model(model, method="nipq", first_last_bits="same",
                            example_input=torch.randn(1, 3, 32, 32))
    assert count(model, QuantConv2d) == n_conv == 52 and len(report) == 53
    assert [m.groups for m in model.modules() if isinstance(m, QuantConv2d)] == groups
    assert max(groups) > 1
    assert all((r.weight_bits, r.act_bits) == (4, 4) for r in report)
    assert report[0].name == "features.0.0" and report[0].position == "first"
    assert [r for r in report if r.position == "last"][0].name == "classifier.1"
    assert isinstance(model.features[0][0].weight_quantizer, qtrainer.NIPQQuantizer)
    assert model.features[0][0].weight_quantizer.role == "weight"


def test_execution_order_and_multiple_inputs_with_kwargs():
    model = MultiInput()
    image, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 3)
    ref = model(image, extra, scale=0.5)
    report = quantize_model(model, example_input=(image, extra), example_kwargs={"scale": 0.5},
                            first_last_bits="fp")
    names = {r.name for r in report}
    assert names == {"side"}  # stem ran first, head last: both left FP
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert report[0].signed_input is True  # randn input
    set_quantizers(model, enabled=False)
    assert torch.equal(model(image, extra, scale=0.5), ref)


def test_mlp_and_conv1d():
    model = mlp()
    report = quantize_model(model, weight_bits=3, act_bits=2, example_input=torch.randn(4, 8, 8))
    assert [(r.weight_bits, r.act_bits) for r in report] == [(8, 8), (3, 2), (8, 8)]
    conv = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.ReLU(), nn.Conv1d(4, 1, 1))
    report = quantize_model(conv, method="tempering", example_input=torch.randn(3, 2, 20))
    assert count(conv, QuantConv1d) == 3 and report[1].macs == 4 * 4 * 3 * 16
    assert isinstance(conv[2].input_quantizer, qtrainer.TemperingQuantizer)


def test_disabled_quantizers_give_fp_outputs_and_enabled_differ():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fp = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    quantize_model(model, weight_bits=2, act_bits=2, example_input=x)
    initialize_quantizers(model, x)
    set_quantizers(model, enabled=False)
    assert torch.equal(model(x), fp(x))
    set_quantizers(model, enabled=True)
    assert (model(x) - fp(x)).abs().max() > 1e-3


def test_state_dict_round_trips():
    torch.manual_seed(0)
    fp = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    q = copy.deepcopy(fp)
    quantize_model(q, example_input=x)
    # FP weights load into the quantized model strictly; quantizers stay uninitialized
    q2 = torchvision.models.resnet18(num_classes=10)
    quantize_model(q2, example_input=x)
    q2.load_state_dict(fp.state_dict(), strict=True)
    assert not bool(q2.conv1.input_quantizer.initialized)
    assert torch.equal(q2.layer1[0].conv1.weight, fp.layer1[0].conv1.weight)
    # quantized weights load back into the FP model
    initialize_quantizers(q, x)
    with torch.no_grad():
        q.conv1.weight.add_(0.01)
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(fp_state_dict(q), strict=True)
    assert torch.equal(fresh.conv1.weight, q.conv1.weight)
    # quantized -> quantized keeps every quantizer's state exactly
    q3 = torchvision.models.resnet18(num_classes=10)
    quantize_model(q3, example_input=x)
    q3.load_state_dict(q.state_dict(), strict=True)
    q.eval(), q3.eval()
    assert torch.equal(q3(x), q(x))
    assert bool(q3.conv1.input_quantizer.initialized)


def test_idempotent():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    first = quantize_model(model, example_input=x)
    keys, conv1 = list(model.state_dict()), model.conv1
    second = quantize_model(model, method="nipq", weight_bits=2, example_input=x)
    assert second == first and list(model.state_dict()) == keys and model.conv1 is conv1


def test_keeps_device_and_dtype_and_shares_parameters():
    model = mlp().double()
    w = model[1].weight
    quantize_model(model, example_input=torch.randn(2, 64, dtype=torch.float64))
    assert model[1].weight is w and model[1].weight.dtype == torch.float64
    assert model(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64
    assert model[1].weight_quantizer.step.device == w.device


def test_include_exclude_overrides():
    model = torchvision.models.resnet18(num_classes=10)
    report = quantize_model(model, include=["layer*", "fc"], exclude=["*downsample*"],
                            overrides={"layer4.*": {"weight_bits": 2}, "layer1.0.conv1": {"skip": True},
                                       "layer1.1.conv1": {"signed_input": True, "act_bits": 3}},
                            example_input=torch.randn(1, 3, 32, 32))
    by_name = {r.name: r for r in report}
    assert "conv1" not in by_name and "layer1.0.conv1" not in by_name
    assert not any("downsample" in n for n in by_name)
    assert by_name["layer4.1.conv2"].weight_bits == 2 and by_name["layer3.0.conv1"].weight_bits == 4
    assert by_name["layer1.1.conv1"].signed_input is True and by_name["layer1.1.conv1"].act_bits == 3
    assert by_name["fc"].position == "last" and by_name["fc"].weight_bits == 8


def test_initialize_quantizers_restores_bn_statistics():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    quantize_model(model, example_input=x)
    before = copy.deepcopy(model.bn1.state_dict())
    assert initialize_quantizers(model, x) == 42
    after = model.bn1.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    w = model.layer1[0].conv1.weight
    assert model.layer1[0].conv1.weight_quantizer.step.item() == pytest.approx(
        (2 * w.abs().mean() / 7**0.5).item(), rel=1e-6)
    assert all(bool(q.initialized) for _, q in qtrainer.named_quantizers(model))


@pytest.mark.parametrize("kwargs,words", [
    ({"weight_bits": 1}, ["weight_bits=1", "2..16"]),
    ({"act_bits": 17}, ["act_bits=17", "2..16"]),
    ({"method": "lsqq"}, ["method='lsqq'", "lsq, nipq, tempering", "did you mean 'lsq'"]),
    ({"include": ["layer9.*"]}, ["include", "layer9.*", "matches no"]),
    ({"exclude": ["fcc"]}, ["exclude", "fcc", "fc"]),
    ({"overrides": {"conv2": {"weight_bits": 4}}}, ["overrides", "conv2"]),
    ({"overrides": {"conv1": {"bitz": 4}}}, ["bitz", "weight_bits"]),
    ({"first_last_bits": "full"}, ["first_last_bits", "same, fp"]),
    ({"method_kwargs": {"grad_scal": "none"}}, ["grad_scal", "did you mean 'grad_scale'"]),
    ({"method_kwargs": {"grad_scale": "nope"}}, ["grad_scale='nope'", "numel"]),
    ({"exclude": ["*"]}, ["nothing to quantize"]),
])
def test_bad_input_names_argument_and_leaves_model_untouched(kwargs, words):
    model = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    with pytest.raises(ValueError) as err:
        quantize_model(model, example_input=torch.randn(1, 3, 32, 32), **kwargs)
    for w in words:
        assert w in str(err.value)
    assert list(model.modules()) == modules and count(model, QuantizedLayer) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_with_nothing_to_quantize():
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_model(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
