"""Tests of qtrainer.data: decoding and caching, stratified splits, augmentation, build_data."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import qtrainer.data.npz as npz_source
from qtrainer.data import (
    DataBundle,
    IMAGENET_MEAN,
    DeviceLoader,
    ImageArrayDataset,
    build_data,
    channel_stats,
    default_cifar10_jpeg_root,
    load_digits_split,
    load_npz_jpeg,
    stratified_indices,
    stratified_split,
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRAINER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cifar_root():
    return default_cifar10_jpeg_root()


def write_npz(path, images, labels, classes):
    """Write images (N×H×W×3 uint8) as a JPEG npz in the layout of the CIFAR-10 copy."""
    files = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=100, subsampling=0)
        files.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in files])]).astype(np.int64)
    np.savez(
        path,
        jpeg=np.concatenate(files),
        offsets=offsets,
        labels=np.asarray(labels, np.uint8),
        classes=np.array(classes),
    )


def test_default_root_search_order(tmp_path, monkeypatch, cifar_root):
    assert (cifar_root / "train.npz").is_file()
    (tmp_path / "train.npz").touch()
    (tmp_path / "test.npz").touch()
    monkeypatch.setenv("QTRAINER_CIFAR10_JPEG", str(tmp_path))
    assert default_cifar10_jpeg_root() == tmp_path
    monkeypatch.setenv("QTRAINER_CIFAR10_JPEG", str(tmp_path / "nowhere"))
    monkeypatch.setattr(npz_source, "_REPO_ROOT", tmp_path / "repo")
    with pytest.raises(FileNotFoundError) as info:
        default_cifar10_jpeg_root()
    tried = [
        "nowhere",
        os.path.join("shared", "data", "cifar10-jpeg"),
        os.path.join("repo", ".data"),
    ]
    assert all(t in str(info.value) for t in tried)


def test_decoded_images_equal_pillow_decode(cifar_root):
    indices = [0, 4999, 5000, 9999]
    images, labels, classes = load_npz_jpeg(cifar_root / "test.npz", indices)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 4, 5, 9] and labels.dtype == np.int64
    assert classes[:3] == ["airplane", "automobile", "bird"] and len(classes) == 10
    with np.load(cifar_root / "test.npz") as npz:
        for image, i in zip(images, indices):
            raw = npz["jpeg"][npz["offsets"][i] : npz["offsets"][i + 1]].tobytes()
            expected = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
            np.testing.assert_array_equal(image, expected)


def test_stratified_subset_channel_means(cifar_root):
    with np.load(cifar_root / "train.npz") as npz:
        labels = npz["labels"]
    subset = stratified_indices(labels, per_class=300, seed=0)
    images, subset_labels, _ = load_npz_jpeg(cifar_root / "train.npz", subset)
    assert np.bincount(subset_labels).tolist() == [300] * 10
    means = images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(means, [125.3, 122.9, 113.9], atol=3)


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (2500, 4, 3, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)


def test_stratified_indices_exact_counts_and_exclude():
    labels = np.repeat(np.arange(10), 500)
    first = stratified_indices(labels, 40, seed=1)
    assert np.bincount(labels[first]).tolist() == [40] * 10
    assert len(np.unique(first)) == 400 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(first, stratified_indices(labels, 40, seed=1))
    second = stratified_indices(labels, 460, seed=2, exclude=first)
    assert np.intersect1d(first, second).size == 0
    assert np.bincount(labels[second]).tolist() == [460] * 10
    with pytest.raises(ValueError, match="fewer than per_class=461"):
        stratified_indices(labels, 461, seed=2, exclude=first)


def test_stratified_split_holds_out_exact_proportional_counts():
    labels = np.repeat(np.arange(10), 5000)
    keep, held = stratified_split(labels, 5000, seed=0)
    assert np.bincount(labels[held]).tolist() == [500] * 10
    assert len(keep) == 45_000 and np.union1d(keep, held).size == 50_000
    imbalanced = np.repeat([0, 1, 2], [50, 30, 20])
    keep, held = stratified_split(imbalanced, 11, seed=0)
    assert np.bincount(imbalanced[held]).tolist() == [6, 3, 2]  # quotas 5.5, 3.3, 2.2
    assert stratified_split(imbalanced, 0, seed=0)[1].size == 0
    with pytest.raises(ValueError, match="cannot hold out 100 of 100"):
        stratified_split(imbalanced, 100, seed=0)


def test_cache_hit_returns_identical_arrays(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "set" / "train.npz"
    path.parent.mkdir()
    write_npz(path, images, np.arange(30) % 3, ["a", "b", "c"])

    subset_uncached = load_npz_jpeg(path, [29, 3, 7])
    assert not (tmp_path / "cache").exists()  # a subset is decoded alone and not cached
    full, labels, classes = load_npz_jpeg(path)
    assert full.shape == (30, 8, 6, 3) and classes == ["a", "b", "c"]
    assert np.abs(full.astype(int) - images).mean() < 3  # JPEG at quality 100, no subsampling
    assert len(list((tmp_path / "cache").glob("set-train-*.npy"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))

    def no_decode(*args):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(npz_source, "_decode", no_decode)
    again, labels_again, _ = load_npz_jpeg(path)
    np.testing.assert_array_equal(again, full)
    np.testing.assert_array_equal(labels_again, labels)
    subset_cached = load_npz_jpeg(path, [29, 3, 7])
    np.testing.assert_array_equal(subset_cached[0], full[[29, 3, 7]])
    np.testing.assert_array_equal(subset_cached[0], subset_uncached[0])
    np.testing.assert_array_equal(subset_cached[1], [2, 0, 1])

    os.utime(path, ns=(0, 10**18))  # a changed file misses the cache
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_npz_jpeg(path)


def test_large_subset_writes_the_cache(tmp_path, monkeypatch):
    """A subset of at least a quarter of the file decodes the whole file once and caches it,
    so that every later process (a benchmark's rows) reads decoded images instead of JPEG."""
    images = np.random.default_rng(1).integers(0, 256, (40, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "set" / "train.npz"
    path.parent.mkdir()
    write_npz(path, images, np.arange(40) % 4, ["a", "b", "c", "d"])
    decoded = []
    real_decode = npz_source._decode

    def counting_decode(jpeg, offsets, indices):
        decoded.append(len(indices))
        return real_decode(jpeg, offsets, indices)

    monkeypatch.setattr(npz_source, "_decode", counting_decode)
    small = load_npz_jpeg(path, list(range(9)))  # 9 of 40 < 25%: decoded alone
    assert decoded == [9] and not (tmp_path / "cache").exists()
    subset = [39, 0, 17, 5, 22, 8, 31, 12, 2, 26]  # 10 of 40: the whole file, cached
    big, labels, _ = load_npz_jpeg(path, subset)
    assert decoded == [9, 40] and len(list((tmp_path / "cache").glob("set-train-*.npy"))) == 1
    assert labels.tolist() == [i % 4 for i in subset]
    full, _, _ = load_npz_jpeg(path)  # from the cache: nothing decoded
    assert decoded == [9, 40]
    np.testing.assert_array_equal(big, full[subset])
    np.testing.assert_array_equal(small[0], full[:9])


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def reference_normalize(images: np.ndarray) -> torch.Tensor:
    """N×H×W×C uint8 -> N×C×H×W float, computed the textbook way."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def augmentations(image: np.ndarray, padding: int, flip: bool = True) -> torch.Tensor:
    """All crops of the zero-padded H×W×C image (then their mirrors), normalized: K×C×H×W.

    Index ``padding * (2 * padding + 2)`` is the unshifted, unflipped image.
    """
    h, w, _ = image.shape
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    offsets = range(2 * padding + 1)
    crops = [padded[y : y + h, x : x + w] for y in offsets for x in offsets]
    if flip:
        crops += [c[:, ::-1] for c in crops]
    return reference_normalize(np.stack(crops))


def matches(x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Which of the K candidates (K×C×H×W) equal x (C×H×W) up to float rounding."""
    return (candidates - x).abs().amax(dim=(1, 2, 3)) < 1e-5


@pytest.fixture
def toy_images():
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, (20, 6, 5, 3), dtype=np.uint8), np.arange(20) % 4


def test_image_array_dataset_eval_and_train(toy_images):
    images, labels = toy_images
    ds = ImageArrayDataset(images, labels, train=False, mean=MEAN, std=STD)
    x, y = ds[3]
    assert x.shape == (3, 6, 5) and x.dtype == torch.float32 and x.is_contiguous() and y == 3
    torch.testing.assert_close(x, reference_normalize(images[3:4])[0])

    train = ImageArrayDataset(images, labels, train=True, mean=MEAN, std=STD, crop_padding=2)
    torch.manual_seed(0)
    first = [train[i][0] for i in range(20)]
    torch.manual_seed(0)
    assert all(torch.equal(a, train[i][0]) for i, a in enumerate(first))
    changed = 0
    for i, x in enumerate(first):
        hits = matches(x, augmentations(images[i], 2))
        assert hits.any()
        changed += not hits[12]
    assert changed >= 15  # 49 of 50 crop/flip choices change the image


def test_device_loader_eval_normalization_and_lengths(toy_images):
    images, labels = toy_images
    loader = DeviceLoader(images, labels, 8, MEAN, STD, train=False)
    batches = list(loader)
    assert len(loader) == 3 and [len(b[1]) for b in batches] == [8, 8, 4]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), reference_normalize(images))
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.as_tensor(labels))
    dropping = DeviceLoader(images, labels, 8, MEAN, STD, train=True, drop_last=True)
    assert len(dropping) == 2 and sum(len(y) for _, y in dropping) == 16
    # standardizing by the data's own statistics gives zero mean, unit variance per channel
    x = next(iter(DeviceLoader(images, labels, 20, *channel_stats(images), train=False)))[0]
    x = x.double()
    zeros, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), zeros, atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), ones, atol=1e-5, rtol=0)


