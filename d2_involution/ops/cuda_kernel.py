"""Compile (once) and launch the involution CUDA kernels with CuPy.

``involution_cuda.cu`` (fast kernels) is compiled with NVRTC through ``cupy.RawModule`` once per
(device, dtype, K, stride) and ``involution_naive.cu`` (the baseline) once per (device, dtype);
sizes, padding and dilation are kernel arguments, so new input shapes never recompile. CuPy's disk
cache keeps the binaries between processes; it keys them by the code string and the options only,
so :func:`kernel_source` inlines ``involution_common.cuh`` into the code (an edit to the header
changes the key). Only public CuPy APIs are used; CuPy 13 and 14 both work.

Which kernel runs: the fast kernel of an op when K is at most ``FAST_MAX_K[op][dtype]`` (the
largest K that ptxas compiles without spilling, measured, pinned by tests/test_ops_cuda.py) and the
compiled kernel uses no local memory on this GPU; otherwise the naive kernel.

Tensors are shared without copies (CuPy views of PyTorch's memory through ``UnownedMemory``),
outputs are allocated by PyTorch, and kernels run on PyTorch's current stream. The kernels read
NCHW: other layouts are made contiguous here (:func:`d2_involution.ops.involution` already passes
contiguous tensors). Shapes are checked by the custom ops before these functions are called.
"""

import threading
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "available",
    "unavailable_reason",
    "forward",
    "grad_input",
    "grad_weight",
    "naive_forward",
    "naive_grad_input",
    "naive_grad_weight",
    "uses_fast_kernel",
    "kernel_source",
    "nvrtc_options",
    "CTYPES",
    "FAST_MAX_K",
    "SOURCE_DIR",
]

SOURCE_DIR = Path(__file__).resolve().parent
FAST_SOURCE = SOURCE_DIR / "involution_cuda.cu"
NAIVE_SOURCE = SOURCE_DIR / "involution_naive.cu"
COMMON_HEADER = SOURCE_DIR / "involution_common.cuh"
CTYPES = {
    torch.float16: "d2i_half",
    torch.bfloat16: "d2i_bf16",
    torch.float32: "float",
    torch.float64: "double",
}
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Largest K whose fast kernel ptxas (CUDA 13.0, sm_90 and sm_80, strides 1-3) compiles without
# spilling; the next odd K spills. Registers a thread at K = 7 (sm_90, stride 1): forward 104
# (fp32) / 112 (fp16, bf16) / 153 (fp64); grad-input 186-188 / 233 (fp64); grad-weight 118-128 /
# 168 (fp64). Spilling from: forward K = 11, grad-input K = 9, grad-weight K = 11 (fp64) and 13.
FAST_MAX_K: Dict[str, Dict[torch.dtype, int]] = {
    "forward": {_F16: 9, _BF16: 9, _F32: 9, _F64: 9},
    "grad_input": {_F16: 7, _BF16: 7, _F32: 7, _F64: 7},
    "grad_weight": {_F16: 11, _BF16: 11, _F32: 11, _F64: 9},
}
_BLOCK = 128  # threads a block, for every kernel (the fast kernels' __launch_bounds__)
_WAVES = 2  # the fast kernels' grids aim at twice the threads the GPU keeps resident
_MIN_CHUNK = 8
_INT32_MAX = 2**31 - 1

_lock = threading.Lock()
_modules: Dict[tuple, object] = {}
_kernels: Dict[tuple, "_Kernel"] = {}
_streams: Dict[Tuple[int, int], object] = {}
_cupy = None
_reason: Optional[str] = None


class _Kernel(NamedTuple):
    """A compiled kernel with what the launch logic needs to know about it on its device."""

    fn: object
    spills: bool  # uses local memory (register spills)
    resident_threads: int  # threads of it the whole GPU keeps resident at _BLOCK a block


def _import_cupy():
    global _cupy, _reason
    if _cupy is None and _reason is None:
        try:
            import cupy

            _cupy = cupy
        except Exception as e:  # noqa: BLE001 - any import failure means: no CUDA kernels
            _reason = f"cupy cannot be imported ({type(e).__name__}: {e})"
    return _cupy


def available() -> bool:
    """True when CuPy imports and PyTorch sees a CUDA device."""
    return torch.cuda.is_available() and _import_cupy() is not None


