"""The ``npz-jpeg`` file format (keys ``jpeg``, ``offsets``, ``labels``, ``classes``): where the
shared CIFAR-10 copy lies, decoding, and the on-disk cache of decoded images."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cifar10_jpeg_root() -> Path:
    """The folder holding the CIFAR-10 JPEG copy (``train.npz``, ``test.npz``).

    Looks at, in order: the ``QTRAINER_CIFAR10_JPEG`` environment variable,
    ``<repo>/../shared/data/cifar10-jpeg`` and ``<repo>/.data/cifar10-jpeg``.
    Raises FileNotFoundError listing every place tried.
    """
    candidates = []
    if os.environ.get("QTRAINER_CIFAR10_JPEG"):
        candidates.append(Path(os.environ["QTRAINER_CIFAR10_JPEG"]))
    candidates += [
        _REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg",
        _REPO_ROOT / ".data" / "cifar10-jpeg",
    ]
    for path in candidates:
        if (path / "train.npz").is_file() and (path / "test.npz").is_file():
            return path
    tried = "\n".join(f"  {p}" for p in candidates)
    raise FileNotFoundError(
        "CIFAR-10 JPEG data (train.npz, test.npz) not found; tried:\n"
        f"{tried}\nSet QTRAINER_CIFAR10_JPEG to the folder holding them."
    )


CACHE_SUBSET_FRACTION = 0.25
"""A subset of at least this fraction of a file decodes (and caches) the whole file."""


def _cache_dir() -> Path:
    return Path(os.environ.get("QTRAINER_CACHE", Path.home() / ".cache" / "qtrainer"))


def _decode(jpeg: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Decode the JPEG files ``indices`` with Pillow into an N × H × W × 3 uint8 array."""

    def one(i: int) -> np.ndarray:
        with Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]])) as im:
            return np.asarray(im.convert("RGB"))

    if len(indices) == 0:
        raise ValueError("no images selected")
    first = one(indices[0])
    out = np.empty((len(indices), *first.shape), dtype=np.uint8)
    out[0] = first
    for k, i in enumerate(indices[1:], start=1):
        image = one(i)
        if image.shape != first.shape:
            raise ValueError(f"image {i} has shape {image.shape}, image {indices[0]} {first.shape}")
        out[k] = image
    return out


def _save_atomically(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_npz_jpeg(
    path: str | os.PathLike, indices: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a JPEG ``.npz`` file (keys ``jpeg``, ``offsets``, ``labels``, ``classes``).

    Returns ``(images, labels, classes)``: uint8 N × H × W × 3, int64 N, class names.
    ``indices`` selects a subset (in the given order). The fully decoded array is cached as
    ``.npy`` under ``$QTRAINER_CACHE`` (default ``~/.cache/qtrainer``), keyed by the file's
    folder, name, size and mtime, and every later load (whole file or subset) reads it. On a
    cache miss, a subset of at least :data:`CACHE_SUBSET_FRACTION` of the file decodes the
    whole file and writes the cache (at most 4x the subset's decoding, once per machine; e.g.
    CIFAR-10's 30,000-image training pools); a smaller subset decodes only its images and
    writes nothing.
    """
    path = Path(path)
    stat = path.stat()
    cache = _cache_dir() / f"{path.parent.name}-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.npy"
    with np.load(path) as npz:
        labels = npz["labels"].astype(np.int64)
        classes = [str(c) for c in npz["classes"]]
        select = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        whole = indices is None or len(select) >= CACHE_SUBSET_FRACTION * len(labels)
        if cache.is_file():
            images = np.load(cache, mmap_mode="r")
            images = np.array(images if indices is None else images[select])
        elif whole:
            images = _decode(npz["jpeg"], npz["offsets"], np.arange(len(labels)))
            try:
                _save_atomically(cache, images)
            except OSError as e:
                warnings.warn(f"could not cache decoded images at {cache}: {e}", stacklevel=2)
            if indices is not None:
                images = images[select]
        else:
            images = _decode(npz["jpeg"], npz["offsets"], select)
    return images, labels[select], classes


__all__ = ["default_cifar10_jpeg_root", "load_npz_jpeg"]
