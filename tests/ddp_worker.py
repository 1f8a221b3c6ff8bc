"""Run by test_ddp.py as a script: 2-process DDP on CPU (gloo) with the callback.

Each rank saves its quantizer parameters after initialization and after training to
``OUT/rank{r}_{when}.pt``. Usage: python tests/ddp_worker.py OUT RECIPE
"""

import sys
from pathlib import Path

import torch
from lightning import pytorch as pl

sys.path.insert(0, str(Path(__file__).parent))
from lit_helpers import LitCNN, cifar_tensors  # noqa: E402

from qtrainer import named_quantizers  # noqa: E402
from qtrainer.callback import QuantizationCallback  # noqa: E402


def quantizer_state(module):
    return {f"{n}.{k}": v.detach().clone() for n, q in named_quantizers(module)
            for k, v in q.state_dict().items()}


class Dump(pl.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:  # right after the callback's initialization
            torch.save(quantizer_state(pl_module), self.out / f"rank{trainer.global_rank}_init.pt")

    def on_train_end(self, trainer, pl_module):
        torch.save(quantizer_state(pl_module), self.out / f"rank{trainer.global_rank}_end.pt")
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                   self.out / f"rank{trainer.global_rank}_model.pt")


def assert_ranks_agree(out: Path, skip=lambda key: False) -> None:
    """The two ranks' saved states (quantizers at init and end, the whole module) are equal,
    key by key (``skip(key)`` leaves a key out)."""
    for when in ("init", "end", "model"):
        r0 = torch.load(out / f"rank0_{when}.pt", weights_only=True)
        r1 = torch.load(out / f"rank1_{when}.pt", weights_only=True)
        assert r0.keys() == r1.keys() and len(r0) > 0
        for k in r0:
            assert skip(k) or torch.equal(r0[k], r1[k]), (when, k)


def main(out: Path, recipe: str):
    torch.set_num_threads(1)  # two processes on two cores
    pl.seed_everything(0)
    train = cifar_tensors("train", 40)
    loader = torch.utils.data.DataLoader(train, batch_size=50, shuffle=True)
    over = {"phases.epochs": 2, "optimizer.lr": 0.05, "lr_schedule.warmup_epochs": 0}
    if recipe.startswith("nipq"):  # one noise epoch, then the hard phase with BN re-estimation
        over.update({"phases.hard_epochs": 1, "phases.bn_reestimation_batches": 2})
    cb = QuantizationCallback(recipe, overrides=over)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
                         callbacks=[cb, Dump(out)], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LitCNN(width=8), loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
