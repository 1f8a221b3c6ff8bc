"""Datasets for qtrainer: loading, stratified splits, augmentation and the ``build_data`` factory.

Conventions used throughout:

- images are stored as ``uint8`` arrays in NHWC layout (N × H × W × 3, pixel values 0..255);
- models receive float32 NCHW tensors normalized per channel as ``(pixel / 255 - mean) / std``,
  so ``mean`` and ``std`` are in units of the [0, 1]-scaled pixel;
- labels are int64 class indices.

``build_data(spec)`` turns the ``data:`` section of a recipe into a :class:`DataBundle`; its
``train_loader()``, ``val_loader()`` and ``test_loader()`` return iterables of ``(x, y)``
batches (a ``torch.utils.data.DataLoader``, or a :class:`DeviceLoader` when the dataset is held
in accelerator memory).
"""

from __future__ import annotations

import difflib
import io
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Of the bundled scikit-learn digits after dividing pixels (0..16) by 16, over all 1797 images.
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)

_REPO_ROOT = Path(__file__).resolve().parents[1]


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
    folder, name, size and mtime; on a cache miss with ``indices`` given only those images are
    decoded and nothing is cached.
    """
    path = Path(path)
    stat = path.stat()
    cache = _cache_dir() / f"{path.parent.name}-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.npy"
    with np.load(path) as npz:
        labels = npz["labels"].astype(np.int64)
        classes = [str(c) for c in npz["classes"]]
        select = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        if cache.is_file():
            images = np.load(cache, mmap_mode="r")
            images = np.array(images if indices is None else images[select])
        else:
            images = _decode(npz["jpeg"], npz["offsets"], select)
            if indices is None:
                try:
                    _save_atomically(cache, images)
                except OSError as e:
                    warnings.warn(f"could not cache decoded images at {cache}: {e}", stacklevel=2)
    return images, labels[select], classes


def stratified_indices(
    labels: np.ndarray,
    per_class: int,
    seed: int,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Sorted int64 indices taking exactly ``per_class`` random samples of every class.

    Samples listed in ``exclude`` are never taken. Raises ValueError when a class has too few.
    """
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[np.asarray(exclude, dtype=np.int64)] = False
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero((labels == c) & allowed)
        if len(members) < per_class:
            raise ValueError(
                f"class {c} has {len(members)} samples, fewer than per_class={per_class}"
            )
        picks.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picks)).astype(np.int64)


