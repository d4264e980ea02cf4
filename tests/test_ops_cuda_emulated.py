"""The CUDA kernels' index logic checked without a GPU, in all four dtypes: the code NVRTC compiles,
built as host C++ (tests/cuda_emulation.py) and launched thread by thread on CPU tensors, against
the plain unfold reference; and the host fp16 conversions against PyTorch's, bit for bit."""

import ctypes
import random

import pytest
import torch

from cuda_emulation import CXX, build, launch  # tests/ is on sys.path  # isort: skip
from involution_reference import reference  # isort: skip

from d2_involution.ops import cuda_kernel, involution_output_size

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")
BLOCK = 128


def emulator(tmp_path_factory, dtype, K=None, S=None):
    source = cuda_kernel.FAST_SOURCE if K is not None else cuda_kernel.NAIVE_SOURCE
    code = cuda_kernel.kernel_source(source)
    return build(code, cuda_kernel.nvrtc_options(dtype, K, S), tmp_path_factory.getbasetemp())


def run(lib, name, tensors, ints, total):
    grid = (total + BLOCK - 1) // BLOCK
    launch(lib, name, grid, BLOCK, [t.data_ptr() for t in tensors], ints, total)


def config(seed: int, K: int, S: int) -> dict:
    rng = random.Random(seed)
    dilation = rng.choice([1, 2])
    padding = rng.choice([dilation * (K - 1) // 2, rng.randint(0, dilation * (K - 1) // 2 + 1)])
    min_size = max(1, dilation * (K - 1) + 1 - 2 * padding)
    G = rng.choice([1, 2, 3])
    return dict(
        N=rng.randint(1, 2),
        C=G * rng.choice([1, 4, 5]),
        G=G,
        K=K,
        S=S,
        pad=padding,
        dil=dilation,
        H=rng.randint(min_size, min_size + 8),
        W=rng.randint(min_size, min_size + 8),
    )


def inputs(cfg, dtype):
    g = torch.Generator().manual_seed(0)
    Ho = involution_output_size(cfg["H"], cfg["K"], cfg["S"], cfg["pad"], cfg["dil"])
    Wo = involution_output_size(cfg["W"], cfg["K"], cfg["S"], cfg["pad"], cfg["dil"])
    x = torch.randn(cfg["N"], cfg["C"], cfg["H"], cfg["W"], generator=g, dtype=torch.float64)
    w = torch.randn(
        cfg["N"], cfg["G"], cfg["K"], cfg["K"], Ho, Wo, generator=g, dtype=torch.float64
    )
    go = torch.randn(cfg["N"], cfg["C"], Ho, Wo, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), go.to(dtype), Ho, Wo


def expected(x, w, go, cfg):
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    out = reference(xd, wd, cfg["S"], cfg["pad"], cfg["dil"])
    gx, gw = torch.autograd.grad(out, (xd, wd), go.double())
    return out.detach(), gx, gw


def tolerance(dtype, ref):
    """Only the final rounding to ``dtype`` may differ (the kernels accumulate in fp32/fp64)."""
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))


def check(results, refs, dtype, cfg):
    for name, got, ref in zip(("out", "grad_x", "grad_w"), results, refs):
        torch.testing.assert_close(
            got.double(), ref, **tolerance(dtype, ref), msg=lambda m: f"{name} {cfg}: {m}"
        )


