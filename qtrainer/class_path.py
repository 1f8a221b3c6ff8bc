"""Importing the class a run file names by ``class_path`` (``model.class_path``,
``data.class_path``): only what the user wrote, from exactly that module."""

from __future__ import annotations

import importlib


def import_class(class_path: str, key: str):
    """The object ``package.module.Name`` names. ValueError naming ``key`` (the run-file key
    that holds it) when the module cannot be imported or lacks the name."""
    module_name, _, attr = str(class_path).rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={class_path!r} must be 'package.module.ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}={class_path!r}: cannot import module {module_name!r} ({e})") from None
    if not hasattr(module, attr):
        raise ValueError(f"{key}={class_path!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


__all__ = ["import_class"]
