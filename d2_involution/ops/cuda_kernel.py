"""Compile (once) and launch the involution CUDA kernels with CuPy.

Kernel files (NVRTC through ``cupy.RawModule``):

* ``involution_cuda.cu``: forward, grad-input and grad-weight designed for Hopper (shared-memory
  tiles, register windows; ``involution_tile.cuh``), NCHW and NHWC, compiled once per (device,
  dtype, K, stride, dilation);
* ``involution_fused.cu``: the same with kernel generation fused (the weights are computed from
  the reduced features inside the aggregation), once per the same key;
* ``involution_naive.cu``: the baseline (one thread per output element), once per (device, dtype).

Sizes and padding are kernel arguments, so new input shapes never recompile. CuPy's disk cache
keys binaries by the code string and the options only, so :func:`kernel_source` inlines the
headers into the code (an edit to a header changes the key). Only public CuPy APIs are used; CuPy
13 and 14 both work.

Launch: each tiled kernel exports its configuration (``<kernel>_config``: threads, tile, channel
chunks a block, dynamic shared memory, channels a chunk), read from the module once; the host
raises the kernel's dynamic shared-memory limit and carveout where it needs more than 48 KB,
asks CUDA how many blocks an SM holds with its real registers and shared memory, and launches a
grid of (tiles, channel blocks, images). A tiled kernel runs when K <= ``FAST_MAX_K[op][dtype]``
(the largest K ptxas compiles without spilling for sm_90, pinned by tests/test_ops_cuda.py) and
the compiled kernel uses no local memory, fits its shared memory and fits an SM on this GPU;
otherwise the naive kernel (fused ops: the unfused computation) runs.

Layouts: a channels_last x (grad_out for grad-input) selects the NHWC kernels, which take the
weight as the channels_last (N, G*K*K, Ho, Wo) tensor a kernel generator produces, viewed as
(N, G, K, K, Ho, Wo); other tensors are brought to the selected layout (a copy only where they
are in the other one), and results come back in it. Tensors are shared without copies (CuPy views
of PyTorch's memory), outputs are allocated by PyTorch, kernels run on PyTorch's current stream.
Shapes are checked by the custom ops before the plain functions are called; the fused functions
check their own.
"""

import re
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
    "fused_forward",
    "fused_backward",
    "naive_forward",
    "naive_grad_input",
    "naive_grad_weight",
    "uses_fast_kernel",
    "layout_of",
    "as_layout",
    "weight_as_layout",
    "generate_weights",
    "kernel_source",
    "nvrtc_options",
    "CTYPES",
    "FAST_MAX_K",
    "SOURCE_DIR",
]

SOURCE_DIR = Path(__file__).resolve().parent
FAST_SOURCE = SOURCE_DIR / "involution_cuda.cu"
FUSED_SOURCE = SOURCE_DIR / "involution_fused.cu"
NAIVE_SOURCE = SOURCE_DIR / "involution_naive.cu"
COMMON_HEADER = SOURCE_DIR / "involution_common.cuh"
CTYPES = {
    torch.float16: "d2i_half",
    torch.bfloat16: "d2i_bf16",
    torch.float32: "float",
    torch.float64: "double",
}
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# Largest K whose tiled kernels ptxas (CUDA 13.0, sm_90, strides 1 and 2, both layouts) compiles
# without spilling; the next odd K spills at stride 1 or 2 (13 is the largest K compiled at all).
# Registers a thread at K = 7 (sm_90, stride 1) are in docs/benchmarks.md: <= 128 for the
# 128-thread kernels (four blocks, 16 warps an SM), <= 80 for grad-weight's 224 threads (three
# blocks, 21 warps). Other geometries that spill (e.g. dilation 2) are caught at run time.
FAST_MAX_K: Dict[str, Dict[torch.dtype, int]] = {
    "forward": {_F16: 11, _BF16: 11, _F32: 13, _F64: 7},
    "grad_input": {_F16: 13, _BF16: 13, _F32: 13, _F64: 7},
    "grad_weight": {_F16: 11, _BF16: 11, _F32: 11, _F64: 9},
    "fused_forward": {_F16: 13, _BF16: 13, _F32: 13, _F64: 7},
    "fused_grad_input": {_F16: 9, _BF16: 9, _F32: 9, _F64: 7},
}
_SOURCE_OF = {"fused_forward": FUSED_SOURCE, "fused_grad_input": FUSED_SOURCE}
_NAIVE_BLOCK = 128  # threads a block of the naive kernels
_STATIC_SMEM_LIMIT = 48 * 1024  # shared memory a block gets without raising its limit
_MAX_IMAGES = 65535  # gridDim.z
_INT32_MAX = 2**31 - 1
_LOCAL_INCLUDE = re.compile(r'#include "(\w+\.cuh)"$')

