"""The CUDA kernels: NVRTC compilation of every .cu instantiation (no GPU needed), and execution
against the plain unfold reference in every dtype (skipped without a GPU)."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

import d2_involution  # noqa: F401  # isort: skip
from d2_involution.ops import cuda_kernel, involution, involution_output_size

# ------------------------------------------------------------------------------------------------
# Compilation for sm_80 and sm_90 without a GPU, through tools/kernel_stats.py (NVRTC, ptxas,
# cuobjdump; tests/test_kernel_stats.py reads the sm_90 code of the K = 7 instantiations further).

_spec = importlib.util.spec_from_file_location(
    "d2inv_kernel_stats", Path(__file__).resolve().parents[1] / "tools" / "kernel_stats.py"
)
kernel_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_stats)
NVRTC_REASON = kernel_stats.missing_tools("sm_80") or kernel_stats.missing_tools("sm_90")
needs_nvrtc = pytest.mark.skipif(bool(NVRTC_REASON), reason=f"NVRTC/ptxas: {NVRTC_REASON}")
if NVRTC_REASON:
    print(f"test_ops_cuda: NVRTC compile tests skipped: {NVRTC_REASON}")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
TILED = {  # source: its ops (kernels involution_<op>[_acc]_<layout>)
    cuda_kernel.FAST_SOURCE: ("forward", "grad_input", "grad_weight"),
    cuda_kernel.FUSED_SOURCE: ("fused_forward", "fused_grad_input"),
}


def compile_report(source, dtype, K, S=1, D=1, arch=90):
    """{kernel name without "involution_": (registers, spill bytes)} of every kernel in the cubin
    of one instantiation."""
    module = kernel_stats.assemble(source, cuda_kernel.nvrtc_options(dtype, K, S, D), f"sm_{arch}")
    return {
        name.replace("involution_", "", 1): (info["registers"], info["spill_bytes"])
        for name, info in module.ptxas.items()
        if name in module.sass
    }


@needs_nvrtc
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tiled_kernels_compile_for_sm80(dtype):
    """Every tiled kernel compiles for Ampere too (sm_90 is compiled by the budget test)."""
    sources = list(TILED) if dtype == torch.float32 else [cuda_kernel.FAST_SOURCE]
    for source in sources:
        report = compile_report(source, dtype, 7, 2, 1, arch=80)
        for op in TILED[source]:
            for layout in ("nchw", "nhwc"):
                assert f"{op}_{layout}" in report, sorted(report)


@needs_nvrtc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_no_kernel_spills_at_its_fast_max_k(dtype):
    """ptxas for sm_90 at each op's FAST_MAX_K (stride 1; both layouts, _acc variants): no
    spills, so the table sends no spilling instantiation to the tiled kernels (K = 7 is checked
    by the budget test; fp16 shares bf16's code but for the conversions)."""
    for source, ops in TILED.items():
        limits = {op: cuda_kernel.FAST_MAX_K[op][dtype] for op in ops}
        for K in sorted(set(limits.values()) - {7}):
            report = compile_report(source, dtype, K)
            for op in (op for op in ops if limits[op] == K):
                spills = {n: v[1] for n, v in report.items() if n.startswith(op + "_")}
                assert spills and not any(spills.values()), (op, K, spills)


@needs_nvrtc
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_naive_kernels_compile(dtype):
    module = kernel_stats.assemble(cuda_kernel.NAIVE_SOURCE, cuda_kernel.nvrtc_options(dtype))
    for name in ("forward", "grad_input", "grad_weight"):
        assert "involution_naive_" + name in module.sass


# ------------------------------------------------------------------------------------------------
# Execution on a GPU.

CUDA_REASON = None
if not torch.cuda.is_available():
    CUDA_REASON = "no CUDA device"
elif not cuda_kernel.available():
    CUDA_REASON = cuda_kernel.unavailable_reason()
if CUDA_REASON:
    print(f"test_ops_cuda: CUDA execution tests skipped: {CUDA_REASON}")
_skip_without_kernels = pytest.mark.skipif(
    CUDA_REASON is not None, reason=f"CUDA kernels: {CUDA_REASON}"
)


def needs_cuda(test):
    """Marked ``cuda`` (tools/gpu_check.sh) and skipped where the CUDA kernels cannot run."""
    return pytest.mark.cuda(_skip_without_kernels(test))


from involution_reference import reference  # noqa: E402  (tests/ is on sys.path)


def random_config(rng: random.Random) -> dict:
    K = rng.choice([1, 3, 5, 7])
    dilation = rng.choice([1, 2])
    padding = rng.choice([None, rng.randint(0, dilation * (K - 1) // 2 + 1)])
    p = dilation * (K - 1) // 2 if padding is None else padding
    min_size = max(1, dilation * (K - 1) + 1 - 2 * p)
    G = rng.choice([1, 2, 4])
    return dict(
        N=rng.randint(1, 3),
        C=G * rng.choice([1, 3, 16, 40]),
        G=G,
        H=rng.randint(min_size, min_size + 20),
        W=rng.randint(min_size, min_size + 20),
        K=K,
        stride=rng.choice([1, 2, 3]),
        padding=padding,
        dilation=dilation,
    )


CONFIGS = [random_config(random.Random(100 + seed)) for seed in range(24)]
CONFIGS.append(dict(N=2, C=32, G=1, H=9, W=8, K=15, stride=2, padding=None, dilation=1))  # naive


def make_inputs(cfg: dict, dtype, device="cuda", seed=0, layout="contiguous"):
    """x and weight; layout "channels_last": x channels_last and the weight a view of a
    channels_last kernel-generator output, as in a channels_last Involution layer."""
    g = torch.Generator().manual_seed(seed)
    Ho = involution_output_size(cfg["H"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    Wo = involution_output_size(cfg["W"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    w = torch.randn(
        cfg["N"], cfg["G"], cfg["K"], cfg["K"], Ho, Wo, generator=g, dtype=torch.float64
    )
    x, w = x.to(device, dtype), w.to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        flat = w.reshape(cfg["N"], -1, Ho, Wo).contiguous(memory_format=torch.channels_last)
        w = flat.view(w.shape)
    return x.requires_grad_(), w.requires_grad_()


def kwargs_of(cfg: dict) -> dict:
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])


def tolerance(dtype, ref):
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    return dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))


def check_forward_backward(cfg: dict, dtype, layout: str = "contiguous") -> None:
    """involution() on CUDA against the float64 reference: output (and its memory format) and
    both gradients."""
    x, w = make_inputs(cfg, dtype, layout=layout)
    out = involution(x, w, **kwargs_of(cfg))
    assert out.dtype == dtype and out.device == x.device
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format), (layout, out.stride())
    ref = reference(x.detach(), w.detach(), **kwargs_of(cfg))
    torch.testing.assert_close(
        out.double(), ref, **tolerance(dtype, ref), msg=lambda m: f"{cfg} {layout} {m}"
    )
    grad = torch.randn(out.shape, device="cuda").to(dtype)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference(xd, wd, **kwargs_of(cfg)), (xd, wd), grad.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gx.double(), rx, **tolerance(dtype, rx), msg=lambda m: f"gx {m}")
    torch.testing.assert_close(gw.double(), rw, **tolerance(dtype, rw), msg=lambda m: f"gw {m}")


LAYOUTS = ["contiguous", "channels_last"]
# Odd sizes with stride 2 (the kernel grid of the RedNet downsampling blocks), on top of CONFIGS.
ODD_STRIDE2 = [
    dict(N=2, C=32, G=2, H=9, W=11, K=7, stride=2, padding=None, dilation=1),
    dict(N=1, C=48, G=3, H=15, W=13, K=3, stride=2, padding=None, dilation=2),
    dict(N=3, C=16, G=1, H=7, W=7, K=5, stride=2, padding=1, dilation=1),
    dict(N=1, C=64, G=4, H=27, W=1, K=3, stride=2, padding=None, dilation=1),
]
CASES = CONFIGS + ODD_STRIDE2
CASE_IDS = [f"cfg{i}" for i in range(len(CONFIGS))] + [f"odd{i}" for i in range(len(ODD_STRIDE2))]


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", CASES, ids=CASE_IDS)
def test_cuda_matches_reference(cfg, dtype, layout):
    check_forward_backward(cfg, dtype, layout)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_small_for_memcheck(dtype):
    """The case tools/gpu_check.sh runs under compute-sanitizer: tiled (NCHW, NHWC, fused) and
    naive kernels, odd sizes, stride 2, small enough to run in seconds under memcheck."""
    check_forward_backward(ODD_STRIDE2[0], dtype, "channels_last")
    check_forward_backward(dict(ODD_STRIDE2[2], K=15, padding=None), dtype)
    check_forward_backward(dict(ODD_STRIDE2[1], stride=1), dtype)
    for layout in LAYOUTS:
        check_fused(dict(ODD_STRIDE2[0], Cr=8), dtype, layout)


@needs_cuda
def test_cuda_input_over_2_31_elements():
    """x with more than 2**31 elements (64-bit offsets): three channel groups, the last beyond
    element 2**31, compared with the reference computed on their slices; bfloat16 (~24 GB)."""
    N, cpg, G, H, W, K = 1, 16, 8193, 128, 128, 3
    if N * cpg * G * H * W <= 2**31:
        raise AssertionError("the case must exceed 2**31 elements")
    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        pytest.skip(f"needs 30 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, cpg * G, H, W, device="cuda", dtype=dtype, generator=gen)
    w = torch.randn(N, G, K, K, H, W, device="cuda", dtype=dtype, generator=gen)
    x.requires_grad_()
    w.requires_grad_()
    out = involution(x, w)
    go = torch.randn(out.shape, device="cuda", dtype=dtype, generator=gen)
    gx, gw = torch.autograd.grad(out, (x, w), go)
    for g in (0, G // 2, G - 1):
        c = slice(g * cpg, (g + 1) * cpg)
        xs = x.detach()[:, c].double().requires_grad_()
        ws = w.detach()[:, g : g + 1].double().requires_grad_()
        ref = reference(xs, ws)
        rx, rw = torch.autograd.grad(ref, (xs, ws), go[:, c].double())
        for name, got, want in (("out", out[:, c], ref), ("gx", gx[:, c], rx)):
            torch.testing.assert_close(got.double(), want, **tolerance(dtype, want), msg=name)
        torch.testing.assert_close(gw[:, g : g + 1].double(), rw, **tolerance(dtype, rw))


@needs_cuda
def test_cuda_raw_ops_reject_inconsistent_shapes():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(2, 2, 3, 3, 9, 9, device="cuda")
    go = torch.randn(2, 8, 9, 9, device="cuda")
    with pytest.raises(ValueError, match=r"batch size of weight \(1"):
        torch.ops.d2_involution.involution(x, w[:1], 1, 1, 1)
    with pytest.raises(ValueError, match=r"weight spatial size \(9, 8\)"):
        torch.ops.d2_involution.involution_grad_input(go, w[..., :8], 9, 9, 1, 1, 1)
    with pytest.raises(ValueError, match=r"batch size of x \(1"):
        torch.ops.d2_involution.involution_grad_weight(go, x[:1], 2, 3, 1, 1, 1)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_naive_kernels_match_reference(dtype):
    cfg = dict(N=2, C=32, G=2, H=11, W=10, K=7, stride=2, padding=None, dilation=1)
    x, w = make_inputs(cfg, dtype)
    x, w = x.detach(), w.detach()
    out = cuda_kernel.naive_forward(x, w, 2, 3, 1)
    ref = reference(x, w, stride=2)
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype, ref))
    go = torch.randn(out.shape, device="cuda").to(dtype)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    rx, rw = torch.autograd.grad(reference(xd, wd, stride=2), (xd, wd), go.double())
    gx = cuda_kernel.naive_grad_input(go, w, 11, 10, 2, 3, 1)
    gw = cuda_kernel.naive_grad_weight(go, x, 2, 7, 2, 3, 1)
    torch.testing.assert_close(gx.double(), rx, **tolerance(dtype, rx))
    torch.testing.assert_close(gw.double(), rw, **tolerance(dtype, rw))


@needs_cuda
def test_cuda_gradcheck_float64():
    cfg = dict(N=2, C=4, G=2, H=6, W=5, K=3, stride=2, padding=1, dilation=2)
    x, w = make_inputs(cfg, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: involution(a, b, **kwargs_of(cfg)), (x, w))


@needs_cuda
def test_cuda_opcheck():
    cfg = dict(N=2, C=6, G=3, H=7, W=8, K=3, stride=2, padding=2, dilation=2)
    x, w = make_inputs(cfg, torch.float32)
    torch.library.opcheck(torch.ops.d2_involution.involution.default, (x, w, 2, 2, 2))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cuda_autocast(dtype):
    cfg = dict(N=2, C=32, G=2, H=9, W=9, K=7, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg, torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        out = involution(x, w)
    assert out.dtype == dtype
    ref = reference(x.detach().to(dtype), w.detach().to(dtype))
    torch.testing.assert_close(out.double(), ref, **tolerance(dtype, ref))
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@needs_cuda
def test_cuda_empty_batch_and_side_stream():
    x = torch.randn(0, 8, 5, 6, device="cuda", requires_grad=True)
    w = torch.randn(0, 2, 3, 3, 3, 3, device="cuda", requires_grad=True)
    out = involution(x, w, stride=2)
    out.sum().backward()
    assert out.shape == (0, 8, 3, 3) and w.grad.shape == w.shape
    cfg = dict(N=4, C=64, G=4, H=28, W=28, K=7, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg, torch.float32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = involution(x.detach(), w.detach())
    torch.cuda.current_stream().wait_stream(stream)
    ref = reference(x.detach(), w.detach())
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32, ref))


@needs_cuda
def test_cuda_mixed_devices_raise():
    with pytest.raises(ValueError, match="same device"):
        involution(torch.zeros(1, 2, 5, 5, device="cuda"), torch.zeros(1, 1, 3, 3, 5, 5))


# ------------------------------------------------------------------------------------------------
# Fused kernel generation, determinism and the real device's occupancy.


def check_fused(cfg: dict, dtype, layout: str) -> None:
    """cuda_kernel.fused_forward / fused_backward against the float64 unfused computation
    (conv2 of the kernel generator, then involution)."""
    g = torch.Generator().manual_seed(1)
    N, C, G, K, Cr = cfg["N"], cfg["C"], cfg["G"], cfg["K"], cfg["Cr"]
    S, D = cfg["stride"], cfg["dilation"]
    P = D * (K - 1) // 2 if cfg["padding"] is None else cfg["padding"]
    Ho, Wo = (involution_output_size(cfg[k], K, S, P, D) for k in ("H", "W"))

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to("cuda", dtype)

    x, r, go = rand(N, C, cfg["H"], cfg["W"]), rand(N, Cr, Ho, Wo), rand(N, C, Ho, Wo)
    a, b = rand(G * K * K, Cr) / Cr**0.5, rand(G * K * K)
    if layout == "channels_last":
        x, r, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, go))
    leaves = [t.double().requires_grad_() for t in (x, r, a, b)]
    weight = torch.nn.functional.conv2d(leaves[1], leaves[2][..., None, None], leaves[3])
    ref = reference(leaves[0], weight.reshape(N, G, K, K, Ho, Wo), S, P, D)
    refs = (ref, *torch.autograd.grad(ref, leaves, go.double()))
    out = cuda_kernel.fused_forward(x, r, a, b, S, P, D, K, G)
    grads = cuda_kernel.fused_backward(go, x, r, a, b, S, P, D, K, G)
    for name, got, want in zip(("out", "gx", "gr", "ga", "gb"), (out, *grads), refs):
        torch.testing.assert_close(
            got.double(), want, **tolerance(dtype, want), msg=lambda m: f"{name} {cfg} {m}"
        )
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)