def test_device_loader_channels_last(toy_images):
    images, labels = toy_images
    loader = DeviceLoader(images, labels, 4, MEAN, STD, train=True, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    x, _ = next(iter(DeviceLoader(images, labels, 4, MEAN, STD, train=True)))
    assert x.is_contiguous()


def epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_device_loader_is_deterministic_per_seed_and_epoch(toy_images):
    images, labels = toy_images
    a = DeviceLoader(images, labels, 6, MEAN, STD, train=True, seed=3)
    b = DeviceLoader(images, labels, 6, MEAN, STD, train=True, seed=3)
    xa0, ya0 = epoch(a)
    xb0, yb0 = epoch(b)
    assert torch.equal(xa0, xb0) and torch.equal(ya0, yb0)
    xa1, ya1 = epoch(a)  # the next epoch draws anew
    assert not torch.equal(ya0, ya1) and not torch.equal(xa0, xa1)
    a.set_epoch(0)
    assert torch.equal(epoch(a)[0], xa0)
    other_seed = DeviceLoader(images, labels, 6, MEAN, STD, train=True, seed=4)
    assert not torch.equal(epoch(other_seed)[0], xa0)
    assert sorted(ya0.tolist()) == sorted(labels.tolist())  # every image once per epoch


def test_device_loader_flips_and_crops_change_images(toy_images):
    images, labels = toy_images
    reference = reference_normalize(images)
    flip_only = DeviceLoader(images, labels, 20, MEAN, STD, train=True, crop_padding=0)
    mirrored = 0  # each output is one of the (distinct) images, as is or mirrored
    for _ in range(5):
        for x in epoch(flip_only)[0]:
            same, flipped = matches(x, reference).sum(), matches(x, reference.flip(-1)).sum()
            assert same + flipped == 1
            mirrored += int(flipped)
    assert 30 <= mirrored <= 70  # about half of 100

    crop_only = DeviceLoader(images, labels, 20, MEAN, STD, train=True, crop_padding=2, flip=False)
    shifted = 0
    for x, label in zip(*epoch(crop_only)):
        candidates = [i for i in range(20) if labels[i] == label]
        assert any(matches(x, augmentations(images[i], 2, flip=False)).any() for i in candidates)
        shifted += not matches(x, reference[candidates]).any()
    assert shifted >= 15  # 24 of 25 offsets move the image


def test_digits_split_sizes_and_balance():
    train, test = load_digits_split(seed=0, test_fraction=0.2)
    assert len(train) == 1438 and len(test) == 359
    x, y = train.tensors
    assert x.shape == (1438, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 359 over classes of 174..183 images
    everything = torch.cat([x, test.tensors[0]])
    assert abs(everything.mean().item()) < 1e-3 and abs(everything.std().item() - 1) < 1e-3
    other_train, _ = load_digits_split(seed=1)
    assert not torch.equal(other_train.tensors[1], y)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_build_data_digits_bundle():
    bundle = build_data({"name": "digits", "batch_size": 64})
    assert isinstance(bundle, DataBundle)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1295, 143, 359)
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    assert bundle.example_input.shape == (8, 1, 8, 8)
    loader = bundle.train_loader()
    assert isinstance(loader, DataLoader) and len(loader) == 21
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    assert build_data({"name": "digits", "val_size": 0}).val_loader() is None


def test_build_data_npz_jpeg_subset(cifar_root):
    spec = {
        "name": "npz-jpeg",
        "subset_per_class": 30,
        "test_per_class": 10,
        "device_resident": True,
        "device": "cpu",
        "batch_size": 32,
    }
    bundle = build_data(spec)
    assert isinstance(bundle.train, DeviceLoader) and bundle.train_loader() is bundle.train
    sizes = (len(bundle.train.labels), len(bundle.val.labels), len(bundle.test.labels))
    assert sizes == (270, 30, 100)
    assert torch.bincount(bundle.val.labels).tolist() == [3] * 10
    assert bundle.classes[9] == "truck" and bundle.input_shape == (3, 32, 32)
    np.testing.assert_allclose(np.array(bundle.mean) * 255, [125.3, 122.9, 113.9], atol=8)
    assert bundle.example_input.shape == (8, 3, 32, 32)
    x, y = next(iter(bundle.train_loader()))
    assert x.shape == (32, 3, 32, 32) and x.device.type == "cpu"

    datasets = build_data({**spec, "device_resident": False, "num_workers": 0, "val_size": 50})
    assert isinstance(datasets.train, ImageArrayDataset)
    assert (len(datasets.train), len(datasets.val)) == (250, 50)
    with np.load(cifar_root / "test.npz") as npz:
        first = stratified_indices(npz["labels"], 10, seed=0)[0]  # test_per_class=10, seed 0
    image = torch.tensor(load_npz_jpeg(cifar_root / "test.npz", [first])[0][0] / 255)
    mean, std = torch.tensor(datasets.mean), torch.tensor(datasets.std)
    expected = (image.permute(2, 0, 1) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    torch.testing.assert_close(datasets.test[0][0], expected.float())


def _folder(root, splits, size=(28, 28), mode="L", per_class=4, seed=0):
    """``root/<split>/<class>/<i>.png``: random images of one size and mode, where class
    ``one`` is brighter than class ``zero``."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for split in splits:
        for c, name in enumerate(("zero", "one")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 128, (*size, channels), dtype=np.uint8) + 100 * c
                Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(
                    root / split / name / f"{i}.png")


def test_image_folder_keeps_size_and_gray_channel_and_computes_stats(tmp_path):
    _folder(tmp_path, ("train", "test"), per_class=10)
    bundle = build_data({"name": "imagefolder", "root": str(tmp_path), "num_workers": 0,
                         "val_size": 4})
    assert bundle.classes == ["one", "zero"] and bundle.input_shape == (1, 28, 28)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 4, 20)
    assert bundle.example_input.shape == (8, 1, 28, 28)
    # mean/std are the training images' own: the normalized eval images have mean 0, std 1
    train_pixels = np.stack([bundle.train.pixels(i) for i in range(len(bundle.train))])
    assert bundle.mean[0] == pytest.approx(train_pixels.mean() / 255, rel=1e-9)
    assert bundle.std[0] == pytest.approx(train_pixels.std() / 255, rel=1e-9)
    eval_train = type(bundle.train)(bundle.train.samples, 1, None, False, bundle.mean, bundle.std, 0)
    x = torch.stack([eval_train[i][0] for i in range(len(eval_train))])
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-5
    # training items are cropped (zero padding, 28 / 8 = 4 pixels at most) and flipped
    torch.manual_seed(0)
    assert bundle.train[0][0].shape == (1, 28, 28)
    # a model built from the bundle takes one input channel
    from qtrainer.models import build_model

    model = build_model({"name": "small_cnn"}, num_classes=2, input_shape=bundle.input_shape)
    assert model(bundle.example_input).shape == (8, 2)


def test_image_folder_val_and_test_resize_rgb_and_given_stats(tmp_path):
    _folder(tmp_path, ("train", "val", "test"), size=(20, 12), mode="RGB")
    spec = {"name": "imagefolder", "root": str(tmp_path), "num_workers": 0, "image_size": 16,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    bundle = build_data(spec)
    assert bundle.input_shape == (3, 16, 16) and bundle.mean == (0.5, 0.5, 0.5)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 8, 8)  # val/ is val
    assert bundle.test[0][0].shape == (3, 16, 16)
    rgb_as_gray = build_data({**spec, "channels": 1, "mean": None, "std": None})
    assert rgb_as_gray.input_shape == (1, 16, 16)
    (tmp_path / "train" / "zero" / "0.png").unlink()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "train" / "zero" / "0.png")
    with pytest.raises(ValueError, match=r"differ in size .*set data.image_size"):
        build_data({**spec, "image_size": None})
    _folder(tmp_path / "alone", ("train",))
    with pytest.raises(FileNotFoundError, match="no val/ or test/"):
        build_data({"name": "imagefolder", "root": str(tmp_path / "alone")})


def test_imagenet_pipeline_on_image_folders(tmp_path):
    _folder(tmp_path, ("train", "val"), size=(40, 30), mode="RGB", per_class=2)
    bundle = build_data({"name": "imagenet", "root": str(tmp_path), "num_workers": 0})
    assert bundle.input_shape == (3, 224, 224) and bundle.mean == IMAGENET_MEAN
    assert (len(bundle.train), bundle.val, len(bundle.test)) == (4, None, 4)
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        build_data({"name": "imagenet", "root": str(tmp_path / "val")})


def test_seed_orders_batches_and_data_seed_splits(cifar_root):
    spec = {"name": "npz-jpeg", "root": str(cifar_root), "subset_per_class": 12,
            "test_per_class": 1, "val_size": 20, "device_resident": True, "device": "cpu",
            "batch_size": 16, "seed": 3}

    def first_batch_and_val(spec, seed):
        bundle = build_data(spec, seed=seed)
        return next(iter(bundle.train))[1], bundle.val.labels.clone(), bundle.val.images.clone()

    a_batch, a_labels, a_images = first_batch_and_val(spec, 0)
    b_batch, b_labels, b_images = first_batch_and_val(spec, 1)
    assert not torch.equal(a_batch, b_batch)  # the run's seed: another batch order
    assert torch.equal(a_images, b_images)  # ... on the same split
    again = first_batch_and_val(spec, 0)[0]
    assert torch.equal(a_batch, again)
    c_images = first_batch_and_val({**spec, "seed": 4}, 0)[2]
    assert not torch.equal(a_images, c_images)  # data.seed: another split


@pytest.mark.parametrize(
    "spec, error, match",
    [
        (
            {"name": "cifar-10"},
            ValueError,
            r"data.name='cifar-10'.*allowed: digits, npz-jpeg.*did you mean 'cifar10'",
        ),
        ({}, ValueError, r"data.name=None"),
        (
            {"name": "digits", "batchsize": 8},
            ValueError,
            r"data.batchsize is not a valid key.*did you mean 'batch_size'",
        ),
        ({"name": "digits", "root": "x"}, ValueError, r"data.root is not a valid key .*'digits'"),
        ({"name": "digits", "batch_size": 0}, ValueError, r"data.batch_size=0 must be .* >= 1"),
        ({"name": "digits", "val_size": 5000}, ValueError, r"cannot hold out 5000"),
        ({"name": "cifar10"}, ValueError, r"data.root is required"),
        (
            {"name": "cifar100", "root": "/nonexistent"},
            FileNotFoundError,
            r"cifar100 not found.*data.download: true",
        ),
        ({"name": "npz-jpeg", "root": "/nonexistent"}, FileNotFoundError, r"has no train.npz"),
    ],
)
def test_build_data_errors(spec, error, match):
    with pytest.raises(error, match=match):
        build_data(spec)

