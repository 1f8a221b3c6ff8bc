"""Versions of the packages that shape a run's results (stored in checkpoints and summaries)."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("qtrainer", "torch", "lightning", "torchvision"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
