"""The involution op on the CPU: every path (NCHW and NHWC kernels, fallback, pure PyTorch) against
a plain unfold reference, gradients, layouts, the custom op (opcheck, torch.compile, autocast),
tracing, and bad input. The fused op: tests/test_ops_involution_fused.py."""

import io
import os
import random
import subprocess
import sys

import pytest
import torch

import d2_involution  # noqa: F401  # isort: skip
from d2_involution.ops import (
    cpu_kernel,
    involution,
    involution_output_size,
    involution_pytorch,
    pure_pytorch_trace,
)

OP = torch.ops.d2_involution


from involution_reference import reference  # noqa: E402  (tests/ is on sys.path)


def random_config(rng: random.Random, group_channels=(1, 2, 3), extra_width: int = 9) -> dict:
    K = rng.choice([1, 3, 5, 7])
    stride = rng.choice([1, 2, 3])
    dilation = rng.choice([1, 2])
    padding = rng.choice([None, rng.randint(0, dilation * (K - 1) // 2 + 1)])
    p = dilation * (K - 1) // 2 if padding is None else padding
    min_size = max(1, dilation * (K - 1) + 1 - 2 * p)
    G = rng.choice([1, 2, 3])
    return dict(
        N=rng.randint(1, 3),
        C=G * rng.choice(group_channels),
        G=G,
        H=rng.randint(min_size, min_size + 9),
        W=rng.randint(min_size, min_size + extra_width),
        K=K,
        stride=stride,
        padding=padding,
        dilation=dilation,
        channels_last=rng.random() < 0.3,
    )


CONFIGS = [random_config(random.Random(seed)) for seed in range(40)]
# Channels per group that are whole SIMD vectors (4 doubles / 8 floats, up to more than 8
# vectors), and rows of several vectors plus a tail: the kernels' vector paths.
VECTOR_CONFIGS = [
    random_config(random.Random(100 + seed), (4, 8, 16, 24, 36, 40, 72), 20) for seed in range(16)
]


def to_nhwc(x: torch.Tensor, w: torch.Tensor):
    """x channels_last and w stored as a dense (N, Ho, Wo, G, K, K) tensor: the NHWC kernels'."""
    return x.contiguous(memory_format=torch.channels_last), nhwc_weight(w)


def nhwc_weight(w: torch.Tensor) -> torch.Tensor:
    return w.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)


def make_inputs(cfg: dict, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Ho = involution_output_size(cfg["H"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    Wo = involution_output_size(cfg["W"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    w = torch.randn(
        cfg["N"], cfg["G"], cfg["K"], cfg["K"], Ho, Wo, generator=g, dtype=torch.float64
    )
    x, w = x.to(dtype), w.to(dtype)
    if cfg.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), w.requires_grad_()


def kwargs_of(cfg: dict) -> dict:
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])


def require_kernel() -> None:
    if not cpu_kernel.available():
        pytest.skip(f"C++ CPU kernel unavailable: {cpu_kernel.unavailable_reason()}")


def involution_nhwc(x, w, **kwargs):
    """involution on channels_last copies of the inputs: the NHWC kernels."""
    return involution(*to_nhwc(x, w), **kwargs)


@pytest.fixture(params=["kernel", "kernel-nhwc", "fallback", "pytorch"])
def path(request, monkeypatch):
    """The C++ kernels through the custom op (in the layout of the config's x, and all in NHWC),
    the op's fallback without them, and involution_pytorch."""
    if request.param.startswith("kernel"):
        require_kernel()
        return involution_nhwc if request.param == "kernel-nhwc" else involution
    if request.param == "fallback":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
        return involution
    return involution_pytorch


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_matches_reference_float64(path, cfg):
    x, w = make_inputs(cfg)
    out = path(x, w, **kwargs_of(cfg))
    ref = reference(x, w, **kwargs_of(cfg))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{cfg}: {m}")
    grad = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad)
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10, msg=lambda m: f"{cfg} grad x: {m}")
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10, msg=lambda m: f"{cfg} grad w: {m}")


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    "cfg", VECTOR_CONFIGS, ids=[f"vcfg{i}" for i in range(len(VECTOR_CONFIGS))]
)
def test_vector_paths_match_reference(layout, cfg):
    """float64 and float32, with whole-vector channel groups and multi-vector rows."""
    require_kernel()
    fn = involution_nhwc if layout == "nhwc" else involution
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        x, w = make_inputs(cfg, dtype)
        out = fn(x, w, **kwargs_of(cfg))
        ref = reference(x, w, **kwargs_of(cfg))
        torch.testing.assert_close(
            out.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{cfg}: {m}"
        )
        grad = torch.randn(ref.shape, dtype=torch.float64)
        gx, gw = torch.autograd.grad(out, (x, w), grad.to(dtype))
        rx, rw = torch.autograd.grad(ref, (x, w), grad)
        torch.testing.assert_close(gx.double(), rx.double(), rtol=tol, atol=tol)
        torch.testing.assert_close(gw.double(), rw.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", CONFIGS[:12], ids=[f"cfg{i}" for i in range(12)])
def test_matches_reference_float32(path, cfg):
    x, w = make_inputs(cfg, torch.float32)
    out = path(x, w, **kwargs_of(cfg))
    assert out.dtype == torch.float32
    ref = reference(x, w, **kwargs_of(cfg))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    rx, rw = torch.autograd.grad(ref, (x, w), grad.double())
    torch.testing.assert_close(gx.double(), rx.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_fp32(path, dtype):
    cfg = dict(N=2, C=32, G=2, H=9, W=10, K=7, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg, dtype)
    out = path(x, w)
    assert out.dtype == dtype
    # Reference on the same (rounded) inputs: only the final rounding to `dtype` may differ.
    ref = reference(x.detach(), w.detach())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    gx, gw = torch.autograd.grad(out.float().sum(), (x, w))
    assert gx.dtype == dtype and gw.dtype == dtype


def test_gradcheck_float64():
    cfg = dict(N=2, C=4, G=2, H=6, W=5, K=3, stride=2, padding=1, dilation=2)
    x, w = make_inputs(cfg)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, **kwargs_of(cfg)), (x, w))
    assert torch.autograd.gradcheck(lambda a, b: involution_pytorch(a, b, **kwargs_of(cfg)), (x, w))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_threads_do_not_change_results(layout):
    require_kernel()
    cfg = dict(N=3, C=32, G=2, H=11, W=13, K=5, stride=2, padding=None, dilation=1)
    x, w = make_inputs(cfg, torch.float32)
    if layout == "nhwc":
        x, w = (t.detach().requires_grad_() for t in to_nhwc(x, w))
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = involution(x, w, stride=2)
            results.append((out, *torch.autograd.grad(out.sum(), (x, w))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


_POOL_RESULTS = """
import sys, torch
from d2_involution.ops import cpu_kernel, involution
assert cpu_kernel.thread_runtime() == "pool", cpu_kernel.thread_runtime()
torch.set_num_threads(2)
x, w = torch.load(sys.argv[1])
x.requires_grad_(), w.requires_grad_()
out = involution(x, w)
torch.save((out, *torch.autograd.grad(out.sum(), (x, w))), sys.argv[2])
"""


@pytest.mark.skipif(
    "OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"),
    reason="PyTorch without OpenMP or not on Linux: the kernels use their own thread pool",
)
def test_threads_run_on_pytorchs_openmp_team_with_the_pools_results(tmp_path):
    """Inside a model PyTorch's OpenMP workers spin after each op, so the kernels run on that team
    (docs/benchmarks.md); the library's own pool (D2INV_CPU_OPENMP=0) gives identical results."""
    require_kernel()
    runtime = cpu_kernel.thread_runtime()
    assert runtime.startswith("openmp:") and os.path.exists(runtime[len("openmp:") :]), runtime
    cfg = dict(N=4, C=64, G=4, H=14, W=12, K=7, stride=1, padding=None, dilation=1)
    x, w = (t.detach() for t in make_inputs(cfg, torch.float32))
    torch.save((x, w), tmp_path / "inputs.pt")
    env = dict(os.environ, D2INV_CPU_OPENMP="0")
    args = [
        sys.executable,
        "-c",
        _POOL_RESULTS,
        str(tmp_path / "inputs.pt"),
        str(tmp_path / "pool.pt"),
    ]
    subprocess.run(args, env=env, check=True, timeout=300)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x.requires_grad_(), w.requires_grad_()
        out = involution(x, w)
        ours = (out, *torch.autograd.grad(out.sum(), (x, w)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(ours, torch.load(tmp_path / "pool.pt")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck(layout):
    cfg = dict(N=2, C=12, G=3, H=7, W=8, K=3, stride=2, padding=2, dilation=2)
    x, w = make_inputs(cfg)
    Ho, Wo = w.shape[4], w.shape[5]
    go = torch.randn(2, 12, Ho, Wo, dtype=torch.float64)
    if layout == "nhwc":
        x, w = (t.detach().requires_grad_() for t in to_nhwc(x, w))
        go = go.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(OP.involution.default, (x, w, 2, 2, 2))
    torch.library.opcheck(OP.involution_grad_input.default, (go, w.detach(), 7, 8, 2, 2, 2))
    torch.library.opcheck(OP.involution_grad_weight.default, (go, x.detach(), 3, 3, 2, 2, 2))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
def test_outputs_keep_the_layout(kernel, monkeypatch):
    """channels_last in, channels_last out (and weight gradients in the pixel-major order that a
    channels_last generator produces), so a channels_last model needs no layout copies."""
    if kernel:
        require_kernel()
    else:
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    cfg = dict(N=2, C=16, G=2, H=9, W=10, K=3, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg)
    xc, wc = (t.detach().requires_grad_() for t in to_nhwc(x, w))
    out = involution(xc, wc)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    gx, gw = torch.autograd.grad(out, (xc, wc), torch.randn_like(out))
    assert gx.is_contiguous(memory_format=torch.channels_last) and not gx.is_contiguous()
    assert gw.stride() == wc.stride()
    out = involution(x, w)
    assert out.is_contiguous()
    assert all(g.is_contiguous() for g in torch.autograd.grad(out, (x, w), torch.randn_like(out)))


def test_empty_batch(path):
    x = torch.randn(0, 8, 5, 6, requires_grad=True)
    w = torch.randn(0, 2, 3, 3, 3, 3, requires_grad=True)
    out = path(x, w, stride=2)
    assert out.shape == (0, 8, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


class _TinyInvolutionNet(torch.nn.Module):
    def __init__(self, C=8, G=2, K=3, stride=1):
        super().__init__()
        self.G, self.K, self.stride = G, K, stride
        # A strided 1x1 conv makes the ceil(H/s) x ceil(W/s) kernel grid of the op's output.
        self.gen = torch.nn.Conv2d(C, G * K * K, 1, stride=stride)

    def forward(self, x):
        w = self.gen(x)
        N, _, Ho, Wo = w.shape
        w = w.reshape(N, self.G, self.K, self.K, Ho, Wo)
        return involution(torch.relu(x), w, stride=self.stride) * 2


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile(backend):
    torch._dynamo.reset()
    model = _TinyInvolutionNet(stride=2)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    ref = model(x)
    torch.testing.assert_close(out, ref)
    g = torch.autograd.grad(out.sum(), (x, model.gen.weight))
    r = torch.autograd.grad(ref.sum(), (x, model.gen.weight))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b)


def test_torch_export_keeps_one_custom_op_node():
    model = _TinyInvolutionNet(stride=2).eval()
    x = torch.randn(2, 8, 9, 9)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(OP.involution.default) == 1
    torch.testing.assert_close(exported.module()(x), model(x))


def test_jit_trace_records_custom_op_by_default():
    model = _TinyInvolutionNet().eval()
    x = torch.randn(2, 8, 7, 7)
    traced = torch.jit.trace(model, (x,))
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "d2_involution::involution" in kinds
    torch.testing.assert_close(traced(x), model(x))


def test_jit_trace_pure_pytorch():
    model = _TinyInvolutionNet(stride=2).eval()
    x = torch.randn(2, 8, 9, 9)
    with pure_pytorch_trace():
        traced = torch.jit.trace(model, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert not any(k.startswith("d2_involution::") for k in kinds), kinds
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    torch.testing.assert_close(loaded(x), model(x))


def test_onnx_export_uses_standard_ops(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx package is not installed")
    model = _TinyInvolutionNet(stride=2).eval()
    path = tmp_path / "inv.onnx"
    torch.onnx.export(model, (torch.randn(1, 8, 9, 9),), str(path), dynamo=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not any("involution" in op for op in ops), ops


def test_autocast_runs_in_autocast_dtype():
    cfg = dict(N=2, C=8, G=2, H=7, W=7, K=3, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Mixed dtypes are accepted under autocast: both are cast to bfloat16.
        out = involution(x, w.to(torch.float16))
    assert out.dtype == torch.bfloat16
    xb, wb = x.detach().bfloat16(), w.detach().half().bfloat16()
    ref = reference(xb, wb)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_mixed_dtypes_outside_autocast_raise():
    x, w = make_inputs(dict(N=1, C=2, G=1, H=5, W=5, K=3, stride=1, padding=None, dilation=1))
    with pytest.raises(TypeError, match=r"x torch.float64 and weight torch.float32"):
        involution(x, w.float())


def _bad(x_shape, w_shape, **kwargs):
    return (x_shape, w_shape, kwargs)


BAD_INPUTS = [
    (_bad((2, 4, 5), (2, 1, 3, 3, 5, 5)), ValueError, r"x must be 4-D .* \(2, 4, 5\)"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5)), ValueError, r"weight must be 6-D .* \(2, 1, 3, 3, 5\)"),
    (_bad((2, 4, 5, 5), (2, 3, 3, 3, 5, 5)), ValueError, r"divisible by the groups of weight \(3"),
    (_bad((2, 4, 5, 5), (3, 1, 3, 3, 5, 5)), ValueError, r"batch size of weight \(3.*x \(2"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 4, 5)), ValueError, r"\(4, 5\).*output size \(5, 5\)"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5, 5), stride=2), ValueError, r"output size \(3, 3\)"),
    (_bad((2, 4, 5, 5), (2, 1, 2, 2, 5, 5)), ValueError, r"K a positive odd int.*\(2, 1, 2, 2"),
    (_bad((2, 4, 5, 5), (2, 1, 0, 0, 5, 5)), ValueError, r"K a positive odd int"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 5, 5, 5)), ValueError, r"K a positive odd int"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5, 5), stride=0), ValueError, r"stride must be >= 1, got 0"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5, 5), padding=-1), ValueError, r"padding must be >= 0"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5, 5), dilation=0), ValueError, r"dilation must be >= 1"),
    (_bad((2, 4, 5, 5), (2, 1, 3, 3, 5, 5), stride=1.0), TypeError, r"stride must be an int"),
    (_bad((2, 4, 2, 2), (2, 1, 7, 7, 1, 1), padding=0), ValueError, r"too small"),
]