_lock = threading.Lock()
_modules: Dict[tuple, object] = {}
_kernels: Dict[tuple, "_Kernel"] = {}
_streams: Dict[Tuple[int, int], object] = {}
_cupy = None
_reason: Optional[str] = None


class _Config(NamedTuple):
    """A tiled kernel's launch configuration, as its module exports it."""

    threads: int
    tile_rows: int
    tile_cols: int
    chunks: int  # channel chunks a block (grad-weight: 1, a block owns a group)
    smem: int  # dynamic shared memory bytes (0: the tile does not fit a block)
    channels: int  # channels a chunk (grad-weight: channels a shared-memory stage)


class _Kernel(NamedTuple):
    """A compiled kernel with what the launch logic needs to know about it on its device."""

    fn: object
    spills: bool  # uses local memory (register spills)
    config: Optional[_Config]  # None for the naive kernels
    blocks_per_sm: int  # CUDA's occupancy for this block size and shared memory


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
    """The code NVRTC compiles: ``source`` with the local headers it includes (``"*.cuh"`` next to
    it, recursively, each once) inlined, with ``#line`` markers, so compiler messages still name
    the right file and line, and CuPy's cache key covers every source."""
    return _inline(source, set()) + "\n"


def _inline(source: Path, seen: set) -> str:
    lines = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        match = _LOCAL_INCLUDE.match(line.strip())
        if match is None:
            lines.append(line)
            continue
        header = source.parent / match.group(1)
        if header not in seen:
            seen.add(header)
            lines += [f'#line 1 "{header.name}"', _inline(header, seen)]
        lines.append(f'#line {number + 1} "{source.name}"')
    return "\n".join(lines).rstrip()


def nvrtc_options(
    dtype: torch.dtype,
    kernel_size: Optional[int] = None,
    stride: Optional[int] = None,
    dilation: int = 1,
) -> Tuple[str, ...]:
    """NVRTC options for one instantiation (the tiled kernels need K, stride and dilation, the
    naive ones none of them)."""
    opts = ["--std=c++17", f"-DD2I_T={CTYPES[dtype]}"]
    if kernel_size is not None:
        opts += [f"-DD2I_K={kernel_size}", f"-DD2I_S={stride}", f"-DD2I_D={dilation}"]
    return tuple(opts)


def _module(source: Path, dtype: torch.dtype, device_index: int, geometry: tuple):
    key = (source.name, device_index, dtype, geometry)
    with _lock:
        if key not in _modules:
            with _cupy.cuda.Device(device_index):
                _modules[key] = _cupy.RawModule(
                    code=kernel_source(source), options=nvrtc_options(dtype, *geometry)
                )
        return _modules[key]


def _read_config(module, name: str) -> _Config:
    ptr = module.get_global(f"{name}_config")
    return _Config(*(int(v) for v in _cupy.ndarray((6,), dtype=_cupy.int32, memptr=ptr).get()))


