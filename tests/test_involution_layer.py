"""The Involution module: official names and parameter counts, the official computation on even
sizes, the kernel grid on odd sizes, norms, and FLOP counting."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import official_reference  # tests/ is on sys.path under pytest  # isort: skip

import d2_involution  # noqa: F401  # isort: skip
from d2_involution.layers import Involution, init_kernel_generators
from d2_involution.ops.flops import add_involution_flop_handles

REFERENCE = Path(official_reference.KEYS_JSON or "official_rednet_keys.json")


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and BN statistics, so that no term of the computation is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(
                    torch.rand(t.shape, generator=g) + 0.5
                    if "var" in name
                    else torch.randn(t.shape, generator=g) * 0.5
                )
    return module


def official_forward(m: Involution, x: torch.Tensor) -> torch.Tensor:
    """The official computation (d-li14/involution, mmcv-style): floor-mode AvgPool, unfold."""
    N, C, H, W = x.shape
    K, s, G = m.kernel_size, m.stride, m.groups
    pooled = F.avg_pool2d(x, s, s) if s > 1 else x
    weight = m.conv2.conv(F.relu(m.conv1.bn(m.conv1.conv(pooled))))
    h, w = weight.shape[-2:]
    weight = weight.view(N, G, K * K, h, w).unsqueeze(2)
    cols = F.unfold(x, K, dilation=1, padding=(K - 1) // 2, stride=s).view(
        N, G, C // G, K * K, h, w
    )
    return (weight * cols).sum(dim=3).view(N, C, h, w)


def test_param_count_and_official_names():
    m = Involution(32, 3)
    assert sum(p.numel() for p in m.parameters()) == 434
    assert set(m.state_dict()) == {
        "conv1.conv.weight",
        "conv1.bn.weight",
        "conv1.bn.bias",
        "conv1.bn.running_mean",
        "conv1.bn.running_var",
        "conv1.bn.num_batches_tracked",
        "conv2.conv.weight",
        "conv2.conv.bias",
    }


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} not found")
def test_shapes_match_official_checkpoint():
    keys = json.loads(REFERENCE.read_text())["mmcls_rednet50"]["keys"]
    prefix = "backbone.layer1.0.conv2."
    official = {k[len(prefix) :]: v for k, v in keys.items() if k.startswith(prefix)}
    ours = {k: list(v.shape) for k, v in Involution(64, 7).state_dict().items()}
    assert ours == official


@pytest.mark.parametrize("stride", [1, 2])
def test_even_sizes_match_official_computation(stride):
    m = randomize(Involution(32, 7, stride=stride)).double().eval()
    x = torch.randn(2, 32, 12, 10, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 32, 12 // stride, 10 // stride)
    torch.testing.assert_close(out, official_forward(m, x), rtol=1e-12, atol=1e-12)


def test_odd_sizes_stride2_kernel_grid_equals_output_grid():
    m = randomize(Involution(16, 3, stride=2, group_channels=8)).double().eval()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == (2, 16, 5, 6)  # ceil(9 / 2), ceil(11 / 2)
    # Kernel of output pixel (i, j): generated from the mean of the input pixels of window
    # [2i, 2i + 2) x [2j, 2j + 2) that exist (the last row/column has one pixel row/column).
    pooled = torch.stack(
        [
            torch.stack(
                [x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((2, 3)) for j in range(6)], -1
            )
            for i in range(5)
        ],
        -2,
    )
    weight = m.conv2.conv(F.relu(m.conv1.bn(m.conv1.conv(pooled)))).view(2, 2, 9, 5, 6)
    cols = F.unfold(x, 3, padding=1, stride=2).view(2, 2, 8, 9, 5, 6)
    expected = (cols * weight.unsqueeze(2)).sum(3).view(2, 16, 5, 6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert x.grad.shape == x.shape and m.conv1.conv.weight.grad is not None


def test_compiled_pooling_matches_ceil_mode_avgpool(monkeypatch):
    """The pooling used under torch.compile (pytorch/pytorch#198119 workaround) equals
    AvgPool2d(ceil_mode=True) in value and gradient on odd sizes."""
    m = randomize(Involution(16, 3, stride=2, group_channels=8)).double().eval()
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64, requires_grad=True)
    out = m(x)
    grads = torch.autograd.grad(out.square().sum(), (x, m.conv1.conv.weight))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out_c = m(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), (x, m.conv1.conv.weight))
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN", "GN", "FrozenStatsBN", ""])
def test_norms_by_name(norm):
    if norm not in ("BN", "FrozenStatsBN", ""):
        pytest.importorskip("detectron2", reason=f"norm {norm!r} is detectron2's")
    m = Involution(128, 3, norm=norm).eval()
    x = torch.randn(2, 128, 6, 6)
    assert m(x).shape == x.shape
    if norm == "":
        assert m.conv1.bn is None and m.conv1.conv.bias is not None


def test_channels_last_input():
    m = randomize(Involution(32, 5, stride=2)).eval()
    x = torch.randn(2, 32, 10, 9)
    expected = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cuda_matches_cpu_float64(channels_last):
    """The layer on CUDA (CuPy kernels) against the same layer on the CPU in float64, odd input
    sizes and stride 2, output and every gradient."""
    torch.manual_seed(0)
    m = randomize(Involution(64, 7, stride=2)).double().train()
    x = torch.randn(2, 64, 15, 13, dtype=torch.float64, requires_grad=True)
    ref = m(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, *m.parameters()))
    m_gpu, x_gpu = m.float().cuda(), x.detach().float().cuda().requires_grad_()
    if channels_last:
        m_gpu = m_gpu.to(memory_format=torch.channels_last)
        x_gpu = x_gpu.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = m_gpu(x_gpu)
    grads = torch.autograd.grad(out.square().sum(), (x_gpu, *m_gpu.parameters()))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(channels=32, kernel_size=4), "kernel_size must be a positive odd int"),
        (dict(channels=32, kernel_size=3, group_channels=5), r"divisible by group_channels \(5\)"),
        (dict(channels=32, kernel_size=3, stride=0), "stride must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Involution(**kwargs)


def test_flop_count_with_fvcore():
    fvcore_nn = pytest.importorskip("fvcore.nn", reason="fvcore is not installed")
    N, C, K, H, W = 2, 32, 7, 9, 11
    x = torch.randn(N, C, H, W)
    totals = {}
    for fused in (False, True):
        m = Involution(C, K, stride=2, fused=fused).eval()
        op = "involution_fused" if fused else "involution"
        plain = fvcore_nn.FlopCountAnalysis(m, (x,))
        plain.unsupported_ops_warnings(False)
        plain.total()
        assert f"d2_involution::{op}" in plain.unsupported_ops()
        analysis = add_involution_flop_handles(fvcore_nn.FlopCountAnalysis(m, (x,)))
        analysis.unsupported_ops_warnings(False)
        Ho, Wo = (H + 1) // 2, (W + 1) // 2
        generation = N * (K * K * m.groups) * (C // 4) * Ho * Wo
        expected = N * K * K * C * Ho * Wo + (generation if fused else 0)
        assert analysis.by_operator()[op] == expected
        totals[fused] = analysis.total()
    assert totals[True] == totals[False]  # the unfused count has the generating conv instead


# (Involution kwargs, input height and width)
FUSED_CONFIGS = [
    (dict(channels=32, kernel_size=7, stride=1, group_channels=16), (12, 10)),
    (dict(channels=32, kernel_size=3, stride=2, group_channels=8), (9, 11)),
    (dict(channels=24, kernel_size=5, stride=2, group_channels=8, dilation=2), (13, 12)),
    (dict(channels=16, kernel_size=3, stride=3, group_channels=4), (10, 7)),
    (dict(channels=64, kernel_size=7, stride=1, group_channels=16, dilation=2), (15, 15)),
]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("kwargs,size", FUSED_CONFIGS, ids=[f"cfg{i}" for i in range(5)])
def test_fused_equals_unfused(layout, kwargs, size):
    """fused=True and fused=False: same output, input gradient and parameter gradients (float64,
    training mode, so the norm's batch statistics are part of the graph)."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    m = randomize(Involution(**kwargs, fused=False)).double().to(memory_format=fmt)
    x = torch.randn(2, kwargs["channels"], *size, dtype=torch.float64)
    x = x.contiguous(memory_format=fmt).requires_grad_()
    results = []
    for fused in (False, True):
        m.fused = fused
        out = m(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *m.parameters()])
        results.append((out, *grads))
    assert results[0][0].shape == (
        2,
        kwargs["channels"],
        *[-(-n // kwargs["stride"]) for n in size],
    )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _fused_module() -> Involution:
    return randomize(Involution(16, 3, stride=2, group_channels=8, fused=True))


def test_fused_layer_torch_compile_aot_eager():
    torch._dynamo.reset()
    m = _fused_module()
    x = torch.randn(2, 16, 9, 8, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out, ref = compiled(x), m(x)
    torch.testing.assert_close(out, ref)
    params = [m.conv1.conv.weight, m.conv2.conv.weight, m.conv2.conv.bias]
    for a, b in zip(
        torch.autograd.grad(out.square().sum(), [x, *params]),
        torch.autograd.grad(ref.square().sum(), [x, *params]),
    ):
        torch.testing.assert_close(a, b)


def test_fused_layer_torch_export_has_one_fused_node():
    m = _fused_module().eval()
    x = torch.randn(2, 16, 10, 8)
    exported = torch.export.export(m, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    ops = torch.ops.d2_involution
    assert targets.count(ops.involution_fused.default) == 1
    assert ops.involution.default not in targets
    torch.testing.assert_close(exported.module()(x), m(x))


def test_fused_layer_pure_pytorch_trace_has_no_custom_op():
    from d2_involution.ops import pure_pytorch_trace

    m = _fused_module().eval()
    x = torch.randn(2, 16, 10, 8)
    with pure_pytorch_trace():
        traced = torch.jit.trace(m, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert not any(k.startswith("d2_involution::") for k in kinds), kinds
    torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize("channels,fuses", [(32, True), (64, True), (128, False), (256, False)])
def test_fused_default_where_measured_faster(channels, fuses, monkeypatch):
    """fused=None fuses up to FUSE_MAX_CHANNELS channels on CPU; fused=False never does."""
    import d2_involution.layers.involution as layer_module

    calls = []
    real = layer_module.involution_fused
    monkeypatch.setattr(
        layer_module, "involution_fused", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x = torch.randn(1, channels, 6, 6)
    Involution(channels, 3).eval()(x)
    assert bool(calls) == fuses
    calls.clear()
    Involution(channels, 3, fused=False).eval()(x)
    assert not calls
    assert "fused=None" in repr(Involution(channels, 3))


def test_fused_argument_checked():
    with pytest.raises(ValueError, match="fused must be None, True or False, got 'yes'"):
        Involution(32, 3, fused="yes")


@pytest.mark.parametrize("stride", [1, 2])
def test_start_static_begins_as_a_group_shared_convolution(stride):
    """With no position-specific part the generated kernel is conv2's bias everywhere: the layer is
    a convolution whose K x K kernel is shared by the channels of a group."""
    torch.manual_seed(0)
    layer = Involution(32, kernel_size=5, stride=stride, group_channels=8).eval()
    layer.start_static(dynamic_scale=0.0)
    x = torch.randn(2, 32, 11, 13)
    kernel = layer.conv2.conv.bias.view(4, 1, 5, 5).repeat_interleave(8, dim=0)
    expected = F.conv2d(x, kernel, stride=stride, padding=2, groups=32)
    torch.testing.assert_close(layer(x), expected)


def test_init_kernel_generators_by_name():
    torch.manual_seed(0)
    model = torch.nn.Sequential(Involution(16, 3, group_channels=8), Involution(16, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_kernel_generators(model, "official")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    init_kernel_generators(model, "static")
    for i, layer in enumerate(model):
        weight = layer.conv2.conv.weight
        torch.testing.assert_close(weight, 0.1 * before[f"{i}.conv2.conv.weight"])
        assert not torch.equal(layer.conv2.conv.bias, before[f"{i}.conv2.conv.bias"])
        assert torch.equal(layer.conv1.conv.weight, before[f"{i}.conv1.conv.weight"])
    with pytest.raises(ValueError, match="generator_init must be one of"):
        init_kernel_generators(model, "zeros")
    with pytest.raises(ValueError, match="dynamic_scale"):
        model[0].start_static(dynamic_scale=2.0)
