"""The CUDA kernels checked without a GPU, in all four dtypes: the code NVRTC compiles, built as
host C++ and run block by block with real barriers, checked accesses and race detection
(tests/cuda_emulation.py), against the float64 unfold reference. The tiled kernels (forward,
grad-input, grad-weight, fused forward and backward) run through cuda_kernel.py's own launch code
on a fake CuPy, in NCHW and NHWC, strides 1 and 2, dilation 2, odd sizes, partial channel chunks
and several grad-weight stages; the naive kernels are launched directly. The emulator's checks are
themselves tested on kernels that break them."""

import ctypes
import random
import re

import pytest
import torch

from cuda_emulation import CXX, FakeCupy, build, launch  # tests/ is on sys.path  # isort: skip
from involution_reference import reference  # isort: skip

from d2_involution.ops import cuda_kernel, involution_output_size

pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STREAM = 0xBEEF


@pytest.fixture
def fake(tmp_path_factory, monkeypatch) -> FakeCupy:
    fake = FakeCupy(tmp_path_factory.getbasetemp() / "emulated")
    monkeypatch.setattr(cuda_kernel, "_cupy", fake)
    for cache in ("_modules", "_kernels", "_streams"):
        monkeypatch.setattr(cuda_kernel, cache, {})
    monkeypatch.setattr(cuda_kernel, "_torch_stream_ptr", lambda device_index: STREAM)
    return fake


def tolerance(dtype, ref):
    """Only the final rounding to ``dtype`` may differ (the kernels accumulate in fp32/fp64)."""
    eps = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))


def check(name, got, ref, dtype, case):
    torch.testing.assert_close(
        got.double(), ref, **tolerance(dtype, ref), msg=lambda m: f"{name} {case}: {m}"
    )


def problem(seed: int, K: int, S: int, D: int):
    """A random geometry: odd sizes, padding "same" or explicit, 1-3 groups of 1-20 channels
    (partial channel chunks; two grad-weight stages at 20)."""
    rng = random.Random(seed)
    padding = rng.choice([D * (K - 1) // 2, rng.randint(0, D * (K - 1) // 2 + 1)])
    min_size = max(1, D * (K - 1) + 1 - 2 * padding)
    G = rng.choice([1, 2, 3])
    return dict(
        N=rng.randint(1, 2),
        G=G,
        cpg=rng.choice([1, 5, 6, 16, 20]),
        H=rng.randint(min_size, min_size + 10),
        W=rng.randint(min_size, min_size + 10),
        pad=padding,
    )


def tensors(p, K, S, D, dtype, layout, reduced=0):
    g = torch.Generator().manual_seed(0)
    N, G, C = p["N"], p["G"], p["G"] * p["cpg"]
    Ho = involution_output_size(p["H"], K, S, p["pad"], D)
    Wo = involution_output_size(p["W"], K, S, p["pad"], D)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    x, go = rand(N, C, p["H"], p["W"]), rand(N, C, Ho, Wo)
    w, r = rand(N, G, K, K, Ho, Wo), rand(N, max(reduced, 1), Ho, Wo)
    a, b = rand(G * K * K, max(reduced, 1)), rand(G * K * K)
    if layout == "nhwc":
        x, go, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, go, r))
        w = cuda_kernel.weight_as_layout(w, "nhwc")
    return x, w, go, r, a, b


def check_plain(p, K, S, D, dtype, layout):
    x, w, go, _, _, _ = tensors(p, K, S, D, dtype, layout)
    geo = (S, p["pad"], D)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference(xd, wd, *geo)
    rx, rw = torch.autograd.grad(ref, (xd, wd), go.double())
    out = cuda_kernel.forward(x, w, *geo)
    gx = cuda_kernel.grad_input(go, w, p["H"], p["W"], *geo)
    gw = cuda_kernel.grad_weight(go, x, p["G"], K, *geo)
    case = dict(p, K=K, S=S, D=D, layout=layout)
    for name, got, want in (("out", out, ref), ("grad_x", gx, rx), ("grad_w", gw, rw)):
        check(name, got, want, dtype, case)
    assert cuda_kernel.layout_of(out) == cuda_kernel.layout_of(gx) == layout
    assert torch.equal(cuda_kernel.weight_as_layout(gw, layout), gw)  # already in the layout


