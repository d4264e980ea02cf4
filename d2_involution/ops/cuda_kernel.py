"""Compile (once) and launch the involution CUDA kernels with CuPy.

``involution_cuda.cu`` (fast kernels) is compiled with NVRTC through ``cupy.RawModule`` once per
(device, dtype, K, stride) and ``involution_naive.cu`` (the baseline, also used for K > 11) once per
(device, dtype); sizes, padding and dilation are kernel arguments, so new input shapes never
recompile. CuPy's own disk cache keeps the binaries between processes. Nothing here uses CuPy
internals (``cupy._util.memoize``, ``compile_with_cache``): it works with CuPy 13 and 14.

Tensors are shared without copies (CuPy views of PyTorch's memory through ``UnownedMemory``),
outputs are allocated by PyTorch, and kernels run on PyTorch's current stream. Inputs are made
contiguous (NCHW) first, so channels_last tensors are correct at the cost of one copy.
"""

import threading
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

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
    "CTYPES",
    "MAX_FAST_K",
    "SOURCE_DIR",
    "nvrtc_options",
]

SOURCE_DIR = Path(__file__).resolve().parent
FAST_SOURCE = SOURCE_DIR / "involution_cuda.cu"
NAIVE_SOURCE = SOURCE_DIR / "involution_naive.cu"
CTYPES = {
    torch.float16: "d2i_half",
    torch.bfloat16: "d2i_bf16",
    torch.float32: "float",
    torch.float64: "double",
}
MAX_FAST_K = 11
_BLOCK = 128
_INT32_MAX = 2**31 - 1

_lock = threading.Lock()
_modules: Dict[tuple, object] = {}
_cupy = None
_reason: Optional[str] = None


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


def nvrtc_options(
    dtype: torch.dtype, kernel_size: Optional[int] = None, stride: Optional[int] = None
) -> Tuple[str, ...]:
    """NVRTC options for one instantiation (the fast kernels need K and stride, the naive not)."""
    opts = ["--std=c++14", f"-I{SOURCE_DIR}", f"-DD2I_T={CTYPES[dtype]}"]
    if kernel_size is not None:
        opts += [f"-DD2I_K={kernel_size}", f"-DD2I_S={stride}"]
    return tuple(opts)


def _function(name: str, dtype: torch.dtype, device: torch.device, K=None, S=None):
    source = FAST_SOURCE if K is not None else NAIVE_SOURCE
    key = (source.name, device.index, dtype, K, S)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                with _cupy.cuda.Device(device.index):
                    module = _cupy.RawModule(
                        code=source.read_text(), options=nvrtc_options(dtype, K, S)
                    )
                _modules[key] = module
    with _cupy.cuda.Device(device.index):
        return module.get_function(name)


def _view(t: torch.Tensor):
    """A CuPy uint8 view of a contiguous CUDA tensor's memory (no copy; keeps ``t`` alive)."""
    nbytes = t.numel() * t.element_size()
    mem = _cupy.cuda.UnownedMemory(t.data_ptr(), nbytes, t, t.device.index)
    return _cupy.ndarray((nbytes,), dtype=_cupy.uint8, memptr=_cupy.cuda.MemoryPointer(mem, 0))


