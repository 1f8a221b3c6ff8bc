"""Model zoo and the ``build_model`` factory.

All models map a float32 batch N × C × H × W (``MLP``: any N × ...) to logits N × num_classes.
Every activation is its own (not in-place) ``nn.ReLU`` module, so per-layer activation
quantizers can be attached to them. No weights are ever downloaded: pretrained weights come
from a local checkpoint (:func:`load_checkpoint_weights`).
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import pickle
import zipfile
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint_files import load_error_reason
from .class_path import import_class
from .transformer_models import SequenceClassifier, VisionTransformer


class ShortcutA(nn.Module):
    """Option-A residual shortcut (He et al. 2016): subsample by ``stride`` and zero-pad channels.

    Maps N × in_channels × H × W to N × out_channels × ceil(H/stride) × ceil(W/stride); the
    new channels (split evenly before and after the old ones) are zeros. No parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU (CIFAR ResNet block)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        same = stride == 1 and in_channels == out_channels
        self.shortcut = nn.Identity() if same else ShortcutA(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs (He et al. 2016, section 4.2) with option-A shortcuts.

    ``depth = 6n + 2``: a 3×3 conv with 16 channels, three stages of ``n`` basic blocks with
    16/32/64 channels (stages 2 and 3 start with stride 2), global average pooling and a linear
    classifier. Conv and linear weights use He (Kaiming normal) initialization.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for 32×32 inputs (0.27M parameters with 10 classes)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for 32×32 inputs (0.85M parameters with 10 classes)."""
    return CifarResNet(56, num_classes, in_channels)


class SmallCNN(nn.Module):
    """Three conv3×3-BN-ReLU layers (``width``, 2×, 4× channels; the last two with stride 2),
    global average pooling and a linear classifier. Works for any input of at least 5×5
    pixels, e.g. 8×8×1 digits or 32×32×3 CIFAR; fast enough to train on a CPU.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        layers, channels = [], in_channels
        for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            conv = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
            layers += [conv, nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _conv_bn_relu(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    """conv3×3 (no bias), optional 2×2 max pool, BN, ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.BatchNorm2d(out_channels), nn.ReLU())


class _Residual(nn.Module):
    """``x + b(a(x))`` with two conv-BN-ReLU layers of ``channels`` channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.a, self.b = _conv_bn_relu(channels, channels), _conv_bn_relu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class ResNet9(nn.Module):
    """The DAWNBench ResNet-9 (Page 2018, "How to train your ResNet") scaled by ``width``
    (64 is the original 6.5M-parameter net; 16 has 0.41M parameters and 24 M MACs per 32×32
    image): prep conv (``width``) at full resolution; conv (2×) + pool + a residual pair; conv
    (4×) + pool; conv (8×) + pool + a residual pair; global max pool; a bias-free linear
    classifier whose logits are multiplied by ``LOGIT_SCALE`` (as in the original). 8 convs and
    1 linear layer; inputs N × ``in_channels`` × H × W with H, W divisible by 8.
    """

    LOGIT_SCALE = 0.125

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.prep = _conv_bn_relu(in_channels, w)
        self.layer1 = nn.Sequential(_conv_bn_relu(w, 2 * w, pool=True), _Residual(2 * w))
        self.layer2 = _conv_bn_relu(2 * w, 4 * w, pool=True)
        self.layer3 = nn.Sequential(_conv_bn_relu(4 * w, 8 * w, pool=True), _Residual(8 * w))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8 * w, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.LOGIT_SCALE


class MLP(nn.Module):
    """Flatten, then Linear-ReLU for each width in ``hidden`` (an int or a sequence), then a
    linear classifier. Input: N × ... with ``in_features`` values per sample.
    """

    def __init__(self, in_features: int, hidden: int | Sequence[int] = 256, num_classes: int = 10):
        super().__init__()
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in widths:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet9": ResNet9,
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "vit": VisionTransformer,
    "sequence_transformer": SequenceClassifier,
}


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    import torchvision

    def factory(num_classes: int = 1000, **kwargs) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    return factory


def _accepts(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _import(class_path: str) -> Callable[..., nn.Module]:
    return import_class(class_path, "model.class_path")


def build_model(
    spec: dict, *, num_classes: int | None = None, input_shape: Sequence[int] | None = None
) -> nn.Module:
    """Build the model described by a recipe's ``model:`` section.

    Either ``name`` (a built-in: ``resnet20``, ``resnet56``, ``resnet9``, ``small_cnn``, ``mlp``,
    ``vit``, ``sequence_transformer``; or a
    torchvision classification model such as ``resnet18``, ``mobilenet_v2``, built with
    ``weights=None``) with its constructor arguments as further keys, or ``class_path``
    (``package.module.ClassName``, imported from exactly that module) with ``init_args``.
    An optional ``checkpoint`` key loads weights with :func:`load_checkpoint_weights`.

    ``num_classes`` and ``input_shape`` (C, H, W), normally taken from the data, fill the
    constructor arguments ``num_classes``, ``in_channels`` (C) and ``in_features`` (C·H·W)
    where the constructor takes them (torchvision models: ``num_classes`` only); a differing
    value given in ``spec`` is an error.
    """
    spec = dict(spec)
    checkpoint = spec.pop("checkpoint", None)
    derived = {"num_classes": num_classes}
    if input_shape is not None:
        derived.update(in_channels=int(input_shape[0]), in_features=math.prod(input_shape))
    if "class_path" in spec:
        if "name" in spec:
            raise ValueError("model: give either name or class_path, not both")
        label = spec.pop("class_path")
        kwargs = dict(spec.pop("init_args", None) or {})
        if spec:
            raise ValueError(
                f"model.{next(iter(spec))} is not a valid key with model.class_path; "
                "allowed: class_path, init_args, checkpoint"
            )
        factory = _import(label)
    elif "name" in spec:
        label = spec.pop("name")
        kwargs = spec
        if label in BUILTIN_MODELS:
            factory = BUILTIN_MODELS[label]
        elif label in _torchvision_models():
            if "weights" in kwargs:
                raise ValueError(
                    "model.weights is not supported (no downloads); "
                    "give a local model.checkpoint instead"
                )
            factory = _torchvision_factory(label)
            derived = {"num_classes": num_classes}
        else:
            allowed = list(BUILTIN_MODELS) + _torchvision_models()
            close = difflib.get_close_matches(str(label), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"model.name={label!r} is not a known model; allowed: {', '.join(BUILTIN_MODELS)}, "
                "a torchvision classification model (resnet18, mobilenet_v2, ...), "
                f"or give model.class_path{hint}"
            )
    else:
        raise ValueError("model: give name (a built-in or torchvision model) or class_path")
    for key, value in derived.items():
        if value is None or not _accepts(factory, key):
            continue
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"model.{key}={kwargs[key]!r} but the data gives {key}={value!r}")
        kwargs[key] = value
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise ValueError(f"model {label!r}: bad arguments {sorted(kwargs)}: {e}") from None
    if checkpoint is not None:
        load_checkpoint_weights(model, checkpoint)
    return model


def _strip_prefix(state: dict, model_keys: set[str]) -> dict:
    """The entries under the prefix (e.g. ``model.``) most often found before a model key,
    with that prefix removed."""
    counts: dict[str, int] = {}
    for key in state:
        matches = [key[: len(key) - len(m)] for m in model_keys if key.endswith(m)]
        matches = [p for p in matches if p == "" or p.endswith(".")]
        if matches:
            prefix = min(matches, key=len)
            counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return state
    prefix = max(counts, key=counts.get)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_checkpoint_weights(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    Accepts a raw state dict, a Lightning checkpoint (its ``state_dict``) saved with
    ``torch.save``, or a ``.safetensors`` file; loads on the CPU with ``weights_only=True``.
    Keys may carry a prefix (``model.``, ``module.``, ``_orig_mod.``): the prefix under which
    most entries end in one of the model's keys is stripped and entries without it (e.g. a
    Lightning module's other submodules) are ignored. Raises FileNotFoundError or ValueError
    (unreadable/truncated file, missing or unexpected keys with ``strict``, mismatched shapes).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile
    ) as e:
        raise ValueError(
            f"could not read checkpoint {path!r} (truncated or not a PyTorch file?): "
            f"{load_error_reason(e)}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {path!r} holds no state dict of tensors (nor a 'state_dict' entry)"
        )
    model_state = model.state_dict()
    state = _strip_prefix(state, set(model_state))
    missing = sorted(set(model_state) - set(state))
    unexpected = sorted(set(state) - set(model_state))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {path!r} does not match the model: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    shapes = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    if shapes:
        k = shapes[0]
        raise ValueError(
            f"checkpoint {path!r}: {len(shapes)} tensors have the wrong shape, e.g. {k}: "
            f"{tuple(state[k].shape)} in the file, {tuple(model_state[k].shape)} in the model"
        )
    model.load_state_dict(state, strict=strict)
    return model
