"""Classification data layer: IDX parsing, wrappers, synthetic sets, folders, configs."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

import torch.nn.functional as F

from larex.data.base import (AsOOD, ClassSubset, DataRootNotFoundError, ModelInput, Subsample, TrainTestSplit,
                             TrainValSplit, image_hw)
from larex.data.digits import SklearnDigits
from larex.data.fashion_mnist import FashionMNIST, read_idx
from larex.data.image_folder import ImageFolder, ImageFolderOOD
from larex.data.noise import NoiseImages
from larex.data.shift import SEVERITY_TABLE, CovariateShift, gaussian_blur
from larex.data.torchvision_sets import CIFAR10, MNIST, SVHN

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST IDX files absent from {FMNIST_DIR} (apt-get install dataset-fashion-mnist)")


class Toy(Dataset):
    """Images whose pixels equal the sample index; optional ``targets`` attribute."""

    def __init__(self, labels, with_targets=True, shape=(1, 4, 4)):
        self._labels = list(labels)
        self.shape = shape
        if with_targets:
            self.targets = np.asarray(self._labels)

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        return torch.full(self.shape, float(i)), self._labels[i]


def write_idx(path: Path, array: np.ndarray, code: int, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def write_fake_mnist(folder: Path, prefix: str, n: int, compress: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x08, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x08, compress)
    return images, labels


# ---------------------------------------------------------------- IDX / Fashion-MNIST

@needs_fmnist
def test_idx_real_fashion_mnist_files():
    train_x = read_idx(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz"))
    train_y = read_idx(os.path.join(FMNIST_DIR, "train-labels-idx1-ubyte.gz"))
    test_x = read_idx(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    test_y = read_idx(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"))
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    assert np.bincount(train_y, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [1000] * 10
    assert train_x.min() == 0 and train_x.max() == 255
    # Published per-pixel mean of the training set: 0.2860 (the value in configs/dataset/fashion_mnist.yaml).
    assert abs(train_x.mean() / 255.0 - 0.2860) < 5e-4
    ds = FashionMNIST(FMNIST_DIR, train=False)
    x, y = ds[123]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    np.testing.assert_array_equal(x.numpy()[0], test_x[123] / np.float32(255.0))
    assert y == int(test_y[123]) and len(ds) == 10000 and len(ds.classes) == 10
    np.testing.assert_array_equal(ds.targets, test_y.astype(np.int64))


def test_idx_tiny_files_exact(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a, 0x08)
    out = read_idx(tmp_path / "a.gz")
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)
    b = np.array([-5, 70000, 2**31 - 1], dtype=np.int32)  # multi-byte: checks big-endian decoding
    write_idx(tmp_path / "b.idx", b, 0x0C, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx"), b)
    c = np.array([[1.5, -2.25]], dtype=np.float64)
    write_idx(tmp_path / "c.gz", c, 0x0E)
    np.testing.assert_array_equal(read_idx(tmp_path / "c.gz"), c)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="promises 10"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_tiny_files_and_missing(tmp_path):
    images, labels = write_fake_mnist(tmp_path, "t10k", 12, compress=True)
    ds = FashionMNIST(str(tmp_path), train=False)
    assert len(ds) == 12
    np.testing.assert_array_equal(ds[5][0].numpy()[0], images[5] / np.float32(255.0))
    assert ds[5][1] == 5
    with pytest.raises(DataRootNotFoundError) as err:
        FashionMNIST(str(tmp_path), train=True)
    msg = str(err.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "dataset.download=true" in msg
    assert "dataset.root=DIR" in msg
    with pytest.raises(DataRootNotFoundError, match=r"ood\.fmnist\.dataset\.download=true"):
        FashionMNIST(str(tmp_path / "nope"), config_key="ood.fmnist.dataset.root")


# ---------------------------------------------------------------- wrappers

def test_class_subset_relabel():
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    for with_targets in (True, False):
        base = Toy(labels, with_targets=with_targets)
        sub = ClassSubset(base, classes=[5, 1])
        assert len(sub) == 4
        np.testing.assert_array_equal(sub.indices, [1, 3, 4, 8])
        np.testing.assert_array_equal(sub.targets, [1, 1, 0, 0])  # 1 -> index 1, 5 -> index 0
        x, y = sub[2]
        assert y == 0 and float(x[0, 0, 0]) == 4.0
        keep = ClassSubset(base, classes=[5, 1], relabel=False)
        np.testing.assert_array_equal(keep.targets, [1, 1, 5, 5])
    with pytest.raises(ValueError, match="duplicates"):
        ClassSubset(Toy(labels), classes=[1, 1])


def test_train_val_split():
    base = Toy(np.arange(1000) % 7)
    fit = TrainValSplit(base, part="fit", val_fraction=0.1, seed=3)
    val = TrainValSplit(base, part="val", val_fraction=0.1, seed=3)
    assert len(val) == 100 and len(fit) == 900
    assert set(fit.indices).isdisjoint(val.indices)
    np.testing.assert_array_equal(np.sort(np.concatenate([fit.indices, val.indices])), np.arange(1000))
    np.testing.assert_array_equal(TrainValSplit(base, "val", 0.1, seed=3).indices, val.indices)
    assert not np.array_equal(TrainValSplit(base, "val", 0.1, seed=4).indices, val.indices)
    np.testing.assert_array_equal(val.targets, val.indices % 7)
    x, y = val[7]
    assert float(x[0, 0, 0]) == val.indices[7] and y == val.indices[7] % 7
    with pytest.raises(ValueError, match="part"):
        TrainValSplit(base, part="test")
    with pytest.raises(ValueError, match="val_fraction"):
        TrainValSplit(base, part="fit", val_fraction=1.0)


def test_train_test_split_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 31, 7])
    base = Toy(labels)
    train = TrainTestSplit(base, part="train", test_fraction=0.3, seed=5)
    test = TrainTestSplit(base, part="test", test_fraction=0.3, seed=5)
    assert np.bincount(test.targets).tolist() == [3, 6, 9, 2]  # round(0.3 * n_c) per label
    assert len(train) + len(test) == len(base) and set(train.indices).isdisjoint(test.indices)
    np.testing.assert_array_equal(np.sort(np.concatenate([train.indices, test.indices])), np.arange(len(base)))
    assert np.all(np.diff(test.indices) > 0)
    np.testing.assert_array_equal(test.targets, labels[test.indices])
    np.testing.assert_array_equal(TrainTestSplit(base, "test", 0.3, seed=5).indices, test.indices)
    assert not np.array_equal(TrainTestSplit(base, "test", 0.3, seed=6).indices, test.indices)
    assert len(TrainTestSplit(base, "test", 0.3, seed=5, stratify=False)) == round(0.3 * len(base))
    x, y = test[2]
    assert float(x[0, 0, 0]) == test.indices[2] and y == labels[test.indices[2]]
    with pytest.raises(ValueError, match="part"):
        TrainTestSplit(base, part="fit")
    with pytest.raises(ValueError, match="test_fraction"):
        TrainTestSplit(base, part="test", test_fraction=0.0)


def test_subsample_and_as_ood():
    base = Toy(np.arange(100) % 3)
    sub = Subsample(base, limit=10, seed=1)
    assert len(sub) == 10 and len(set(sub.indices)) == 10 and np.all(np.diff(sub.indices) > 0)
    np.testing.assert_array_equal(Subsample(base, 10, seed=1).indices, sub.indices)
    np.testing.assert_array_equal(sub.targets, sub.indices % 3)
    np.testing.assert_array_equal(Subsample(base, None).indices, np.arange(100))
    np.testing.assert_array_equal(Subsample(base, 1000).indices, np.arange(100))
    ood = AsOOD(sub)
    assert len(ood) == 10 and ood[3][1] == -1 and np.all(ood.targets == -1)
    assert float(ood[3][0][0, 0, 0]) == sub.indices[3]


def test_model_input_conversions():
    gray = Toy([2, 7], shape=(1, 28, 28))
    mi = ModelInput(gray, channels=3, image_size=28, mean=[0.25, 0.5, 0.0], std=[0.5, 2.0, 1.0])
    x, y, idx = mi[1]
    assert x.shape == (3, 28, 28) and y == 7 and idx == 1
    # (1 - mean) / std per channel, exactly.
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.5, 0.25, 1.0]), rtol=0, atol=0)
    np.testing.assert_array_equal(mi.targets, [2, 7])

    rgba = torch.stack([torch.full((5, 5), v) for v in (0.2, 0.4, 0.6, 0.9)])
    to_gray = ModelInput(Toy([0], shape=(3, 5, 5)), channels=1, image_size=5, mean=[0.0], std=[1.0])
    g = to_gray.convert(rgba[:3])
    torch.testing.assert_close(g, torch.full((1, 5, 5), 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6))
    to_rgb = ModelInput(Toy([0], shape=(3, 5, 5)), channels=3, image_size=5, mean=[0.0] * 3, std=[1.0] * 3)
    torch.testing.assert_close(to_rgb.convert(rgba), rgba[:3])
    assert to_rgb.convert(torch.full((5, 5), 255, dtype=torch.uint8)).eq(1.0).all()

    # Bilinear upsampling 8 -> 28 (half-pixel centres) of a column ramp x[j] = j: out[i] = clip(src(i), 0, 7).
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 8, 8)
    up = ModelInput(Toy([0], shape=(1, 8, 8)), channels=1, image_size=28, mean=[0.0], std=[1.0]).convert(ramp)
    assert up.shape == (1, 28, 28)
    src = np.clip((np.arange(28) + 0.5) * 8 / 28 - 0.5, 0, 7)
    np.testing.assert_allclose(up[0, 5].numpy(), src, atol=1e-5)
    np.testing.assert_allclose(up[0, :, 9].numpy(), np.full(28, src[9]), atol=1e-5)

    with pytest.raises(ValueError, match="Toy is empty"):
        ModelInput(Toy([]), channels=1, image_size=28, mean=[0.0], std=[1.0])
    with pytest.raises(ValueError, match="one per channel"):
        ModelInput(gray, channels=3, image_size=28, mean=[0.5], std=[0.5])


def _reference_convert(x, size, mean, std):
    """ModelInput's stretch conversion before non-square sizes existed (1-channel, same channels)."""
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - mean) / std


