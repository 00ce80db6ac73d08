"""Search building blocks without a trained model: bisection, cache, budgets, allocation maths."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankshrink.errors import ConfigError
from rankshrink.fingerprint import module_fingerprint as model_fingerprint
from rankshrink.search import Budget, EvaluationCache, evaluation_bound, smallest_passing
from rankshrink.search.allocate import build_path, lower_hull
from rankshrink.search.cache import CacheWarning, cache_key
from rankshrink.search.space import Candidate, rank_grid

# --------------------------------------------------------------------------- bisection

def _run(values, tolerance, guess=None):
    baseline = 1.0
    calls = []

    def evaluate(i):
        calls.append(i)
        return values[i]

    found = smallest_passing(len(values), evaluate, lambda v: baseline - v <= tolerance + 1e-9, guess=guess)
    return found, calls


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), cut=st.integers(0, 300), guess=st.one_of(st.none(), st.integers(-5, 310)))
def test_bisection_matches_brute_force_on_monotone_curves(n, cut, guess):
    cut = min(cut, n)                   # items >= cut pass
    values = [0.5 if i < cut else 1.0 for i in range(n)]
    found, calls = _run(values, 0.01, guess)
    expected = cut if cut < n else None
    assert found.index == expected
    assert len(calls) == len(set(calls)) <= math.ceil(math.log2(n)) + 1 if n > 1 else len(calls) == 1
    assert found.monotone
    if expected is not None and expected > 0:
        assert expected - 1 in found.values  # the rank below the answer was evaluated and failed


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=200))
def test_bisection_answer_always_passes_even_when_not_monotone(values):
    found, calls = _run(values, 0.05)
    if found.index is not None:
        assert 1.0 - values[found.index] <= 0.05 + 1e-9
        if found.index > 0:
            assert 1.0 - values[found.index - 1] > 0.05
    else:
        assert 1.0 - values[-1] > 0.05
    assert len(calls) <= (math.ceil(math.log2(len(values))) + 1 if len(values) > 1 else 1)
    ordered = [found.values[i] for i in sorted(found.values)]
    assert found.monotone == all(b >= a - 1e-9 for a, b in zip(ordered, ordered[1:]))


def test_bisection_top_failing_costs_one_evaluation():
    found, calls = _run([0.1, 0.2, 0.3], 0.01)
    assert found.index is None and calls == [2]


def test_rank_grid():
    assert rank_grid(0) == []
    assert rank_grid(5) == [1, 2, 3, 4, 5]
    grid = rank_grid(102, dense_up_to=12, ratio=1.12)
    assert grid[:12] == list(range(1, 13)) and grid[-1] == 102 and grid == sorted(set(grid))


# --------------------------------------------------------------------------- allocation maths

def _cand(cost, distortion, name="l"):
    return Candidate(name, "svd", cost, cost, cost, cost, distortion)


def test_lower_hull_and_path_order():
    front = [_cand(1, 10.0), _cand(2, 8.0), _cand(3, 3.0), _cand(4, 2.8), _cand(10, 0.0)]
    hull = lower_hull(front, "macs")
    assert hull == [0, 2, 4]  # (2, 8) lies above the chord from (1, 10) to (3, 3); (4, 2.8) above (3, 3)-(10, 0)
    other = [_cand(1, 1.0, "m"), _cand(5, 0.0, "m")]
    path = build_path([front, other], [hull, lower_hull(other, "macs")], "macs", [1.0, 1.0])
    # slopes: layer 0: 3/7, then 7/2; layer 1: 1/4. Cheapest distortion per cost saved first.
    assert path == [(1, 0), (0, 2), (0, 0)]


# --------------------------------------------------------------------------- budgets

def test_budget_parsing():
    assert Budget.parse({"macs": 0.5}).relative
    assert Budget.parse(("params", 120000)).absolute({"params": 10 ** 6}) == 120000
    assert Budget.parse({"bytes": 0.25}).absolute({"bytes": 1000}) == 250
    for bad in ({"flops": 0.5}, {"macs": 0}, {"macs": -1}, {"macs": float("nan")}, "half", {"macs": True}):
        with pytest.raises(ConfigError):
            Budget.parse(bad)


def test_evaluation_bound():
    assert evaluation_bound(102, 4) == 4 * (7 + 2) + 10
    assert evaluation_bound(1, 3) == 3 * 2 + 10


# --------------------------------------------------------------------------- cache

def test_cache_roundtrip_and_corruption(tmp_path):
    cache = EvaluationCache(tmp_path)
    key = cache_key("m", "{}", "accuracy", "d", "o")
    assert cache.get(key) is None
    cache.put(key, 0.75, seconds=0.1)
    assert cache.get(key)["value"] == 0.75 and cache.hits == 1
    path = cache.path(key)
    entry = json.loads(path.read_text())
    entry["value"] = 0.99  # tampered: checksum no longer matches
    path.write_text(json.dumps(entry))
    with pytest.warns(CacheWarning, match="corrupt"):
        assert cache.get(key) is None
    assert not path.exists() and cache.dropped == 1
    cache.put(key, 0.5)
    path.write_text(path.read_text()[:20])  # truncated
    with pytest.warns(CacheWarning):
        assert cache.get(key) is None
    cache.put_json("proxies", "k" * 64, {"svd:1": 0.5})
    assert cache.get_json("proxies", "k" * 64) == {"svd:1": 0.5}


def test_disabled_cache_stores_nothing(tmp_path):
    cache = EvaluationCache.disabled()
    cache.put("a" * 64, 1.0)
    assert cache.get("a" * 64) is None and not cache.enabled


def test_cache_keys_differ_by_every_part():
    parts = ["m", "p", "k", "d", "o"]
    base = cache_key(*parts)
    for i in range(5):
        changed = list(parts)
        changed[i] = changed[i] + "x"
        assert cache_key(*changed) != base


def test_model_fingerprint_tracks_weights_names_and_dtypes():
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    b = nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(a.double())
    assert model_fingerprint(a) != model_fingerprint(nn.Sequential(a))