def _kernel(source: Path, name: str, dtype: torch.dtype, device_index: int, geometry=()) -> _Kernel:
    """The compiled kernel ``name`` of ``source``; tiled kernels come with their configuration,
    their shared-memory limit raised where they need it, and CUDA's occupancy for them."""
    key = (name, dtype, device_index, geometry)
    kernel = _kernels.get(key)
    if kernel is None:
        module = _module(source, dtype, device_index, geometry)
        with _cupy.cuda.Device(device_index):
            fn = module.get_function(name)
            config = _read_config(module, name) if geometry else None
            threads, smem = (config.threads, config.smem) if config else (_NAIVE_BLOCK, 0)
            if smem > _STATIC_SMEM_LIMIT:
                fn.max_dynamic_shared_size_bytes = smem
                fn.preferred_shared_memory_carveout = 100  # percent: shared memory over L1
            per_sm = 0
            if not config or smem > 0:
                per_sm = _cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    fn.kernel.ptr, threads, smem
                )
        kernel = _Kernel(fn, fn.local_size_bytes > 0, config, per_sm)
        _kernels[key] = kernel
    return kernel


def uses_fast_kernel(op: str, dtype: torch.dtype, kernel_size: int) -> bool:
    """Whether ``op`` ("forward", "grad_input", "grad_weight", "fused_forward",
    "fused_grad_input") may use its tiled kernel at this K (the naive kernel, or for the fused
    ops the unfused computation, runs where the tiled one would spill)."""
    return kernel_size <= FAST_MAX_K[op][dtype]


def _tiled(op: str, layout: str, dtype: torch.dtype, device, K: int, S: int, D: int, suffix=""):
    """The tiled kernel of ``op`` for this instantiation, or None where it must not run."""
    if not uses_fast_kernel(op, dtype, K):
        return None
    name = f"involution_{op}{suffix}_{layout}"
    kernel = _kernel(_SOURCE_OF.get(op, FAST_SOURCE), name, dtype, device.index, (K, S, D))
    usable = not kernel.spills and kernel.config.smem > 0 and kernel.blocks_per_sm > 0
    return kernel if usable else None


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


# ---------------------------------------------------------------------------------------------
# Layouts


def layout_of(t: torch.Tensor) -> str:
    """The kernels' layout for a 4-D tensor: "nhwc" when it is channels_last (and not also
    contiguous), else "nchw"."""
    channels_last = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return "nhwc" if channels_last else "nchw"


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A 4-D tensor in the kernels' layout (no copy when it already is)."""
    if layout == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def weight_as_layout(w: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, G, K, K, Ho, Wo) weights in the kernels' layout: contiguous, or (NHWC) the view of a
    channels_last (N, G*K*K, Ho, Wo) tensor, memory order (n, i, j, g, u, v)."""
    if layout == "nchw":
        return w.contiguous()
    return w.permute(0, 4, 5, 1, 2, 3).contiguous().permute(0, 3, 4, 5, 1, 2)


def _empty_like_layout(t: torch.Tensor, shape: Sequence[int], layout: str, dtype=None):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def _empty_weight(t: torch.Tensor, shape: Sequence[int], layout: str, dtype=None) -> torch.Tensor:
    """An uninitialised (N, G, K, K, Ho, Wo) weight-shaped tensor in the kernels' layout."""
    N, G, K, _, Ho, Wo = shape
    if layout == "nchw":
        return torch.empty(tuple(shape), dtype=dtype or t.dtype, device=t.device)
    return _empty_like_layout(t, (N, G * K * K, Ho, Wo), "nhwc", dtype).view(tuple(shape))


def _vec16(layout: str, cpg: int, chunk: int, C: int, *tensors: torch.Tensor) -> int:
    """Flag bit 0 of the NHWC kernels: their channel runs suit 16-byte loads (each chunk's
    channels contiguous, C and the pointers aligned)."""
    if layout != "nhwc":
        return 0
    v = 16 // tensors[0].element_size()
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors)
    return int(cpg % chunk == 0 and C % v == 0 and aligned)


# ---------------------------------------------------------------------------------------------
# Launches


def _args(tensors: Sequence[Optional[torch.Tensor]], ints: Sequence[int]) -> tuple:
    views = tuple(_view(t) if t is not None else np.uint64(0) for t in tensors)
    return views + tuple(np.int32(v) for v in ints)


