"""The ``qtrainer`` CLI with probes, for tests/test_cli_ddp.py:

    QTRAINER_PROBE_DIR=DIR python tests/cli_probe.py run FILE [KEY=VALUE ...]

Lightning's DDP launcher starts the other ranks by running this script again (same arguments,
same environment), so every rank is probed:

- each rank saves ``DIR/rank{r}.pt`` at the end of training: its pid, world size, and every
  quantizer parameter and buffer;
- every process appends each file it writes through :mod:`qtrainer.atomic` (checkpoints,
  exports, summary.json, metrics.csv, run.yaml, plots) to ``DIR/writes-{pid}.txt``.
"""

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

import qtrainer.atomic as atomic
from qtrainer.run import runner
from qtrainer.cli import app

PROBE = Path(os.environ["QTRAINER_PROBE_DIR"])


class Probe(Callback):
    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
                 if "_quantizer." in k}
        torch.save({"pid": os.getpid(), "rank": trainer.global_rank,
                    "world_size": trainer.world_size, "quantizers": state},
                   PROBE / f"rank{trainer.global_rank}.pt")


_atomic_path = atomic.atomic_path


def logged_atomic_path(path):
    with open(PROBE / f"writes-{os.getpid()}.txt", "a") as f:
        f.write(f"{os.fspath(path)}\n")
    return _atomic_path(path)


atomic.atomic_path = logged_atomic_path  # atomic_write and the helpers look it up per call
runner.EXTRA_CALLBACKS.append(Probe)

if __name__ == "__main__":
    sys.exit(app())
