"""Checkpoint files written by qtrainer's Lightning trainers: atomic writes and a sha256 over
the whole content, checked on load (torch's zip reader checks no CRC: a flipped byte in a tensor
would load silently).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import atomic_write
from .checkpoint_files import (DIGEST_KEY, check_checkpoint_digest, checkpoint_digest,
                               load_error_reason)


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
