"""The user's own data: array files, a Python function, an image folder, and the API's forms.

Every form is checked for what it yields (inputs of the right form, labels, a deterministic
stratified split or the file's own indices), and every bad input for a one-line error that
names the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset

import rankshrink as rs
from rankshrink.data import (
    InputDataset,
    iterate_batches,
    load_data,
    load_digits_splits,
    split_data,
    splits_from,
    stratified_indices,
)
from rankshrink.errors import ConfigError, DataError, FileFormatError, UnsafeFileError
from rankshrink.fingerprint import dataset_fingerprint


@pytest.fixture(scope="module")
def digits():
    splits = load_digits_splits()
    x = torch.cat([splits.train.tensors[0], splits.val.tensors[0], splits.test.tensors[0]])
    y = torch.cat([splits.train.tensors[1], splits.val.tensors[1], splits.test.tensors[1]])
    return x, y


def _all(dataset):
    batches = list(iterate_batches(dataset, 10_000))
    assert len(batches) == 1
    return batches[0]


# --------------------------------------------------------------------------- array files

@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_array_file_with_labels_is_split_stratified_and_deterministically(tmp_path, digits, suffix):
    x, y = digits
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, x=x.numpy(), y=y.numpy())
    elif suffix == ".safetensors":
        save_file({"x": x, "y": y}, str(path))
    else:
        torch.save({"x": x, "y": y}, path)
    splits = load_data(str(path))
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8) and splits.name == "data"
    sizes = [len(part) for part in (splits.train, splits.val, splits.test)]
    assert sizes == [1437, 180, 180]  # round(0.1·1797) = 180 for val and test
    for part in (splits.val, splits.test):  # stratified: each class within one sample of its share
        counts = torch.bincount(part.tensors[1], minlength=10).double()
        expected = torch.bincount(y, minlength=10).double() * 180 / 1797
        assert float((counts - expected).abs().max()) <= 1.0
    rows = torch.cat([p.tensors[0] for p in (splits.train, splits.val, splits.test)])
    assert len({r.numpy().tobytes() for r in rows}) == len({r.numpy().tobytes() for r in x})  # disjoint, complete
    again = load_data(str(path))
    assert all(torch.equal(a.tensors[0], b.tensors[0]) for a, b in zip((splits.val,), (again.val,)))
    other = load_data(str(path), split=(0.6, 0.2, 0.2), seed=1)
    assert [len(p) for p in (other.train, other.val, other.test)] == [1079, 359, 359]


def test_named_and_positional_inputs_and_index_arrays(tmp_path, digits):
    x, y = digits
    side = x.flatten(1)[:, :4].clone()
    n = len(y)
    train, val, test = np.arange(0, n - 200), np.arange(n - 200, n - 100), np.arange(n - 100, n)
    np.savez(tmp_path / "named.npz", **{"x.image": x.numpy(), "x.side": side.numpy(), "y": y.numpy(),
                                        "train": train, "val": val, "test": test})
    splits = load_data(str(tmp_path / "named.npz"))
    inputs, labels = _all(splits.val)
    assert set(inputs) == {"image", "side"} and torch.equal(inputs["image"], x[val]) and torch.equal(labels, y[val])
    assert splits.input_shape == {"image": (1, 8, 8), "side": (4,)}
    assert len(splits.train) == n - 200 and len(splits.test) == 100
    np.savez(tmp_path / "positional.npz", **{"x.0": x.numpy(), "x.1": side.numpy()})
    unlabelled = load_data(str(tmp_path / "positional.npz"))
    inputs, labels = _all(unlabelled.train)
    assert isinstance(inputs, tuple) and len(inputs) == 2 and labels is None
    assert unlabelled.num_classes is None and not unlabelled.labelled


def _bad(tmp_path, name, **arrays):
    np.savez(tmp_path / name, **arrays)
    return str(tmp_path / name)


def test_bad_array_files_name_the_file_and_key(tmp_path):
    x = np.zeros((10, 3), np.float32)
    y = np.arange(10) % 2
    cases = [
        (dict(y=y), "has no 'x'"),
        (dict(x=x, y=y[:9]), "'y' has 9 labels for 10 samples"),
        (dict(x=x, y=y.astype(np.float32)), "'y' are float32; labels must be integer"),
        (dict(x=x, y=-y), "negative label"),
        (dict(x=x, y=y, train=np.arange(8), val=np.array([8, 12])), "'val' holds index 12, outside 0..9"),
        (dict(x=x, y=y, train=np.arange(8), val=np.array([7, 8])), "sample 7 is in both 'train' and 'val'"),
        (dict(x=x, y=y, train=np.arange(8)), "no 'val'"),
        (dict(x=x, y=y, train=np.arange(8.0), val=np.array([8, 9])), "'train' must be a 1-D array of integer"),
        (dict(x=x, X=x), "unexpected key(s) 'X'"),
        ({"x": x, "x.a": x}, "both 'x' and 'x.a'"),
        ({"x.0": x, "x.2": x}, "without gaps"),
        ({"x.a": x, "x.b": x[:5]}, "disagree on the number of samples"),
        ({"x.1b": x}, "not a Python identifier"),
    ]
    for index, (arrays, message) in enumerate(cases):
        path = _bad(tmp_path, f"bad{index}.npz", **arrays)
        with pytest.raises(DataError) as info:
            load_data(path)
        assert message in str(info.value) and path in str(info.value), (message, str(info.value))
    with pytest.raises(FileFormatError, match="does not exist"):
        load_data(str(tmp_path / "nope.npz"))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FileFormatError, match="broken.npz"):
        load_data(str(tmp_path / "broken.npz"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsafeFileError, match="objects.npz"):
        load_data(str(tmp_path / "objects.npz"))


def test_pt_files_load_without_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ARBITRARY CODE RAN",))

    torch.save({"x": torch.zeros(4, 2), "y": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeFileError, match="evil.pt"):
        load_data(str(tmp_path / "evil.pt"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match="holds a list"):
        load_data(str(tmp_path / "list.pt"))
    torch.save({"x": torch.zeros(4, 2), "y": 3}, tmp_path / "scalar.pt")
    with pytest.raises(FileFormatError, match="entry 'y' is not a tensor"):
        load_data(str(tmp_path / "scalar.pt"))


# --------------------------------------------------------------------------- python function, API forms

class PairDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class DictDataset(Dataset):
    """HF-style items: keyword inputs with a 'label' beside them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "side": self.x[i].flatten()[:4], "label": self.y[i]}