def unavailable_reason() -> Optional[str]:
    """Why the CUDA kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    _import_cupy()
    return _reason


def kernel_source(source: Path) -> str:
    """The code NVRTC compiles: ``source`` with ``involution_common.cuh`` inlined (with ``#line``
    markers, so compiler messages still name the right file and line)."""
    include = f'#include "{COMMON_HEADER.name}"'
    lines = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        if line.strip() == include:
            lines += [f'#line 1 "{COMMON_HEADER.name}"', COMMON_HEADER.read_text().rstrip()]
            lines.append(f'#line {number + 1} "{source.name}"')
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def nvrtc_options(
    dtype: torch.dtype, kernel_size: Optional[int] = None, stride: Optional[int] = None
) -> Tuple[str, ...]:
    """NVRTC options for one instantiation (the fast kernels need K and stride, the naive not)."""
    opts = ["--std=c++14", f"-DD2I_T={CTYPES[dtype]}"]
    if kernel_size is not None:
        opts += [f"-DD2I_K={kernel_size}", f"-DD2I_S={stride}"]
    return tuple(opts)


def _module(dtype: torch.dtype, device_index: int, K: Optional[int], S: Optional[int]):
    source = FAST_SOURCE if K is not None else NAIVE_SOURCE
    key = (source.name, device_index, dtype, K, S)
    with _lock:
        if key not in _modules:
            with _cupy.cuda.Device(device_index):
                _modules[key] = _cupy.RawModule(
                    code=kernel_source(source), options=nvrtc_options(dtype, K, S)
                )
        return _modules[key]


def _kernel(name: str, dtype: torch.dtype, device_index: int, K=None, S=None) -> _Kernel:
    key = (name, dtype, device_index, K, S)
    kernel = _kernels.get(key)
    if kernel is None:
        module = _module(dtype, device_index, K, S)
        device = _cupy.cuda.Device(device_index)
        with device:
            fn = module.get_function(name)
            per_sm = _cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                fn.kernel.ptr, _BLOCK, 0
            )
            sms = device.attributes["MultiProcessorCount"]
        kernel = _Kernel(fn, fn.local_size_bytes > 0, max(1, per_sm) * _BLOCK * sms)
        _kernels[key] = kernel
    return kernel


def _fast_kernel(op: str, dtype: torch.dtype, device_index: int, K: int, S: int):
    """The fast kernel of ``op`` for this instantiation, or None where the naive one must run."""
    if not uses_fast_kernel(op, dtype, K):
        return None
    kernel = _kernel(f"involution_{op}", dtype, device_index, K, S)
    return None if kernel.spills else kernel


def uses_fast_kernel(op: str, dtype: torch.dtype, kernel_size: int) -> bool:
    """Whether ``op`` ("forward", "grad_input", "grad_weight") may use its fast kernel at this K
    (the naive one runs where the fast one would spill)."""
    return kernel_size <= FAST_MAX_K[op][dtype]


class _StreamHandle:
    """A raw ``cudaStream_t`` seen through the CUDA stream protocol (``Stream.from_external``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self) -> Tuple[int, int]:
        return (0, self.ptr)


def _torch_stream_ptr(device_index: int) -> int:
    return torch.cuda.current_stream(device_index).cuda_stream


def _cupy_stream(device_index: int):
    """PyTorch's current stream on this device as a CuPy stream (cached per raw stream)."""
    ptr = _torch_stream_ptr(device_index)
    stream = _streams.get((device_index, ptr))
    if stream is None:
        from_external = getattr(_cupy.cuda.Stream, "from_external", None)
        if from_external is not None:  # CuPy >= 14
            stream = from_external(_StreamHandle(ptr))
        else:  # CuPy 13 (ExternalStream is deprecated from 14 on and warns there)
            stream = _cupy.cuda.ExternalStream(ptr, device_index)
        _streams[(device_index, ptr)] = stream
    return stream


def _view(t: torch.Tensor):
    """A CuPy uint8 view of a contiguous CUDA tensor's memory (no copy; keeps ``t`` alive)."""
    nbytes = t.numel() * t.element_size()
    mem = _cupy.cuda.UnownedMemory(t.data_ptr(), nbytes, t, t.device.index)
    return _cupy.ndarray((nbytes,), dtype=_cupy.uint8, memptr=_cupy.cuda.MemoryPointer(mem, 0))


