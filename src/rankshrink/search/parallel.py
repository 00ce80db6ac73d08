"""Parallel evaluation: the search's independent evaluations on a pool of workers (Ray), or in-process.

The search asks for two kinds of independent work: *probes* (the network's output distortion with
one layer factorized, on the probe batch -- every layer's sensitivity probe at once) and *whole-model
evaluations* (the validation metric of a plan -- the per-layer bisections in lockstep, and a few
plans ahead of a sequential step). A pool runs a list of such tasks and returns their values in
order; the driver builds every factorized block (it holds the calibration), ships only the blocks of
the layers a task replaces, and writes every value into the one evaluation cache. The algorithm never
depends on the pool: it asks for the same evaluations and takes the same decisions with 1 worker or
20, so distributed and local runs find the same plan, and a run resumes from the cache whichever
way it was started.

* :class:`LocalPool` -- in-process, one task after another (the default; no Ray needed).
* :class:`RayPool` -- ``workers`` Ray actors, each holding a copy of the model, the metric (with its
  validation data and the original's reference outputs) and the probe batch, sent once through the
  object store. ``ray.init()`` starts a local cluster (``num_cpus=workers``) unless ``address`` names
  an existing one (``ray.init(address=...)``; rankshrink and the model's code must be importable on
  its nodes). Each worker uses ``threads`` torch threads (default: the machine's cores / workers).

:func:`make_pool` picks one from :class:`~rankshrink.search.config.SearchConfig` (``workers``,
``ray_address``); without Ray installed, asking for workers says how to install it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigError

__all__ = ["LocalPool", "RayPool", "make_pool", "RAY_HINT", "build_with_blocks"]

RAY_HINT = "pip install 'rankshrink[ray]' (or pip install ray)"


def build_with_blocks(model: nn.Module, blocks: dict[str, nn.Module]) -> nn.Module:
    """``model`` with each named layer replaced by its block, sharing every other weight (for evaluation)."""
    from ..plan import Plan
    from ..surgery import build

    if not blocks:
        return model
    entries = {name: _entry_of(block) for name, block in blocks.items()}
    return build(model, Plan.from_mapping(entries), lambda name, module, entry, rank: blocks[name],
                 share_weights=True)


def _entry_of(block: nn.Module) -> Any:
    from ..methods import make_config

    method: Any = block.method  # a Factorized block records its method and rank
    return make_config(method, block.rank)


class LocalPool:
    """Tasks run in this process, in order."""

    parallelism = 1

    def __init__(self, model: nn.Module, metric: Any, distortion: Any = None):
        self.model = model
        self.metric = metric
        self.distortion = distortion

    def metric_values(self, tasks: Sequence[dict[str, nn.Module]]) -> list[tuple[float, float, Any]]:
        """(value, seconds, per-sample predictions or None) of the metric with each task's blocks in place."""
        from ..memory import release_memory

        out = []
        for blocks in tasks:
            start = time.perf_counter()
            model = build_with_blocks(self.model, blocks)
            predictions = None
            if getattr(self.metric, "per_sample", False):  # kept for the bootstrap intervals (search/bootstrap.py)
                predictions = self.metric.predict(model)
                value = self.metric.from_predictions(predictions)
            else:
                value = self.metric(model)
            out.append((float(value), time.perf_counter() - start, predictions))
            del model
            release_memory()
        return out

    def distortions(self, tasks: Sequence[dict[str, nn.Module]]) -> list[float]:
        """The probe distortion of each task's blocks (layer name -> block)."""
        from ..memory import release_memory

        assert self.distortion is not None, "no probe batch"
        modules = {name: self.model.get_submodule(name) for blocks in tasks for name in blocks}
        values = []
        for blocks in tasks:
            values.append(self.distortion.with_replacements({modules[name]: block for name, block in blocks.items()}))
            release_memory()
        return values

    def close(self) -> None:
        pass


class _Worker:
    """What one Ray actor holds: the model, the metric and the probe batch (sent once), and a thread count."""

    def __init__(self, payload: Any, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(max(1, int(threads)))
        except Exception:  # threadpoolctl is optional
            self._limits = None
        self.pool = LocalPool(*payload)

    def metric_value(self, blocks: dict[str, nn.Module]) -> tuple[float, float, Any]:
        return self.pool.metric_values([blocks])[0]

    def distortion(self, blocks: dict[str, nn.Module]) -> float:
        return self.pool.distortions([blocks])[0]


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(f"parallel evaluation (--workers, --ray-address) needs Ray: {RAY_HINT}.") from None
    return ray


class RayPool:
    """``workers`` Ray actors evaluating tasks in parallel (see the module notes)."""

    def __init__(self, model: nn.Module, metric: Any, distortion: Any = None, *, workers: int | None = None,
                 address: str | None = None, threads: int | None = None):
        ray = _ray()
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers or 2, **options)
            self._started = True
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.parallelism = int(workers)
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // self.parallelism)
        _register_user_modules(model)
        payload = ray.put((model, metric, distortion))
        actor = ray.remote(num_cpus=1)(_Worker)
        self._actors = [actor.remote(payload, threads) for _ in range(self.parallelism)]
        self.model = model

    def _run(self, method: str, tasks: Sequence[Any]) -> list[Any]:
        ray = self._ray
        refs = [getattr(self._actors[i % self.parallelism], method).remote(task) for i, task in enumerate(tasks)]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayTaskError as exc:  # the worker's own exception, re-raised here
            cause = exc.as_instanceof_cause()
            raise cause from None

    def metric_values(self, tasks: Sequence[dict[str, nn.Module]]) -> list[tuple[float, float, Any]]:
        return self._run("metric_value", tasks)

    def distortions(self, tasks: Sequence[dict[str, nn.Module]]) -> list[float]:
        return self._run("distortion", tasks)

    def close(self) -> None:
        for actor in self._actors:
            try:
                self._ray.kill(actor)
            except Exception:  # an actor that is already gone
                pass
        self._actors = []
        if self._started:
            self._ray.shutdown()
            self._started = False


def _register_user_modules(model: nn.Module) -> None:
    """Send the classes of a model loaded from a file (file.py:factory) by value: workers cannot import them."""
    try:
        import cloudpickle
    except ImportError:  # ray vendors its own copy
        from ray import cloudpickle
    import sys

    for module in {type(m).__module__ for m in model.modules()}:
        if module.startswith("rankshrink_user_model_") and module in sys.modules:
            cloudpickle.register_pickle_by_value(sys.modules[module])


def make_pool(config: Any, model: nn.Module, metric: Any, distortion: Any = None) -> LocalPool | RayPool:
    """The pool :class:`~rankshrink.search.config.SearchConfig` asks for: Ray with ``workers`` > 1 or a
    ``ray_address``, else in-process."""
    workers, address = getattr(config, "workers", None), getattr(config, "ray_address", None)
    if address is None and (workers is None or workers <= 1):
        return LocalPool(model, metric, distortion)
    threads = getattr(config, "threads", None)
    return RayPool(model, metric, distortion, workers=workers, address=address, threads=threads)