@pytest.mark.parametrize("args,exc,match", BAD_INPUTS)
def test_bad_input(args, exc, match):
    x_shape, w_shape, kwargs = args
    with pytest.raises(exc, match=match):
        involution(torch.randn(x_shape), torch.randn(w_shape), **kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.complex64])
def test_unsupported_dtypes(dtype):
    x = torch.zeros(1, 2, 5, 5, dtype=dtype)
    w = torch.zeros(1, 1, 3, 3, 5, 5)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype}"):
        involution(x, w)
    with pytest.raises(TypeError, match=rf"weight has dtype {dtype}"):
        involution(w.new_zeros(1, 2, 5, 5), w.to(dtype))


RAW_BAD_CALLS = [
    # (op, args, match): the custom ops called directly with shapes that do not agree.
    ("involution", ((2, 8, 9, 9), (1, 2, 3, 3, 9, 9), 1, 1, 1), r"batch size of weight \(1"),
    ("involution", ((2, 8, 9, 9), (2, 2, 3, 3, 9, 8), 1, 1, 1), r"\(9, 8\).*output size"),
    ("involution", ((2, 8, 9, 9), (2, 3, 3, 3, 9, 9), 1, 1, 1), r"divisible by the groups"),
    ("involution", ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), 0, 1, 1), r"stride must be >= 1"),
    (
        "involution_grad_input",
        ((2, 8, 9, 9), (2, 2, 3, 3, 9, 8), 9, 9, 1, 1, 1),
        r"weight spatial size \(9, 8\).*grad_out's \(9, 9\)",
    ),
    (
        "involution_grad_input",
        ((2, 8, 9, 9), (3, 2, 3, 3, 9, 9), 9, 9, 1, 1, 1),
        r"batch size of weight \(3",
    ),
    (
        "involution_grad_input",
        ((2, 8, 9, 9), (2, 2, 3, 3, 9, 9), 17, 9, 1, 1, 1),
        r"output size \(17, 9\) of a 17x9 input",
    ),
    ("involution_grad_weight", ((2, 8, 9, 9), (1, 8, 9, 9), 2, 3, 1, 1, 1), r"batch size of x"),
    ("involution_grad_weight", ((2, 8, 9, 9), (2, 8, 9, 7), 2, 3, 1, 1, 1), r"must be \(N, C"),
    ("involution_grad_weight", ((2, 8, 9, 9), (2, 8, 9, 9), 3, 3, 1, 1, 1), r"groups \(3\)"),
    ("involution_grad_weight", ((2, 8, 9, 9), (2, 8, 9, 9), 2, 4, 1, 1, 1), r"positive odd"),
]