def _launch(fn, total: int, tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> None:
    """One thread per work item: a 1-D grid of _BLOCK-thread blocks on PyTorch's stream."""
    device_index = tensors[0].device.index
    args = tuple(_view(t) for t in tensors) + tuple(np.int32(v) for v in ints) + (np.int64(total),)
    grid = (total + _BLOCK - 1) // _BLOCK
    with _cupy.cuda.Device(device_index):
        with _cupy_stream(device_index):
            fn((grid,), (_BLOCK,), args)


def _chunk(kernel: _Kernel, cpg: int, threads_per_chunk: int) -> int:
    """Channels a thread handles: the whole group, halved (not below 8) while the grid would have
    fewer than _WAVES times the threads the GPU keeps resident for this kernel."""
    target = _WAVES * kernel.resident_threads
    chunk = cpg
    while chunk > _MIN_CHUNK and threads_per_chunk * ((cpg + chunk - 1) // chunk) < target:
        chunk = (chunk + 1) // 2
    return chunk


def _check_plane(K: int, Ho: int, Wo: int, H: int, W: int) -> None:
    if K * K * Ho * Wo > _INT32_MAX or H * W > _INT32_MAX:
        raise ValueError(
            f"involution CUDA kernels: K*K*Ho*Wo ({K}*{K}*{Ho}*{Wo}) and H*W ({H}*{W}) must fit "
            "in int32"
        )


def _empty(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=t.dtype, device=t.device)


def forward(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward on CUDA; returns a contiguous (N, C, Ho, Wo) tensor."""
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    _check_plane(K, Ho, Wo, H, W)
    out = _empty(x, (N, C, Ho, Wo))
    if out.numel() == 0 or x.numel() == 0:
        return out.zero_()
    x, weight = x.contiguous(), weight.contiguous()
    kernel = _fast_kernel("forward", x.dtype, x.device.index, K, stride)
    if kernel is None:
        return naive_forward(x, weight, stride, padding, dilation, out=out)
    chunk = _chunk(kernel, C // G, N * G * Ho * Wo)
    n_chunks = (C // G + chunk - 1) // chunk
    ints = (C, G, H, W, Ho, Wo, padding, dilation, chunk, n_chunks)
    _launch(kernel.fn, N * G * n_chunks * Ho * Wo, (x, weight, out), ints)
    return out


def grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    H: int,
    W: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """Gradient w.r.t. x, (N, C, H, W)."""
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    _check_plane(K, Ho, Wo, H, W)
    gx = _empty(grad_out, (N, C, H, W))
    if gx.numel() == 0 or grad_out.numel() == 0:
        return gx.zero_()
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    kernel = _fast_kernel("grad_input", gx.dtype, gx.device.index, K, stride)
    if kernel is None:
        return naive_grad_input(grad_out, weight, H, W, stride, padding, dilation, out=gx)
    chunk = _chunk(kernel, C // G, N * G * H * W)
    n_chunks = (C // G + chunk - 1) // chunk
    ints = (C, G, H, W, Ho, Wo, padding, dilation, chunk, n_chunks)
    _launch(kernel.fn, N * G * n_chunks * H * W, (grad_out, weight, gx), ints)
    return gx


def grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """Gradient w.r.t. the weight, (N, G, K, K, Ho, Wo)."""
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    G, K = groups, kernel_size
    _check_plane(K, Ho, Wo, H, W)
    gw = _empty(x, (N, G, K, K, Ho, Wo))
    if gw.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    grad_out, x = grad_out.contiguous(), x.contiguous()
    kernel = _fast_kernel("grad_weight", gw.dtype, gw.device.index, K, stride)
    if kernel is None:
        return naive_grad_weight(grad_out, x, G, K, stride, padding, dilation, out=gw)
    ints = (C, G, H, W, Ho, Wo, padding, dilation)
    _launch(kernel.fn, N * G * Ho * Wo, (grad_out, x, gw), ints)
    return gw


def _naive(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, ints) -> torch.Tensor:
    if out.numel() == 0 or a.numel() == 0 or b.numel() == 0:
        return out.zero_()
    kernel = _kernel(f"involution_naive_{name}", out.dtype, out.device.index)
    _launch(kernel.fn, out.numel(), (a.contiguous(), b.contiguous(), out), ints)
    return out


def naive_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward with the naive one-thread-per-output kernel (baseline)."""
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    out = _empty(x, (N, C, Ho, Wo)) if out is None else out
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    return _naive("forward", x, weight, out, ints)


def naive_grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    H: int,
    W: int,
    stride: int,
    padding: int,
    dilation: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. x with the naive kernel (baseline)."""
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    out = _empty(grad_out, (N, C, H, W)) if out is None else out
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    return _naive("grad_input", grad_out, weight, out, ints)


def naive_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. the weight with the naive kernel (baseline)."""
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    G, K = groups, kernel_size
    out = _empty(x, (N, G, K, K, Ho, Wo)) if out is None else out
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    return _naive("grad_weight", grad_out, x, out, ints)
