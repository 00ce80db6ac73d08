"""Shared pytest fixtures: keep every test away from the user's real cache directory.

Each test gets a fresh ``RANKSHRINK_CACHE``. Trained built-in models are expensive,
so their cached weights are shared across the session: copied into each test's
fresh cache before it runs and harvested from it afterwards (copies, so a test that
corrupts its cache cannot affect another).
"""

import shutil

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the models here are tiny, and on a shared
    2-core machine busy-waiting OpenMP threads made them up to 50x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_int8_decisions():
    """Each test decides its own float32 nodes: the process-wide memo of quantize_where_faster starts empty."""
    from rankshrink.deploy import quantize

    quantize._FLOAT_NODE_DECISIONS.clear()
    yield
    quantize._FLOAT_NODE_DECISIONS.clear()


@pytest.fixture(scope="session")
def _session_models(tmp_path_factory):
    return tmp_path_factory.mktemp("rankshrink-models")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _session_models):
    cache = tmp_path_factory.mktemp("rankshrink-cache")
    models = cache / "models"
    shutil.copytree(_session_models, models)
    monkeypatch.setenv("RANKSHRINK_CACHE", str(cache))
    yield cache
    if models.is_dir():
        for path in models.glob("*.safetensors"):
            target = _session_models / path.name
            if not target.exists():
                shutil.copy2(path, target)
