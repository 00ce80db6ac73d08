"""``rankshrink lora train`` / ``lora merge``: the command functions and their argparse wiring."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rankshrink import lora
from rankshrink.cli.lora import add_lora_subparser, parse_targets
from rankshrink.errors import ConfigError, FileFormatError
from rankshrink.files import load_tensors, save_tensors


def _parser():
    parser = argparse.ArgumentParser(prog="rankshrink")
    add_lora_subparser(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def base_weights(tmp_path):
    from rankshrink.models import MnistMLP

    torch.manual_seed(0)
    model = MnistMLP(num_features=64)
    path = tmp_path / "base.safetensors"
    save_tensors(path, model.state_dict())
    return model.eval(), path


def test_parse_targets():
    assert parse_targets(None) == "all"
    assert parse_targets(["layers.0,layers.2"]) == ["layers.0", "layers.2"]
    assert parse_targets(["Linear"]) == "Linear"
    with pytest.raises(ConfigError, match="--target is empty"):
        parse_targets([","])


def test_lora_train_then_merge(tmp_path, base_weights, capsys):
    base, weights = base_weights
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    args = _parser().parse_args([
        "lora", "train", "--model", "builtin:mnist-mlp", "--weights", str(weights), "--data", "builtin:digits",
        "--target", "layers.0", "layers.4", "--rank", "2", "--alpha", "4", "--epochs", "1", "--out",
        str(adapter_dir), "--no-progress"])
    assert args.func(args) == 0
    assert "trainable params: 916 of" in capsys.readouterr().out
    summary = json.loads((adapter_dir / "train_summary.json").read_text())
    assert summary["targets"] == ["layers.0", "layers.4"]
    assert summary["trainable_parameters"] == 2 * (64 + 128) + 2 * (256 + 10)
    assert not (adapter_dir / "train_checkpoint.pt").exists()
    adapted = lora.load_adapter(base, adapter_dir)

    args = _parser().parse_args(["lora", "merge", "--model", "builtin:mnist-mlp", "--weights", str(weights),
                                 "--adapter", str(adapter_dir), "--out", str(merged_dir)])
    assert args.func(args) == 0
    from rankshrink.models import MnistMLP

    merged = MnistMLP(num_features=64)
    merged.load_state_dict(load_tensors(merged_dir / "model.safetensors"))
    x = torch.rand(8, 64)
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)

    # the adapter refuses another base unless told otherwise
    other = tmp_path / "other.safetensors"
    save_tensors(other, MnistMLP(num_features=64).state_dict())
    args = _parser().parse_args(["lora", "merge", "--model", "builtin:mnist-mlp", "--weights", str(other),
                                 "--adapter", str(adapter_dir), "--out", str(tmp_path / "m2")])
    with pytest.raises(FileFormatError, match="different base model.*--no-check-fingerprint"):
        args.func(args)
    # a non-empty --out is refused without --force
    args = _parser().parse_args(["lora", "merge", "--model", "builtin:mnist-mlp", "--weights", str(weights),
                                 "--adapter", str(adapter_dir), "--out", str(merged_dir)])
    with pytest.raises(ConfigError, match="not empty.*--force"):
        args.func(args)


def test_lora_merge_compressed_base(tmp_path, base_weights):
    """A compressed model (rankshrink apply output) is adapted and merged; svd blocks grow by r."""
    from rankshrink import Plan, apply, save
    from rankshrink.cli.lora import merge_adapter_command

    base, _ = base_weights
    plan = Plan.from_mapping({"layers.0": ("svd", 8)})
    compressed = apply(base, plan)
    save(compressed, plan, tmp_path / "small")
    adapted = lora.add_adapters(compressed, r=2, lora_alpha=2, target_modules=["layers.0", "layers.2"])
    with torch.no_grad():
        for w in lora.lora_layers(adapted).values():
            w.lora_B["default"].normal_(0, 0.05)
    lora.save_adapter(adapted, tmp_path / "adapter")
    merge_adapter_command(model="builtin:mnist-mlp", weights=str(tmp_path / "small"),
                          adapter=str(tmp_path / "adapter"), out=str(tmp_path / "merged"))
    new_plan = json.loads((tmp_path / "merged" / "plan.json").read_text())
    assert "10" in json.dumps(new_plan)  # svd rank 8 + adapter rank 2
    from rankshrink import load
    from rankshrink.models import MnistMLP

    merged = load(MnistMLP(num_features=64), tmp_path / "merged")
    x = torch.rand(4, 64)
    torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
