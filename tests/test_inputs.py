"""Model inputs of any form (rankshrink.inputs) and the verbs that take them: calibrate, finetune, LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankshrink as rs
from rankshrink import inputs
from rankshrink.data import splits_from
from rankshrink.errors import DataError
from user_models import ImageAndSide, side_features


def test_call_batch_take_concat_and_describe():
    x, s = torch.rand(5, 1, 8, 8), torch.rand(5, 4)
    model = ImageAndSide().eval()
    assert torch.equal(inputs.call_model(model, (x, s)), inputs.call_model(model, {"image": x, "side": s}))
    structure = {"image": x, "side": s}
    assert inputs.batch_size(structure) == 5
    part = inputs.take(structure, slice(1, 3))
    assert part["image"].shape == (2, 1, 8, 8) and torch.equal(part["side"], s[1:3])
    joined = inputs.concat([inputs.take(structure, slice(0, 2)), inputs.take(structure, slice(2, 5))])
    assert torch.equal(joined["image"], x) and torch.equal(joined["side"], s)
    assert inputs.describe(structure, per_sample=True) == "image (1, 8, 8), side (4,)"
    assert inputs.describe((x, s)) == "input_0 (5, 1, 8, 8), input_1 (5, 4)"
    assert inputs.input_names((x, s)) == ["input_0", "input_1"] and inputs.input_names(x) == ["input"]
    with pytest.raises(DataError, match="disagree on the number of samples.*'image' has 5, 'side' has 4"):
        inputs.batch_size({"image": x, "side": s[:4]})
    with pytest.raises(DataError, match="'side' has samples of different shapes"):
        inputs.concat([structure, {"image": x, "side": torch.rand(5, 3)}])


def test_to_model_moves_and_casts_floats_only():
    model = nn.Embedding(10, 3).to(torch.float64)
    out = inputs.to_model({"ids": torch.tensor([[1, 2]]), "weights": torch.rand(1, 2)}, model)
    assert out["ids"].dtype == torch.int64 and out["weights"].dtype == torch.float64


def test_signature_and_failures_name_the_input_and_the_layer():
    model = ImageAndSide().eval()
    x, s = torch.rand(2, 1, 8, 8), torch.rand(2, 4)
    with pytest.raises(DataError, match=r"'extra' that ImageAndSide.forward\(image, side\) does not take"):
        inputs.check_signature(model, {"image": x, "side": s, "extra": s})
    with pytest.raises(DataError, match=r"needs 'side'"):
        inputs.check_signature(model, {"image": x})
    with pytest.raises(DataError, match="has 3 inputs per sample but ImageAndSide.forward"):
        inputs.check_signature(model, (x, s, s))
    with pytest.raises(DataError, match=r"layer 'conv' \(Conv2d, expects \(batch, 1, …, …\) inputs\) got "
                                        r"\(2, 3, 8, 8\) float32"):
        inputs.call_checked(model, (torch.rand(2, 3, 8, 8), s))
    assert inputs.output_tensor({"logits": torch.ones(1)}).shape == (1,)
    with pytest.raises(DataError, match="not a tensor of logits"):
        inputs.output_tensor([1, 2])


@pytest.fixture(scope="module")
def two_input_splits():
    digits = rs.data.load_digits_splits()

    def part(ds):
        x, y = ds.tensors
        return {"image": x, "side": side_features(x)}, y

    return splits_from(part(digits.train), part(digits.val), part(digits.test))


@pytest.mark.slow
def test_calibrate_finetune_and_lora_take_dict_inputs(two_input_splits):
    from rankshrink.lora import LoraConfig, add_adapters, train_adapter

    torch.manual_seed(0)
    model = ImageAndSide().eval()
    cal = rs.calibrate(model, two_input_splits, samples=64)
    assert cal["side"].dim == 4 and cal["conv2"].samples == 64
    small = rs.apply(model, {"fc": ("svd", 8), "conv2": ("weight", 6)}, calibration=cal, fit="activations")
    tuned = rs.finetune(small, two_input_splits, 1, teacher=model, progress=False)
    assert tuned.val_after >= tuned.val_before and tuned.test_after is not None
    adapted = add_adapters(model, LoraConfig(r=2, target_modules=["fc", "head"]))
    result = train_adapter(adapted, two_input_splits.train, val_data=two_input_splits.val, epochs=1,
                           progress=False)
    assert result.best_val >= result.initial_val
    assert rs.count(adapted, rs.data.first_batch(two_input_splits.val)[0]).macs > 0
