"""The CUDA kernels: NVRTC compilation of every .cu instantiation (no GPU needed), and execution
against the plain unfold reference in every dtype (skipped without a GPU)."""

import random
import re

import pytest
import torch

import d2_involution  # noqa: F401  # isort: skip
from d2_involution.ops import cuda_kernel, involution, involution_output_size

# ------------------------------------------------------------------------------------------------
# NVRTC compilation for sm_80 and sm_90 without a GPU.


def _nvrtc_or_reason():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - any failure to load NVRTC means: skip
        return None, f"NVRTC is not loadable here ({type(e).__name__}: {e})"
    try:
        archs = set(nvrtc.getSupportedArchs())
    except Exception:  # noqa: BLE001 - old NVRTC without the query: try compiling anyway
        archs = {80, 90}
    missing = {80, 90} - archs
    if missing:
        return None, f"this NVRTC cannot target sm_{sorted(missing)}"
    return nvrtc, None


NVRTC, NVRTC_REASON = _nvrtc_or_reason()
if NVRTC_REASON:
    print(f"test_ops_cuda: NVRTC compile tests skipped: {NVRTC_REASON}")
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason=f"NVRTC unavailable: {NVRTC_REASON}")


PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    re.S,
)


def nvrtc_compile(source, options, arch: int):
    """Compile the code cuda_kernel.py hands to NVRTC (header inlined, no include path) to a
    cubin, through ptxas; returns the cubin and {kernel: (registers, spill bytes)} from ptxas."""
    prog = NVRTC.createProgram(cuda_kernel.kernel_source(source), source.name, [], [])
    try:
        try:
            NVRTC.compileProgram(prog, [*options, f"-arch=sm_{arch}", "--ptxas-options=-v"])
        except NVRTC.NVRTCError as e:
            raise AssertionError(f"{source.name} {options}:\n{NVRTC.getProgramLog(prog)}") from e
        report = {
            name.replace("involution_", "", 1): (int(regs), int(stores) + int(loads))
            for name, stores, loads, regs in PTXAS_ENTRY.findall(NVRTC.getProgramLog(prog))
        }
        return NVRTC.getCUBIN(prog), report
    finally:
        NVRTC.destroyProgram(prog)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
OPS = ("forward", "grad_input", "grad_weight")
# Every dtype and arch with two (K, stride) pairs, plus on sm_90 the K that pin FAST_MAX_K; the
# other K/stride branches once (float32, sm_90), since K and the stride change no type-dependent
# code (NVRTC + ptxas take 1-5 s per instance here).
INSTANCES = [(3, 1), (7, 2)]
SM90_INSTANCES = [(9, 1), (11, 1)]
MORE_INSTANCES = [(1, 3), (7, 1), (5, 2), (9, 3)]


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fast_kernels_compile(dtype, arch):
    """Every instantiation compiles; on sm_90 ptxas pins FAST_MAX_K: no spill up to an op's
    largest fast K, spills at the next odd K where that is compiled here (grad-weight's K = 13,
    which spills too, is left out: its compile alone takes longer than all of these)."""
    instances = INSTANCES + (SM90_INSTANCES if arch == 90 else [])
    instances += MORE_INSTANCES if (dtype, arch) == (torch.float32, 90) else []
    limits = {op: cuda_kernel.FAST_MAX_K[op][dtype] for op in OPS}
    for K, S in instances:
        options = cuda_kernel.nvrtc_options(dtype, K, S)
        cubin, report = nvrtc_compile(cuda_kernel.FAST_SOURCE, options, arch)
        assert set(report) == set(OPS), report
        for op in OPS:
            assert f"involution_{op}".encode() in cubin, (op, K, S)
            # sm_80 spills a little at K = 7, stride >= 2 (grad-input): the run-time
            # local-memory check sends that to the naive kernel. On sm_90 the table decides.
            if arch == 90 and K <= limits[op]:
                assert report[op][1] == 0, (op, K, S, report[op])
            elif arch == 90 and K == limits[op] + 2:
                assert report[op][1] > 0, (op, K, S, report[op])
    if arch == 90:
        assert set(limits.values()) <= {K for K, _ in instances}, (limits, instances)


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_naive_kernels_compile(dtype, arch):
    cubin, _ = nvrtc_compile(cuda_kernel.NAIVE_SOURCE, cuda_kernel.nvrtc_options(dtype), arch)
    for name in (b"forward", b"grad_input", b"grad_weight"):
        assert b"involution_naive_" + name in cubin


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
CONFIGS.append(dict(N=2, C=32, G=1, H=9, W=8, K=13, stride=2, padding=None, dilation=1))  # naive


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
    """The case tools/gpu_check.sh runs under compute-sanitizer: fast and naive kernels, odd sizes,
    stride 2, both layouts, small enough to run in seconds under memcheck."""
    check_forward_backward(ODD_STRIDE2[0], dtype, "channels_last")
    check_forward_backward(dict(ODD_STRIDE2[2], K=13, padding=None), dtype)
    check_forward_backward(dict(ODD_STRIDE2[1], stride=1), dtype)


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