def check_fused(p, K, S, D, dtype, layout):
    Cr = max(1, p["cpg"] * p["G"] // 4)
    x, _, go, r, a, b = tensors(p, K, S, D, dtype, layout, reduced=Cr)
    geo = (S, p["pad"], D)
    leaves = [t.double().requires_grad_() for t in (x, r, a, b)]
    N, Ho, Wo = x.shape[0], r.shape[2], r.shape[3]
    weight = torch.nn.functional.conv2d(leaves[1], leaves[2][..., None, None], leaves[3])
    ref = reference(leaves[0], weight.reshape(N, p["G"], K, K, Ho, Wo), *geo)
    refs = (ref, *torch.autograd.grad(ref, leaves, go.double()))
    out = cuda_kernel.fused_forward(x, r, a, b, *geo, K, p["G"])
    grads = cuda_kernel.fused_backward(go, x, r, a, b, *geo, K, p["G"])
    case = dict(p, K=K, S=S, D=D, Cr=Cr, layout=layout)
    for name, got, want in zip(
        ("out", "grad_x", "grad_r", "grad_a", "grad_b"), (out, *grads), refs
    ):
        check(f"fused {name}", got, want, dtype, case)
    assert cuda_kernel.layout_of(out) == cuda_kernel.layout_of(grads[0]) == layout


GEOMETRIES = [(1, 1, 1), (3, 1, 1), (3, 2, 2), (5, 2, 1), (7, 1, 1), (7, 2, 1), (3, 3, 1)]
# float64 for every (K, stride, dilation) branch; the other dtypes (other loads, conversions,
# stores and tile sizes) for two of them each.
CASES = [(torch.float64, *g) for g in GEOMETRIES] + [
    (dtype, *g) for dtype in DTYPES[1:] for g in [(7, 1, 1), (3, 2, 2)]
]


@pytest.mark.parametrize(
    "dtype,K,S,D", CASES, ids=[f"{str(c[0])[6:]}-K{c[1]}s{c[2]}d{c[3]}" for c in CASES]
)
def test_tiled_kernels_emulated(fake, dtype, K, S, D):
    for layout in ("nchw", "nhwc"):
        for seed in range(3):
            p = problem(seed + 10 * K + S, K, S, D)
            check_plain(p, K, S, D, dtype, layout)
            check_fused(p, K, S, D, dtype, layout)
    ran = {launch.name for launch in fake.launches}
    for op in ("forward", "grad_input", "grad_weight", "grad_weight_acc"):
        assert {f"involution_{op}_nchw", f"involution_{op}_nhwc"} <= ran
    if cuda_kernel.uses_fast_kernel("fused_grad_input", dtype, K):
        assert {"involution_fused_forward_nhwc", "involution_fused_grad_input_nchw"} <= ran


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
def test_nhwc_16_byte_fill_emulated(fake, dtype):
    """Channel runs aligned for 16-byte loads (flags bit 0) in every NHWC tiled kernel."""
    p = dict(N=2, G=2, cpg=48, H=9, W=10, pad=3)  # 48: a multiple of every dtype's chunk
    check_plain(p, 7, 1, 1, dtype, "nhwc")
    check_fused(p, 7, 1, 1, dtype, "nhwc")
    vector = {launch.name for launch in fake.launches if launch.ints[-1] & 1}
    assert {f"involution_{op}_nhwc" for op in ("forward", "grad_input", "grad_weight")} <= vector
    assert {"involution_fused_forward_nhwc", "involution_fused_grad_input_nhwc"} <= vector


def test_naive_kernels_emulated(tmp_path_factory):
    for dtype in DTYPES:
        code = cuda_kernel.kernel_source(cuda_kernel.NAIVE_SOURCE)
        lib = build(code, cuda_kernel.nvrtc_options(dtype), tmp_path_factory.getbasetemp())
        for seed, (K, S, D) in enumerate(GEOMETRIES[:4] + [(13, 2, 1)]):
            p = problem(seed, K, S, D)
            x, w, go, _, _, _ = tensors(p, K, S, D, dtype, "nchw")
            xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
            ref = reference(xd, wd, S, p["pad"], D)
            rx, rw = torch.autograd.grad(ref, (xd, wd), go.double())
            out, gx, gw = torch.empty_like(go), torch.empty_like(x), torch.empty_like(w)
            C, Ho, Wo = x.shape[1], go.shape[2], go.shape[3]
            ints = (C, p["G"], p["H"], p["W"], Ho, Wo, K, S, p["pad"], D)
            for name, a, b, o in (
                ("forward", x, w, out),
                ("grad_input", go, w, gx),
                ("grad_weight", go, x, gw),
            ):
                grid = (o.numel() + 127) // 128
                launch(
                    lib, f"involution_naive_{name}", (grid,), 128, [a, b, o], ints, total=o.numel()
                )
            for name, got, want in (("out", out, ref), ("grad_x", gx, rx), ("grad_w", gw, rw)):
                check(f"naive {name}", got, want, dtype, p)


# ------------------------------------------------------------------------------------------------
# The emulator's own checks, on kernels that break them.

BROKEN = r"""
#include "involution_common.cuh"
extern __shared__ __align__(16) unsigned char d2i_smem[];
// in0: n floats; out: n floats. ints[0] selects the fault.
extern "C" __global__ void broken(const float* in0, const float* in1, const float* in2,
                                  const float* in3, float* out, int n, int fault, int a, int b,
                                  int c, int d, int e, int f, int g, int h) {
  float* s = reinterpret_cast<float*>(d2i_smem);
  const int t = threadIdx.x;
  d2i_sts(s + t, d2i_load(in0 + t));
  if (fault != 1) __syncthreads();                      // 1: read a neighbour's word unsynced
  float v = d2i_lds(s + (t + 1) % blockDim.x);
  if (fault == 2) v += d2i_load(in0 + n);               // 2: read past the input
  if (fault == 3) d2i_store(const_cast<float*>(in0) + t, v);  // 3: store into an input
  if (fault == 4) v += d2i_lds(s + blockDim.x + 64);     // 4: outside the launch's shared memory
  if (fault == 5 && t == 0) return;                     // 5: exit before a barrier
  if (fault == 5) __syncthreads();
  d2i_store(out + t, v);
}
"""


@pytest.mark.parametrize(
    "fault,message",
    [
        (0, None),
        (1, "shared race"),
        (2, "global load outside every tensor"),
        (3, "global store into an input tensor"),
        (4, "outside the"),
        (5, "__syncthreads() reached by"),
    ],
)
def test_emulator_detects_faults(tmp_path_factory, fault, message):
    code = BROKEN.replace('#include "involution_common.cuh"', cuda_kernel.COMMON_HEADER.read_text())
    lib = build(code, ["-DD2I_T=float"], tmp_path_factory.getbasetemp())
    n = 32
    x = torch.arange(2 * n, dtype=torch.float32)[:n]  # what follows x is no tensor's memory
    out = torch.zeros(n)
    ints = [n, fault] + [0] * 8
    if message is None:
        launch(lib, "broken", (1,), n, [x, None, None, None, out], ints, smem=4 * n + 4)
        assert torch.equal(out, torch.roll(x, -1))
    else:
        with pytest.raises(AssertionError, match=re.escape(message)):
            launch(lib, "broken", (1,), n, [x, None, None, None, out], ints, smem=4 * n + 4)


def convert(fn, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Run one of the emulation's element-wise conversions over ``values``."""
    out = torch.empty(values.numel(), dtype=out_dtype)
    fn(ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(out.data_ptr()), values.numel())
    return out


def test_host_fp16_conversions_match_pytorch(tmp_path_factory):
    """The host emulation's fp16 loads and stores round like the GPU's cvt instructions (and
    PyTorch): every half value loads exactly; stores round to nearest even, ties, subnormals,
    overflow and signed zeros included."""
    code = cuda_kernel.kernel_source(cuda_kernel.NAIVE_SOURCE)
    lib = build(code, cuda_kernel.nvrtc_options(torch.float16), tmp_path_factory.getbasetemp())
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