def _launch_tiled(
    kernel: _Kernel,
    grid_xy: Tuple[int, int],
    tensors: Sequence[Optional[torch.Tensor]],
    batched: Sequence[bool],
    ints: Sequence[int],
) -> None:
    """A grid of (grid_xy, images) blocks; images beyond gridDim.z go in further launches on
    slices of the batched tensors."""
    device_index = next(t for t in tensors if t is not None).device.index
    N = next(t for t, b in zip(tensors, batched) if b).shape[0]
    cfg = kernel.config
    with _cupy.cuda.Device(device_index):
        with _cupy_stream(device_index):
            for n0 in range(0, N, _MAX_IMAGES):
                n1 = min(N, n0 + _MAX_IMAGES)
                part = [t[n0:n1] if b and t is not None else t for t, b in zip(tensors, batched)]
                args = _args(part, (n1 - n0, *ints[1:]))
                kernel.fn((*grid_xy, n1 - n0), (cfg.threads,), args, shared_mem=cfg.smem)


def _launch_naive(fn, total: int, tensors: Sequence[torch.Tensor], ints: Sequence[int]) -> None:
    """One thread per output element: a 1-D grid of _NAIVE_BLOCK-thread blocks."""
    device_index = tensors[0].device.index
    args = tuple(_view(t) for t in tensors) + tuple(np.int32(v) for v in ints) + (np.int64(total),)
    grid = (total + _NAIVE_BLOCK - 1) // _NAIVE_BLOCK
    with _cupy.cuda.Device(device_index):
        with _cupy_stream(device_index):
            fn((grid,), (_NAIVE_BLOCK,), args)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _chunk_blocks(cfg: _Config, C: int, G: int) -> int:
    """Blocks along the channels: G groups of ceil(C/G / channels) chunks, cfg.chunks a block."""
    return _cdiv(G * _cdiv(C // G, cfg.channels), cfg.chunks)


def _check_plane(K: int, Ho: int, Wo: int, H: int, W: int) -> None:
    if K * K * Ho * Wo > _INT32_MAX or H * W > _INT32_MAX:
        raise ValueError(
            f"involution CUDA kernels: K*K*Ho*Wo ({K}*{K}*{Ho}*{Wo}) and H*W ({H}*{W}) must fit "
            "in int32"
        )


def _empty(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------------------------------------
# The three ops


def forward(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """Involution forward on CUDA; returns (N, C, Ho, Wo) in the memory format of x."""
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    _check_plane(K, Ho, Wo, H, W)
    layout = layout_of(x)
    out = _empty_like_layout(x, (N, C, Ho, Wo), layout)
    if out.numel() == 0 or x.numel() == 0:
        return out.zero_()
    kernel = _tiled("forward", layout, x.dtype, x.device, K, stride, dilation)
    if kernel is None:
        out.copy_(naive_forward(x, weight, stride, padding, dilation))
        return out
    x, weight = as_layout(x, layout), weight_as_layout(weight, layout)
    cfg = kernel.config
    tiles = _cdiv(Ho, cfg.tile_rows) * _cdiv(Wo, cfg.tile_cols)
    flags = _vec16(layout, C // G, cfg.channels, C, x)
    ints = (N, C, G, H, W, Ho, Wo, padding, 0, flags)
    grid = (tiles, _chunk_blocks(cfg, C, G))
    _launch_tiled(kernel, grid, (x, weight, None, None, out), (1, 1, 0, 0, 1), ints)
    return out


def _phase_tiles(cfg: _Config, H: int, W: int, stride: int, padding: int) -> int:
    """Grad-input's tiles: input pixels in phase coordinates (y + p) / S, from p / S on."""
    rows = (H - 1 + padding) // stride + 1 - padding // stride
    cols = (W - 1 + padding) // stride + 1 - padding // stride
    return _cdiv(rows, cfg.tile_rows) * _cdiv(cols, cfg.tile_cols)


def grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    H: int,
    W: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """Gradient w.r.t. x, (N, C, H, W), in the memory format of grad_out."""
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    _check_plane(K, Ho, Wo, H, W)
    layout = layout_of(grad_out)
    gx = _empty_like_layout(grad_out, (N, C, H, W), layout)
    if gx.numel() == 0 or grad_out.numel() == 0:
        return gx.zero_()
    kernel = _tiled("grad_input", layout, gx.dtype, gx.device, K, stride, dilation)
    if kernel is None:
        gx.copy_(naive_grad_input(grad_out, weight, H, W, stride, padding, dilation))
        return gx
    grad_out, weight = as_layout(grad_out, layout), weight_as_layout(weight, layout)
    cfg = kernel.config
    flags = _vec16(layout, C // G, cfg.channels, C, grad_out)
    ints = (N, C, G, H, W, Ho, Wo, padding, 0, flags)
    grid = (_phase_tiles(cfg, H, W, stride, padding), _chunk_blocks(cfg, C, G))
    _launch_tiled(kernel, grid, (grad_out, weight, None, None, gx), (1, 1, 0, 0, 1), ints)
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
    """Gradient w.r.t. the weight, (N, G, K, K, Ho, Wo), in the weight layout matching x."""
    return _grad_weight(grad_out, x, groups, kernel_size, stride, padding, dilation, False)


def _grad_weight(grad_out, x, G, K, stride, padding, dilation, in_acc: bool) -> torch.Tensor:
    """grad_weight; in_acc: in the accumulator dtype (fp32 for fp16/bf16; the fused backward)."""
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    _check_plane(K, Ho, Wo, H, W)
    layout = layout_of(x)
    dtype = torch.promote_types(x.dtype, torch.float32) if in_acc else x.dtype
    gw = _empty_weight(x, (N, G, K, K, Ho, Wo), layout, dtype)
    if gw.numel() == 0 or x.numel() == 0:
        return gw.zero_()
    suffix = "_acc" if in_acc else ""
    kernel = _tiled("grad_weight", layout, x.dtype, x.device, K, stride, dilation, suffix)
    if kernel is None:
        gw.copy_(naive_grad_weight(grad_out, x, G, K, stride, padding, dilation))
        return gw
    grad_out, x = as_layout(grad_out, layout), as_layout(x, layout)
    cfg = kernel.config
    flags = _vec16(layout, C // G, 16 // x.element_size(), C, x, grad_out)
    ints = (N, C, G, H, W, Ho, Wo, padding, 0, flags)
    tiles = _cdiv(Ho, cfg.tile_rows) * _cdiv(Wo, cfg.tile_cols)
    _launch_tiled(kernel, (tiles, G), (grad_out, x, None, None, gw), (1, 1, 0, 0, 1), ints)
    return gw


# ---------------------------------------------------------------------------------------------
# Fused kernel generation: weight(n, g, u, v, i, j) = gen_bias[m] + sum_j gen_weight[m, j] *
# r[n, j, i, j'] with m = (g*K + u)*K + v, never written to memory.


def _check_fused(x, r, gen_weight, gen_bias, stride, padding, dilation, K, G) -> Tuple[int, int]:
    """The fused functions' own checks (they are called directly); returns (M, Cr)."""
    op = "involution fused (CUDA)"
    N, C, H, W = x.shape
    if r.dim() != 4 or r.shape[0] != N:
        raise ValueError(f"{op}: r must be (N, Cr, Ho, Wo) with N={N}, got {tuple(r.shape)}")
    Cr, Ho, Wo = r.shape[1:]
    M = G * K * K
    if tuple(gen_weight.shape) not in ((M, Cr), (M, Cr, 1, 1)):
        raise ValueError(
            f"{op}: gen_weight must be (G*K*K, Cr) = ({M}, {Cr}) (or with trailing 1, 1), got "
            f"{tuple(gen_weight.shape)}"
        )
    if tuple(gen_bias.shape) != (M,):
        raise ValueError(f"{op}: gen_bias must be ({M},), got {tuple(gen_bias.shape)}")
    if C % G != 0:
        raise ValueError(f"{op}: the channels of x ({C}) must be divisible by groups ({G})")
    expected = tuple((s + 2 * padding - dilation * (K - 1) - 1) // stride + 1 for s in (H, W))
    if (Ho, Wo) != expected:
        raise ValueError(
            f"{op}: r spatial size ({Ho}, {Wo}) must be the output size {expected} of x "
            f"{tuple(x.shape)} with K={K}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    for name, t in (("r", r), ("gen_weight", gen_weight), ("gen_bias", gen_bias)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{op}: {name} must be {x.dtype} on {x.device} like x, got {t.dtype} on {t.device}"
            )
    return M, Cr


def generate_weights(r: torch.Tensor, gen_weight: torch.Tensor, gen_bias: torch.Tensor, K: int):
    """The (N, G, K, K, Ho, Wo) weights the fused kernels generate, materialised (the unfused
    computation: conv2 of the kernel generator, used where no fused kernel runs)."""
    N, Cr, Ho, Wo = r.shape
    M = gen_bias.shape[0]
    flat = torch.nn.functional.conv2d(r, gen_weight.reshape(M, Cr, 1, 1), gen_bias)
    return flat.reshape(N, M // (K * K), K, K, Ho, Wo)


def _generator_at(gen_weight: torch.Tensor, M: int, Cr: int) -> torch.Tensor:
    """gen_weight as the fused kernels take it: At (Cr, M), contiguous, in the accumulator dtype
    (an exact fp32 copy for fp16/bf16, so that the generation loop converts no weight)."""
    acc = torch.promote_types(gen_weight.dtype, torch.float32)
    return gen_weight.reshape(M, Cr).t().to(acc).contiguous()


def fused_forward(
    x: torch.Tensor,
    r: torch.Tensor,
    gen_weight: torch.Tensor,
    gen_bias: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    kernel_size: int,
    groups: int,
) -> torch.Tensor:
    """Involution with fused kernel generation on CUDA: ``forward(x, weight)`` with weight the 1x1
    convolution (gen_weight, gen_bias) of r, computed inside the aggregation.

    x (N, C, H, W), r (N, Cr, Ho, Wo), gen_weight (G*K*K, Cr) or (G*K*K, Cr, 1, 1) (output
    channel order (g, u, v)), gen_bias (G*K*K,); NCHW or channels_last (by x). Returns
    (N, C, Ho, Wo) in the memory format of x.
    """
    K, G = kernel_size, groups
    M, Cr = _check_fused(x, r, gen_weight, gen_bias, stride, padding, dilation, K, G)
    N, C, H, W = x.shape
    Ho, Wo = r.shape[2:]
    layout = layout_of(x)
    kernel = None
    if x.numel() > 0 and Cr * Ho * Wo <= _INT32_MAX and C * H * W <= _INT32_MAX:
        kernel = _tiled("fused_forward", layout, x.dtype, x.device, K, stride, dilation)
    if kernel is None:
        weight = generate_weights(r, gen_weight, gen_bias, K)
        return forward(x, weight, stride, padding, dilation)
    out = _empty_like_layout(x, (N, C, Ho, Wo), layout)
    x, r = as_layout(x, layout), as_layout(r, layout)
    at = _generator_at(gen_weight, M, Cr)
    cfg = kernel.config
    tiles = _cdiv(Ho, cfg.tile_rows) * _cdiv(Wo, cfg.tile_cols)
    flags = _vec16(layout, C // G, cfg.channels, C, x)
    ints = (N, C, G, H, W, Ho, Wo, padding, Cr, flags)
    grid = (tiles, _chunk_blocks(cfg, C, G))
    tensors = (x, r, at, gen_bias.contiguous(), out)
    _launch_tiled(kernel, grid, tensors, (1, 1, 0, 0, 1), ints)
    return out


def fused_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    gen_weight: torch.Tensor,
    gen_bias: torch.Tensor,
    stride: int,
    padding: int,
    dilation: int,
    kernel_size: int,
    groups: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`fused_forward`: (grad_x, grad_r, grad_gen_weight, grad_gen_bias).

    grad_x comes from the fused grad-input kernel, which regenerates the weights in registers;
    the weight gradient (N, G*K*K, Ho, Wo), in fp32 for fp16/bf16, is a transient of this call
    (nothing is kept from the forward but x and r), projected onto r, gen_weight and gen_bias by
    matrix products. grad_x and grad_r come in the memory format of x, the others contiguous in
    the shapes of gen_weight and gen_bias.
    """
    K, G = kernel_size, groups
    M, Cr = _check_fused(x, r, gen_weight, gen_bias, stride, padding, dilation, K, G)
    N, C, H, W = x.shape
    Ho, Wo = r.shape[2:]
    layout = layout_of(x)
    grad_out, r = as_layout(grad_out, layout), as_layout(r, layout)
    grad_x = _fused_grad_input(
        grad_out, x, r, gen_weight, gen_bias, stride, padding, dilation, K, G
    )
    gw = _grad_weight(grad_out, as_layout(x, layout), G, K, stride, padding, dilation, True)
    acc = gw.dtype
    a = gen_weight.reshape(M, Cr).to(acc)
    if layout == "nchw":
        gw2 = gw.reshape(N, M, Ho * Wo)
        grad_r = torch.matmul(a.t(), gw2).reshape(N, Cr, Ho, Wo)
        grad_a = torch.einsum("nmp,njp->mj", gw2, r.reshape(N, Cr, Ho * Wo).to(acc))
        grad_b = gw2.sum((0, 2))
    else:  # gw's memory order is (n, i, j, m): (N, Ho*Wo, M) matrices
        gw2 = gw.permute(0, 4, 5, 1, 2, 3).reshape(N, Ho * Wo, M)
        grad_r = torch.matmul(gw2, a).reshape(N, Ho, Wo, Cr).permute(0, 3, 1, 2)
        grad_a = torch.einsum(
            "npm,npj->mj", gw2, r.permute(0, 2, 3, 1).reshape(N, Ho * Wo, Cr).to(acc)
        )
        grad_b = gw2.sum((0, 1))
    grad_r = as_layout(grad_r.to(r.dtype), layout)
    grad_a = grad_a.to(gen_weight.dtype).reshape(gen_weight.shape)
    return grad_x, grad_r, grad_a, grad_b.to(gen_bias.dtype)


def _fused_grad_input(grad_out, x, r, gen_weight, gen_bias, stride, padding, dilation, K, G):
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    M, Cr = G * K * K, r.shape[1]
    layout = layout_of(x)
    kernel = None
    if grad_out.numel() > 0 and Cr * Ho * Wo <= _INT32_MAX and C * Ho * Wo <= _INT32_MAX:
        kernel = _tiled("fused_grad_input", layout, x.dtype, x.device, K, stride, dilation)
    if kernel is None:
        weight = generate_weights(r, gen_weight, gen_bias, K)
        return as_layout(grad_input(grad_out, weight, H, W, stride, padding, dilation), layout)
    gx = _empty_like_layout(x, (N, C, H, W), layout)
    at = _generator_at(gen_weight, M, Cr)
    cfg = kernel.config
    flags = _vec16(layout, C // G, cfg.channels, C, grad_out)
    ints = (N, C, G, H, W, Ho, Wo, padding, Cr, flags)
    grid = (_phase_tiles(cfg, H, W, stride, padding), _chunk_blocks(cfg, C, G))
    tensors = (grad_out, r, at, gen_bias.contiguous(), gx)
    _launch_tiled(kernel, grid, tensors, (1, 1, 0, 0, 1), ints)
    return gx


# ---------------------------------------------------------------------------------------------
# The naive kernels (baseline; NCHW)


def _naive(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, ints) -> torch.Tensor:
    if out.numel() == 0 or a.numel() == 0 or b.numel() == 0:
        return out.zero_()
    kernel = _kernel(NAIVE_SOURCE, f"involution_naive_{name}", out.dtype, out.device.index)
    _launch_naive(kernel.fn, out.numel(), (a.contiguous(), b.contiguous(), out), ints)
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
