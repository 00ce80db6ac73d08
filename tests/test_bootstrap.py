"""Paired bootstrap intervals of a metric drop, per-sample metrics, and what the search records."""

import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from rankshrink.errors import ConfigError
from rankshrink.metrics import accuracy, agreement, per_class_accuracy, predictions
from rankshrink.search import EvaluationCache, SearchConfig
from rankshrink.search.allocate import measured_monotone
from rankshrink.search.bootstrap import accuracy_statistic, drop_interval, per_class_statistic
from rankshrink.search.cache import cache_key, decode_predictions, encode_predictions
from rankshrink.search.evaluate import EvaluationRecord
from rankshrink.search.metrics import agreement_metric, as_metric


def test_identical_predictions_have_a_zero_interval():
    labels = np.arange(200) % 10
    preds = np.where(np.arange(200) % 7 == 0, (labels + 1) % 10, labels)
    assert drop_interval(accuracy_statistic(labels), preds, preds) == (0.0, 0.0)


@pytest.mark.parametrize("n,wrong", [(360, 3), (360, 20), (1000, 50)])
def test_interval_matches_the_binomial_when_only_the_compressed_model_errs(n, wrong):
    # The original is right everywhere and the compressed model wrong on `wrong` samples: on a
    # resample the drop is (wrong samples drawn) / n, a Binomial(n, wrong / n) / n.
    labels = np.arange(n) % 10
    compressed = labels.copy()
    compressed[:wrong] = (labels[:wrong] + 1) % 10
    low, high = drop_interval(accuracy_statistic(labels), labels, compressed, resamples=4000, seed=1)
    expected = stats.binom.ppf([0.025, 0.975], n, wrong / n) / n
    assert low <= wrong / n <= high
    assert abs(low - expected[0]) <= 1.5 / n and abs(high - expected[1]) <= 1.5 / n
    # Deterministic for a seed; another seed moves the ends by at most a sample or two.
    assert drop_interval(accuracy_statistic(labels), labels, compressed, resamples=4000, seed=1) == (low, high)
    other = drop_interval(accuracy_statistic(labels), labels, compressed, resamples=4000, seed=2)
    assert abs(other[1] - high) <= 2.5 / n


def test_pairing_cancels_errors_both_models_share():
    # Both models are wrong on the same 40 samples and the compressed one on 2 more: the paired
    # interval of the drop is about those 2, far narrower than the unpaired spread of 42 errors.
    n = 360
    labels = np.arange(n) % 10
    original = labels.copy()
    original[:40] = (labels[:40] + 1) % 10
    compressed = original.copy()
    compressed[40:42] = (labels[40:42] + 1) % 10
    low, high = drop_interval(accuracy_statistic(labels), original, compressed)
    assert 0 <= low and high <= 5.5 / n


def test_confidence_must_lie_strictly_between_zero_and_one():
    labels = np.zeros(4, dtype=np.int64)
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="confidence"):
            drop_interval(accuracy_statistic(labels), labels, labels, confidence=bad)
    with pytest.raises(ConfigError, match="confidence"):
        SearchConfig(confidence=1.0)


def _dataset(n=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 5
    return TensorDataset(x, y)


@pytest.mark.parametrize("name", ["accuracy", "per-class", "worst-class", "agreement"])
def test_built_in_metrics_are_functions_of_their_predictions(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    data = _dataset()
    metric = as_metric(name, model, data, num_classes=5)
    assert metric.per_sample
    direct = metric(other)
    from_predictions = metric.from_predictions(metric.predict(other))
    # agreement() averages in float32; the search computes every metric from predictions in float64
    assert from_predictions == pytest.approx(direct, abs=1e-7)
    expected = {"accuracy": accuracy(other, data),
                "per-class": float(np.nanmean(per_class_accuracy(other, data, num_classes=5))),
                "worst-class": float(np.nanmin(per_class_accuracy(other, data, num_classes=5))),
                "agreement": agreement(other, data, predictions(model, data))}[name]
    assert direct == pytest.approx(expected, abs=1e-7)


def test_per_class_statistic_ignores_classes_missing_from_a_resample():
    labels = np.array([0, 0, 1, 2])
    preds = np.array([0, 1, 1, 0])
    index = np.array([[0, 1, 0, 1], [2, 2, 3, 3]])  # row 0: only class 0; row 1: classes 1 and 2
    assert per_class_statistic(labels, "mean")(preds, index).tolist() == [0.5, 0.5]
    assert per_class_statistic(labels, "min")(preds, index).tolist() == [0.5, 0.0]


def test_a_custom_callable_has_no_per_sample_form():
    metric = as_metric(lambda m: 0.5, nn.Linear(2, 2), None)
    assert not metric.per_sample
    agreement_of_nothing = agreement_metric(nn.Linear(2, 2), _dataset(4))
    assert agreement_of_nothing.per_sample


def test_cached_predictions_roundtrip_and_tampering_is_detected(tmp_path):
    preds = np.array([3, 1, 4, 1, 5, 9, 2, 6, -1], dtype=np.int64)
    assert decode_predictions(encode_predictions(preds)).tolist() == preds.tolist()
    cache = EvaluationCache(tmp_path)
    key = cache_key("m", "{}", "accuracy", "d", "o")
    cache.put(key, 0.75, predictions=preds)
    assert cache.get(key)["predictions"].tolist() == preds.tolist()
    path = cache.path(key)
    entry = json.loads(path.read_text())
    entry["predictions"] = encode_predictions(preds[::-1])  # same value, other predictions
    path.write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.get(key) is None


def _record(plan, value):
    return EvaluationRecord(0, "", plan, value, None, 0.0, False)


def test_monotone_is_computed_from_every_measured_pair():
    dense = {}
    small = {"a": {"method": "svd", "rank": 2, "fit": "weights"}}
    large = {"a": {"method": "svd", "rank": 8, "fit": "weights"}}
    both = {**small, "b": {"method": "svd", "rank": 3, "fit": "weights"}}
    other = {"a": {"method": "cp", "rank": 1, "fit": "weights"}}
    assert measured_monotone([_record(dense, 0.9), _record(large, 0.88), _record(small, 0.8), _record(both, 0.7)])
    # A smaller rank of the same layer measured more accurate than a larger one: not monotone.
    assert not measured_monotone([_record(large, 0.8), _record(small, 0.85)])
    # Adding a compressed layer and gaining accuracy: not monotone either.
    assert not measured_monotone([_record(small, 0.8), _record(both, 0.81)])
    # Different methods of a layer are not comparable by rank.
    assert measured_monotone([_record(other, 0.95), _record(small, 0.8), _record(dense, 0.96)])
    # A compressed model above the original: not monotone (the original keeps every layer).
    assert not measured_monotone([_record(dense, 0.9), _record(small, 0.91)])
