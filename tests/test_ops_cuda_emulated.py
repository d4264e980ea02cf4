"""The CUDA kernels' index logic checked without a GPU: the .cu files compiled as host C++ (a shim
maps blockIdx/threadIdx/__ldg to host code) and "launched" thread by thread on CPU tensors, then
compared with the plain unfold reference. fp16 needs PTX and is covered only by test_ops_cuda.py."""

import ctypes
import random
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import d2_involution  # noqa: F401  # isort: skip
from d2_involution.ops import cuda_kernel, involution_output_size

CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to emulate the kernels")

SHIM = r"""
#include <algorithm>
#include <cstring>
struct d2i_dim3 { unsigned int x = 0, y = 0, z = 0; };
static d2i_dim3 blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
template <typename T> inline T __ldg(const T* p) { return *p; }
using std::min;
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
#include "SOURCE"
#define LAUNCH(...) blockDim.x = 128; \
  for (long long blk = 0; blk * 128 < total; ++blk) { blockIdx.x = (unsigned int)blk; \
    for (unsigned int thr = 0; thr < 128; ++thr) { threadIdx.x = thr; __VA_ARGS__; } }
typedef D2I_T T;
"""
FAST_DRIVER = r"""
extern "C" void emu_forward(const T* a, const T* b, T* o, int C, int G, int H, int W, int Ho,
    int Wo, int pad, int dil, int chunk, int n_chunks, long long total) {
  LAUNCH(involution_forward(a, b, o, C, G, H, W, Ho, Wo, pad, dil, chunk, n_chunks, total)) }
extern "C" void emu_grad_input(const T* a, const T* b, T* o, int C, int G, int H, int W, int Ho,
    int Wo, int pad, int dil, int chunk, int n_chunks, long long total) {
  LAUNCH(involution_grad_input(a, b, o, C, G, H, W, Ho, Wo, pad, dil, chunk, n_chunks, total)) }
extern "C" void emu_grad_weight(const T* a, const T* b, T* o, int C, int G, int H, int W, int Ho,
    int Wo, int pad, int dil, long long total) {
  LAUNCH(involution_grad_weight(a, b, o, C, G, H, W, Ho, Wo, pad, dil, total)) }
"""
NAIVE_DRIVER = r"""
#define NAIVE(name) extern "C" void emu_##name(const T* a, const T* b, T* o, int C, int G, int H, \
    int W, int Ho, int Wo, int K, int S, int pad, int dil, long long total) { \
  LAUNCH(involution_naive_##name(a, b, o, C, G, H, W, Ho, Wo, K, S, pad, dil, total)) }
NAIVE(forward)
NAIVE(grad_input)
NAIVE(grad_weight)
"""

_libs = {}


def emulator(tmp_path_factory, dtype, K=None, S=None) -> ctypes.CDLL:
    key = (dtype, K, S)
    if key not in _libs:
        source = cuda_kernel.FAST_SOURCE if K is not None else cuda_kernel.NAIVE_SOURCE
        text = SHIM.replace("SOURCE", str(source)) + (FAST_DRIVER if K else NAIVE_DRIVER)
        d = tmp_path_factory.mktemp("emu")
        (d / "driver.cpp").write_text(text)
        defines = [o for o in cuda_kernel.nvrtc_options(dtype, K, S) if o.startswith("-D")]
        cmd = [
            CXX,
            "-O1",
            "-std=c++14",
            "-shared",
            "-fPIC",
            "-DD2I_HOST_EMULATION",
            *defines,
            f"-I{cuda_kernel.SOURCE_DIR}",
            str(d / "driver.cpp"),
            "-o",
            str(d / "emu.so"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _libs[key] = ctypes.CDLL(str(d / "emu.so"))
    return _libs[key]


def call(fn, tensors, ints, total):
    args = [ctypes.c_void_p(t.data_ptr()) for t in tensors] + [ctypes.c_int(v) for v in ints]
    fn(*args, ctypes.c_longlong(total))


def reference(x, weight, stride, padding, dilation):
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    cols = F.unfold(x, K, dilation=dilation, padding=padding, stride=stride)
    cols = cols.view(N, G, C // G, K * K, Ho, Wo)
    return (cols * weight.reshape(N, G, 1, K * K, Ho, Wo)).sum(3).reshape(N, C, Ho, Wo)


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


def check(results, refs, dtype, cfg):
    eps = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    for name, got, ref in zip(("out", "grad_x", "grad_w"), results, refs):
        tol = dict(rtol=eps, atol=eps * max(1.0, ref.abs().max().item()))
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m: f"{name} {cfg}: {m}")


KS = [(1, 2), (3, 1), (3, 2), (5, 3), (7, 1), (7, 2)]


# float64 for every (K, stride) branch; bfloat16 (other loads and stores) for two of them.
FAST_CASES = [(torch.float64, K, S) for K, S in KS] + [
    (torch.bfloat16, 3, 2),
    (torch.bfloat16, 7, 1),
]


@pytest.mark.parametrize(
    "dtype,K,S", FAST_CASES, ids=[f"{str(d)[6:]}-K{k}s{s}" for d, k, s in FAST_CASES]
)
def test_fast_kernels_emulated(tmp_path_factory, dtype, K, S):
    lib = emulator(tmp_path_factory, dtype, K, S)
    for seed in range(4):
        cfg = config(seed, K, S)
        x, w, go, Ho, Wo = inputs(cfg, dtype)
        C, G, H, W, cpg = cfg["C"], cfg["G"], cfg["H"], cfg["W"], cfg["C"] // cfg["G"]
        refs = expected(x, w, go, cfg)
        for chunk in sorted({cpg, 2, 1}):
            n_chunks = (cpg + chunk - 1) // chunk
            geo = (C, G, H, W, Ho, Wo, cfg["pad"], cfg["dil"])
            out, gx, gw = torch.empty_like(go), torch.empty_like(x), torch.empty_like(w)
            N = cfg["N"]
            call(lib.emu_forward, (x, w, out), geo + (chunk, n_chunks), N * G * n_chunks * Ho * Wo)
            call(lib.emu_grad_input, (go, w, gx), geo + (chunk, n_chunks), N * G * n_chunks * H * W)
            call(lib.emu_grad_weight, (go, x, gw), geo, N * G * Ho * Wo)
            check((out, gx, gw), refs, dtype, dict(cfg, chunk=chunk))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_naive_kernels_emulated(tmp_path_factory, dtype):
    lib = emulator(tmp_path_factory, dtype)
    for seed, (K, S) in enumerate(KS + [(13, 2)]):
        cfg = config(seed, K, S)
        x, w, go, Ho, Wo = inputs(cfg, dtype)
        refs = expected(x, w, go, cfg)
        out, gx, gw = torch.empty_like(go), torch.empty_like(x), torch.empty_like(w)
        ints = (cfg["C"], cfg["G"], cfg["H"], cfg["W"], Ho, Wo, K, S, cfg["pad"], cfg["dil"])
        call(lib.emu_forward, (x, w, out), ints, out.numel())
        call(lib.emu_grad_input, (go, w, gx), ints, gx.numel())
        call(lib.emu_grad_weight, (go, x, gw), ints, gw.numel())
        check((out, gx, gw), refs, dtype, cfg)
