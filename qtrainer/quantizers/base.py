"""The common interface of qtrainer's quantizers, the declaration of a method's parameters,
and the autograd pieces they share.

A quantizer is an ``nn.Module`` mapping a float tensor to its fake-quantized value (same shape,
same dtype). Every quantizer exposes:

- ``bits``: the current integer bit-width (int), ``signed``: whether codes can be negative;
- ``step_size``: the scale between integer codes (a tensor, shape ``[1]``, per channel or per
  group: :mod:`qtrainer.quantizers.granularity`);
- ``initialize(x)``: data-driven initialization of its parameters from a tensor;
- ``int_codes(x) -> (codes, scale)``: integer codes (float tensor holding integers, shaped
  like ``x``) and the scale such that ``formulas.dequantize(codes, scale)`` (``codes * scale``
  for one step or one per channel) equals the eval output exactly;
- ``hard``: when True the quantizer always applies hard quantization (no training noise);
  ``set_hard(flag)`` switches it. ``enabled = False`` turns the quantizer into the identity.

A quantizer class is a method plug-in (see :mod:`qtrainer.quantizers.registry`): it declares
``method_name``, its recipe parameters ``params`` (:class:`Param`, plain data), whether it has
a noise-then-hard phase (``hard_phase``) and learnable bit-widths (``learnable_bits``); it
implements its training and eval forward with their backward in :meth:`Quantizer.quantize`
and, optionally, :meth:`Quantizer.fused_plan` (its forward as a call of one of the fused op
contracts of :mod:`qtrainer.quantizers.ops`).

Quantization math runs in fp32 whatever the input dtype (bf16/fp16 autocast) and the result is
cast back to the input dtype.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import ops as _ops

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
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}{hint}")
    return value


PARAM_TYPES = ("bool", "int", "float", "str")
PARAM_TARGETS = ("quantizer", "schedule")


@dataclass(frozen=True)
class Param:
    """One recipe parameter of a quantization method, as plain data (no torch objects), so the
    recipe layer can build its validation from it.

    Attributes:
        name: the key (for ``target="quantizer"`` also the constructor argument's name).
        type: ``"bool"``, ``"int"``, ``"float"`` (ints accepted) or ``"str"``.
        default: the value when the recipe does not set it.
        doc: one sentence with the meaning and the unit.
        choices: the allowed values (empty: any value of the type).
        low, high: bounds for numbers (None: unbounded), inclusive unless ``low_open`` /
            ``high_open``.
        target: ``"quantizer"`` (a constructor argument of every quantizer of the method) or
            ``"schedule"`` (read by a training-time schedule, e.g. tempering's ``lambda_0``).
    """

    name: str
    type: str
    default: Any
    doc: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    target: str = "quantizer"

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ValueError(f"Param {self.name!r}: type={self.type!r}; allowed: {PARAM_TYPES}")
        if self.target not in PARAM_TARGETS:
            raise ValueError(f"Param {self.name!r}: target={self.target!r}; "
                             f"allowed: {PARAM_TARGETS}")
        self.check(self.default)

    def as_dict(self) -> dict:
        """The declaration as a JSON-compatible dict."""
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d

    def describe_range(self) -> str:
        lo = "-inf" if self.low is None else repr(self.low)
        hi = "inf" if self.high is None else repr(self.high)
        return f"{'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def check(self, value):
        """``value`` if it is valid for this parameter (a float parameter returns a float),
        else ``ValueError`` naming the parameter, the value and what is allowed."""
        if self.choices:
            return check_choice(self.name, value, tuple(self.choices))
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[self.type]
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.type != "bool"):
            raise ValueError(f"{self.name}={value!r} must be of type {self.type}")
        if self.type in ("int", "float"):
            bad_lo = self.low is not None and (value <= self.low if self.low_open
                                               else value < self.low)
            bad_hi = self.high is not None and (value >= self.high if self.high_open
                                                else value > self.high)
            if bad_lo or bad_hi or value != value:
                raise ValueError(f"{self.name}={value!r} must be a number in "
                                 f"{self.describe_range()}")
        return float(value) if self.type == "float" else value


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
    """Base class of every quantization method: bookkeeping shared by all (enable/hard
    switches, init flag) and the plug-in declaration (class attributes below)."""

    method_name: ClassVar[str] = ""
    """The method's name in recipes and ``make_quantizer`` (a Python identifier)."""
    params: ClassVar[tuple[Param, ...]] = ()
    """The method's recipe parameters."""
    hard_phase: ClassVar[bool] = False
    """Trains with noise first, then switches to hard quantization (``set_hard``) for a final
    phase (NIPQ)."""
    learnable_bits: ClassVar[bool] = False
    """Can learn its bit-width (mixed precision)."""

    def __init__(self, signed: bool):
        super().__init__()
        self.signed = bool(signed)
        self.enabled = True
        self.hard = False
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False  # Python mirror of ``initialized`` (no device sync per forward)

    @classmethod
    def param(cls, name: str) -> Param:
        """The declared :class:`Param` called ``name``."""
        return next(p for p in cls.params if p.name == name)

    @classmethod
    def build(cls, bits: int, signed: bool, role: str, channels: int | None = None,
              shape: tuple[int, ...] | None = None, **params) -> Quantizer:
        """The quantizer of this method for a weight tensor (``role="weight"``, ``channels``
        its output channels, ``shape`` its shape) or an activation site (``role="input"``);
        ``params`` are constructor arguments. The default passes ``role``, ``channels`` and
        ``shape`` on only where the constructor takes them."""
        accepted = inspect.signature(cls).parameters
        site = {k: v for k, v in (("role", role), ("channels", channels), ("shape", shape))
                if k in accepted}
        return cls(bits=bits, signed=signed, **site, **params)

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

    def fused_plan(self, x: torch.Tensor):
        """This quantizer's current forward on ``x`` (fp32) as one call of a fused op contract
        (:class:`qtrainer.quantizers.ops.Plan`), drawing its noise seed now; None (the
        default) for a method without one."""
        return None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize an fp32 tensor: the method's training forward (noise where it has
        one) or eval forward, with its backward. The default runs :meth:`fused_plan`."""
        plan = self.fused_plan(x)
        if plan is None:  # pragma: no cover - a plug-in must implement one of the two
            raise NotImplementedError(f"{type(self).__name__} implements neither quantize nor "
                                      "fused_plan")
        return _ops.apply(x, plan)

    @classmethod
    def has_fused_plan(cls) -> bool:
        """True when :meth:`fused_plan` describes this class's forward: some class defines it,
        and that class is the one defining :meth:`quantize` or a subclass of it (a subclass
        that overrides only ``quantize`` keeps its own code)."""
        def owner(name):
            return next(k for k in cls.__mro__ if name in vars(k))

        plan = owner("fused_plan")
        return plan is not Quantizer and issubclass(plan, owner("quantize"))

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
