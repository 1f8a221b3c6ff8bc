"""Candidate CIFAR-10 models for the CPU accuracy preset (issue #12 probe; not part of qtrainer).

Every activation is its own nn.ReLU module and every conv/linear is a plain nn.Conv2d/nn.Linear,
as qtrainer's surgery expects.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x):
        return x + self.b(self.a(x))


class ResNet9(nn.Module):
    """DAWNBench ResNet-9 (Page 2018) scaled by ``width`` (64 = the original 6.5M-parameter net):
    prep conv(w) @32, layer1 conv(2w)+pool @16 + residual(2 convs), layer2 conv(4w)+pool @8,
    layer3 conv(8w)+pool @4 + residual(2 convs), global max pool, linear (logits x ``scale``).
    8 convs + 1 linear. ``res1``/``res3`` = False drops that residual pair (a 'ResNet-5')."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 res1: bool = True, res3: bool = True, scale: float = 0.125):
        super().__init__()
        w = width
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w, pool=True), *( [Residual(2 * w)] if res1 else []))
        self.layer2 = conv_bn(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w, pool=True), *( [Residual(8 * w)] if res3 else []))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.scale


def build(name: str, **kw) -> nn.Module:
    import qtrainer.models as qm

    if name == "resnet9":
        return ResNet9(**kw)
    return qm.build_model({"name": name, **kw}, num_classes=10, input_shape=(3, 32, 32))


def describe(model: nn.Module) -> dict:
    """Parameters, conv/linear layer count, MACs and conv-input elements per image."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    macs, acts = [0], [0]

    def hook(m, inp, out):
        acts[0] += inp[0][0].numel()
        macs[0] += m.weight.numel() * (out[0, 0].numel() if out.dim() > 2 else 1)

    hs = [m.register_forward_hook(hook) for m in layers]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    model.train(was)
    for h in hs:
        h.remove()
    return {"params": sum(p.numel() for p in model.parameters()), "qlayers": len(layers),
            "mmacs": macs[0] / 1e6, "act_k": acts[0] / 1e3}