def test_model_input_int_size_unchanged():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, h, w, generator=g) for h, w in ((8, 8), (28, 28), (10, 37), (64, 50), (3, 100))]
    for policy in ({}, {"resize": "stretch"}):
        mi = ModelInput(Toy([0]), channels=1, image_size=28, mean=[0.3], std=[0.7], **policy)
        assert mi.image_size == 28 and mi.size == (28, 28) and mi.resize == "stretch"
        for x in images:
            torch.testing.assert_close(mi.convert(x), _reference_convert(x, 28, 0.3, 0.7), rtol=0, atol=0)


def test_model_input_pair_sizes_and_letterbox():
    ramp = torch.arange(8, dtype=torch.float32).expand(1, 8, 8)
    mi = ModelInput(Toy([0]), channels=1, image_size=[32, 48], mean=[0.0], std=[1.0])
    assert mi.image_size == (32, 48) and mi.size == (32, 48)
    out = mi.convert(ramp)
    assert out.shape == (1, 32, 48)
    ref = F.interpolate(ramp[None], size=(32, 48), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert mi.convert(torch.rand(1, 32, 48)).shape == (1, 32, 48)
    from omegaconf import ListConfig

    assert ModelInput(Toy([0]), 1, OmegaConf.create([20, 10]), [0.0], [1.0]).size == (20, 10)
    assert isinstance(OmegaConf.create([20, 10]), ListConfig)

    # A 10x20 white image into 20x20: unchanged scale, centred 10x20 band (rows 5..14) of ones, mean elsewhere.
    mean, std = [0.25, 0.5, 0.75], [0.5, 0.25, 2.0]
    lb = ModelInput(Toy([0]), channels=3, image_size=20, mean=mean, std=std, resize="letterbox")
    x = lb.convert(torch.ones(3, 10, 20))
    assert x.shape == (3, 20, 20)
    raw = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    torch.testing.assert_close(raw[:, 5:15], torch.ones(3, 10, 20))
    torch.testing.assert_close(raw[:, :5], torch.tensor(mean).view(3, 1, 1).expand(3, 5, 20))
    torch.testing.assert_close(raw[:, 15:], torch.tensor(mean).view(3, 1, 1).expand(3, 5, 20))
    assert x[:, :5].eq(0).all() and x[:, 15:].eq(0).all()  # padding is exactly 0 after normalization
    # Upscaled, aspect kept: 8x8 into [32, 48] -> a 32x32 block in columns 8..39 (the stretch resize of 8 -> 32).
    box = ModelInput(Toy([0]), 1, [32, 48], [0.5], [0.25], resize="letterbox").convert(ramp)
    ref32 = F.interpolate(ramp[None], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(box[:, :, 8:40], (ref32 - 0.5) / 0.25, rtol=0, atol=0)
    assert box[:, :, :8].eq(0).all() and box[:, :, 40:].eq(0).all()
    # Downscaled: 30x60 into 10x10 -> 5x10 band, rows 2..6 (odd padding: extra row at the bottom).
    small = ModelInput(Toy([0]), 1, 10, [0.0], [1.0], resize="letterbox").convert(torch.ones(1, 30, 60))
    torch.testing.assert_close(small[0, 2:7], torch.ones(5, 10))
    assert small[0, :2].eq(0).all() and small[0, 7:].eq(0).all()
    # Same size: untouched by every policy.
    same = torch.rand(1, 10, 20)
    for policy in ("stretch", "letterbox", "none"):
        torch.testing.assert_close(ModelInput(Toy([0]), 1, [10, 20], [0.0], [1.0], resize=policy).convert(same),
                                   same, rtol=0, atol=0)


def test_model_input_resize_none_and_errors():
    ds = Toy([0, 1], shape=(1, 6, 9))
    mi = ModelInput(ds, 1, [6, 9], [0.0], [1.0], resize="none")
    assert mi[1][0].shape == (1, 6, 9)
    with pytest.raises(ValueError, match=r"item 0 of Toy\) is 6x9 .*dataset\.image_size is 6x6.*dataset\.resize=none"):
        ModelInput(ds, 1, 6, [0.0], [1.0], resize="none")[0]
    native = ModelInput(ds, 1, None, [0.0], [1.0], resize="none")
    assert native.size is None and native[0][0].shape == (1, 6, 9)
    with pytest.raises(ValueError, match=r"dataset\.image_size is null.*dataset\.resize=none"):
        ModelInput(ds, 1, None, [0.0], [1.0])
    with pytest.raises(ValueError, match=r"dataset\.resize must be one of stretch, letterbox, none, got 'crop'"):
        ModelInput(ds, 1, 28, [0.0], [1.0], resize="crop")
    for bad in (0, -3, [28], [28, 28, 3], [28, 0], "28", 28.0, [28.5, 28], True, {"h": 1}):
        with pytest.raises(ValueError, match=r"dataset\.image_size must be an int >= 1 .* or a pair \[H, W\]"):
            ModelInput(ds, 1, bad, [0.0], [1.0])
    assert image_hw(np.int64(5)) == (5, 5) and image_hw((3, np.int32(4))) == (3, 4)


# ---------------------------------------------------------------- synthetic sets

def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = gaussian_blur(x, 1.0)
    ref = gaussian_filter(x.numpy(), sigma=(0, 0, 1.0, 1.0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
    const = torch.full((1, 9, 9), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 2.0), const)


def test_covariate_shift_deterministic_and_monotone():
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.random((6, 1, 28, 28), dtype=np.float32))

    class Imgs(Dataset):
        targets = np.arange(6)

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return imgs[i], i

    base = Imgs()
    a, b = CovariateShift(base, severity=3, seed=5), CovariateShift(base, severity=3, seed=5)
    for i in (0, 4):
        torch.testing.assert_close(a[i][0], b[i][0], rtol=0, atol=0)
        assert a[i][1] == i
    assert not torch.equal(a[0][0], CovariateShift(base, severity=3, seed=6)[0][0])
    assert np.array_equal(a.targets, np.arange(6))
    diffs = [np.mean([(CovariateShift(base, severity=s)[i][0] - imgs[i]).abs().mean().item() for i in range(6)])
             for s in range(1, 6)]
    assert all(d1 < d2 for d1, d2 in zip(diffs, diffs[1:])), diffs
    x = CovariateShift(base, severity=5)[2][0]
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(CovariateShift(base, blur_sigma=0.0, noise_std=0.0)[3][0], imgs[3])
    assert CovariateShift(base, severity=3).params(28) == (SEVERITY_TABLE[3][0] * 28 / 32, SEVERITY_TABLE[3][1])
    with pytest.raises(ValueError, match="severity"):
        CovariateShift(base, severity=6)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "blobs"])
