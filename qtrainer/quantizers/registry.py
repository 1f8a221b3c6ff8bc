"""The registry of quantization methods: name -> quantizer class (a method plug-in).

Methods come from the entry point group ``qtrainer.methods`` of every installed distribution,
qtrainer's own ``lsq``, ``nipq`` and ``tempering`` included (``pyproject.toml``), loaded on
first use; built-ins whose entry points are missing (a source tree that was never installed)
are imported directly, once. :func:`register_method` adds a class at run time.

A plug-in package declares::

    [project.entry-points."qtrainer.methods"]
    mymethod = "my_package.module:MyQuantizer"

where ``MyQuantizer`` subclasses :class:`qtrainer.quantizers.Quantizer` and sets
``method_name = "mymethod"`` and ``params`` (see :class:`qtrainer.quantizers.base.Param`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import warnings
from collections.abc import Mapping
from importlib.metadata import entry_points

from .base import Param, Quantizer

ENTRY_POINT_GROUP = "qtrainer.methods"
BUILTINS = {"lsq": "qtrainer.quantizers.lsq:LSQQuantizer",
            "nipq": "qtrainer.quantizers.nipq:NIPQQuantizer",
            "tempering": "qtrainer.quantizers.tempering:TemperingQuantizer"}

_METHODS: dict[str, type[Quantizer]] = {}
_LOADED: list[bool] = []


def _check_class(cls) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise TypeError(f"{cls!r} is not a subclass of qtrainer.quantizers.Quantizer")
    name = cls.method_name
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"{cls.__name__}.method_name={name!r} must be a Python identifier")
    names = [p.name for p in cls.params]
    if not all(isinstance(p, Param) for p in cls.params) or len(set(names)) != len(names):
        raise ValueError(f"{cls.__name__}.params must be Param declarations with unique names")
    accepted = inspect.signature(cls).parameters
    missing = [p.name for p in cls.params if p.target == "quantizer" and p.name not in accepted]
    if missing:
        raise ValueError(f"{cls.__name__}: quantizer parameters {missing} are not arguments of "
                         "its constructor")


def register_method(cls: type[Quantizer]) -> type[Quantizer]:
    """Register quantizer class ``cls`` under ``cls.method_name`` (usable as a decorator).

    Registering the same class again does nothing; another class under a taken name is a
    ``ValueError`` naming both."""
    _check_class(cls)
    old = _METHODS.get(cls.method_name)
    if old is not None and old is not cls:
        raise ValueError(f"method {cls.method_name!r} is already registered by "
                         f"{old.__module__}.{old.__qualname__}; cannot register "
                         f"{cls.__module__}.{cls.__qualname__}")
    _METHODS[cls.method_name] = cls
    return cls


def _load_class(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _ensure_loaded() -> dict[str, type[Quantizer]]:
    """Load the entry points once (a broken plug-in is skipped with a warning), then any
    built-in they did not provide."""
    if not _LOADED:
        _LOADED.append(True)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
                register_method(cls)
            except Exception as exc:  # a third-party plug-in must not break qtrainer
                warnings.warn(f"quantization method entry point {ep.name!r} ({ep.value}) was "
                              f"not loaded: {type(exc).__name__}: {exc}", RuntimeWarning,
                              stacklevel=3)
                continue
            if ep.name != cls.method_name:
                warnings.warn(f"entry point {ep.name!r} provides method {cls.method_name!r}; "
                              "it is registered under the latter", RuntimeWarning, stacklevel=3)
        for name, target in BUILTINS.items():
            if name not in _METHODS:
                register_method(_load_class(target))
    return _METHODS


def get_method(name: str) -> type[Quantizer]:
    """The quantizer class of method ``name``; ``ValueError`` with the known names and a close
    match for an unknown one."""
    methods = _ensure_loaded()
    if name not in methods:
        known = sorted(methods)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown quantization method {name!r}; known: {', '.join(known)}{hint}")
    return methods[name]


def method_names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    return tuple(sorted(_ensure_loaded()))


def describe_methods() -> dict[str, dict]:
    """Every method's declaration as plain data: ``{name: {"class": "module:qualname",
    "hard_phase": bool, "learnable_bits": bool, "params": [Param.as_dict(), ...]}}``."""
    return {name: {"class": f"{cls.__module__}:{cls.__qualname__}",
                   "hard_phase": cls.hard_phase, "learnable_bits": cls.learnable_bits,
                   "params": [p.as_dict() for p in cls.params]}
            for name, cls in sorted(_ensure_loaded().items())}


class MethodsView(Mapping):
    """A read-only live mapping ``name -> quantizer class`` over the registry."""

    def __getitem__(self, name: str) -> type[Quantizer]:
        methods = _ensure_loaded()
        if name not in methods:
            raise KeyError(name)
        return methods[name]

    def __iter__(self):
        return iter(method_names())

    def __len__(self) -> int:
        return len(_ensure_loaded())


METHODS = MethodsView()

__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "METHODS", "MethodsView", "describe_methods",
           "get_method", "method_names", "register_method"]
