"""Checkpoint files written by qtrainer's Lightning trainers: atomic writes and a sha256 over
the whole content, checked on load (torch's zip reader checks no CRC: a flipped byte in a tensor
would load silently).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import atomic_write
from .models import load_error_reason


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose local writes are atomic (:mod:`qtrainer.atomic`): a
    checkpoint file is always either the previous complete one or the new complete one. Its
    :func:`checkpoint_digest` goes into ``checkpoint["qtrainer"]["sha256"]`` and is checked on
    load, which reads the file with ``weights_only=True``.

    (Lightning's own ``_atomic_save`` writes through an fsspec transaction into a temporary file
    in the system temp folder and then moves it, which is a copy, not a rename, when that folder
    is another file system, and it never fsyncs.) Remote URLs fall back to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        target = os.fspath(path)
        if "://" in target and not target.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        target = target.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        if isinstance(checkpoint.get("state_dict"), Mapping):  # a Lightning checkpoint
            meta = checkpoint.get("qtrainer")
            meta = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
                    if k != DIGEST_KEY}
            checkpoint["qtrainer"] = meta  # the digest covers the checkpoint as it is loaded
            meta[DIGEST_KEY] = checkpoint_digest(checkpoint)
        with atomic_write(target) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict:
        """Read a checkpoint as untrusted data: ``weights_only=True`` unless asked otherwise
        (tensors, numbers, strings and containers; nothing is unpickled into code), and a
        truncated, damaged or tampered file is a ``ValueError`` naming it."""
        try:
            checkpoint = super().load_checkpoint(
                path, map_location=map_location,
                weights_only=True if weights_only is None else weights_only)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - zip, pickle, torch and OS errors alike
            raise ValueError(f"could not read checkpoint {os.fspath(path)!r} (truncated, damaged "
                             f"or not a checkpoint of weights): {load_error_reason(e)}") from None
        check_checkpoint_digest(checkpoint, path)
        return checkpoint


__all__ = ["DIGEST_KEY", "AtomicCheckpointIO", "check_checkpoint_digest", "checkpoint_digest"]