@pytest.mark.parametrize("op,args,match", RAW_BAD_CALLS)
def test_raw_ops_reject_inconsistent_shapes(op, args, match):
    """``torch.ops.d2_involution.*`` validate their own inputs (a kernel never sees them)."""
    a, b, *ints = args
    with pytest.raises(ValueError, match=match):
        getattr(OP, op)(torch.randn(a), torch.randn(b), *ints)


def test_raw_op_rejects_mixed_dtypes():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(1, 1, 3, 3, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="same dtype"):
        OP.involution(x, w, 1, 1, 1)


def test_channels_last_in_channels_last_out_and_nothing_copied():
    """channels_last x gives a channels_last output; the CPU kernels run NHWC natively, so
    autograd keeps x and the weight themselves (no copies; the weight as a channels_last kernel
    generator makes it), and backward returns channels_last gradients."""
    cfg = dict(N=2, C=8, G=2, H=9, W=7, K=3, stride=2, padding=None, dilation=1)
    x, w = make_inputs(dict(cfg, channels_last=True))
    w_view = w.reshape(2, 18, *w.shape[4:]).contiguous(memory_format=torch.channels_last)
    w_view = w_view.view(w.shape)  # as an Involution layer in channels_last makes it
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = involution(x, w_view, stride=2)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    op_saved = [t for t in saved if t.shape in (x.shape, w.shape)]
    assert [t.data_ptr() for t in op_saved] == [x.data_ptr(), w_view.data_ptr()]
    ref = reference(x, w_view, stride=2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out, (x, w_view), grad)
    want = torch.autograd.grad(ref, (x, w_view), grad)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_non_tensor_and_mixed_devices():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        involution([1.0], torch.zeros(1, 1, 1, 1, 1, 1))
    x = torch.zeros(1, 2, 5, 5)
    w = torch.zeros(1, 1, 3, 3, 5, 5, device="meta")
    with pytest.raises(ValueError, match="same device, got x on cpu and weight on meta"):
        involution(x, w)
