"""Data loading: digits splits, IDX (MNIST) and pickle (CIFAR-10) parsing, specs, subsets."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from rankshrink.data import (
    DATA_SPEC_FORMS,
    Splits,
    _make_splits,
    calibration_subset,
    iterate_batches,
    load_cifar10,
    load_data,
    load_digits_splits,
    load_mnist,
    load_synthetic,
    read_idx,
)
from rankshrink.errors import ConfigError, DataError, FileFormatError


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_digits_splits()


# --------------------------------------------------------------------------- digits

def test_digits_split_sizes_shapes_and_ranges(digits: Splits) -> None:
    sizes = (len(digits.train), len(digits.val), len(digits.test))
    assert sizes == (1078, 360, 359)
    assert sum(sizes) == 1797
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.name == "digits"
    for part in (digits.train, digits.val, digits.test):
        x, y = part.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert len(digits.fingerprint) == 64


def test_digits_splits_are_disjoint_and_cover_the_data_set(digits: Splits) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    original = Counter((row.astype(np.float32) / 16).tobytes() + bytes([label])
                       for row, label in zip(bunch.data, bunch.target))
    rebuilt = Counter()
    for part in (digits.train, digits.val, digits.test):
        x, y = part.tensors
        for row, label in zip(x.reshape(len(x), -1).numpy(), y.tolist()):
            rebuilt[row.tobytes() + bytes([label])] += 1
    assert rebuilt == original  # every sample exactly once across the three splits


def test_digits_splits_are_stratified(digits: Splits) -> None:
    full = np.bincount(np.concatenate([p.tensors[1].numpy() for p in (digits.train, digits.val, digits.test)]))
    for part, fraction in ((digits.train, 0.6), (digits.val, 0.2), (digits.test, 0.2)):
        counts = np.bincount(part.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - full * fraction) <= 1.5)


def test_digits_splits_are_deterministic_and_seeded(digits: Splits) -> None:
    again = load_digits_splits()
    assert again.fingerprint == digits.fingerprint
    for a, b in zip((digits.train, digits.val, digits.test), (again.train, again.val, again.test)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))
    other = load_digits_splits(seed=1)
    assert other.fingerprint != digits.fingerprint
    assert not torch.equal(other.val.tensors[0], digits.val.tensors[0])


def test_fingerprint_changes_with_one_value() -> None:
    x = torch.zeros(4, 1, 2, 2)
    y = torch.tensor([0, 1, 0, 1])
    a = _make_splits("t", 2, (x, y), (x[:1], y[:1]), (x[:1], y[:1]))
    x2 = x.clone()
    x2[3, 0, 1, 1] = 1e-6
    b = _make_splits("t", 2, (x2, y), (x[:1], y[:1]), (x[:1], y[:1]))
    c = _make_splits("t", 2, (x, y), (x[:2], y[:2]), (x[:1], y[:1]))
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3


# --------------------------------------------------------------------------- IDX / MNIST

def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path: Path, data: bytes, compress: bool) -> None:
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(root: Path, n_train: int = 20, n_test: int = 5, compress: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write(root / name, _idx_bytes(array), compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_from_idx_files(tmp_path: Path, compress: bool) -> None:
    arrays = _write_mnist(tmp_path, compress=compress)
    splits = load_mnist(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 5)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    images = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    # validation is the *last* part of the training file
    np.testing.assert_array_equal(splits.train.tensors[0][:, 0].numpy(), images[:18])
    np.testing.assert_array_equal(splits.val.tensors[0][:, 0].numpy(), images[18:])
    np.testing.assert_array_equal(splits.test.tensors[1].numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert load_data(f"mnist:{tmp_path}").fingerprint == splits.fingerprint


def test_load_mnist_from_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw", compress=True)
    assert len(load_mnist(tmp_path).test) == 5


def test_read_idx_other_types_and_errors(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    (tmp_path / "ints").write_bytes(_idx_bytes(values, code=0x0C))
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), values)

    (tmp_path / "bad_magic").write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 16)
    with pytest.raises(FileFormatError, match="not an IDX file"):
        read_idx(tmp_path / "bad_magic")
    (tmp_path / "truncated").write_bytes(_idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(FileFormatError, match="truncated"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FileFormatError):
        read_idx(tmp_path / "broken.gz")


def test_load_mnist_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="never downloads") as err:
        load_mnist(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    _write_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message and "never downloads" in message


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(FileFormatError, match="20 images"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10

def _write_cifar(directory: Path, n: int = 6, protocol: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    datas = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        datas.append(data)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": data, b"filenames": [b"x.png"] * n}
        with open(directory / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
    return datas


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_load_cifar10_from_pickle_batches(tmp_path: Path, protocol: int) -> None:
    datas = _write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    splits = load_cifar10(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (27, 3, 6)
    assert splits.input_shape == (3, 32, 32)
    expected = datas[0].reshape(-1, 3, 32, 32).astype(np.float32) / 255
    np.testing.assert_array_equal(splits.train.tensors[0][:6].numpy(), expected)
    normalized = load_cifar10(tmp_path / "cifar-10-batches-py", normalize=True)
    np.testing.assert_allclose(normalized.train.tensors[0][:6].numpy(), (expected - 0.5) / 0.5, atol=1e-6)
    assert normalized.fingerprint != splits.fingerprint


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_loader_refuses_malicious_pickle(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(FileFormatError) as err:
        load_cifar10(tmp_path)
    assert "data_batch_3" in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


def test_cifar_loader_refuses_other_globals_and_bad_content(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": Counter(), b"labels": []}, handle)
    with pytest.raises(FileFormatError, match="collections.Counter"):
        load_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(FileFormatError, match="3072"):
        load_cifar10(tmp_path)


def test_cifar_missing_files(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_5")
    with pytest.raises(DataError, match="data_batch_5.*never downloads"):
        load_cifar10(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"cifar10:{tmp_path / 'absent'}")


# --------------------------------------------------------------------------- specs, synthetic

def test_load_data_default_and_builtin(digits: Splits) -> None:
    assert load_data().fingerprint == digits.fingerprint
    assert load_data("builtin:digits").fingerprint == digits.fingerprint


@pytest.mark.parametrize("spec", ["foo", "builtin:cifar", "mnist:", "synthetic:imagenet", "digits", ""])
def test_bad_data_specs_list_valid_forms(spec: str) -> None:
    with pytest.raises(DataError) as err:
        load_data(spec)
    for form in DATA_SPEC_FORMS:
        assert form in str(err.value)


def test_synthetic_sets_are_deterministic_shaped_and_learnable() -> None:
    small = load_synthetic("cifar", n_train=300, n_val=100, n_test=100)
    again = load_synthetic("cifar", n_train=300, n_val=100, n_test=100)
    assert small.fingerprint == again.fingerprint
    assert small.input_shape == (3, 32, 32)
    assert load_synthetic("mnist", n_train=10, n_val=5, n_test=5).input_shape == (1, 28, 28)
    x, y = small.train.tensors
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert np.bincount(y.numpy(), minlength=10).min() >= 20
    # nearest class mean already beats chance by far: the classes carry signal
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    vx, vy = small.val.tensors
    guess = torch.cdist(vx.flatten(1), means).argmin(1)
    assert float((guess == vy).float().mean()) > 0.3
    spec = load_data("synthetic:mnist")
    assert (len(spec.train), spec.name) == (4000, "synthetic-mnist")


# --------------------------------------------------------------------------- subsets and batches

def test_calibration_subset(digits: Splits) -> None:
    sub = calibration_subset(digits.train, n=100, seed=3)
    again = calibration_subset(digits.train, n=100, seed=3)
    assert len(sub) == 100
    assert all(torch.equal(a, b) for a, b in zip(sub.tensors, again.tensors))
    assert not torch.equal(calibration_subset(digits.train, n=100, seed=4).tensors[0], sub.tensors[0])
    rows = {r.numpy().tobytes() for r in digits.train.tensors[0]}
    assert all(r.numpy().tobytes() in rows for r in sub.tensors[0])
    whole = calibration_subset(digits.val, n=10_000)
    assert torch.equal(whole.tensors[0], digits.val.tensors[0])
    nested = calibration_subset(Subset(digits.val, [5, 7, 9]), n=2)
    assert len(nested) == 2
    with pytest.raises(ConfigError):
        calibration_subset(digits.val, n=0)
    with pytest.raises(DataError):
        calibration_subset(TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))


class _PairList(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((2,), float(i)), i % 3


def test_iterate_batches_on_generic_and_tensor_datasets() -> None:
    batches = list(iterate_batches(_PairList(5), 2))
    assert [len(y) for _, y in batches] == [2, 2, 1]
    assert torch.equal(batches[2][0], torch.tensor([[4.0, 4.0]]))
    order = torch.tensor([4, 0, 2])
    data = TensorDataset(torch.arange(5.0), torch.arange(5))
    (x, y), = list(iterate_batches(data, 8, order=order))
    assert y.tolist() == [4, 0, 2]
    assert [len(y) for _, y in iterate_batches(data, 2, drop_last_single=True)] == [2, 2]
    with pytest.raises(DataError, match="3 tensors"):
        list(iterate_batches(TensorDataset(torch.zeros(2), torch.zeros(2), torch.zeros(2)), 1))
