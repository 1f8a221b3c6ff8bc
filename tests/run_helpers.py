"""Helpers shared by the CLI, QTrainer and untrusted-file tests: the CLI invoked in-process,
tiny run files on digits, and a SmallCNN trained in full precision on digits."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from qtrainer.cli import app
from qtrainer.data import load_digits_split
from qtrainer.models import SmallCNN

_RUNNER = CliRunner()


def invoke(*args):
    """``qtrainer ARGS`` in this process; torch's thread count and the SIGINT handler (which
    Lightning replaces after a Ctrl-C) are restored afterwards."""
    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    try:
        return _RUNNER.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, handler)


def write_run_file(folder: Path, **raw) -> Path:
    """``folder/run.yaml`` holding ``raw`` (a run-file mapping) as YAML."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_digits_cnn(width: int, epochs: int, weight_decay: float = 0.0,
                     one_cycle: bool = False) -> SmallCNN:
    """A ``SmallCNN(in_channels=1, num_classes=10, width)`` trained on digits' training split
    (seed 0) with SGD(lr 0.1, momentum 0.9) in batches of 64, one thread; returned in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        x, y = load_digits_split(seed=0)[0].tensors
        model = SmallCNN(in_channels=1, num_classes=10, width=width)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, 0.1, total_steps=epochs * math.ceil(len(x) / 64)) if one_cycle else None
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)
