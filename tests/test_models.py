"""Tests of qtrainer.models: architectures (parameter counts, shapes), build_model, checkpoints."""

import pytest
import torch
from torch import nn

from qtrainer.models import (
    MLP,
    CifarResNet,
    ResNet9,
    ShortcutA,
    SmallCNN,
    build_model,
    load_checkpoint_weights,
    resnet20,
    resnet56,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_and_shapes():
    model = resnet20()
    # 0.27M as in He et al. (2016), Table 6: convs + BN + 64×10 classifier.
    assert n_params(model) == 269_722
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 19
    assert n_params(resnet20(num_classes=100)) == 269_722 + 90 * 65
    assert resnet20(num_classes=7, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_resnet56_parameter_count():
    model = resnet56()
    assert n_params(model) == 853_018  # 0.85M
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 55


def test_option_a_shortcut_is_parameter_free_zero_padding():
    model = resnet20()
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # at the two stride-2 stage transitions
    assert all(n_params(s) == 0 and not list(s.buffers()) for s in shortcuts)
    x = torch.randn(2, 16, 32, 32)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_cifar_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_activations_are_distinct_modules():
    relus = [m for m in resnet20().modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert len({id(m) for m in relus}) == len(relus)


def test_resnet9_parameter_count_layers_and_surgery():
    """DAWNBench ResNet-9 at width w: 8 bias-free 3x3 convs (w, 2w, 2w, 2w, 4w, 8w, 8w, 8w
    output channels) with a BN each, a bias-free 8w -> classes linear."""
    def count(w, c_in=3, classes=10):
        convs = [(c_in, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w),
                 (4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]
        return sum(9 * a * b + 2 * b for a, b in convs) + 8 * w * classes

    model = ResNet9(width=16)
    assert n_params(model) == count(16) == 412_944
    assert n_params(ResNet9(in_channels=1, num_classes=7, width=8)) == count(8, 1, 7)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 8 and len({id(m) for m in relus}) == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    built = build_model({"name": "resnet9", "width": 8}, num_classes=5, input_shape=(1, 32, 32))
    assert built.prep[0].in_channels == 1 and built.fc.out_features == 5

    import qtrainer

    report = qtrainer.quantize_model(model, method="lsq", weight_bits=2, act_bits=2,
                                     example_input=torch.randn(1, 3, 32, 32))
    positions = {r.name: r.position for r in report}
    assert len(report) == 9 and positions["prep.0"] == "first" and positions["fc"] == "last"
    # every conv after the first sees a ReLU output (unsigned), the first the signed image
    assert [r.signed_input for r in report] == [True] + [False] * 8
    # MACs per 32x32 image: each conv at its input resolution (the pool follows the conv):
    # prep 3->16 at 32x32, five 3x3 convs of 4.72 M each, the 128 x 10 linear
    assert sum(r.macs for r in report) == 9 * 3 * 16 * 32 * 32 + 5 * 9 * 16 * 32 * 32 ** 2 + 1280


def test_small_cnn_and_mlp_shapes():
    assert SmallCNN(1, 10, width=8)(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert SmallCNN()(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    mlp = MLP(64, [32, 16], 10)
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert n_params(mlp) == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


def test_small_cnn_learns_on_cpu():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    model = SmallCNN(1, 2, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_build_model_builtins_take_shape_from_data():
    model = build_model({"name": "small_cnn", "width": 8}, num_classes=5, input_shape=(1, 8, 8))
    assert model.features[0].in_channels == 1 and model.fc.out_features == 5
    mlp = build_model({"name": "mlp", "hidden": 32}, num_classes=10, input_shape=(1, 8, 8))
    assert mlp.net[1].in_features == 64
    resnet = build_model({"name": "resnet20"}, num_classes=10, input_shape=(3, 32, 32))
    assert n_params(resnet) == 269_722


def test_build_model_torchvision_without_weights():
    model = build_model({"name": "resnet18"}, num_classes=10, input_shape=(3, 32, 32))
    assert model.fc.out_features == 10
    assert n_params(model) == 11_181_642
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="model.weights"):
        build_model({"name": "resnet18", "weights": "DEFAULT"})


def test_build_model_class_path():
    spec = {"class_path": "qtrainer.models.SmallCNN", "init_args": {"width": 4}}
    model = build_model(spec, num_classes=3, input_shape=(1, 8, 8))
    assert isinstance(model, SmallCNN) and model.fc.out_features == 3
    # data-derived arguments are passed only where the constructor takes them
    spec = {"class_path": "torch.nn.Linear", "init_args": {"in_features": 4, "out_features": 2}}
    linear = build_model(spec, num_classes=2)
    assert isinstance(linear, nn.Linear)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "resnet2O"}, r"model.name='resnet2O'.*did you mean 'resnet20'"),
        ({"name": "mobilenetv2"}, r"torchvision classification model.*did you mean 'mobilenet_v2'"),
        ({}, "give name"),
        ({"name": "resnet20", "class_path": "x.Y"}, "not both"),
        ({"class_path": "no_such_module_xyz.Model"}, "cannot import module 'no_such_module_xyz'"),
        ({"class_path": "qtrainer.models.NoSuchNet"}, "has no attribute 'NoSuchNet'"),
        ({"class_path": "SmallCNN"}, "package.module.ClassName"),
        ({"class_path": "qtrainer.models.SmallCNN", "width": 3}, "model.width is not a valid key"),
        ({"name": "small_cnn", "depth": 3}, "bad arguments"),
        ({"name": "resnet20", "num_classes": 100}, "num_classes=100 but the data gives .*=10"),
    ],
)
def test_build_model_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec, num_classes=10, input_shape=(3, 32, 32))


def _perturbed() -> nn.Module:
    """A SmallCNN(1, 10, width=4) whose parameters differ from any fresh one."""
    other = SmallCNN(1, 10, width=4)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    return other


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_raw_state_dict_and_lightning_checkpoint(tmp_path):
    source = SmallCNN(1, 10, width=4)
    raw = tmp_path / "raw.pt"
    torch.save(source.state_dict(), raw)
    assert same_state(source, load_checkpoint_weights(_perturbed(), raw))

    # Lightning layout: the module's attribute prefix, other top-level entries, other submodules.
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["criterion.weight"] = torch.ones(10)  # outside the model's prefix: ignored
    lightning = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": state, "optimizer_states": []}, lightning)
    assert same_state(source, load_checkpoint_weights(_perturbed(), lightning))

    state["model.fc.step_size"] = torch.ones(1)  # e.g. a quantizer's state: not in a plain model
    torch.save({"state_dict": state}, lightning)
    with pytest.raises(ValueError, match=r"1 unexpected keys \['fc.step_size'\]"):
        load_checkpoint_weights(_perturbed(), lightning)
    load_checkpoint_weights(_perturbed(), lightning, strict=False)


def test_load_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = SmallCNN(1, 10, width=4)
    path = tmp_path / "w.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in source.state_dict().items()}, path)
    target = load_checkpoint_weights(_perturbed(), path)
    assert torch.equal(target.features[0].weight, source.features[0].weight)


def test_checkpoint_errors(tmp_path):
    model = SmallCNN(1, 10, width=4)
    with pytest.raises(FileNotFoundError):
        load_checkpoint_weights(model, tmp_path / "missing.pt")
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint_weights(model, truncated)
    with pytest.raises(ValueError, match="wrong shape.*fc.weight"):
        load_checkpoint_weights(SmallCNN(1, 3, width=4), good)
    spec = {"name": "small_cnn", "width": 4, "checkpoint": str(good)}
    assert same_state(model, build_model(spec, num_classes=10, input_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint_weights(resnet20(), good)