def _launch(fn, total: int, tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> None:
    device = tensors[0].device
    args = tuple(_view(t) for t in tensors) + tuple(np.int32(v) for v in ints) + (np.int64(total),)
    grid = (total + _BLOCK - 1) // _BLOCK
    with _cupy.cuda.Device(device.index):
        stream = _cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
        with stream:
            fn((grid,), (_BLOCK,), args)


def _check(*tensors: torch.Tensor) -> None:
    if _import_cupy() is None:
        raise RuntimeError(f"d2_involution CUDA kernels unavailable: {_reason}")
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in CTYPES:
        raise TypeError(
            f"involution CUDA kernels: expected one dtype of {list(CTYPES)}, got {dtypes}"
        )


def _chunk(cpg: int, threads_per_channel_group: int, device: torch.device) -> int:
    """Channels a thread handles: the whole group unless that leaves the GPU under-filled."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    target = sms * 2048 * 2
    chunk = cpg
    while chunk > 8 and threads_per_channel_group * ((cpg + chunk - 1) // chunk) < target:
        chunk = (chunk + 1) // 2
    return chunk


def _check_plane(K: int, Ho: int, Wo: int, H: int, W: int) -> None:
    if K * K * Ho * Wo > _INT32_MAX or H * W > _INT32_MAX:
        raise ValueError(
            f"involution CUDA kernels: K*K*Ho*Wo ({K}*{K}*{Ho}*{Wo}) and H*W ({H}*{W}) must fit "
            "in int32"
        )


def forward(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward on CUDA; returns a contiguous (N, C, Ho, Wo) tensor."""
    _check(x, weight)
    x, weight = x.contiguous(), weight.contiguous()
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    _check_plane(K, Ho, Wo, H, W)
    out = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or x.numel() == 0:
        return out.zero_()
    if K > MAX_FAST_K:
        return naive_forward(x, weight, stride, padding, dilation, out=out)
    chunk = _chunk(C // G, N * G * Ho * Wo, x.device)
    n_chunks = (C // G + chunk - 1) // chunk
    fn = _function("involution_forward", x.dtype, x.device, K, stride)
    total = N * G * n_chunks * Ho * Wo
    _launch(fn, total, (x, weight, out), (C, G, H, W, Ho, Wo, padding, dilation, chunk, n_chunks))
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
    _check(grad_out, weight)
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    _check_plane(K, Ho, Wo, H, W)
    gx = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device)
    if gx.numel() == 0 or grad_out.numel() == 0:
        return gx.zero_()
    if K > MAX_FAST_K:
        return naive_grad_input(grad_out, weight, H, W, stride, padding, dilation, out=gx)
    chunk = _chunk(C // G, N * G * H * W, gx.device)
    n_chunks = (C // G + chunk - 1) // chunk
    fn = _function("involution_grad_input", gx.dtype, gx.device, K, stride)
    total = N * G * n_chunks * H * W
    ints = (C, G, H, W, Ho, Wo, padding, dilation, chunk, n_chunks)
    _launch(fn, total, (grad_out, weight, gx), ints)
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
    _check(grad_out, x)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    G, K = groups, kernel_size
    _check_plane(K, Ho, Wo, H, W)
    gw = torch.empty((N, G, K, K, Ho, Wo), dtype=x.dtype, device=x.device)
    if gw.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    if K > MAX_FAST_K:
        return naive_grad_weight(grad_out, x, G, K, stride, padding, dilation, out=gw)
    fn = _function("involution_grad_weight", gw.dtype, gw.device, K, stride)
    _launch(fn, N * G * Ho * Wo, (grad_out, x, gw), (C, G, H, W, Ho, Wo, padding, dilation))
    return gw


def naive_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward with the naive one-thread-per-output kernel (baseline)."""
    _check(x, weight)
    x, weight = x.contiguous(), weight.contiguous()
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    if out is None:
        out = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or x.numel() == 0:
        return out.zero_()
    fn = _function("involution_naive_forward", x.dtype, x.device)
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    _launch(fn, out.numel(), (x, weight, out), ints)
    return out


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
    _check(grad_out, weight)
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    if out is None:
        out = torch.empty((N, C, H, W), dtype=grad_out.dtype, device=grad_out.device)
    if out.numel() == 0 or grad_out.numel() == 0:
        return out.zero_()
    fn = _function("involution_naive_grad_input", out.dtype, out.device)
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    _launch(fn, out.numel(), (grad_out, weight, out), ints)
    return out


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
    _check(grad_out, x)
    grad_out, x = grad_out.contiguous(), x.contiguous()
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    G, K = groups, kernel_size
    if out is None:
        out = torch.empty((N, G, K, K, Ho, Wo), dtype=x.dtype, device=x.device)
    if out.numel() == 0 or x.numel() == 0:
        return out.zero_()
    fn = _function("involution_naive_grad_weight", out.dtype, out.device)
    ints = (C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    _launch(fn, out.numel(), (grad_out, x, out), ints)
    return out
