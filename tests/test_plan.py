"""Plans: rankshrink.plan (Plan of method configs, versioned JSON)."""

import json

import pytest

from rankshrink.errors import FileFormatError, PlanError
from rankshrink.methods import make_config as LayerPlan
from rankshrink.plan import PLAN_FORMAT, PLAN_VERSION, Plan


def sample_plan():
    return Plan.from_mapping({"features.0": ("tucker2", (8, 4)), "features.3": {"method": "cp", "rank": 6},
                              "classifier.1": ("svd", 12), "block.conv": LayerPlan("spatial", 3)},
                             metadata={"model": "builtin:digits-cnn", "note": "ünïcode ok"})


def test_json_round_trip():
    plan = sample_plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert list(again) == list(plan)  # order kept
    assert again["features.0"] == LayerPlan("tucker2", (8, 4))
    assert again.metadata == plan.metadata
    data = json.loads(plan.to_json())
    assert data["format"] == PLAN_FORMAT and data["version"] == PLAN_VERSION
    entry = data["layers"]["features.0"]
    assert entry["method"] == "tucker2" and entry["rank"] == [8, 4] and entry["fit"] == "weights"
    assert entry["options"] == {"damping": 0.0, "bias_correction": True, "seed": 0, "n_iter_max": 100, "tol": 1e-6}


def test_save_load_round_trip(tmp_path):
    plan = sample_plan()
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert not [p for p in path.parent.iterdir() if p.name != "plan.json"]  # no temp files left


def test_hand_edited_json():
    text = """
    {"format": "rankshrink-plan", "version": 1,
     "layers": {"conv1": {"method": "tucker2", "rank": [16, 3]},
                "conv2": {"rank": 5, "method": "tucker2"},
                "fc":    {"method": "svd", "rank": 10}}}
    """
    plan = Plan.from_json(text)
    assert plan["conv1"].rank == (16, 3) and plan["conv2"].rank == 5 and plan["fc"].rank == 10
    assert plan.metadata == {} and len(plan) == 3 and "fc" in plan and "conv3" not in plan
    # format and version may be left out of a hand-written plan
    assert Plan.from_json('{"layers": {"fc": {"method": "svd", "rank": 2}}}')["fc"] == LayerPlan("svd", 2)


@pytest.mark.parametrize("entry,message", [
    ({"method": "tt", "rank": 3}, "unknown method 'tt'"),
    ({"method": "svd", "rank": 0}, "positive integer"),
    ({"method": "svd", "rank": -2}, "positive integer"),
    ({"method": "svd", "rank": 2.0}, "positive integer"),
    ({"method": "svd", "rank": 2.5}, "positive integer"),
    ({"method": "svd", "rank": True}, "positive integer"),
    ({"method": "svd", "rank": "4"}, "positive integer"),
    ({"method": "svd", "rank": None}, "positive integer"),
    ({"method": "svd", "rank": [4, 2]}, "positive integer"),
    ({"method": "weight", "rank": [4, 2]}, "positive integer"),
    ({"method": "tucker2", "rank": [4, 0]}, r"or a pair \[R_out, R_in\]"),
    ({"method": "tucker2", "rank": [4]}, "pair"),
    ({"method": "tucker2", "rank": [4, 2, 1]}, "pair"),
    ({"method": "tucker2", "rank": [4, 2.0]}, "pair"),
    ({"method": "tucker2", "rank": [True, 2]}, "pair"),
    ({"method": "svd"}, "needs the keys"),
    ({"rank": 3}, "needs the keys"),
    ({}, "needs the keys"),
    ({"method": "svd", "rank": 3, "alpha": 1}, "needs the keys"),
    ({"method": "svd", "rank": 3, "Rank": 3}, "needs the keys"),
    ("svd:3", "expected"),
    (3, "expected"),
    (["svd", 3, 1], "expected"),
    (None, "expected"),
])
def test_malformed_layer_entries_name_the_layer(entry, message):
    text = json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION,
                       "layers": {"ok": {"method": "svd", "rank": 2}, "features.3": entry}})
    with pytest.raises(PlanError, match=message) as info:
        Plan.from_json(text, source="my.json")
    assert "layer 'features.3'" in str(info.value) and "my.json" in str(info.value)
    with pytest.raises(PlanError, match="layer 'features.3'"):
        Plan.from_mapping({"features.3": entry})


@pytest.mark.parametrize("data,message", [
    ({"format": "onnx", "version": 1, "layers": {}}, "'format' is 'onnx'"),
    ({"format": PLAN_FORMAT, "version": 3, "layers": {}}, "version 3 is not supported"),
    ({"format": PLAN_FORMAT, "version": "1", "layers": {}}, "version '1' is not supported"),
    ({"format": PLAN_FORMAT, "version": 1}, "'layers' must be an object"),
    ({"format": PLAN_FORMAT, "version": 1, "layers": [["fc", "svd", 2]]}, "'layers' must be an object"),
    ({"format": PLAN_FORMAT, "version": 1, "layers": {}, "metadata": []}, "'metadata' must be an object"),
    ({"format": PLAN_FORMAT, "version": 1, "layers": {"": {"method": "svd", "rank": 2}}}, "non-empty"),
    ([1, 2], "must be a JSON object"),
    ("plan", "must be a JSON object"),
])
def test_malformed_plan_documents(data, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.dumps(data))


def test_invalid_json_text_and_files(tmp_path):
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json('{"layers": {"fc": {"method": "svd", "rank": 2}}', source="cut.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FileFormatError, match="bad.json"):
        Plan.load(bad)
    with pytest.raises(FileFormatError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": PLAN_FORMAT, "version": 1, "layers": {"fc": {"method": "svd", "rank": 0}}}))
    with pytest.raises(PlanError, match=r"wrong\.json.*layer 'fc'"):
        Plan.load(wrong)


def test_layer_plan_and_plan_helpers():
    assert LayerPlan("tucker2", [3, 2]).rank == (3, 2)  # lists become tuples (hashable, comparable)
    assert LayerPlan("tucker2", 3).to_json()["rank"] == 3
    with pytest.raises(ValueError, match="positive integer"):
        LayerPlan("svd", 0)
    with pytest.raises(PlanError, match="layer 'a'"):
        Plan.from_mapping({"a": ("svd", 0)})
    plan = Plan.from_mapping({"a": ("svd", 2)})
    bigger = plan.with_layer("b", "weight", 3).with_layer("a", "svd", 4)
    assert plan["a"].rank == 2 and "b" not in plan          # original untouched
    assert bigger["a"].rank == 4 and bigger["b"] == LayerPlan("weight", 3)
    assert dict(bigger.items()) == {"a": LayerPlan("svd", 4), "b": LayerPlan("weight", 3)}
    # key() ignores metadata and order
    one = Plan.from_mapping({"a": ("svd", 2), "b": ("cp", 3)}, metadata={"x": 1})
    two = Plan.from_mapping({"b": ("cp", 3), "a": ("svd", 2)})
    assert one.key() == two.key()
    assert one.key() != one.with_layer("a", "svd", 3).key()
    assert len(Plan()) == 0 and Plan.from_json(Plan().to_json()) == Plan()