def test_noise_images_deterministic(kind):
    ds = NoiseImages(n=50, channels=3, image_size=16, kind=kind, seed=2)
    x, y = ds[7]
    assert x.shape == (3, 16, 16) and y == -1 and len(ds) == 50
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(NoiseImages(50, 3, 16, kind, seed=2)[7][0], x, rtol=0, atol=0)
    assert not torch.equal(ds[8][0], x)
    if kind == "blobs":
        assert ((x == 0) | (x >= 0.75)).all() and (x == 0).any()
    if kind == "uniform":
        big = torch.stack([ds[i][0] for i in range(50)])
        assert abs(big.mean().item() - 0.5) < 0.02
    rect = NoiseImages(n=3, channels=1, image_size=[12, 20], kind=kind, seed=2)
    assert rect[0][0].shape == (1, 12, 20) and rect.image_size == (12, 20) and ds.image_size == 16
    with pytest.raises(ValueError, match=r"image_size \(set from dataset\.image_size\) must be an int >= 2"):
        NoiseImages(n=3, image_size=[1, 20], kind=kind)


def test_sklearn_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    ds = SklearnDigits(image_size=28)
    assert len(ds) == 1797
    x, y = ds[10]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(ref.target[10])
    assert ds.data.min() >= 0 and ds.data.max() <= 1
    np.testing.assert_array_equal(ds.targets, ref.target)
    native = SklearnDigits(image_size=8)
    np.testing.assert_allclose(native[10][0][0].numpy(), ref.images[10] / 16.0, rtol=0, atol=1e-7)
    rect = SklearnDigits(image_size=[16, 24])
    assert rect[10][0].shape == (1, 16, 24) and rect.image_size == (16, 24) and ds.image_size == 28
    # The one-off upsampling equals ModelInput's own stretch of the native 8x8 image.
    mi = ModelInput(native, 1, 28, [0.0], [1.0])
    torch.testing.assert_close(mi[10][0], x, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"SklearnDigits: image_size \(set from dataset\.image_size\)"):
        SklearnDigits(image_size=0)