KS = [(1, 2), (3, 1), (3, 2), (5, 3), (7, 1), (7, 2)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# float64 for every (K, stride) branch; the other dtypes (other loads, stores and accumulators)
# for two of them each.
FAST_CASES = [(torch.float64, K, S) for K, S in KS] + [
    (dtype, K, S) for dtype in DTYPES[1:] for K, S in [(3, 2), (7, 1)]
]


@pytest.mark.parametrize(
    "dtype,K,S", FAST_CASES, ids=[f"{str(d)[6:]}-K{k}s{s}" for d, k, s in FAST_CASES]
)
def test_fast_kernels_emulated(tmp_path_factory, dtype, K, S):
    lib = emulator(tmp_path_factory, dtype, K, S)
    for seed in range(4):
        cfg = config(seed, K, S)
        x, w, go, Ho, Wo = inputs(cfg, dtype)
        N, C, G, H, W, cpg = cfg["N"], cfg["C"], cfg["G"], cfg["H"], cfg["W"], cfg["C"] // cfg["G"]
        refs = expected(x, w, go, cfg)
        for chunk in sorted({cpg, 2, 1}):
            n_chunks = (cpg + chunk - 1) // chunk
            geo = (C, G, H, W, Ho, Wo, cfg["pad"], cfg["dil"])
            out, gx, gw = torch.empty_like(go), torch.empty_like(x), torch.empty_like(w)
            chunked = geo + (chunk, n_chunks)
            run(lib, "involution_forward", (x, w, out), chunked, N * G * n_chunks * Ho * Wo)
            run(lib, "involution_grad_input", (go, w, gx), chunked, N * G * n_chunks * H * W)
            run(lib, "involution_grad_weight", (go, x, gw), geo, N * G * Ho * Wo)
            check((out, gx, gw), refs, dtype, dict(cfg, chunk=chunk))


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_naive_kernels_emulated(tmp_path_factory, dtype):
    lib = emulator(tmp_path_factory, dtype)
    for seed, (K, S) in enumerate(KS + [(13, 2)]):
        cfg = config(seed, K, S)
        x, w, go, Ho, Wo = inputs(cfg, dtype)
        refs = expected(x, w, go, cfg)
        out, gx, gw = torch.empty_like(go), torch.empty_like(x), torch.empty_like(w)
        ints = (cfg["C"], cfg["G"], cfg["H"], cfg["W"], Ho, Wo, K, S, cfg["pad"], cfg["dil"])
        run(lib, "involution_naive_forward", (x, w, out), ints, out.numel())
        run(lib, "involution_naive_grad_input", (go, w, gx), ints, gx.numel())
        run(lib, "involution_naive_grad_weight", (go, x, gw), ints, gw.numel())
        check((out, gx, gw), refs, dtype, cfg)


def convert(fn, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Run one of the emulation's element-wise conversions over ``values``."""
    out = torch.empty(values.numel(), dtype=out_dtype)
    fn(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()), values.numel())
    return out


def test_host_fp16_conversions_match_pytorch(tmp_path_factory):
    """The host emulation's fp16 loads and stores round like the GPU's cvt instructions (and
    PyTorch): every half value loads exactly; stores round to nearest even, ties, subnormals,
    overflow and signed zeros included."""
    lib = emulator(tmp_path_factory, torch.float16)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    loaded = convert(lib.emu_half_to_float, bits, torch.float32)
    want = bits.view(torch.float16).float()
    finite = ~want.isnan()
    assert torch.equal(loaded[finite].view(torch.int32), want[finite].view(torch.int32))
    assert loaded[~finite].isnan().all()

    # Every half, the midpoints between neighbours (ties), points just off them, beyond the
    # range, and random floats of every magnitude.
    halves = want[finite & want.isfinite()].sort().values
    mids = (halves[:-1].double() + halves[1:].double()) / 2
    off = torch.cat([mids * (1 + 2**-30), mids * (1 - 2**-30)])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(200_000, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(
        -30, 20, (200_000,), generator=g
    )
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, -1e30, 2**-25, 2**-26])
    values = torch.cat([halves, mids.float(), off.float(), rand.float(), special.float()])
    got = convert(lib.emu_float_to_half, values, torch.int16)
    assert torch.equal(got, values.half().view(torch.int16))
    nan = torch.tensor([float("nan"), -float("nan")])
    assert convert(lib.emu_float_to_half, nan, torch.int16).view(torch.float16).isnan().all()
