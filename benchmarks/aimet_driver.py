"""Run Qualcomm AIMET's greedy compression-ratio selection on one model; the yardstick of ``ranks.py``.

This script runs under the Python of AIMET's own virtual environment (``ranks.py`` builds it:
torch==2.13.0, aimet-torch 2.42 and an import-only torchvision stand-in), never under
rankshrink's. It receives everything as files and writes one JSON answer::

    python aimet_driver.py JOB.json OUT.json

``JOB.json``: ``src`` (rankshrink's source directory, for the architecture class only),
``architecture`` (a class name in ``rankshrink.models.architectures``), ``input_shape``,
``num_classes``, ``weights`` (a safetensors state dict), ``data`` (a safetensors file with
``val_x``/``val_y``/``test_x``/``test_y``), ``runs`` (a list of ``{"scheme": "weight_svd" |
"spatial_svd", "target": 0.5}``) and ``candidates`` (AIMET's ``num_comp_ratio_candidates``).

For every run: a fresh copy of the model, AIMET's ``ModelCompressor.compress_model`` in auto
(greedy) mode with ``CostMetric.mac`` and the validation accuracy as its eval function, then the
compressed model's validation and test accuracy, the number of eval-function calls, the wall
time, and the MACs of the original and the compressed model counted by torch's
``FlopCounterMode`` (matmuls and convolutions: flops / 2). AIMET writes ``./data/`` into its
working directory, so run this in a scratch directory.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path


def main(job_path: str, out_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, job["src"])

    import torch
    from aimet_torch.common.defs import CompressionScheme, CostMetric, GreedySelectionParameters
    from aimet_torch.compress import ModelCompressor
    from aimet_torch.defs import SpatialSvdParameters, WeightSvdParameters
    from safetensors.torch import load_file
    from torch.utils.flop_counter import FlopCounterMode

    from rankshrink.models import architectures

    torch.set_num_threads(1)
    data = load_file(job["data"])
    state = load_file(job["weights"])
    shape = tuple(job["input_shape"])

    def fresh() -> torch.nn.Module:
        model = getattr(architectures, job["architecture"])(shape, job["num_classes"])
        model.load_state_dict(state, strict=True)
        return model.eval()

    @torch.no_grad()
    def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        correct = 0
        for i in range(0, len(y), 512):
            correct += int((model(x[i:i + 512]).argmax(dim=1) == y[i:i + 512]).sum())
        return correct / len(y)

    def macs(model: torch.nn.Module) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, *shape))
        return counter.get_total_flops() // 2

    def layers(model: torch.nn.Module) -> dict:
        return {name: {"type": type(m).__name__, "weight": list(m.weight.shape)}
                for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

    original = fresh()
    answer = {"original": {"val_accuracy": accuracy(original, data["val_x"], data["val_y"]),
                           "test_accuracy": accuracy(original, data["test_x"], data["test_y"]),
                           "macs": macs(original), "layers": layers(original)},
              "runs": []}
    for run in job["runs"]:
        calls = []

        def evaluate(model, iterations=None, use_cuda=False, calls=calls):
            calls.append(1)
            return accuracy(model, data["val_x"], data["val_y"])

        greedy = GreedySelectionParameters(target_comp_ratio=run["target"],
                                           num_comp_ratio_candidates=job["candidates"])
        if run["scheme"] == "weight_svd":
            scheme = CompressionScheme.weight_svd
            params = WeightSvdParameters(WeightSvdParameters.Mode.auto,
                                         WeightSvdParameters.AutoModeParams(_greedy_scheme(), greedy))
        else:
            scheme = CompressionScheme.spatial_svd
            params = SpatialSvdParameters(SpatialSvdParameters.Mode.auto,
                                          SpatialSvdParameters.AutoModeParams(greedy))
        model = copy.deepcopy(fresh())
        start = time.perf_counter()
        compressed, stats = ModelCompressor.compress_model(model, evaluate, 1, (1, *shape), scheme,
                                                           CostMetric.mac, params)
        seconds = time.perf_counter() - start
        answer["runs"].append({
            **run, "seconds": seconds, "evaluations": len(calls),
            "aimet_mac_ratio": float(stats.mac_compression_ratio),
            "aimet_memory_ratio": float(stats.memory_compression_ratio),
            "per_layer": {s.name: (None if s.compression_ratio is None else float(s.compression_ratio))
                          for s in stats.per_layer_stats},
            "macs": macs(compressed), "layers": layers(compressed),
            "val_accuracy": accuracy(compressed, data["val_x"], data["val_y"]),
            "test_accuracy": accuracy(compressed, data["test_x"], data["test_y"])})
        print(f"[aimet] {run['scheme']} target {run['target']}: MACs {answer['runs'][-1]['macs']} "
              f"(of {answer['original']['macs']}), val {answer['runs'][-1]['val_accuracy']:.4f}, "
              f"{len(calls)} evaluations, {seconds:.1f} s", file=sys.stderr)
    Path(out_path).write_text(json.dumps(answer, indent=2) + "\n")
    return 0


def _greedy_scheme():
    from aimet_torch.common.defs import RankSelectScheme

    return RankSelectScheme.greedy


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