def test_python_function_returning_datasets_loaders_and_tensors(tmp_path, digits):
    x, y = digits
    torch.save({"x": x[:300], "y": y[:300]}, tmp_path / "pool.pt")
    source = tmp_path / "mydata.py"
    source.write_text(f'''
import torch
from torch.utils.data import DataLoader, TensorDataset
from test_user_data import PairDataset

def load():
    data = torch.load({str(tmp_path / "pool.pt")!r})
    x, y = data["x"], data["y"]
    return {{"train": PairDataset(x[:200], y[:200]),
            "val": DataLoader(TensorDataset(x[200:250], y[200:250]), batch_size=7, shuffle=True),
            "test": (x[250:], y[250:]), "num_classes": 10}}

def unlabelled():
    data = torch.load({str(tmp_path / "pool.pt")!r})
    return {{"train": {{"image": data["x"][:200]}}, "val": {{"image": data["x"][200:]}}}}

def wrong():
    return {{"train": 1, "validation": 2}}
''')
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        splits = load_data(f"{source}:load")
        unlabelled = load_data(f"{source}:unlabelled")
        with pytest.raises(DataError, match="lacks 'val'"):
            load_data(f"{source}:wrong")
    finally:
        sys.path.remove(str(Path(__file__).parent))
    assert splits.num_classes == 10 and splits.name == "mydata"
    inputs, labels = _all(splits.train)
    assert torch.equal(inputs, x[:200]) and torch.equal(labels, y[:200])
    inputs, labels = _all(splits.val)  # the loader's data set, in order (rankshrink shuffles itself)
    assert torch.equal(inputs, x[200:250]) and torch.equal(labels, y[200:250])
    assert _all(splits.test)[1].tolist() == y[250:300].tolist()
    assert not unlabelled.labelled and _all(unlabelled.train)[1] is None
    with pytest.raises(DataError, match="train part.*have labels but.*val"):
        splits_from((x[:10], y[:10]), x[10:20])


def test_items_of_every_form_batch_alike(digits):
    x, y = digits
    pairs = _all(PairDataset(x[:50], y[:50]))
    dicts = _all(DictDataset(x[:50], y[:50]))
    assert torch.equal(pairs[0], x[:50]) and torch.equal(pairs[1], y[:50])
    assert set(dicts[0]) == {"image", "side"} and torch.equal(dicts[1], y[:50])
    structured = InputDataset({"image": x[:50], "side": x[:50].flatten(1)[:, :4]}, y[:50])
    subset = torch.utils.data.Subset(structured, [3, 1, 4])
    inputs, labels = _all(subset)
    assert torch.equal(inputs["image"], x[[3, 1, 4]]) and labels.tolist() == y[[3, 1, 4]].tolist()
    assert dataset_fingerprint(subset) != dataset_fingerprint(torch.utils.data.Subset(structured, [3, 1, 5]))
    with pytest.raises(DataError, match="float32; labels must be integer"):
        InputDataset(x[:4], y[:4].float() + 0.5)

    class FloatLabels(PairDataset):
        def __getitem__(self, i):
            return self.x[i], float(self.y[i]) + 0.5

    with pytest.raises(DataError, match="labels of items 0..3 of FloatLabels are float"):
        _all(FloatLabels(x[:4], y[:4]))


