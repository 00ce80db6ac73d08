"""Data sets: your own (arrays, a Python function, an image folder), built-in digits, local MNIST/CIFAR-10, synthetic.

Every loader returns a :class:`Splits` in three disjoint parts: ``train`` (what models
train and calibrate on), ``val`` (model selection, rank-search tolerances, early stopping)
and ``test`` (reported only, never used for decisions). Samples are ``(inputs, label)`` or,
for unlabelled data, ``inputs`` alone, where inputs are a tensor, a tuple of tensors
(positional arguments of the model) or a dict of tensors (keyword arguments).
rankshrink never downloads anything. A data SPEC string selects a loader (see :func:`load_data`).

* :mod:`.splits` -- :class:`Splits`, :func:`splits_from` (three parts you have),
  :func:`split_data` (one pool, split deterministically and stratified);
* :mod:`.dataset` -- :class:`InputDataset` (inputs of any form, optional labels);
* :mod:`.batches` -- batches and subsets;
* :mod:`.arrays` (``.npz``/``.safetensors``/``.pt``), :mod:`.pyfile` (``file.py:function``),
  :mod:`.imagefolder` (``imagefolder:DIR``), :mod:`.builtin` (digits, synthetic),
  :mod:`.mnist`, :mod:`.cifar` (local files); :mod:`.spec` -- :func:`load_data` for data SPECs.
"""

from .batches import _dataset_len, _tensor_source, calibration_subset, first_batch, has_labels, iterate_batches
from .builtin import load_digits_splits, load_synthetic
from .cifar import load_cifar10
from .dataset import InputDataset, as_dataset, make_dataset
from .mnist import load_mnist, read_idx
from .spec import DATA_SPEC_FORMS, load_data
from .splits import Splits, _make_splits, parse_fractions, split_data, splits_from, stratified_indices

__all__ = ["Splits", "splits_from", "split_data", "stratified_indices", "parse_fractions", "InputDataset",
           "as_dataset", "make_dataset", "load_digits_splits", "load_mnist", "load_cifar10", "load_synthetic",
           "load_data", "read_idx", "calibration_subset", "iterate_batches", "first_batch", "has_labels",
           "DATA_SPEC_FORMS", "_dataset_len", "_tensor_source", "_make_splits"]
