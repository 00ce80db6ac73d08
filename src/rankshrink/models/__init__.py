"""Models: the reference architectures, the built-in registry (trained once, cached), and model SPECs.

* :mod:`.architectures` -- ``DigitsCNN``, ``CifarCNN``, ``MnistMLP``.
* :mod:`.tiny` -- embedded-sized, MLPerf Tiny-shaped: ``ResNet8``, ``DSCNN``, ``MobileNetV1``,
  ``FCAutoencoder`` / ``AnomalyDetector``, ``WideMLP``.
* :mod:`.builtin` -- :data:`BUILTIN_MODELS`, :func:`load_builtin` (train on first use, then the cache).
* :mod:`.spec` -- :func:`load_model_spec` for ``builtin:NAME``, ``file.py:factory`` and ``model.onnx``.
* :mod:`.onnx_in` -- :func:`load_onnx_model`: ONNX → torch through onnx2torch (optional).
* :mod:`.hf` -- :func:`load_hf_model` / :func:`load_hf_tokenizer`: ``hf:DIR``, a local Hugging Face directory
  (optional: transformers), never downloading.
* :mod:`.weights` -- strict weight loading and the non-finite-weights check.
"""

from .architectures import CifarCNN, DigitsCNN, MnistMLP
from .builtin import BUILTIN_MODELS, BuiltinModel, builtin_weights_path, load_builtin
from .spec import load_model_spec
from .tiny import DSCNN, AnomalyDetector, FCAutoencoder, MobileNetV1, ResNet8, WideMLP
from .weights import check_finite, load_weights

__all__ = ["DigitsCNN", "CifarCNN", "MnistMLP", "BuiltinModel", "BUILTIN_MODELS", "builtin_weights_path",
           "load_builtin", "load_weights", "load_model_spec", "check_finite", "ResNet8", "DSCNN", "MobileNetV1",
           "FCAutoencoder", "AnomalyDetector", "WideMLP"]