def test_split_data_and_stratified_indices():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [3])  # a class of one sample is fine
    train, val, test = stratified_indices(y, (0.8, 0.1, 0.1), seed=0)
    assert (len(train), len(val), len(test)) == (68, 8, 8)
    assert sorted(torch.cat([train, val, test]).tolist()) == list(range(len(y)))
    assert int((y[val] == 0).sum()) in (4, 5) and int((y[val] == 1).sum()) == 3
    assert torch.equal(stratified_indices(y, (0.8, 0.1, 0.1), seed=0)[1], val)
    assert not torch.equal(stratified_indices(y, (0.8, 0.1, 0.1), seed=1)[1], val)
    splits = split_data({"a": torch.rand(84, 3), "b": torch.rand(84, 2)}, y, fractions=(0.5, 0.5, 0.0))
    assert len(splits.test) == 0 and len(splits.val) == 42 and splits.input_shape == {"a": (3,), "b": (2,)}
    for bad in ("0.8,0.3,0.1", "0,0.5,0.5", "abc", "0.5"):
        with pytest.raises(ConfigError, match="split"):
            load_data("builtin:digits", split=bad)


def test_fingerprints_come_from_content_never_from_a_name(digits):
    x, y = digits
    a = splits_from((x[:100], y[:100]), (x[100:150], y[100:150]))
    changed = x[100:150].clone()
    changed[7, 0, 3, 3] += 0.25  # one validation sample
    b = splits_from((x[:100], y[:100]), (changed, y[100:150]))
    assert a.fingerprint != b.fingerprint
    assert dataset_fingerprint(a.val) != dataset_fingerprint(b.val)
    assert dataset_fingerprint(a.train) == dataset_fingerprint(b.train)
    with pytest.raises(TypeError):
        rs.data.Splits(a.train, a.val, a.test, 10, (1, 8, 8), "x", "a-fingerprint-I-wrote")  # no such field


def test_large_data_is_fingerprinted_by_size_and_a_sample(monkeypatch):
    import rankshrink.fingerprint as fp

    monkeypatch.setattr(fp, "FULL_HASH_MAX_BYTES", 1000)
    monkeypatch.setattr(fp, "SAMPLED_ROWS", 50)
    x = torch.rand(1000, 4)
    base = dataset_fingerprint(TensorDataset(x))
    sampled_row = x.clone()
    sampled_row[0, 0] += 1  # the first row is always in the sample
    assert dataset_fingerprint(TensorDataset(sampled_row)) != base
    assert dataset_fingerprint(TensorDataset(x[:999])) != base  # the size is in the key


# --------------------------------------------------------------------------- image folders

def _write_images(root: Path, sizes=((8, 8),), mode="L"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog", "emu"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(root / label / f"{i}.png")


def test_image_folder_split_resized_and_presplit(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "pets"
    _write_images(root)
    splits = load_data(f"imagefolder:{root}")
    assert splits.num_classes == 3 and splits.input_shape == (1, 8, 8)
    assert [len(p) for p in (splits.train, splits.val, splits.test)] == [24, 3, 3]
    x, y = _all(splits.val)
    assert sorted(y.tolist()) == [0, 1, 2] and float(x.max()) <= 1.0 and x.dtype == torch.float32
    rgb = load_data(f"imagefolder:{root}", input_shape=(3, 4, 5))
    assert rgb.input_shape == (3, 4, 5)
    presplit = tmp_path / "presplit"
    _write_images(presplit / "train")
    _write_images(presplit / "val")
    parts = load_data(f"imagefolder:{presplit}")
    assert len(parts.train) == len(parts.val) == 30 and len(parts.test) == 0


def test_image_folder_bad_inputs(tmp_path):
    pytest.importorskip("PIL")
    mixed = tmp_path / "mixed"
    _write_images(mixed, sizes=((8, 8), (9, 8)))
    with pytest.raises(DataError, match="differ in size.*--input-shape"):
        load_data(f"imagefolder:{mixed}")
    assert load_data(f"imagefolder:{mixed}", input_shape=(1, 8, 8)).input_shape == (1, 8, 8)
    broken = tmp_path / "broken"
    _write_images(broken)
    (broken / "dog" / "3.png").write_bytes(b"not a png")
    with pytest.raises(FileFormatError, match=r"dog/3.png' cannot be read"):
        load_data(f"imagefolder:{broken}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")


def test_a_data_loader_of_an_iterable_data_set_is_read_once(digits):
    x, y = digits

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            for i in range(40):
                yield x[i], int(y[i])

    dataset = rs.data.as_dataset(DataLoader(Stream(), batch_size=16))
    inputs, labels = _all(dataset)
    assert torch.equal(inputs, x[:40]) and torch.equal(labels, y[:40])