def stratified_split(
    labels: np.ndarray, holdout: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into sorted ``(keep, held_out)`` index arrays.

    ``held_out`` has exactly ``holdout`` samples, spread over the classes in proportion to
    their frequency (largest-remainder rounding), drawn at random with ``seed``.
    """
    labels = np.asarray(labels)
    if not 0 <= holdout < len(labels):
        raise ValueError(f"cannot hold out {holdout} of {len(labels)} samples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * holdout / len(labels)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(take - quota, kind="stable")[: holdout - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_out = np.sort(np.concatenate(held)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel ``(mean, std)`` of uint8 N × H × W × C images, in [0, 1] pixel units.

    Computed from per-channel histograms, 1,000 images at a time (fast, little memory).
    """
    c = images.shape[-1]
    hist = np.zeros(256 * c, dtype=np.int64)
    for chunk in np.array_split(images, max(1, len(images) // 1000)):
        hist += np.bincount((chunk.reshape(-1, c) + np.arange(c) * 256).ravel(), minlength=256 * c)
    hist = hist.reshape(c, 256)
    values = np.arange(256) / 255
    mean = hist @ values / hist.sum(1)
    std = np.sqrt(hist @ values**2 / hist.sum(1) - mean**2)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _crop_flip(
    images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Crop-with-zero-padding and horizontal flip of a uint8 N × H × W × C batch (one gather).

    ``oy``, ``ox``: int64 (N,) crop offsets in ``[0, 2 * padding]`` into the padded image;
    ``flip``: bool (N,). Returns a new N × H × W × C uint8 tensor.
    """
    n, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    cols = torch.arange(w, device=images.device)
    rows = oy[:, None] + torch.arange(h, device=images.device)
    cols = ox[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N × H × W × C -> float32 N × C × H × W, ``(pixel / 255 - mean) / std``.

    The result is a permuted view's arithmetic, i.e. in ``channels_last`` memory format.
    """
    x = images.permute(0, 3, 1, 2).float()
    return (x - (mean * 255).view(1, -1, 1, 1)) / (std * 255).view(1, -1, 1, 1)


def _image_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N × H × W × C images and int64 N labels as CPU tensors, checked for shape."""
    images = torch.as_tensor(np.asarray(images, dtype=np.uint8))
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"expected N×H×W×C images and N labels, got {tuple(images.shape)} and {len(labels)}"
        )
    return images, labels


class ImageArrayDataset(Dataset):
    """A Dataset over an in-memory uint8 N × H × W × C image array.

    Items are ``(x, y)``: x float32 C × H × W normalized with per-channel ``mean``/``std`` (units
    of the [0, 1] pixel), y an int class index. With ``train=True`` each item is randomly
    cropped after zero-padding by ``crop_padding`` pixels and flipped horizontally with
    probability 1/2 (if ``flip``), drawing from torch's global RNG, which DataLoader seeds per
    worker, so runs are reproducible under ``torch.manual_seed``/a seeded DataLoader generator.
    """

    def __init__(
        self,
        images,
        labels,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 4,
        flip: bool = True,
    ):
        self.images, self.labels = _image_tensors(images, labels)
        self.train, self.crop_padding, self.flip = train, crop_padding, flip
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i : i + 1]
        if self.train:
            oy, ox = torch.randint(0, 2 * self.crop_padding + 1, (2, 1))
            flip = torch.rand(1) < 0.5 if self.flip else torch.zeros(1, dtype=torch.bool)
            image = _crop_flip(image, oy, ox, flip, self.crop_padding)
        return _normalize(image, self.mean, self.std)[0].contiguous(), int(self.labels[i])


class DeviceLoader:
    """Batches of an image array held once in (accelerator) memory, augmented on that device.

    Yields ``(x, y)``: x float32 B × C × H × W normalized (``channels_last`` memory format if
    asked), y int64 B, both on ``device``. With ``train=True`` every epoch is shuffled and each
    image randomly cropped (zero padding ``crop_padding``) and flipped, all randomness drawn
    from a CPU ``torch.Generator`` seeded by ``(seed, epoch)``, so batches are identical on
    CPU and CUDA and across runs. Each iteration uses the current epoch and then advances it;
    ``set_epoch(e)`` chooses it explicitly. ``train=False`` yields the images in order, as is.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        train: bool,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        images, labels = _image_tensors(images, labels)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.batch_size, self.train, self.seed, self.drop_last = batch_size, train, seed, drop_last
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffle and augmentation of ``epoch``."""
        self.epoch = epoch

    def example_batch(self, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` images (normalized, not augmented) and labels; the epoch and every
        random state are left untouched."""
        x = _normalize(self.images[:n], self.mean, self.std)
        return (x if self.channels_last else x.contiguous()), self.labels[:n]

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if self.train:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(n, generator=g).to(self.device)
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, n), generator=g)
            offsets = offsets.to(self.device)
            flips = (torch.rand(n, generator=g) < 0.5).to(self.device)
            if not self.flip:
                flips.zero_()
        self.epoch += 1
        for b in range(len(self)):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[s] if self.train else s
            images = self.images[index]
            if self.train:
                oy, ox = offsets[0, s], offsets[1, s]
                images = _crop_flip(images, oy, ox, flips[s], self.crop_padding)
            x = _normalize(images, self.mean, self.std)
            yield (x if self.channels_last else x.contiguous()), self.labels[index]


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's bundled digits (1797 8×8 grayscale images, 10 classes; no network).

    Returns ``(train, test)`` TensorDatasets of ``(x, y)``: x float32 N × 1 × 8 × 8, pixels
    divided by 16 then standardized with :data:`DIGITS_MEAN`/:data:`DIGITS_STD`; y int64 N.
    The split is stratified; ``test_fraction`` of the images (rounded) go to ``test``.
    """
    from sklearn.datasets import load_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = (x - DIGITS_MEAN[0]) / DIGITS_STD[0]
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = stratified_split(digits.target, round(test_fraction * len(y)), seed)
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@dataclass
class DataBundle:
    """The datasets of one recipe and what a model needs to know about them.

    ``train``/``val``/``test``: Datasets of ``(x, y)`` (x float32 C × H × W) or DeviceLoaders;
    ``val`` is None when no validation split is held out (validate on ``test`` then).
    ``input_shape`` is (C, H, W); ``mean``/``std`` the per-channel normalization (units of the
    [0, 1] pixel); ``example_input`` a float32 CPU batch of up to 8 test inputs (B × C × H × W).
    The ``*_loader()`` methods return the iterables to train/evaluate on.
    """

    train: Dataset | DeviceLoader
    val: Dataset | DeviceLoader | None
    test: Dataset | DeviceLoader
    num_classes: int
    classes: list[str]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    example_input: torch.Tensor
    batch_size: int = 128
    num_workers: int = 0
    drop_last: bool = False
    seed: int = 0

    def _loader(self, data, train: bool):
        if isinstance(data, DeviceLoader):
            return data
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_loader(self):
        """Shuffled training batches (seeded with ``seed``)."""
        return self._loader(self.train, train=True)

    def val_loader(self):
        """Validation batches in order, or None when there is no validation split."""
        return None if self.val is None else self._loader(self.val, train=False)

    def test_loader(self):
        """Test batches in order."""
        return self._loader(self.test, train=False)


def _example_input(data: Dataset | DeviceLoader, n: int = 8) -> torch.Tensor:
    if isinstance(data, DeviceLoader):
        return data.example_batch(n)[0].cpu().contiguous()
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


_COMMON_KEYS = {"name", "batch_size", "num_workers", "seed", "val_size", "drop_last"}
_ARRAY_KEYS = _COMMON_KEYS | {
    "root", "subset_per_class", "test_per_class", "device_resident", "device", "channels_last"
}
DATA_KEYS = {
    "digits": _COMMON_KEYS | {"test_fraction"},
    "npz-jpeg": _ARRAY_KEYS,
    "cifar10": _ARRAY_KEYS | {"download"},
    "cifar100": _ARRAY_KEYS | {"download"},
    "imagefolder": _COMMON_KEYS | {"root"},
    "imagenet": _COMMON_KEYS | {"root"},
}


def _did_you_mean(value, allowed) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _int(spec: dict, key: str, default, minimum: int = 0):
    value = spec.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{key}={value!r} must be an integer >= {minimum}")
    return value


def build_data(spec: dict) -> DataBundle:
    """Build the datasets described by a recipe's ``data:`` section.

    ``name`` (required) is one of:

    - ``digits``: scikit-learn's bundled 8×8 digits (offline default); ``test_fraction`` (0.2).
    - ``npz-jpeg``: a folder ``root`` with ``train.npz``/``test.npz`` (see :func:`load_npz_jpeg`;
      default :func:`default_cifar10_jpeg_root`). Normalized with the mean/std of the training
      split.
    - ``cifar10``/``cifar100``: torchvision's copies under ``root``; ``download`` (False).
    - ``imagefolder``/``imagenet``: ``root`` with ``train/`` and ``val/`` class folders (``val/``
      is the test split); random-resized 224 crop + flip for training, resize 256 + center crop
      224 for evaluation, ImageNet mean/std.

    Common keys: ``batch_size`` (128), ``num_workers`` (0 for in-memory data, else up to 8),
    ``seed`` (0; subsets, splits and shuffling), ``drop_last`` (False; training batches),
    ``val_size``: images held out of the training data for validation, stratified (default
    10% of the training pool, i.e. 5,000 for CIFAR; 0 for image folders, giving ``val=None``).
    Array datasets (``npz-jpeg``, ``cifar10``, ``cifar100``) also take ``subset_per_class``
    (a stratified training pool, before the hold-out), ``test_per_class`` (a stratified test
    subset), ``device_resident`` (False; serve batches from a :class:`DeviceLoader`), ``device``
    (for ``device_resident``; default CUDA when available) and ``channels_last`` (False).
    """
    spec = dict(spec)
    name = spec.get("name")
    if name not in DATA_KEYS:
        raise ValueError(
            f"data.name={name!r} is not a known dataset; allowed: {', '.join(DATA_KEYS)}"
            f"{_did_you_mean(name, DATA_KEYS)}"
        )
    for key in spec:
        if key not in DATA_KEYS[name]:
            raise ValueError(
                f"data.{key} is not a valid key for data.name={name!r}; allowed: "
                f"{', '.join(sorted(DATA_KEYS[name]))}{_did_you_mean(key, DATA_KEYS[name])}"
            )
    seed = _int(spec, "seed", 0)
    options = dict(
        batch_size=_int(spec, "batch_size", 128, minimum=1),
        drop_last=bool(spec.get("drop_last", False)),
        seed=seed,
    )
    if name == "digits":
        train, test = load_digits_split(seed, spec.get("test_fraction", 0.2))
        labels = train.tensors[1].numpy()
        keep, held = stratified_split(labels, _int(spec, "val_size", len(labels) // 10), seed)
        return DataBundle(
            train=Subset(train, keep.tolist()),
            val=Subset(train, held.tolist()) if len(held) else None,
            test=test,
            num_classes=10,
            classes=[str(d) for d in range(10)],
            input_shape=(1, 8, 8),
            mean=DIGITS_MEAN,
            std=DIGITS_STD,
            example_input=test.tensors[0][:8],
            num_workers=_int(spec, "num_workers", 0),
            **options,
        )
    if name in ("imagefolder", "imagenet"):
        return _image_folder_bundle(spec, options)
    return _array_bundle(name, spec, options)


def _load_arrays(name: str, spec: dict, subset_per_class, test_per_class, seed: int):
    """(train_images, train_labels, test_images, test_labels, classes) of an array dataset."""
    if name == "npz-jpeg":
        root = Path(spec["root"]) if spec.get("root") is not None else default_cifar10_jpeg_root()
        for split in ("train", "test"):
            if not (root / f"{split}.npz").is_file():
                raise FileNotFoundError(f"data.root={str(root)!r} has no {split}.npz")
        splits = []
        for split, per_class in (("train", subset_per_class), ("test", test_per_class)):
            select = None
            if per_class is not None:
                with np.load(root / f"{split}.npz") as npz:
                    select = stratified_indices(npz["labels"], per_class, seed)
            splits.append(load_npz_jpeg(root / f"{split}.npz", select))
        (train_x, train_y, classes), (test_x, test_y, _) = splits
        return train_x, train_y, test_x, test_y, classes

    import torchvision

    if spec.get("root") is None:
        raise ValueError(f"data.root is required for data.name={name!r}")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(spec["root"], train=True, download=bool(spec.get("download", False)))
        test = cls(spec["root"], train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"{name} not found under data.root={str(spec['root'])!r} ({e}); set "
            "data.download: true to fetch it, or use data.name: npz-jpeg for the CIFAR-10 JPEG copy"
        ) from None
    arrays = []
    for ds, per_class in ((train, subset_per_class), (test, test_per_class)):
        labels = np.asarray(ds.targets, dtype=np.int64)
        if per_class is not None:
            select = stratified_indices(labels, per_class, seed)
            arrays += [ds.data[select], labels[select]]
        else:
            arrays += [ds.data, labels]
    return (*arrays, list(train.classes))


def _array_bundle(name: str, spec: dict, options: dict) -> DataBundle:
    seed = options["seed"]
    train_x, train_y, test_x, test_y, classes = _load_arrays(
        name,
        spec,
        _int(spec, "subset_per_class", None, minimum=1),
        _int(spec, "test_per_class", None, minimum=1),
        seed,
    )
    keep, held = stratified_split(train_y, _int(spec, "val_size", len(train_y) // 10), seed)
    mean, std = channel_stats(train_x[keep])
    splits = {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[held], train_y[held]),
        "test": (test_x, test_y),
    }
    if spec.get("device_resident", False):
        device = spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        made = {
            split: DeviceLoader(
                x,
                y,
                options["batch_size"],
                mean,
                std,
                train=split == "train",
                device=device,
                seed=seed,
                drop_last=split == "train" and options["drop_last"],
                channels_last=bool(spec.get("channels_last", False)),
            )
            for split, (x, y) in splits.items()
        }
        num_workers = _int(spec, "num_workers", 0)
    else:
        made = {
            split: ImageArrayDataset(x, y, split == "train", mean, std)
            for split, (x, y) in splits.items()
        }
        num_workers = _int(spec, "num_workers", min(8, os.cpu_count() or 1))
    return DataBundle(
        train=made["train"],
        val=made["val"] if len(held) else None,
        test=made["test"],
        num_classes=len(classes),
        classes=classes,
        input_shape=(train_x.shape[3], train_x.shape[1], train_x.shape[2]),
        mean=mean,
        std=std,
        example_input=_example_input(made["test"]),
        num_workers=num_workers,
        **options,
    )


def _image_folder_bundle(spec: dict, options: dict) -> DataBundle:
    import copy

    from torchvision import datasets, transforms

    if spec.get("root") is None:
        raise ValueError(f"data.root is required for data.name={spec['name']!r}")
    root = Path(spec["root"])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"data.root={str(root)!r} has no {split}/ folder of class subfolders"
            )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]
    )
    train = datasets.ImageFolder(root / "train", transform=train_tf)
    test = datasets.ImageFolder(root / "val", transform=eval_tf)
    classes = list(train.classes)
    if list(test.classes) != classes:
        raise ValueError(f"data.root={str(root)!r}: train/ and val/ have different class folders")
    keep, held = stratified_split(train.targets, _int(spec, "val_size", 0), options["seed"])
    val = None
    if len(held):
        val_base = copy.copy(train)
        val_base.transform = eval_tf
        val = Subset(val_base, held.tolist())
        train = Subset(train, keep.tolist())
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        classes=classes,
        input_shape=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        example_input=_example_input(test),
        num_workers=_int(spec, "num_workers", min(8, os.cpu_count() or 1)),
        **options,
    )
