"""Hugging Face encoders: hf:DIR models, text:FILE data, label-free metrics, embeddings, reachability.

The encoder is a small BERT built from a random-initialized transformers config in the test and saved
with its own WordPiece tokenizer to a temporary directory: nothing is downloaded.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import rankshrink as rs  # noqa: E402
from rankshrink.data.text import load_text, tokenize_lines  # noqa: E402
from rankshrink.models.hf import load_hf_model, load_hf_tokenizer  # noqa: E402


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    from rankshrink.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()

WORDS = ["the", "a", "cat", "dog", "runs", "sits", "on", "mat", "big", "small", "red", "blue", "house", "tree",
         "and", "with", "under", "over", "quick", "slow", "bird", "sings", "near", "river"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """(model directory, text file): a 2-layer BERT (hidden 32) with its tokenizer, and 120 lines of text."""
    root = tmp_path_factory.mktemp("hf")
    model_dir = root / "model"
    model_dir.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(model_dir / "vocab.txt")).save_pretrained(str(model_dir))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.2)  # weights large enough that ranks matter
    transformers.BertModel(config).eval().save_pretrained(str(model_dir))
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(120)]
    text = root / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    return model_dir, text


def test_text_data_is_dict_inputs_and_padding_never_enters_calibration(encoder_dir):
    model_dir, text = encoder_dir
    splits = load_text(text, model_dir, max_length=16)
    inputs = splits.train[0]  # unlabelled: the sample is its inputs
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["input_ids"].shape[0] <= 16
    model = load_hf_model(f"hf:{model_dir}")
    n = 40
    cal = rs.calibrate(model, splits.train, samples=n, layers=["encoder.layer.0.attention.self.query",
                                                               "embeddings.word_embeddings"])
    ids = torch.stack([splits.train[i]["input_ids"] for i in range(len(splits.train))])
    mask = torch.stack([splits.train[i]["attention_mask"] for i in range(len(splits.train))]).bool()
    assert bool((~mask).any()), "the test needs padding"
    # The calibration samples are drawn from the training split; whichever they are, only real tokens count:
    query = cal["encoder.layer.0.attention.self.query"]
    counts = cal["embeddings.word_embeddings"]
    assert query.count == int(counts._counts().sum())  # one row per real token, in both statistics
    assert query.count < n * ids.shape[1]  # padding rows would make it n × positions
    assert float(counts._counts()[0]) == 0.0  # [PAD] (id 0) is never counted


def test_cosine_metric_is_the_mean_cosine_of_mask_pooled_hidden_states(encoder_dir):
    from rankshrink.search.metrics import as_metric

    model_dir, text = encoder_dir
    splits = load_text(text, model_dir, max_length=16)
    original = load_hf_model(model_dir)
    other = load_hf_model(model_dir)
    with torch.no_grad():
        other.encoder.layer[1].output.dense.weight.mul_(30.0)
    metric = as_metric("cosine", original, splits.val)
    assert metric(original) == pytest.approx(1.0, abs=1e-12)
    # By hand: mean-pool each model's last hidden state over the real tokens, then the mean cosine.
    cosines = []
    for i in range(len(splits.val)):
        sample = {k: v[None] for k, v in splits.val[i].items()}
        with torch.no_grad():
            a, b = other(**sample).last_hidden_state[0], original(**sample).last_hidden_state[0]
        keep = sample["attention_mask"][0].bool()
        ea, eb = a[keep].double().mean(0), b[keep].double().mean(0)
        cosines.append(float(ea @ eb / (ea.norm() * eb.norm())))
    expected = sum(cosines) / len(cosines)
    assert expected < 0.99  # the change is visible
    assert metric(other) == pytest.approx(expected, abs=1e-6)


def test_cosine_mse_kl_on_tensor_outputs_by_hand():
    from rankshrink.search.metrics import as_metric

    torch.manual_seed(0)
    x = torch.randn(50, 6)
    data = torch.utils.data.TensorDataset(x)
    original = nn.Linear(6, 4)
    other = nn.Linear(6, 4)
    with torch.no_grad():
        y0, y = original(x).double(), other(x).double()
    cos = float(torch.nn.functional.cosine_similarity(y, y0, dim=1).mean())
    mse = 1 - float((y - y0).pow(2).sum() / (y0 - y0.mean(0)).pow(2).sum())
    p0 = y0.log_softmax(1)
    kl = -float((p0.exp() * (p0 - y.log_softmax(1))).sum(1).mean())
    assert as_metric("cosine", original, data)(other) == pytest.approx(cos, abs=1e-9)
    assert as_metric("mse", original, data)(other) == pytest.approx(mse, abs=1e-9)
    assert as_metric("kl", original, data)(other) == pytest.approx(kl, abs=1e-9)
    assert as_metric("kl", original, data)(original) == pytest.approx(0.0, abs=1e-12)


def test_token_distillation_loss_by_hand_ignores_padding():
    from rankshrink.train import token_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    cos = torch.nn.functional.cosine_similarity
    real = [(0, 0), (0, 1), (0, 2), (1, 0)]
    expected = sum(1 - float(cos(student[b, t], teacher[b, t], dim=0)) for b, t in real) / len(real)
    loss = token_loss({"last_hidden_state": student}, {"last_hidden_state": teacher}, {"attention_mask": mask})
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    padded = student.clone()
    padded[0, 3] = 100.0  # a padding token never counts
    again = token_loss({"last_hidden_state": padded}, {"last_hidden_state": teacher}, {"attention_mask": mask})
    assert float(again) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("fit", ["weights", "activations"])
def test_embedding_factorization_is_exact_at_full_rank(fit):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Flatten(), nn.Linear(40, 3))
    ids = torch.randint(0, 30, (64, 5))
    data = torch.utils.data.TensorDataset(ids)
    plan = {"0": {"method": "embedding", "rank": 8, "fit": fit}}
    small = rs.apply(model, plan, data=data if fit == "activations" else None)
    block = small[0]
    assert isinstance(block[0], nn.Embedding) and block[0].weight.shape == (30, 8)
    assert isinstance(block[1], nn.Linear) and block[1].weight.shape == (8, 8)
    with torch.no_grad():
        assert torch.allclose(small(ids), model(ids), atol=1e-5)
        # every row of the table, seen in calibration or not
        assert torch.allclose(block(torch.arange(30)), model[0](torch.arange(30)), atol=1e-5)


def test_embedding_activation_fit_is_the_count_weighted_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(200, 16))
    ids = torch.randint(0, 20, (256, 4))  # only the first 20 tokens are ever looked up
    data = torch.utils.data.TensorDataset(ids)
    rank = 4

    def error(entry) -> float:
        small = rs.apply(model, {"0": {"method": "embedding", "rank": rank, **entry}},
                         data=data if entry["fit"] == "activations" else None)
        with torch.no_grad():
            return float((small(ids) - model(ids)).double().pow(2).sum() / model(ids).double().pow(2).sum())

    # By hand: the lookups' error is Σ_v counts[v]·‖w_v − w'_v‖², minimised by the truncated SVD of the
    # table with rows scaled by √counts; what is left is its tail of squared singular values.
    counts = torch.bincount(ids.reshape(-1), minlength=200).double()
    scaled = model[0].weight.detach().double() * counts.sqrt()[:, None]
    singular = torch.linalg.svdvals(scaled)
    optimum = float(singular[rank:].pow(2).sum() / singular.pow(2).sum())
    assert error({"fit": "activations", "options": {"damping": 0.0}}) == pytest.approx(optimum, rel=1e-4)
    assert error({"fit": "activations"}) < error({"fit": "weights"})  # the default damping still favours use


def test_gpt2_conv1d_is_factorized_as_a_linear_exactly_at_full_rank():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8), nn.ReLU(), nn.Linear(12, 2))  # Conv1D(nf=out, nx=in): a fused projection
    x = torch.randn(10, 3, 8)
    plan = {"0": {"method": "svd", "rank": 8, "fit": "weights"}}
    small = rs.apply(model, plan)
    assert isinstance(small[0][0], nn.Linear) and small[0][0].in_features == 8
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_unreached_pooler_is_reported_and_left_out(encoder_dir):
    from rankshrink.reachability import unreached_layers

    model_dir, _ = encoder_dir
    model = load_hf_model(model_dir)
    tokenizer = load_hf_tokenizer(model_dir)
    example = tokenize_lines(["the cat sits", "a dog runs on the mat"], tokenizer)
    names = ["pooler.dense", "encoder.layer.1.output.dense", "encoder.layer.0.attention.self.query"]
    found = unreached_layers(model, example, names)
    assert set(found) == {"pooler.dense"} and "does not reach" in found["pooler.dense"]


def test_cache_key_includes_the_model_code():
    from rankshrink.fingerprint import code_fingerprint, module_fingerprint

    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return 2 * self.fc(x)

    class Plain(Doubled):
        def forward(self, x):
            return self.fc(x)

    a, b = Doubled(), Plain()
    b.load_state_dict(a.state_dict())
    assert module_fingerprint(a) == module_fingerprint(b)  # the same weights ...
    assert code_fingerprint(a) != code_fingerprint(b)  # ... run by other code


def test_hf_errors_are_one_clear_line(tmp_path):
    from rankshrink.errors import RankshrinkError

    with pytest.raises(RankshrinkError, match="no config.json"):
        load_hf_model(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RankshrinkError, match="no weights"):
        load_hf_model(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("one line\nanother\n")
    code, _, err = run_cli(["compress", "--model", "builtin:digits-cnn", "--data", f"text:{text}",
                            "--max-params", "50%", "--out", str(tmp_path / "out")])
    assert code == 1 and "needs a tokenizer" in err and "Traceback" not in err


@pytest.mark.slow
def test_hf_compress_load_export_end_to_end(encoder_dir, tmp_path):
    """CLI compress of hf:DIR on text:FILE (cosine, 50% of the factorizable parameters), reload, export."""
    model_dir, text = encoder_dir
    out = tmp_path / "out"
    code, stdout, err = run_cli(["compress", "--model", f"hf:{model_dir}", "--data", f"text:{text}",
                                 "--max-length", "24", "--metric", "cosine", "--max-params", "50%-of-factorizable",
                                 "--out", str(out), "--no-cache", "--quiet", "--no-report",
                                 "--ignore-latency"])  # a 32-wide toy: its factors run slower than dense
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())["layers"]
    assert plan and "pooler.dense" not in plan
    original = load_hf_model(model_dir)
    loaded = rs.load(lambda: load_hf_model(model_dir), out)
    params = sum(p.numel() for p in loaded.parameters())
    dense = sum(p.numel() for p in original.parameters())
    budget = summary["budget"]
    assert budget["of"] == "factorizable" and params <= budget["target"] < dense
    # The budget: everything but the factorizable layers as it is, plus half of theirs.
    factorizable = budget["factorizable"]
    assert budget["target"] == int(dense - factorizable + 0.5 * factorizable)
    # The reloaded model is the compressed one: its validation cosine is the one the search reported.
    splits = load_text(text, model_dir, max_length=24)
    from rankshrink.search.metrics import as_metric

    cosine = as_metric("cosine", original, splits.val)(loaded)
    assert cosine == pytest.approx(summary["compressed"]["metric"], abs=1e-6)
    assert 0.5 < cosine <= 1.0
    example = tokenize_lines(["the cat sits on the mat", "a dog"], load_hf_tokenizer(model_dir), 24)
    # transformers' masking code branches on sequence lengths, which the tracer reports as data-dependent: the
    # export is allowed through and verified on ONNX Runtime at several batch sizes and lengths instead.
    path = rs.export(loaded, example, tmp_path / "encoder.onnx", allow_traced_branches=True,
                     dynamic_axes={name: [1] for name in example})
    assert path.is_file() and path.stat().st_size > 0
    assert (out / "model.onnx").is_file()  # compress shipped its own, verified on real (padded) inputs
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    longer = tokenize_lines(["a much longer sentence than the example had, with many more tokens in it"],
                            load_hf_tokenizer(model_dir), 24)
    feed = {i.name: longer[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feed)[0]
    with torch.no_grad():
        want = loaded(**longer).last_hidden_state.numpy()
    assert got.shape == want.shape and abs(got - want).max() < 1e-4


def _factorized_encoder(model_dir, splits, rank=4):
    original = load_hf_model(model_dir)
    plan = {name: {"method": "svd", "rank": rank, "fit": "weights"} for name, module in original.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("encoder.")}
    return original, rs.apply(original, plan)


@pytest.mark.slow
def test_encoder_distillation_on_unlabelled_text_uses_cosine_and_a_small_default_lr(encoder_dir):
    from rankshrink.finetuning import ENCODER_LR
    from rankshrink.search.metrics import as_metric

    model_dir, text = encoder_dir
    splits = load_text(text, model_dir, max_length=16)
    original, small = _factorized_encoder(model_dir, splits)
    result = rs.finetune(small, splits, 2, teacher=original, batch_size=16, progress=False)
    assert result.distilled and result.train.history[0]["lr"] == pytest.approx(ENCODER_LR)
    # validation is the mean cosine with the teacher's outputs; keep-best never returns worse
    cosine = as_metric("cosine", original, splits.val)
    assert result.val_before == pytest.approx(cosine(small), abs=1e-9)
    assert result.val_after == pytest.approx(cosine(result.model), abs=1e-9)
    assert result.val_after >= result.val_before and result.val_before < 0.999
    # a learning rate that wrecks the model: keep-best returns the start and says so
    _, close = _factorized_encoder(model_dir, splits, rank=24)
    with pytest.warns(UserWarning, match="keep-best returned the starting weights"):
        wrecked = rs.finetune(close, splits, 1, teacher=original, batch_size=16, lr=50.0, progress=False)
    assert wrecked.train.best_epoch == 0 and wrecked.val_after == pytest.approx(cosine(close), abs=1e-9)


def test_workers_without_ray_say_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from rankshrink.errors import ConfigError
    from rankshrink.search.config import SearchConfig
    from rankshrink.search.parallel import make_pool

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(ConfigError, match=r"needs Ray: pip install 'rankshrink\[ray\]'"):
        make_pool(SearchConfig(workers=2), nn.Linear(2, 2), None)
    code, _, err = run_cli(["compress", "--model", "builtin:digits-cnn", "--max-params", "50%", "--workers", "2",
                            "--out", str(tmp_path / "out")])
    assert code == 1 and "pip install 'rankshrink[ray]'" in err and "Traceback" not in err


@pytest.mark.slow
def test_two_ray_workers_find_the_same_plan_as_in_process(encoder_dir):
    pytest.importorskip("ray")
    model_dir, text = encoder_dir
    splits = load_text(text, model_dir, max_length=16)
    results = {}
    for workers in (None, 2):
        results[workers] = rs.compress(load_hf_model(model_dir), splits, budget={"params": 0.5, "of": "factorizable"},
                                       metric="cosine", cache=False, progress=False, workers=workers,
                                       distortion="closed-form")  # its probes run on the pool too
    local, ray = results[None], results[2]
    assert ray.plan.key() == local.plan.key() and ray.value == local.value
    assert [r.value for r in ray.records] == [r.value for r in local.records]


def test_closed_form_error_curve_equals_the_measured_layer_error_at_every_rank():
    """The data-aware error of the optimal rank-r factors follows from the whitened spectrum, no forward pass."""
    from rankshrink.methods import get_method

    torch.manual_seed(0)
    layer = nn.Linear(16, 12, bias=False)
    mixing = torch.randn(16, 16) * torch.linspace(0.1, 2.0, 16)  # correlated, unequal input directions
    x = torch.randn(400, 16) @ mixing
    model = nn.Sequential(layer)
    cal = rs.calibrate(model, torch.utils.data.TensorDataset(x), samples=400)
    svd = get_method("svd")
    config = svd.config_class(rank=1, fit="activations", damping=0.0)
    errors, total = svd.error_curve(layer.weight, config, cal["0"])
    with torch.no_grad():
        reference = layer(x).double()
    assert total == pytest.approx(float(reference.pow(2).sum()), rel=1e-6)
    for rank in (1, 4, 8, 12):
        small = rs.apply(model, {"0": {"method": "svd", "rank": rank, "fit": "activations",
                                       "options": {"damping": 0.0}}}, calibration=cal)
        with torch.no_grad():
            measured = float((small(x).double() - reference).pow(2).sum())
        assert float(errors[rank]) == pytest.approx(measured, rel=1e-4, abs=1e-6 * total), rank


@pytest.mark.parametrize("argv, expected", [
    (["--max-params", "50%-of-factorizable"], {"params": 0.5, "of": "factorizable"}),
    (["--max-params", "40%", "--budget-of", "factorizable"], {"params": 0.4, "of": "factorizable"}),
    (["--max-macs", "0.3 of model"], {"macs": 0.3}),
    (["--max-bytes", "25%-of-factorizable"], {"bytes": 0.25, "of": "factorizable"}),
])
def test_budget_of_factorizable_is_parsed(argv, expected):
    import argparse

    from rankshrink.cli.compress import _target

    args = argparse.Namespace(tolerance=None, max_macs=None, max_params=None, max_bytes=None, max_latency=None,
                              budget_of=None)
    for flag, value in zip(argv[::2], argv[1::2]):
        setattr(args, flag.lstrip("-").replace("-", "_"), value)
    assert _target(args) == {"budget": expected}


@pytest.mark.parametrize("argv, message", [
    (["--max-params", "120k-of-factorizable"], "is a count"),
    (["--max-params", "50%-of-factorizable", "--budget-of", "model"], "disagree"),
    (["--tolerance", "1%", "--budget-of", "factorizable"], "applies to a budget"),
])
def test_budget_of_mistakes_are_one_clear_line(argv, message, tmp_path):
    code, _, err = run_cli(["compress", "--model", "builtin:digits-cnn", *argv, "--out", str(tmp_path / "out")])
    assert code == 1 and message in err and "Traceback" not in err
