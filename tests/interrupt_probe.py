"""The ``qtrainer`` CLI, paused at a chosen training batch until a signal ends it, for
tests/test_interrupt.py:

    QTRAINER_PAUSE_AT=EPOCH:BATCH QTRAINER_PAUSE_MARKER=FILE python tests/interrupt_probe.py run RUN.yaml

At the end of batch BATCH of epoch EPOCH (both 0-based) the run writes FILE and waits there
for the test's signal (SIGKILL, or SIGINT: Python raises KeyboardInterrupt in the wait, as
after a Ctrl-C). So the signal lands at a batch boundary the test chose, on any machine,
however fast; a run still waiting after 600 s exits with code 3.
"""

import os
import signal
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from qtrainer.cli import app
from qtrainer.run import runner

EPOCH, BATCH = (int(v) for v in os.environ["QTRAINER_PAUSE_AT"].split(":"))
MARKER = Path(os.environ["QTRAINER_PAUSE_MARKER"])


class PauseForSignal(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) != (EPOCH, BATCH):
            return
        MARKER.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(3)


runner.EXTRA_CALLBACKS.append(PauseForSignal)
# A run started from a background job of a non-interactive shell inherits SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler: restore it, as an interactive Ctrl-C has.
signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    sys.exit(app())
