"""The rank search on the trained digits CNN: bisection vs brute force, evaluation bounds,
tolerance and budget guarantees, the evaluation cache, interruption and bad inputs."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankshrink.cost import count
from rankshrink.errors import ConfigError, DataError
from rankshrink.metrics import accuracy
from rankshrink.search import CacheWarning, SearchInterrupted, brute_force_rank, evaluation_bound, smallest_rank
from rankshrink.search import compress as plan
from rankshrink.search.evaluate import single_threaded
from rankshrink.surgery import apply

pytestmark = pytest.mark.slow

TOL = 0.01


@pytest.fixture(scope="module")
def digits(request, tmp_path_factory):
    from rankshrink.models import load_builtin

    try:  # trained once and kept in pytest's cache across sessions
        where = request.config.cache.mkdir("rankshrink-digits-cnn")
    except AttributeError:
        where = tmp_path_factory.mktemp("models")
    with single_threaded():
        model, splits = load_builtin("digits-cnn", cache_dir=where, progress=False)
    return model, splits


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSHRINK_CACHE", str(tmp_path / "rankshrink-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("search-cache")


@pytest.fixture(scope="module")
def tolerance_results(digits, shared_cache):
    model, splits = digits
    return {mode: plan(model, splits, tolerance=TOL, sensitivity=mode, cache=shared_cache, progress=False)
            for mode in ("auto", "probe", "proxy")}


# --------------------------------------------------------------------------- one layer

@pytest.mark.parametrize("layer,method,objective", [("classifier.3", "svd", "activations"),
                                                    ("features.0", "weight", "weights")])
def test_bisection_matches_brute_force_on_one_layer(digits, layer, method, objective):
    model, splits = digits
    fast = smallest_rank(model, layer, splits, tolerance=TOL, method=method, fit=objective, cache=False)
    brute = brute_force_rank(model, layer, splits, tolerance=TOL, method=method, fit=objective)
    assert fast.break_even == brute.break_even
    assert fast.requested <= math.ceil(math.log2(fast.break_even)) + 2
    assert brute.evaluations == brute.break_even + 1
    if fast.rank != brute.rank:
        # Documented: accuracy is not monotone in rank. Bisection then still returns a passing
        # rank whose lower neighbour fails (both evaluated), or "dense" when the break-even
        # rank itself fails; brute force can find a smaller, isolated passing rank.
        assert not brute.monotone
        ok = lambda r: brute.baseline - brute.values[r] <= TOL + 1e-9
        if fast.rank is None:
            assert not ok(brute.break_even)
        else:
            assert ok(fast.rank) and (fast.rank == 1 or not ok(fast.rank - 1))
            assert brute.rank is not None and fast.rank > brute.rank
    if fast.rank is not None:
        assert fast.value == brute.values[fast.rank]
        assert fast.drop <= TOL + 1e-9


def test_one_layer_search_dense_when_nothing_passes(digits):
    model, splits = digits
    # A zero tolerance with a layer whose break-even rank still loses accuracy: stays dense
    # after two evaluations (original + break-even rank), or finds an exact rank.
    result = smallest_rank(model, "classifier.3", splits, tolerance=0.0, cache=False, fit="weights")
    assert result.requested <= math.ceil(math.log2(result.break_even)) + 2
    if result.rank is None:
        assert result.requested == 2 and result.plan.layers == {}
    else:
        assert result.drop <= 1e-9


# --------------------------------------------------------------------------- whole network, tolerance

@pytest.mark.parametrize("mode", ["auto", "probe", "proxy"])
def test_tolerance_search_respects_the_tolerance_within_the_evaluation_bound(digits, tolerance_results, mode):
    model, splits = digits
    result = tolerance_results[mode]
    layers = len(result.layers)
    assert layers == 4
    assert result.requested <= evaluation_bound(result.r_max, layers)
    assert result.requested <= 1 + layers * (math.ceil(math.log2(result.r_max)) + 1) + 10
    if mode == "proxy":
        assert result.requested <= 11
    # The tolerance holds on the validation split, re-measured independently.
    small = result.compressed_model()
    assert accuracy(model, splits.val) == pytest.approx(result.baseline)
    assert accuracy(small, splits.val) == pytest.approx(result.value)
    assert result.drop <= TOL + 1e-9
    assert result.ratio("macs") < 0.5  # it did compress
    # Costs are exact: the formulas agree with counting the built model.
    counted = count(small, splits.val.tensors[0][:1])
    assert (counted.params, counted.macs, counted.bytes) == (result.compressed["params"], result.compressed["macs"],
                                                             result.compressed["bytes"])
    assert result.fit == "activations"
    assert result.test["original"] is not None and result.test["compressed"] is not None
    assert all(r.value == pytest.approx(1 - (r.drop or 0) - (1 - result.baseline)) for r in result.records)
    summary = result.summary()
    for key in ("original", "compressed", "evaluations", "evaluations_cached", "seed", "layers", "drop_ci"):
        assert key in summary
    json.dumps(summary)
    # The answer is the cheapest of every whole-model plan it measured within the tolerance.
    passing = [r for r in result.records if r.drop is not None and r.drop <= TOL + 1e-9]
    assert result.compressed["macs"] == min([result.original["macs"], *(r.macs for r in passing)])
    final = next(r for r in result.records if r.plan == {n: e.to_json() for n, e in result.plan.items()})
    assert (final.params, final.bytes, final.macs) == (counted.params, counted.bytes, counted.macs)
    # Monotone is what the measured pairs say.
    from rankshrink.search.allocate import measured_monotone

    assert result.monotone == measured_monotone(result.records)
    low, high = summary["drop_ci"]["validation"]
    assert low <= result.drop <= high


def test_the_default_tolerance_search_is_cheaper_than_probing_first(tolerance_results):
    # Measured on this CNN: whole-model plans for every evaluation (auto) beat one-layer probes first.
    assert tolerance_results["auto"].compressed["macs"] <= tolerance_results["probe"].compressed["macs"]


def test_tolerance_mode_never_loses_to_budget_mode(digits, tolerance_results, shared_cache):
    model, splits = digits
    result = tolerance_results["auto"]
    for budget in (0.5, 0.3, 0.2, 0.15, 0.12, 0.1, 0.08):
        other = plan(model, splits, budget={"macs": budget}, cache=shared_cache, progress=False)
        if other.drop <= TOL + 1e-9:  # whatever budget mode finds within the tolerance ...
            assert result.compressed["macs"] <= other.compressed["macs"], budget  # ... is no cheaper


def test_confidence_applies_the_tolerance_to_the_intervals_upper_end(digits, shared_cache):
    model, splits = digits
    tolerance = 0.02
    result = plan(model, splits, tolerance=tolerance, confidence=0.95, cache=shared_cache, progress=False)
    plain = plan(model, splits, tolerance=tolerance, cache=shared_cache, progress=False)
    low, high = result.drop_ci["validation"]
    assert result.confidence == 0.95 and low <= result.drop <= high <= tolerance + 1e-9
    judged = [r for r in result.records if r.plan]
    assert judged and all(r.drop_high is not None and r.drop_high >= r.drop - 1e-12 for r in judged)
    # The answer is the cheapest plan whose upper end is within the tolerance ...
    passing = [r.macs for r in judged if r.drop_high <= tolerance + 1e-9]
    assert result.compressed["macs"] == min(passing)
    # ... and the reported interval is the one the answer was judged by.
    final = next(r for r in judged if r.plan == {n: e.to_json() for n, e in result.plan.items()})
    assert final.drop_high == high
    # Demanding confidence cannot make the accepted drop larger than the tolerance allows.
    assert plain.drop <= tolerance + 1e-9 and result.drop <= tolerance


def test_the_model_is_not_modified(digits, tolerance_results):
    model, splits = digits
    from rankshrink.fingerprint import module_fingerprint as model_fingerprint

    before = model_fingerprint(model)
    tolerance_results["proxy"].compressed_model()
    assert model_fingerprint(model) == before
    assert all(type(m).__name__ != "Factorized" for m in model.modules())


# --------------------------------------------------------------------------- whole network, budget

@pytest.mark.parametrize("budget", [{"macs": 0.5}, {"macs": 0.3}, {"macs": 0.2}, {"params": 0.25},
                                    {"bytes": 100_000}])
def test_budget_lands_within_two_percent_under_and_never_over(digits, shared_cache, budget):
    model, splits = digits
    result = plan(model, splits, budget=budget, cache=shared_cache, progress=False)
    (kind, value), = budget.items()
    target = result.budget["target"]
    assert target == (int(value * result.original[kind]) if value <= 1 else value)
    counted = count(result.compressed_model(), splits.val.tensors[0][:1])
    actual = {"macs": counted.macs, "params": counted.params, "bytes": counted.bytes}[kind]
    assert actual == result.compressed[kind]
    assert 0.98 * target <= actual <= target
    assert result.requested <= 1 + 10  # the original, the allocation and at most 9 neighbours
    assert result.value > 0.5


def test_budget_below_the_minimum_reachable_is_refused(digits, shared_cache):
    model, splits = digits
    with pytest.raises(ConfigError, match="minimum reachable"):
        plan(model, splits, budget={"macs": 100}, cache=shared_cache, progress=False)


# --------------------------------------------------------------------------- cache and interruption

def test_repeat_run_costs_nothing_and_a_corrupt_entry_is_recomputed(digits, tmp_path):
    model, splits = digits
    kw = dict(tolerance=TOL, methods=["svd"], cache=tmp_path / "c", progress=False)
    first = plan(model, splits, **kw)
    assert first.evaluations == first.requested > 0 and first.evaluations_cached == 0
    second = plan(model, splits, **kw)
    assert second.evaluations == 0 and second.evaluations_cached == first.requested
    assert second.plan.key() == first.plan.key()
    entries = sorted((tmp_path / "c" / "evaluations").rglob("*.json"))
    assert len(entries) == first.requested
    entry = json.loads(entries[0].read_text())
    entry["value"] = entry["value"] + 0.1  # a flipped bit: the checksum no longer matches
    entries[0].write_text(json.dumps(entry))
    with pytest.warns(CacheWarning, match="corrupt"):
        third = plan(model, splits, **kw)
    assert third.evaluations == 1 and third.evaluations_cached == first.requested - 1
    assert third.plan.key() == first.plan.key()


def test_interrupted_search_resumes_without_repeating_evaluations(digits, tmp_path):
    model, splits = digits
    calls = []

    def metric(m):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return accuracy(m, splits.val)

    metric.cache_key = "val-accuracy"
    kw = dict(tolerance=TOL, methods=["svd"], cache=tmp_path / "c", progress=False)
    with pytest.raises(SearchInterrupted):
        plan(model, splits, metric=metric, **kw)
    assert len(calls) == 6
    resumed = plan(model, splits, metric=metric, **kw)
    assert resumed.evaluations_cached == 5
    fresh = plan(model, splits, metric=metric, tolerance=TOL, methods=["svd"], cache=False, progress=False)
    assert resumed.plan.key() == fresh.plan.key() and resumed.requested == fresh.requested


# --------------------------------------------------------------------------- metrics and injection

def test_agreement_needs_no_labels(digits):
    model, splits = digits
    inputs = splits.val.tensors[0]
    unlabeled = TensorDataset(inputs, torch.zeros(len(inputs), dtype=torch.long))
    result = plan(model, unlabeled, tolerance=0.02, metric="agreement", methods=["svd"], cache=False,
                  progress=False)
    assert result.baseline == 1.0 and result.value >= 0.98 - 1e-9
    assert result.metric == "agreement"


def test_factorization_step_is_injectable(digits):
    model, splits = digits
    seen = []

    def my_apply(m, p):
        seen.append(p.key())
        return apply(m, p)

    result = plan(model, splits, tolerance=TOL, methods=["svd"], apply_fn=my_apply, cache=False, progress=False)
    assert seen and result.fit == "weights"
    weights_only = plan(model, splits, tolerance=TOL, methods=["svd"], fit="weights", cache=False,
                        progress=False)
    assert weights_only.fit == "weights"


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_give_clear_errors(digits):
    model, splits = digits
    for tolerance in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="tolerance"):
            plan(model, splits, tolerance=tolerance, cache=False, progress=False)
    with pytest.raises(ConfigError, match="exactly one"):
        plan(model, splits, cache=False, progress=False)
    with pytest.raises(ConfigError, match="exactly one"):
        plan(model, splits, tolerance=0.01, budget={"macs": 0.5}, cache=False, progress=False)
    with pytest.raises(DataError, match="NaN"):
        plan(model, splits, tolerance=0.01, metric=lambda m: float("nan"), methods=["svd"], cache=False,
             progress=False)
    empty = TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        plan(model, empty, tolerance=0.01, cache=False, progress=False)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    with pytest.raises(DataError, match="classes"):
        plan(wrong, splits, tolerance=0.01, cache=False, progress=False)
