"""LightningModules written the way users write them (not the package's models), for the tests of
what QuantizationCallback does to a user's training: a CNN with BatchNorm trained by Adam +
StepLR, SGD + ReduceLROnPlateau, a manual-optimization classifier, a GAN with two optimizers, and
a transformer encoder whose forward takes ``(ids, mask)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import pytorch as pl
from lit_helpers import LitCNN
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ConvNet(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 8, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.body(x))


class AdamStepLR(LitCNN):
    """Adam + StepLR (halves the lr every epoch) on a ConvNet; hyperparameters saved; the
    training/validation/test steps of lit_helpers.LitCNN (cross-entropy, accuracy)."""

    def __init__(self, lr: float = 0.05, width: int = 8, in_channels: int = 3):
        super().__init__(width=width, lr=lr)
        self.save_hyperparameters()
        self.net = ConvNet(in_channels, width)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


class PlateauSGD(AdamStepLR):
    """SGD with two groups (decay on conv/linear weights only) and ReduceLROnPlateau on a
    validation metric that never improves, so the lr halves after every validation but the
    first."""

    def validation_step(self, batch, batch_idx):
        self.log("plateau", 1.0)

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.ndim > 1]
        rest = [p for p in self.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": rest}],
                              lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "plateau"}}


class ManualAdam(AdamStepLR):
    """Manual optimization: Adam stepped by hand, CosineAnnealingLR stepped at each epoch end."""

    def __init__(self, lr: float = 0.01, width: int = 8, in_channels: int = 3):
        super().__init__(lr, width, in_channels)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)]


class GAN(pl.LightningModule):
    """A generator of 3 x 8 x 8 images from ``latent`` noise (``forward(z)``) and a conv
    discriminator, each with its own Adam, trained by hand."""

    def __init__(self, latent: int = 16):
        super().__init__()
        self.latent = latent
        self.automatic_optimization = False
        self.G = nn.Sequential(nn.Linear(latent, 64), nn.ReLU(), nn.Linear(64, 3 * 8 * 8), nn.Tanh())
        self.D = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                               nn.Flatten(), nn.Linear(8 * 4 * 4, 1))

    def forward(self, z):
        return self.G(z).view(-1, 3, 8, 8)

    def training_step(self, batch, batch_idx):
        real = F.avg_pool2d(batch[0], 4).clamp(-1, 1)
        og, od = self.optimizers()
        z = torch.randn(len(real), self.latent)
        fake = self(z)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        d_loss = (F.binary_cross_entropy_with_logits(self.D(real), ones)
                  + F.binary_cross_entropy_with_logits(self.D(fake.detach()), zeros))
        od.zero_grad()
        self.manual_backward(d_loss)
        od.step()
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        og.zero_grad()
        self.manual_backward(g_loss)
        og.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def configure_optimizers(self):
        return (torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999)),
                torch.optim.Adam(self.D.parameters(), lr=1e-4, betas=(0.5, 0.999)))


class TokenClassifier(pl.LightningModule):
    """Embedding + ``nn.TransformerEncoder`` (nested tensors enabled, padding mask) + mean pool
    + linear head; ``forward(ids, mask)`` with ``mask`` True at padding."""

    def __init__(self, vocab: int = 20, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(d, 2)

    def forward(self, ids, mask):
        h = self.encoder(self.emb(ids), src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1))

    def training_step(self, batch, batch_idx):
        ids, mask, y = batch
        loss = F.cross_entropy(self(ids, mask), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, mask, y = batch
        self.log("val_acc", (self(ids, mask).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def token_loaders(n: int = 256, length: int = 12, batch_size: int = 32, seed: int = 0):
    """Sequences of tokens 1..19 padded with 0 to ``length`` (padding at the end); the label
    says whether token 7 occurs. Returns (train, val) loaders of ``(ids, mask, label)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] >= lengths[:, None]
    ids[mask] = 0
    y = (ids == 7).any(1).long()
    data = TensorDataset(ids, mask, y)
    train = DataLoader(torch.utils.data.Subset(data, range(n - 64)), batch_size=batch_size)
    val = DataLoader(torch.utils.data.Subset(data, range(n - 64, n)), batch_size=64)
    return train, val
