"""Test-only models for run files (``model: {class_path: fault_models.NaNAt, ...}``).

``NaNAt`` is qtrainer's SmallCNN whose output turns NaN in training forwards number ``at`` to
``at + count - 1`` (counted from 0, in this process): a loss that diverges at a known optimizer
step, through the whole ``qtrainer run`` path.
"""

import torch

from qtrainer.models import SmallCNN


class NaNAt(SmallCNN):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, at: int = 30,
                 count: int = 1 << 30):
        super().__init__(in_channels=in_channels, num_classes=num_classes, width=width)
        self.at, self.count, self.calls = at, count, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and torch.is_grad_enabled():
            n, self.calls = self.calls, self.calls + 1
            if self.at <= n < self.at + self.count:
                out = out * float("nan")
        return out
