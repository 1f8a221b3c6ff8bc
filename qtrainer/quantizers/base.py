"""The common interface of qtrainer's quantizers and the autograd pieces they share.

A quantizer is an ``nn.Module`` mapping a float tensor to its fake-quantized value (same shape,
same dtype). Every quantizer exposes:

- ``bits``: the current integer bit-width (int), ``signed``: whether codes can be negative;
- ``step_size``: the scale between integer codes (a tensor, shape ``[1]`` or per channel);
- ``initialize(x)``: data-driven initialization of its parameters from a tensor;
- ``int_codes(x) -> (codes, scale)``: integer codes (float tensor holding integers) and the
  scale such that ``codes * scale`` equals the eval output exactly;
- ``hard``: when True the quantizer always applies hard quantization (no training noise);
  ``set_hard(flag)`` switches it. ``enabled = False`` turns the quantizer into the identity.

Quantization math runs in fp32 whatever the input dtype (bf16/fp16 autocast) and the result is
cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn

BITS_RANGE = (2, 16)


def check_bits(name: str, value) -> int:
    """Validate a bit-width argument: an int in 2..16 (bools rejected)."""
    lo, hi = BITS_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is not a valid bit-width; allowed: integers {lo}..{hi}")
    return value


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    """Validate a string option against its allowed values, suggesting a close match."""
    if value not in allowed:
        import difflib

        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}{hint}")
    return value


class RoundSTE(torch.autograd.Function):
    """``torch.round`` (half to even) whose gradient is taken as 1 (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(x)


class Quantizer(nn.Module):
    """Base class: bookkeeping shared by all methods (enable/hard switches, init flag)."""

    def __init__(self, signed: bool):
        super().__init__()
        self.signed = bool(signed)
        self.enabled = True
        self.hard = False
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # Python mirror of ``initialized`` (no device sync per forward)

    # -- interface every method implements -------------------------------------------------
    @property
    def bits(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def step_size(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def initialize(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def int_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def quantize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Fake-quantize an fp32 tensor (the method's math; training noise if applicable)."""
        raise NotImplementedError

    # -- shared behaviour ------------------------------------------------------------------
    @property
    def code_range(self) -> tuple[int, int]:
        """Inclusive (min, max) integer code at the current bit-width."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def noisy(self) -> bool:
        """True when the forward applies the training behaviour rather than hard quantization."""
        return self.training and not self.hard

    def set_hard(self, flag: bool = True) -> None:
        self.hard = bool(flag)

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._ready = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._ready:
            with torch.no_grad():
                self.initialize(x.detach())
        return self.quantize(x.float()).to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A full-precision state dict has no quantizer entries: keep this quantizer as it is
        # (uninitialized) instead of reporting its keys as missing.
        own = [prefix + k for k in (*self._parameters, *self._buffers)]
        if not any(k in state_dict for k in own):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._ready = bool(self.initialized)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"
