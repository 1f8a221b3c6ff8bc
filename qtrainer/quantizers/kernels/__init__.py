"""Fused Triton kernels for the quantizers' training forward and backward.

Nothing here imports Triton at import time: :func:`available` only checks that the package is
installed, and the kernel modules are imported on first use (so ``TRITON_INTERPRET=1`` set by a
test before the first kernel call still takes effect). The kernels operate on the flat storage
of dense tensors (contiguous or channels_last), compute in fp32 whatever the input dtype, and
reduce parameter gradients in the backward kernel itself (per-block fp32 partial sums, added in
a fixed order by the last block to finish), so a backward is one launch.

- :mod:`.triton_step`: the ``step`` contract (LSQ, noise tempering; noise drawn in the kernel
  from a seed tensor).
- :mod:`.triton_nipq`: the ``nipq_noise`` (uniform or histogram noise) and ``nipq_hard``
  contracts.

Use them through :mod:`qtrainer.quantizers.ops`, not directly.
"""

from __future__ import annotations

import importlib.util
import os

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """True when the ``triton`` package is installed (nothing is imported)."""
    return _HAS_TRITON


def interpreting() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def step():
    """The ``step`` contract's kernel module (imports Triton)."""
    from . import triton_step

    return triton_step


def nipq():
    """The NIPQ kernel module (imports Triton)."""
    from . import triton_nipq

    return triton_nipq


__all__ = ["available", "interpreting", "nipq", "step"]
