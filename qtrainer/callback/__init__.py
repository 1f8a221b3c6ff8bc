"""The Lightning side of QAT: :class:`QuantizationCallback` (:mod:`.quantization`) and what it
uses: optimizer groups and schedules (:mod:`.optimizers`), fault checks (:mod:`.faults`) and
batch helpers (:mod:`.batches`)."""

from .batches import batch_input, peek_batch, set_loader_epoch
from .faults import QuantizationFault
from .quantization import PHASE_HARD, PHASE_NOISE, QuantizationCallback

__all__ = ["PHASE_HARD", "PHASE_NOISE", "QuantizationCallback", "QuantizationFault",
           "batch_input", "peek_batch", "set_loader_epoch"]
