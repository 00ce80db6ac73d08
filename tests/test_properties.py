"""Property-based tests (Hypothesis) over random Linear/Conv1d/Conv2d configurations."""

import string

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankshrink.cost import count
from rankshrink.factorized import layer_geometry
from rankshrink.methods import factorize, full_rank, get_method, methods_for, select_options
from rankshrink.methods import make_config as LayerPlan
from rankshrink.plan import Plan

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw, dims):
    """A valid nn.Conv{dims}d configuration and an input that fits it."""
    cin, cout = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same":
        stride = (1,) * dims  # PyTorch allows 'same' only with stride 1
        padding = "same"
    elif kind == "valid":
        padding = "valid"
    elif kind == "int":
        padding = draw(st.integers(0, 3))
    else:
        padding = tuple(draw(st.integers(0, 3)) for _ in range(dims))
    mode = draw(st.sampled_from(MODES))
    bias = draw(st.booleans())
    # Big enough for the kernel's reach and for reflect padding (pad < size).
    size = tuple(d * (k - 1) + draw(st.integers(6, 9)) for k, d in zip(kernel, dilation))
    cls = nn.Conv2d if dims == 2 else nn.Conv1d
    args = dict(stride=stride if dims == 2 else stride[0], padding=padding,
                dilation=dilation if dims == 2 else dilation[0], padding_mode=mode, bias=bias)
    layer = cls(cin, cout, kernel if dims == 2 else kernel[0], **args)
    return layer, (draw(st.integers(1, 2)), cin, *size)


@st.composite
def linear_configs(draw):
    fin, fout = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return nn.Linear(fin, fout, bias=draw(st.booleans())), (*lead, fin)


layers = st.one_of(linear_configs(), conv_configs(1), conv_configs(2))


def prepared(config, seed=0):
    layer, shape = config
    torch.manual_seed(seed)
    layer = layer.double().eval().requires_grad_(False)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer, torch.randn(*shape, dtype=torch.float64)


def flops(model, x):
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x)
    return counter.get_total_flops()


@SETTINGS
@given(layers)
def test_full_rank_reproduces_layer(config):
    layer, x = prepared(config)
    with torch.no_grad():
        y = layer(x)
    scale = float(y.norm()) or 1.0
    for method in methods_for(layer):
        if not get_method(method).exact_at_full_rank:
            continue
        block = factorize(layer, method, full_rank(layer_geometry(layer), method))
        with torch.no_grad():
            out = block(x)
        assert out.shape == y.shape, method
        assert float((out - y).norm()) / scale < 1e-8, method


@settings(SETTINGS, max_examples=12)
@given(layers, st.data())
def test_any_rank_gives_right_shape_and_counted_macs_match(config, data):
    layer, x = prepared(config)
    y = layer(x)
    batch = x.shape[0]
    dense = count(nn.Sequential(layer), x)
    assert 2 * dense.macs * batch == flops(layer, x)
    for method in methods_for(layer):
        top = full_rank(layer_geometry(layer), method)
        if method == "cp":
            top = min(top, 4)  # ALS cost; shape and MACs do not depend on convergence
        rank = data.draw(st.integers(1, top), label=f"{method} rank")
        if method == "tucker2" and data.draw(st.booleans(), label="pair"):
            rank = (data.draw(st.integers(1, layer.out_channels)), data.draw(st.integers(1, layer.in_channels)))
        block = factorize(layer, method, rank, **select_options(method, {"n_iter_max": 20}))
        assert block(x).shape == y.shape, method
        model = nn.Sequential(block)
        counted = count(model, x)
        assert 2 * counted.macs * batch == flops(model, x), method
        assert counted.params == sum(p.numel() for p in block.parameters())


names = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12)
entries = st.one_of(
    st.builds(LayerPlan, st.sampled_from(["svd", "spatial", "weight", "cp"]), st.integers(1, 4096)),
    st.builds(LayerPlan, st.just("tucker2"),
              st.one_of(st.integers(1, 512), st.tuples(st.integers(1, 512), st.integers(1, 512)))))
metadata = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.booleans(),
                                                          st.none()), max_size=3)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.dictionaries(names, entries, max_size=6), metadata)
def test_plan_json_round_trip(layers_, meta):
    plan = Plan(layers_, meta)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert list(again) == list(plan)
    assert again.key() == plan.key()
