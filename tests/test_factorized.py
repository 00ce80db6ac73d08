"""Layer builders: the method registry (factorize, Factorized, each method's build, ranks)."""

import copy

import pytest
import torch
from torch import nn

from rankshrink import Factorized, factorize
from rankshrink.errors import LayerError
from rankshrink.factorized import layer_geometry, unsupported_reason
from rankshrink.methods import full_rank, get_method, method_names, methods_for, normalize_rank

CONV2D_METHODS = methods_for(nn.Conv2d(1, 1, 1))
CONV1D_METHODS = methods_for(nn.Conv1d(1, 1, 1))
EXACT_AT_FULL_RANK = tuple(m for m in method_names() if get_method(m).exact_at_full_rank)


def build_factorized(geometry, method, rank, **kw):
    return get_method(method).build(geometry, normalize_rank(geometry, method, rank), **kw)

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def make(cls, *args, dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = cls(*args, **kwargs).to(dtype)
    with torch.no_grad():  # non-zero bias so that misplaced biases show up
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_()
    return layer


# (in, out, kernel, stride, padding, dilation, padding_mode, bias)
CONV2D_CASES = [
    (3, 5, 3, 1, 0, 1, "zeros", True),
    (3, 5, 3, 1, 1, 1, "zeros", False),
    (4, 6, 3, 2, 1, 1, "zeros", True),
    (4, 6, (3, 5), (2, 1), (1, 2), (1, 2), "zeros", True),      # rectangular, per-dimension tuples
    (4, 6, (2, 4), 1, "same", 1, "zeros", True),                # 'same' with even kernels
    (4, 6, (2, 3), 1, "same", (2, 1), "zeros", False),          # 'same' + dilation, even kernel
    (4, 6, 3, 1, "same", 1, "reflect", True),
    (4, 6, (2, 2), 1, "same", 1, "circular", True),
    (3, 4, 3, 1, "valid", 1, "zeros", True),
    (3, 4, 3, (1, 2), 1, 1, "reflect", True),
    (3, 4, (3, 1), 1, (1, 0), 1, "replicate", False),
    (3, 4, (1, 3), 2, (0, 2), 1, "circular", True),
    (5, 4, 3, 1, 2, 2, "replicate", True),
    (3, 7, 5, 2, 2, 1, "circular", False),
    (6, 4, 1, 1, 0, 1, "zeros", True),                           # 1×1 kernel
    (4, 6, 1, 2, 0, 1, "zeros", False),                          # strided 1×1
    (2, 9, 3, 1, 1, 1, "zeros", True),                           # T > S·k·k for weight SVD
    (9, 2, 3, 1, 1, 1, "reflect", True),
]

CONV1D_CASES = [
    (3, 5, 3, 1, 0, 1, "zeros", True),
    (3, 5, 4, 1, "same", 1, "zeros", True),                      # 'same' with an even kernel
    (3, 5, 3, 1, "same", 2, "reflect", False),
    (4, 6, 3, 2, 1, 1, "replicate", True),
    (4, 6, 5, 1, 4, 2, "circular", True),
    (4, 6, 3, 1, "valid", 1, "zeros", False),
    (5, 3, 1, 1, 0, 1, "zeros", True),                           # 1-wide kernel
    (2, 8, 2, 3, 1, 1, "zeros", True),
]


def conv_from_case(cls, case, dtype):
    cin, cout, k, stride, padding, dilation, mode, bias = case
    return make(cls, cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                padding_mode=mode, bias=bias, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV2D_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv2d_full_rank_exact(case, dtype):
    layer = conv_from_case(nn.Conv2d, case, dtype)
    x = torch.randn(2, case[0], 9, 10, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    for method in ("spatial", "weight", "tucker2"):
        block = factorize(layer, method, full_rank(layer_geometry(layer), method))
        out = block(x)
        assert out.shape == y.shape, method
        assert rel(out, y) < TOL[dtype], method


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV1D_CASES, ids=lambda c: "-".join(map(str, c)))
def test_conv1d_full_rank_exact(case, dtype):
    layer = conv_from_case(nn.Conv1d, case, dtype)
    x = torch.randn(2, case[0], 13, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    for method in ("weight", "tucker2"):
        block = factorize(layer, method, full_rank(layer_geometry(layer), method))
        out = block(x)
        assert out.shape == y.shape, method
        assert rel(out, y) < TOL[dtype], method


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,bias", [((7, 3), True), ((3, 7), False), ((6, 6), True)])
def test_linear_full_rank_exact(shape, bias, dtype):
    layer = make(nn.Linear, shape[1], shape[0], bias=bias, dtype=dtype)
    for x in (torch.randn(4, shape[1], dtype=dtype), torch.randn(2, 5, shape[1], dtype=dtype)):
        y = layer(x)
        out = factorize(layer, "svd", min(shape))(x)
        assert out.shape == y.shape and rel(out, y) < TOL[dtype]


@pytest.mark.parametrize("method", ["als", "compressed"])
def test_cp_layer_reproduces_planted_kernel(method):
    from test_decompose import planted_cp

    layer = make(nn.Conv2d, 5, 6, 3, padding=1, padding_mode="reflect")
    with torch.no_grad():
        layer.weight.copy_(planted_cp((6, 5, 3, 3), 4, seed=2))
    x = torch.randn(2, 5, 8, 8, dtype=torch.float64)
    block = factorize(layer, "cp", 4, algorithm=method)
    assert [type(m) for m in block] == [nn.Conv2d] * 4
    assert block[1].groups == block[2].groups == 4
    assert rel(block(x), layer(x)) < 1e-5
    assert rel(block.dense_weight(), layer.weight) < 1e-5


def all_blocks(bias=True):
    lin = make(nn.Linear, 6, 4, bias=bias)
    c2 = make(nn.Conv2d, 4, 5, 3, padding=1, bias=bias)
    c1 = make(nn.Conv1d, 4, 5, 3, padding=1, bias=bias)
    yield lin, factorize(lin, "svd", 4)
    for method in CONV2D_METHODS:
        yield c2, factorize(c2, method, full_rank(layer_geometry(c2), method) if method != "cp" else 3)
    for method in CONV1D_METHODS:
        yield c1, factorize(c1, method, full_rank(layer_geometry(c1), method) if method != "cp" else 3)


@pytest.mark.parametrize("bias", [True, False])
def test_bias_only_on_last_factor(bias):
    for layer, block in all_blocks(bias):
        assert isinstance(block, Factorized) and isinstance(block, nn.Sequential)
        assert all(f.bias is None for f in list(block)[:-1]), block.method
        if bias:
            assert torch.equal(block[-1].bias, layer.bias) and block.bias is block[-1].bias
        else:
            assert block[-1].bias is None and block.bias is None


def test_full_rank_dense_weight_equals_original():
    for layer, block in all_blocks():
        if block.method in EXACT_AT_FULL_RANK:
            assert block.dense_weight().shape == layer.weight.shape
            assert torch.allclose(block.dense_weight(), layer.weight, rtol=0, atol=1e-12), block.method


def test_block_metadata_and_repr():
    layer = make(nn.Conv2d, 4, 6, 3, stride=2, padding="valid")
    block = factorize(layer, "tucker2", 3)
    assert block.method == "tucker2" and block.rank == (3, 3)
    assert block.geometry == layer_geometry(layer)
    assert block.geometry["padding"] == "valid" and block.geometry["stride"] == [2, 2]
    assert "method='tucker2'" in repr(block) and "replaces=Conv2d" in repr(block)
    assert factorize(layer, "tucker2", [4, 2]).rank == (4, 2)
    assert [tuple(w.shape) for w in factorize(layer, "tucker2", (4, 2)).factor_weights()] == \
        [(2, 4, 1, 1), (4, 2, 3, 3), (6, 4, 1, 1)]


def relative_weight_errors(layer, method, ranks):
    return [rel(factorize(layer, method, r).dense_weight(), layer.weight) for r in ranks]


@pytest.mark.parametrize("method", ["svd", "spatial", "weight", "tucker2"])
def test_error_non_increasing_in_rank(method):
    if method == "svd":
        layer = make(nn.Linear, 12, 10, seed=3)
    else:
        layer = make(nn.Conv2d, 6, 8, 3, padding=1, seed=3)
    top = full_rank(layer_geometry(layer), method)
    errors = relative_weight_errors(layer, method, range(1, top + 1))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers(dtype):
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    layers = [(make(nn.Linear, 16, 8, dtype=dtype), "svd", 8, torch.randn(3, 16)),
              (make(nn.Conv2d, 4, 6, 3, padding=1, dtype=dtype), "weight", 6, torch.randn(2, 4, 6, 6)),
              (make(nn.Conv2d, 4, 6, 3, padding=1, dtype=dtype), "spatial", 12, torch.randn(2, 4, 6, 6)),
              (make(nn.Conv2d, 4, 6, 3, padding=1, dtype=dtype), "tucker2", 6, torch.randn(2, 4, 6, 6)),
              (make(nn.Conv2d, 4, 6, 3, padding=1, dtype=dtype), "cp", 3, torch.randn(2, 4, 6, 6)),
              (make(nn.Conv1d, 4, 6, 3, dtype=dtype), "tucker2", 6, torch.randn(2, 4, 9))]
    for layer, method, rank, x in layers:
        block = factorize(layer, method, rank)
        assert all(p.dtype == dtype for p in block.parameters()), method
        out = block(x.to(dtype))
        assert out.dtype == dtype
        if method != "cp":
            assert rel(block.dense_weight().float(), layer.weight.float()) < tol, method


def test_factorize_leaves_layer_untouched_and_keeps_mode():
    layer = make(nn.Conv2d, 4, 6, 3)
    before = copy.deepcopy(layer.state_dict())
    layer.eval()
    block = factorize(layer, "weight", 3)
    assert not block.training
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.train()
    assert factorize(layer, "weight", 3).training
    assert all(p.requires_grad for p in block.parameters())


def test_svd_method_option_reaches_the_decomposition():
    layer = make(nn.Linear, 300, 200, dtype=torch.float32)
    a = factorize(layer, "svd", 20, algorithm="randomized", seed=1)
    b = factorize(layer, "svd", 20, algorithm="exact")
    assert not torch.equal(a[0].weight, b[0].weight)
    assert rel(a.dense_weight(), layer.weight) <= rel(b.dense_weight(), layer.weight) * 1.05


def test_options_routed_per_method_and_unknown_refused():
    from rankshrink.errors import ConfigError
    from rankshrink.methods import select_options

    conv = make(nn.Conv2d, 4, 6, 3)
    # One set of options serves every method: top-level keys go to the methods that have them,
    # a method's own name holds options for it alone.
    mixed = {"power_iters": 2, "refine_iters": 2, "n_iter_max": 50, "seed": 3,
             "spatial": {"algorithm": "randomized"}, "weight": {"algorithm": "randomized"}, "cp": {"algorithm": "als"}}
    for method in CONV2D_METHODS:
        picked = select_options(method, mixed)
        assert picked["seed"] == 3 and isinstance(factorize(conv, method, 3, **picked), Factorized)
    assert select_options("cp", mixed)["algorithm"] == "als" and "power_iters" not in select_options("cp", mixed)
    with pytest.raises(LayerError, match="unknown factorization option"):
        factorize(conv, "weight", 3, power_iter=2)
    with pytest.raises(ConfigError, match="unknown factorization option"):
        select_options("weight", {"power_iter": 2})
    with pytest.raises(LayerError, match="algorithm must be one of auto, als, compressed"):
        factorize(conv, "cp", 3, algorithm="randomized")


def test_unsupported_layers():
    class MyLinear(nn.Linear):
        pass

    assert unsupported_reason(nn.Linear(3, 4)) is None
    assert unsupported_reason(nn.Conv2d(3, 4, 3)) is None
    assert "depthwise" in unsupported_reason(nn.Conv2d(4, 4, 3, groups=4))
    assert "grouped" in unsupported_reason(nn.Conv1d(4, 8, 3, groups=2))
    assert "subclass" in unsupported_reason(MyLinear(3, 4))
    assert "Conv3d" in unsupported_reason(nn.Conv3d(2, 2, 3))
    assert "ConvTranspose2d" in unsupported_reason(nn.ConvTranspose2d(2, 2, 3))
    assert "no weight matrix" in unsupported_reason(nn.ReLU())
    assert "no weight matrix" in unsupported_reason(nn.BatchNorm2d(3))
    assert "already factorized" in unsupported_reason(factorize(nn.Linear(4, 4), "svd", 2))
    for module in (nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), MyLinear(3, 4)):
        with pytest.raises(LayerError, match="cannot factorize"):
            factorize(module, "weight", 1, name="blk")


def test_method_and_rank_errors():
    lin, conv2, conv1 = nn.Linear(6, 4), nn.Conv2d(3, 5, 3), nn.Conv1d(3, 5, 3)
    assert methods_for(lin) == ("svd",) and methods_for(conv1) == CONV1D_METHODS
    with pytest.raises(LayerError, match="does not apply to Linear"):
        factorize(lin, "tucker2", 2)
    with pytest.raises(LayerError, match="does not apply to Conv2d"):
        factorize(conv2, "svd", 2)
    with pytest.raises(LayerError, match="does not apply to Conv1d"):
        factorize(conv1, "spatial", 2)
    with pytest.raises(LayerError, match="unknown method 'tt'"):
        factorize(conv2, "tt", 2)
    for bad in (0, -1, 2.0, True, None):  # not a rank at all: refused by the config
        with pytest.raises(LayerError, match=r"fc: rank must be a positive integer"):
            factorize(lin, "svd", bad, name="fc")
    with pytest.raises(LayerError, match=r"outside 1\.\.4"):  # a rank, but not for this layer
        factorize(lin, "svd", 5, name="fc")
    with pytest.raises(LayerError, match="fc"):
        factorize(lin, "svd", 0, name="fc")
    with pytest.raises(LayerError, match="tucker2"):
        factorize(conv2, "tucker2", (6, 1))
    geometry = layer_geometry(conv2)
    assert normalize_rank(geometry, "tucker2", 4) == (4, 3)
    assert normalize_rank(geometry, "tucker2", [2, 3]) == (2, 3)
    assert full_rank(geometry, "spatial") == 9 and full_rank(geometry, "weight") == 5
    broken = nn.Linear(3, 3)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    with pytest.raises(LayerError, match="NaN"):
        factorize(broken, "svd", 2)


def test_build_factorized_matches_factorize_structure():
    layer = make(nn.Conv2d, 4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2),
                 padding_mode="reflect")
    for method in CONV2D_METHODS:
        block = factorize(layer, method, 3)
        empty = build_factorized(block.geometry, method, 3, device="meta")
        assert [type(m) for m in empty] == [type(m) for m in block]
        for a, b in zip(empty, block):
            assert a.weight.shape == b.weight.shape
            for attr in ("stride", "padding", "dilation", "groups", "padding_mode"):
                assert getattr(a, attr) == getattr(b, attr)
        empty = build_factorized(block.geometry, method, 3, dtype=torch.float64)
        empty.load_state_dict(block.state_dict())
        x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
        assert torch.equal(empty(x), block(x))
