"""Run by test_ddp_transformer.py as a script: a user's small transformer (token embedding,
nn.TransformerEncoder with padding masks, linear head) trained under QuantizationCallback with
Lightning's DDP on 2 CPU processes (gloo).

Each rank saves its quantizer parameters after initialization and after training, and its
whole state dict, to ``OUT/rank{r}_{when}.pt``; ``OUT/last.ckpt`` is the checkpoint
``trainer.save_checkpoint`` writes. Usage: python tests/ddp_transformer_worker.py OUT STRATEGY
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning import pytorch as pl
from torch import nn

from ddp_worker import Dump
from qtrainer.callback import QuantizationCallback
from qtrainer.data.sequences import majority_token_dataset


class LitTextEncoder(pl.LightningModule):
    """What a user writes: embedding, encoder (padding masked), mean over tokens, head."""

    def __init__(self, vocab: int = 16, width: int = 32, classes: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(width, classes)

    def forward(self, ids):
        pad = ids == 0
        x = self.encoder(self.embed(ids), src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((x * keep).sum(1) / keep.sum(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def main(out: Path, strategy: str):
    torch.set_num_threads(1)  # two processes on two cores
    pl.seed_everything(0)
    loader = torch.utils.data.DataLoader(majority_token_dataset(256, seed=0), batch_size=32,
                                         shuffle=True)
    cb = QuantizationCallback("lsq-4bit", overrides={"phases.epochs": 2})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2,
                         callbacks=[cb, Dump(out)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitTextEncoder(), loader)
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