FUSED_CASES = [
    dict(N=2, C=64, G=4, Cr=16, H=14, W=14, K=7, stride=1, padding=None, dilation=1),
    dict(N=2, C=32, G=2, Cr=8, H=15, W=9, K=7, stride=2, padding=None, dilation=1),
    dict(N=1, C=24, G=3, Cr=6, H=9, W=10, K=3, stride=1, padding=2, dilation=2),
]


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", FUSED_CASES, ids=[f"fused{i}" for i in range(len(FUSED_CASES))])
def test_cuda_fused_matches_unfused_reference(cfg, dtype, layout):
    check_fused(cfg, dtype, layout)


@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_kernels_are_deterministic(layout):
    """Two runs give bitwise the same output and gradients (no atomics anywhere)."""
    cfg = dict(N=4, C=64, G=4, H=28, W=28, K=7, stride=1, padding=None, dilation=1)
    x, w = make_inputs(cfg, torch.float32, layout=layout)
    runs = []
    for _ in range(2):
        out = involution(x, w)
        runs.append((out, *torch.autograd.grad(out, (x, w), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_tiled_kernels_fit_this_gpu(dtype):
    """At RedNet's K = 7 every tiled kernel runs (no spills, its shared memory granted) and, on a
    Hopper GPU, 16 warps of it fit an SM (the static budget, seen by CUDA's occupancy query)."""
    cfg = dict(N=2, C=64, G=4, Cr=16, H=14, W=14, K=7, stride=1, padding=None, dilation=1)
    for layout in LAYOUTS:
        check_fused(cfg, dtype, layout)
        check_forward_backward(cfg, dtype, layout)
    kernels = {
        key[0]: k for key, k in cuda_kernel._kernels.items() if key[1:] == (dtype, 0, (7, 1, 1))
    }
    assert len(kernels) == 12, sorted(kernels)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for name, kernel in kernels.items():
        assert not kernel.spills and kernel.blocks_per_sm > 0, name
        warps = kernel.blocks_per_sm * kernel.config.threads // 32
        assert warps >= 16 or not hopper, (name, kernel.blocks_per_sm, kernel.config)
