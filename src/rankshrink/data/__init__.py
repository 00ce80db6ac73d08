"""Data sets: built-in digits, local MNIST/CIFAR-10 files, deterministic synthetic sets.

Every loader returns a :class:`Splits` with float32 inputs and int64 labels in three
disjoint parts: ``train`` (what models train on), ``val`` (model selection, rank-search
tolerances, early stopping) and ``test`` (reported only, never used for decisions).
rankshrink never downloads anything: MNIST and CIFAR-10 are read from a directory the
user names. A data SPEC string selects a loader (see :func:`load_data`).

* :mod:`.splits` -- :class:`Splits`; :mod:`.batches` -- batches and subsets;
* :mod:`.builtin` -- digits and synthetic sets; :mod:`.mnist`, :mod:`.cifar` -- local files;
* :mod:`.spec` -- :func:`load_data` for data SPECs.
"""

from .batches import _dataset_len, _tensor_source, calibration_subset, iterate_batches
from .builtin import load_digits_splits, load_synthetic
from .cifar import load_cifar10
from .mnist import load_mnist, read_idx
from .spec import DATA_SPEC_FORMS, load_data
from .splits import Splits, _make_splits

__all__ = ["Splits", "load_digits_splits", "load_mnist", "load_cifar10", "load_synthetic", "load_data", "read_idx",
           "calibration_subset", "iterate_batches", "DATA_SPEC_FORMS", "_dataset_len", "_tensor_source",
           "_make_splits"]