# ---------------------------------------------------------------- folders

def test_image_folder_class_tree_and_flat(tmp_path):
    tree = tmp_path / "tree"
    (tree / "b_cls" / "nested").mkdir(parents=True)
    (tree / "a_cls").mkdir()
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    rgb = np.stack([np.full((3, 3), v, np.uint8) for v in (10, 20, 30)], axis=-1)
    rgba = np.concatenate([rgb, np.full((3, 3, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(gray, mode="L").save(tree / "b_cls" / "x.png")
    Image.fromarray(rgba, mode="RGBA").save(tree / "b_cls" / "nested" / "y.PNG")
    Image.fromarray(rgb, mode="RGB").save(tree / "a_cls" / "z.bmp")
    (tree / "a_cls" / "notes.txt").write_text("not an image")
    ds = ImageFolder(str(tree))
    assert ds.classes == ["a_cls", "b_cls"] and len(ds) == 3
    assert [os.path.relpath(p, tree) for p in ds.samples] == [
        os.path.join("a_cls", "z.bmp"), os.path.join("b_cls", "nested", "y.PNG"), os.path.join("b_cls", "x.png")]
    np.testing.assert_array_equal(ds.targets, [0, 1, 1])
    x0, y0 = ds[0]
    assert y0 == 0 and x0.shape == (3, 3, 3)
    np.testing.assert_allclose(x0[:, 0, 0].numpy(), np.array([10, 20, 30]) / 255.0, rtol=1e-6)
    x1, _ = ds[1]
    assert x1.shape == (3, 3, 3)  # RGBA -> RGB
    x2, _ = ds[2]
    assert x2.shape == (1, 4, 5)
    np.testing.assert_allclose(x2[0].numpy(), gray / 255.0, rtol=1e-6)
    assert len(ImageFolder(str(tree), recursive=False)) == 2

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((6, 6), i * 50, np.uint8)).save(flat / f"{i}.png")
    fds = ImageFolder(str(flat))
    assert len(fds) == 3 and fds.classes == [] and np.all(fds.targets == -1)
    assert float(fds[2][0][0, 0, 0]) == pytest.approx(100 / 255.0)
    ood = ImageFolderOOD(str(tree))
    assert len(ood) == 3 and ood[0][1] == -1 and ood.root == str(tree)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataRootNotFoundError) as err:
        ImageFolder(str(tmp_path / "missing"), config_key="ood.textures.root")
    assert str(tmp_path / "missing") in str(err.value) and "ood.textures.root=DIR" in str(err.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found.*\.png.*\.webp"):
        ImageFolder(str(tmp_path / "empty"))
    mixed = tmp_path / "mixed"
    (mixed / "c").mkdir(parents=True)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(mixed / "r.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(mixed / "c" / "s.png")
    with pytest.raises(ValueError, match="mixes"):
        ImageFolder(str(mixed))


# ---------------------------------------------------------------- torchvision wrappers

def test_torchvision_wrappers_missing_root(tmp_path):
    with pytest.raises(DataRootNotFoundError) as err:
        MNIST(str(tmp_path), train=False)
    assert os.path.join(str(tmp_path), "MNIST", "raw") in str(err.value)
    assert "dataset.download=true" in str(err.value)
    with pytest.raises(DataRootNotFoundError, match="cifar-10-batches-py"):
        CIFAR10(str(tmp_path), train=False)
    with pytest.raises(DataRootNotFoundError, match=r"test_32x32\.mat.*ood\.svhn\.dataset\.download=true"):
        SVHN(str(tmp_path), split="test", config_key="ood.svhn.dataset.root")


def test_torchvision_mnist_wrapper_reads_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_fake_mnist(raw, "train", 4, compress=False, seed=2)  # torchvision checks that all four files exist
    images, labels = write_fake_mnist(raw, "t10k", 15, compress=False, seed=3)
    ds = MNIST(str(tmp_path), train=False)
    assert len(ds) == 15 and ds.data.shape == (15, 1, 28, 28)
    x, y = ds[4]
    np.testing.assert_array_equal(x[0].numpy(), images[4] / np.float32(255.0))
    assert y == 4 and np.array_equal(ds.targets, labels)


# ---------------------------------------------------------------- configs

def _main_cfg(ood_names=(), dataset="fashion_mnist", seed=0):
    cfg = OmegaConf.create({"seed": seed, "data_root": "data",
                            "dataset": OmegaConf.load(CONFIGS / "dataset" / f"{dataset}.yaml")})
    cfg.ood = {n: OmegaConf.load(CONFIGS / "ood" / f"{n}.yaml") for n in ood_names}
    return cfg


def _targets_in(node):
    if OmegaConf.is_dict(node):
        if "_target_" in node:
            yield node._target_
        for k in node:
            yield from _targets_in(node._get_node(k))
    elif OmegaConf.is_list(node):
        for item in node:
            yield from _targets_in(item)


def test_all_configs_load_and_targets_import():
    from hydra.utils import get_class

    dataset_files = sorted((CONFIGS / "dataset").glob("*.yaml"))
    ood_files = sorted((CONFIGS / "ood").glob("*.yaml"))
    assert {p.stem for p in dataset_files} >= {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "image_folder",
                                               "digits"}
    keys = set(OmegaConf.load(CONFIGS / "dataset" / "fashion_mnist.yaml")) - {"root", "download", "download_root"}
    assert set(OmegaConf.load(CONFIGS / "dataset" / "digits.yaml")) >= keys
    ood_names = {p.stem for p in ood_files}
    for path in dataset_files:
        cfg = OmegaConf.load(path)
        assert len(cfg.mean) == cfg.channels == len(cfg.std), path.name
        assert set(cfg.splits) == {"fit", "val", "test"}, path.name
        assert set(cfg.default_ood) <= ood_names, path.name
        if cfg.classes is not None:
            assert len(cfg.classes) == cfg.num_classes, path.name
        for target in _targets_in(cfg):
            get_class(target)
    for path in ood_files:
        # Explicit absolute package (`_group_._name_` is ignored with version_base >= 1.2).
        assert path.read_text().splitlines()[0] == f"# @package ood.{path.stem}", path.name
        cfg = OmegaConf.load(path)
        assert cfg._target_.startswith("larex.data."), path.name
        assert issubclass(get_class(cfg._target_), AsOOD), path.name
        for target in _targets_in(cfg):
            get_class(target)


@needs_fmnist
def test_fashion_mnist_configs_instantiate():
    from hydra.utils import instantiate

    cfg = _main_cfg(["fmnist_holdout", "fmnist_shift", "digits", "noise"])
    fit, val, test = (instantiate(cfg.dataset.splits[s]) for s in ("fit", "val", "test"))
    assert len(fit) + len(val) == 48000 and len(val) == 4800 and len(test) == 8000
    assert set(np.unique(fit.targets)) == set(range(8)) and np.bincount(test.targets).tolist() == [1000] * 8
    assert set(fit.indices).isdisjoint(val.indices)
    holdout = instantiate(cfg.ood.fmnist_holdout)
    assert len(holdout) == 2000 and np.all(holdout.targets == -1) and holdout[0][1] == -1
    shift = instantiate(cfg.ood.fmnist_shift)
    assert len(shift) == 8000 and shift[0][1] == -1 and shift.dataset.severity == 3
    digits = instantiate(cfg.ood.digits)
    assert len(digits) == 1797 and digits[0][0].shape == (1, 28, 28)
    noise = instantiate(cfg.ood.noise)
    assert len(noise) == 2000 and noise[0][0].shape == (1, 28, 28)
    mi = ModelInput(holdout, channels=3, image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
    x, y, i = mi[5]
    assert x.shape == (3, 32, 32) and y == -1 and i == 5


def _base_indices(ds) -> np.ndarray:
    """Indices into the innermost dataset (SklearnDigits) of every item of a chain of index views."""
    idx = np.arange(len(ds))
    while hasattr(ds, "indices"):
        idx = np.asarray(ds.indices)[idx]
        ds = ds.dataset
    assert isinstance(ds, SklearnDigits)
    return idx


def test_digits_configs_instantiate():
    """dataset=digits is always available (bundled with scikit-learn): sizes, disjoint splits, stats, OOD."""
    from hydra.utils import instantiate

    cfg = _main_cfg(["digits_holdout", "digits_shift", "noise"], dataset="digits")
    assert set(cfg.dataset.default_ood) == {"digits_holdout", "digits_shift", "noise"}
    fit, val, test = (instantiate(cfg.dataset.splits[s]) for s in ("fit", "val", "test"))
    assert (len(fit), len(val), len(test)) == (909, 101, 433)
    digits = fit.dataset.dataset.dataset
    fit_i, val_i, test_i = (_base_indices(d) for d in (fit, val, test))
    assert len(set(fit_i)) == len(fit_i)
    assert set(fit_i).isdisjoint(val_i) and set(fit_i).isdisjoint(test_i) and set(val_i).isdisjoint(test_i)
    for part, idx in ((fit, fit_i), (val, val_i), (test, test_i)):  # relabelled 0..7 == original digit here
        np.testing.assert_array_equal(part.targets, digits.targets[idx])
        assert set(np.unique(part.targets)) == set(range(8))
    x, y = test[3]
    assert x.shape == (1, 28, 28) and y == digits.targets[test_i[3]]
    torch.testing.assert_close(x, digits.data[test_i[3]], rtol=0, atol=0)
    # Stratified held-out part: round(0.3 * n_c) of every digit.
    counts = np.bincount(digits.targets)
    assert np.bincount(test.targets).tolist() == [round(0.3 * c) for c in counts[:8]]
    # mean/std of the YAML: pixels of the ID train part (fit + val) at 28 px.
    train_px = digits.data[np.concatenate([fit_i, val_i])]
    assert abs(train_px.mean().item() - cfg.dataset.mean[0]) < 5e-4
    assert abs(train_px.std().item() - cfg.dataset.std[0]) < 5e-4
    # fit/val follow ${seed}; the test part does not.
    other = _main_cfg(dataset="digits", seed=1)
    fit1, test1 = instantiate(other.dataset.splits.fit), instantiate(other.dataset.splits.test)
    np.testing.assert_array_equal(_base_indices(test1), test_i)
    assert not np.array_equal(_base_indices(fit1), fit_i) and len(fit1) == 909

    holdout = instantiate(cfg.ood.digits_holdout)
    hold_i = _base_indices(holdout.dataset)
    assert len(holdout) == 106 and np.all(holdout.targets == -1) and holdout[0][1] == -1
    assert set(digits.targets[hold_i]) == {8, 9} and set(np.bincount(digits.targets[hold_i])[8:]) == {52, 54}
    assert set(hold_i).isdisjoint(np.concatenate([fit_i, val_i, test_i]))
    train_part = fit.dataset.dataset  # TrainTestSplit(part=train): the held-out 8/9 are from the other part
    assert set(hold_i).isdisjoint(train_part.indices)
    shift = instantiate(cfg.ood.digits_shift)
    np.testing.assert_array_equal(_base_indices(shift.dataset.dataset), test_i)
    assert len(shift) == 433 and shift[0][1] == -1 and shift.dataset.severity == 3
    assert shift[0][0].shape == (1, 28, 28) and not torch.equal(shift[0][0], test[0][0])
    noise = instantiate(cfg.ood.noise)
    assert len(noise) == 2000 and noise[0][0].shape == (1, 28, 28)
    mi = ModelInput(fit, channels=1, image_size=cfg.dataset.image_size, mean=cfg.dataset.mean, std=cfg.dataset.std)
    x, y, i = mi[5]
    assert x.shape == (1, 28, 28) and y == fit.targets[5] and i == 5


def test_hydra_compose_digits(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = tmp_path / "conf"
    shutil.copytree(CONFIGS / "dataset", conf / "dataset")
    shutil.copytree(CONFIGS / "ood", conf / "ood")
    (conf / "main.yaml").write_text("defaults:\n  - dataset: digits\n  - _self_\nseed: 0\ndata_root: data\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("main", overrides=["+ood=[digits_holdout,digits_shift,noise]", "dataset.image_size=[16,24]",
                                         "dataset.test_fraction=0.5", "ood.noise.dataset.n=5"])
        fm = compose("main", overrides=["dataset=fashion_mnist", "+ood=[digits_holdout]"])
    test, holdout = instantiate(cfg.dataset.splits.test), instantiate(cfg.ood.digits_holdout)
    assert test[0][0].shape == (1, 16, 24) and holdout[0][0].shape == (1, 16, 24)
    assert instantiate(cfg.ood.noise)[0][0].shape == (1, 16, 24)
    assert len(holdout) == 177 and len(instantiate(cfg.ood.digits_shift)) == len(test)  # follows test_fraction
    mi = ModelInput(test, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.mean, cfg.dataset.std)
    assert mi.size == (16, 24) and mi[0][0].shape == (1, 16, 24)
    # Without dataset.test_fraction / test_seed (another ID set) digits_holdout falls back to 0.3 / 0.
    assert len(instantiate(fm.ood.digits_holdout)) == 106


def test_hydra_compose_ood_group(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    conf = tmp_path / "conf"
    shutil.copytree(CONFIGS / "dataset", conf / "dataset")
    shutil.copytree(CONFIGS / "ood", conf / "ood")
    (conf / "main.yaml").write_text("defaults:\n  - dataset: fashion_mnist\n  - _self_\nseed: 0\ndata_root: data\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "a.jpg")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("main", overrides=["+ood=[noise,image_folder,textures]", f"ood.image_folder.root={folder}",
                                         "ood.noise.dataset.n=7", f"data_root={tmp_path / 'data'}"])
    assert set(cfg.ood) == {"noise", "image_folder", "textures"}
    assert cfg.ood.textures.root == str(tmp_path / "data" / "textures")
    ds = instantiate(cfg.ood.image_folder)
    assert len(ds) == 1 and ds[0][1] == -1 and ds[0][0].shape == (3, 5, 5)
    assert len(instantiate(cfg.ood.noise)) == 7
    with pytest.raises(InstantiationException, match=r"ood\.textures\.root=DIR"):
        instantiate(cfg.ood.textures)
