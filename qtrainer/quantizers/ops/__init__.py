"""Fused fake quantization: op contracts run by Triton kernels or by the torch formulas.

The layer knows op contracts only (:mod:`.contracts`: ``step``, ``nipq_noise``,
``nipq_hard``), never quantizer classes: a quantizer class maps its forward on a tensor to a
:class:`Plan` (its ``fused_plan`` method), and this package runs it. Noise is a deterministic
function of a seed tensor, so a backward (or a recomputed forward) regenerates it instead of
storing it; the Triton kernels and the torch formulas draw different (equally distributed)
streams from the same seed.

- :mod:`.switches`: where the ops run (``QTRAINER_FUSED``, ``QTRAINER_KERNELS``);
- :mod:`.backends`: Triton or torch per call;
- :mod:`.custom`: the ``torch.library`` custom ops (``torch.compile`` traces them);
- :mod:`.contracts`: the contract table, plans, :func:`apply` and :func:`backward`.
"""

from __future__ import annotations

from .contracts import (CONTRACTS, IDENTITY, Contract, Plan, apply, backward, draw_seed,
                        nipq_lut, recompute, unpack)
from .custom import (nipq_hard_fake_quant, nipq_hard_fake_quant_backward, nipq_noise_fake_quant,
                     nipq_noise_fake_quant_backward, nipq_noise_lut, step_fake_quant,
                     step_fake_quant_backward)
from .switches import (BACKENDS, FUSED_MODES, fused_enabled, get_options, options, set_backend,
                       set_fused, use_triton)

__all__ = [
    "BACKENDS", "CONTRACTS", "Contract", "FUSED_MODES", "IDENTITY", "Plan", "apply", "backward",
    "draw_seed", "fused_enabled", "get_options", "nipq_hard_fake_quant",
    "nipq_hard_fake_quant_backward", "nipq_lut", "nipq_noise_fake_quant",
    "nipq_noise_fake_quant_backward", "nipq_noise_lut", "options", "recompute", "set_backend",
    "set_fused",
    "step_fake_quant", "step_fake_quant_backward", "unpack", "use_triton",
]
