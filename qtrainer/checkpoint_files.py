"""Reading checkpoint files as untrusted data (no Lightning needed): ``torch.load`` with
``weights_only=True`` and a one-line reason when it refuses a file, and the sha256 over a
checkpoint's whole content that qtrainer writes into ``checkpoint["qtrainer"]`` (torch's zip
reader checks no CRC: a flipped byte in a tensor would load silently).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

DIGEST_KEY = "sha256"
"""Key of ``checkpoint["qtrainer"]`` holding :func:`checkpoint_digest`."""


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checkpoint_digest(checkpoint: Mapping) -> str:
    """sha256 of everything in a checkpoint (weights, optimizer and loop states, RNG...) but
    the digest itself: names, dtypes, shapes and bytes of every tensor. (torch's zip reader
    checks no CRC: a flipped byte in a tensor loads silently.)"""
    meta = checkpoint.get("qtrainer")
    if isinstance(meta, Mapping):
        checkpoint = {**checkpoint, "qtrainer": {k: v for k, v in meta.items() if k != DIGEST_KEY}}
    h = hashlib.sha256()
    _feed(h, checkpoint)
    return h.hexdigest()


def check_checkpoint_digest(checkpoint: Any, path) -> None:
    """Raise ``ValueError`` naming ``path`` when a checkpoint differs from the digest written
    with it (checkpoints without one, e.g. from other tools, pass)."""
    meta = checkpoint.get("qtrainer") if isinstance(checkpoint, dict) else None
    expected = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
    if expected is not None and checkpoint_digest(checkpoint) != expected:
        raise ValueError(f"checkpoint {os.fspath(path)!r} does not match the checksum written "
                         "with it: it was modified or damaged after it was saved")


def load_error_reason(e: BaseException) -> str:
    """A one-line reason why ``torch.load`` refused a file. (torch's weights-only message spans
    paragraphs and suggests ``weights_only=False``, which is no advice for an untrusted file.)"""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
            return (f"it holds more than weights ({reason}); checkpoints are never unpickled "
                    "into code")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)`` checked against the digest written with it.
    Raises ``FileNotFoundError``, or ``ValueError`` naming the file when it is truncated,
    damaged, edited after saving or holds more than weights."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle, torch and OS errors alike
        raise ValueError(f"could not read checkpoint {os.fspath(path)!r} (truncated, damaged "
                         f"or not a checkpoint of weights): {load_error_reason(e)}") from None
    check_checkpoint_digest(checkpoint, path)
    return checkpoint


__all__ = ["DIGEST_KEY", "check_checkpoint_digest", "checkpoint_digest", "load_error_reason",
           "read_checkpoint"]
