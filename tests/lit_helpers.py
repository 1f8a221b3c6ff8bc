"""A user-style LightningModule and real-image data for the callback tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from lightning import pytorch as pl
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from qtrainer.data import default_cifar10_jpeg_root, load_npz_jpeg, stratified_indices
from qtrainer.models import SmallCNN

MEAN = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
STD = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


def cifar_tensors(split: str, per_class: int, seed: int = 0) -> TensorDataset:
    """A stratified subset of CIFAR-10-JPEG as normalized float tensors N x 3 x 32 x 32."""
    path = default_cifar10_jpeg_root() / f"{split}.npz"
    with np.load(path) as npz:
        labels = npz["labels"]
    images, y, _ = load_npz_jpeg(path, stratified_indices(labels, per_class, seed))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return TensorDataset((x - MEAN) / STD, torch.from_numpy(y))


class LitCNN(pl.LightningModule):
    """What a user writes: a model, a loss, an optimizer (Adam-free SGD), accuracy logged."""

    def __init__(self, width: int = 16, lr: float = 0.05, n_optimizers: int = 1):
        super().__init__()
        self.net = SmallCNN(width=width)
        self.lr = lr
        self.n_optimizers = n_optimizers
        self.automatic_optimization = n_optimizers == 1  # Lightning's rule for several

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        if self.n_optimizers == 1:
            return opt
        return [opt, torch.optim.SGD(self.parameters(), lr=self.lr)]


def quiet_trainer(epochs: int, callbacks: list, **kw) -> pl.Trainer:
    """A deterministic Trainer without logger, checkpoints, progress bar or summary (unless
    ``kw`` turns them on)."""
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, deterministic=True, **kw)


def loaders(train: TensorDataset, val: TensorDataset, batch_size: int = 128):
    """Train batches shuffled per epoch by a seeded, epoch-aware sampler (Lightning calls its
    ``set_epoch``), so a resumed run sees the same batches as an uninterrupted one."""
    sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
    return (DataLoader(train, batch_size=batch_size, sampler=sampler),
            DataLoader(val, batch_size=500))


class DigitsDataModule(pl.LightningDataModule):
    """A user's LightningDataModule (no validation split): scikit-learn's digits, 8x8 gray."""

    num_classes = 10

    def __init__(self, batch_size: int = 64):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from qtrainer.data import load_digits_split

        self.train, self.test = load_digits_split(seed=0)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=self.batch_size)
