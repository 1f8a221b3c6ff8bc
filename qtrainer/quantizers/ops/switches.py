"""Where the fused ops run and which implementation they use (module state, set from the
environment at import).

- ``QTRAINER_FUSED`` / :func:`set_fused`: ``auto`` (default) or ``on`` (the same): the ops run
  on the backend below and the recomputing layers (:mod:`qtrainer.recompute`) keep only the
  un-quantized input for backward, on every device; ``off``: the torch formulas on every
  device and plain layers (autograd keeps each quantized tensor), the reference the fused
  path is compared with.
- ``QTRAINER_KERNELS`` / :func:`set_backend`: ``auto`` (Triton for CUDA tensors when Triton is
  installed, the torch formulas otherwise), ``triton`` (Triton for every tensor: CPU needs
  ``TRITON_INTERPRET=1``) or ``torch``.
"""

from __future__ import annotations

import contextlib
import os

from torch import Tensor

from .. import kernels

FUSED_MODES = ("auto", "on", "off")
BACKENDS = ("auto", "triton", "torch")


def _env(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(value, value)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


_STATE = {"fused": _env("QTRAINER_FUSED", FUSED_MODES),
          "backend": _env("QTRAINER_KERNELS", BACKENDS)}


def set_fused(mode) -> None:
    """Whether quantizers and layers use the fused ops: ``auto``/``on`` (also ``True``) or
    ``off`` (also ``False``)."""
    mode = {True: "on", False: "off"}[mode] if isinstance(mode, bool) else mode
    if mode not in FUSED_MODES:
        raise ValueError(f"fused={mode!r} is not allowed; allowed: {', '.join(FUSED_MODES)}")
    _STATE["fused"] = mode


def set_backend(name: str) -> None:
    """Which implementation the ops run: ``auto``, ``triton`` or ``torch``."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if name == "triton" and not kernels.available():
        raise RuntimeError("backend='triton' needs the triton package")
    _STATE["backend"] = name


def get_options() -> dict:
    """``{"fused": mode, "backend": name}``."""
    return dict(_STATE)


@contextlib.contextmanager
def options(fused=None, backend: str | None = None):
    """Temporarily set :func:`set_fused` and/or :func:`set_backend`."""
    old = get_options()
    try:
        if fused is not None:
            set_fused(fused)
        if backend is not None:
            set_backend(backend)
        yield
    finally:
        _STATE.update(old)


def fused_enabled(x: Tensor) -> bool:
    """True when quantizers and layers should route ``x`` through the fused ops."""
    return _STATE["fused"] != "off"


def use_triton(x: Tensor) -> bool:
    """True when the ops run the Triton kernels for ``x`` (never with ``fused="off"``)."""
    backend = _STATE["backend"]
    if _STATE["fused"] == "off" or backend == "torch" or not kernels.available():
        return False
    return backend == "triton" or x.is_cuda


__all__ = ["BACKENDS", "FUSED_MODES", "fused_enabled", "get_options", "options", "set_backend",
           "set_fused", "use_triton"]
