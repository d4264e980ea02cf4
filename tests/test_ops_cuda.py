"""The CUDA kernels: NVRTC compilation of every .cu instantiation (no GPU needed), and execution
against the plain unfold reference in every dtype (skipped without a GPU)."""

import random

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


def nvrtc_compile(source, options, arch: int) -> bytes:
    """Compile to a cubin (through ptxas, so register allocation is checked too)."""
    prog = NVRTC.createProgram(source.read_text(), source.name, [], [])
    try:
        try:
            NVRTC.compileProgram(prog, [*options, f"-arch=sm_{arch}"])
        except NVRTC.NVRTCError as e:
            raise AssertionError(f"{source.name} {options}:\n{NVRTC.getProgramLog(prog)}") from e
        return NVRTC.getCUBIN(prog)
    finally:
        NVRTC.destroyProgram(prog)


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = [str(d).split(".")[-1] for d in DTYPES]
# Every dtype and arch with two (K, stride) pairs; the other K/stride branches once (float32,
# sm_90), since K and the stride change no type-dependent code (NVRTC takes ~1 s per instance).
MORE_INSTANCES = [(1, 3), (7, 1), (5, 2), (cuda_kernel.MAX_FAST_K, 1)]


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fast_kernels_compile(dtype, arch):
    more = MORE_INSTANCES if (dtype, arch) == (torch.float32, 90) else []
    for K, S in [(3, 1), (7, 2)] + more:
        cubin = nvrtc_compile(cuda_kernel.FAST_SOURCE, cuda_kernel.nvrtc_options(dtype, K, S), arch)
        for name in (b"involution_forward", b"involution_grad_input", b"involution_grad_weight"):
            assert name in cubin, (name, K, S)


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_naive_kernels_compile(dtype, arch):
    cubin = nvrtc_compile(cuda_kernel.NAIVE_SOURCE, cuda_kernel.nvrtc_options(dtype), arch)
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
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"CUDA kernels: {CUDA_REASON}")


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
        channels_last=rng.random() < 0.3,
    )


CONFIGS = [random_config(random.Random(100 + seed)) for seed in range(24)]
CONFIGS.append(dict(N=2, C=32, G=1, H=9, W=8, K=13, stride=2, padding=None, dilation=1))  # naive


def make_inputs(cfg: dict, dtype, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    Ho = involution_output_size(cfg["H"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    Wo = involution_output_size(cfg["W"], cfg["K"], cfg["stride"], cfg["padding"], cfg["dilation"])
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    w = torch.randn(
        cfg["N"], cfg["G"], cfg["K"], cfg["K"], Ho, Wo, generator=g, dtype=torch.float64
    )
    x, w = x.to(device, dtype), w.to(device, dtype)
    if cfg.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), w.requires_grad_()


def kwargs_of(cfg: dict) -> dict:
    return dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])


def tolerance(dtype, ref):
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
    return dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_cuda_matches_reference(cfg, dtype):
    x, w = make_inputs(cfg, dtype)
    out = involution(x, w, **kwargs_of(cfg))
    assert out.dtype == dtype and out.device == x.device
    ref = reference(x.detach(), w.detach(), **kwargs_of(cfg))
    torch.testing.assert_close(
        out.double(), ref, **tolerance(dtype, ref), msg=lambda m: f"{cfg} {m}"
    )
    grad = torch.randn(out.shape, device="cuda").to(dtype)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rx, rw = torch.autograd.grad(reference(xd, wd, **kwargs_of(cfg)), (xd, wd), grad.double())
    assert gx.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gx.double(), rx, **tolerance(dtype, rx), msg=lambda m: f"gx {m}")
    torch.testing.assert_close(gw.double(), rw, **tolerance(dtype, rw), msg=lambda m: f"gw {m}")


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
