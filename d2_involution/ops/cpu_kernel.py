"""Build (once) and call the C++ CPU involution kernels in ``involution_cpu.cpp``.

The source has plain C entry points and no PyTorch headers, so it is compiled with the system C++
compiler alone (about 25 s on a loaded 2-core machine, once per machine) and loaded with ctypes;
``torch.utils.cpp_extension.load`` would also need ninja and PyTorch's C++ headers. The library is
cached under ``$D2INV_CACHE_DIR`` (default ``~/.cache/d2_involution``), keyed by the source, the
flags and the CPU, so a cache shared between machines never runs code built for another CPU.
Without a compiler (or with ``D2INV_CPU_KERNEL=0``) :func:`available` is False and the op falls
back to its pure-PyTorch path, after one warning saying why.

Layouts: every function takes tensors of any strides and runs the kernels of the layout of its
first feature-map argument (:func:`layout`): NCHW, or NHWC for channels_last tensors, so that a
channels_last model runs without layout copies. The other inputs are made dense in that layout
(a copy only when they are not already), and the results are returned in it: feature maps
channels_last, weights (N, G, K, K, Ho, Wo) with strides of a dense (N, Ho, Wo, G, K, K) tensor.
Threads: ``torch.get_num_threads()``, run on the OpenMP runtime PyTorch has loaded (the same
team as PyTorch's own ops, found in ``/proc/self/maps``; ``D2INV_CPU_OPENMP=0`` disables that),
else on the library's own pool (see ``involution_cpu.cpp``); see :func:`thread_runtime`. Results
depend on neither.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "available",
    "unavailable_reason",
    "thread_runtime",
    "layout",
    "forward",
    "grad_input",
    "grad_weight",
    "fused_forward",
    "fused_backward",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("involution_cpu.cpp")
_FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fno-math-errno",
    "-ffp-contract=fast",
]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_LAYOUTS = ("nchw", "nhwc")
_N_SIZES = 12  # N, C, G, H, W, Ho, Wo, K, stride, pad, dil, threads

_OPENMP_LIBRARIES = ("libgomp", "libiomp5", "libomp")  # GNU, Intel, LLVM
_OPENMP_SYMBOLS = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads", "omp_in_parallel")

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_tried = False
_openmp_path: Optional[str] = None


def _cpu_id() -> str:
    """Identifies the instruction set the library is built for (-march=native)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
    except OSError:
        pass
    return platform.machine() + flags


def _cache_dir() -> Path:
    default = Path(os.path.expanduser("~")) / ".cache" / "d2_involution"
    return Path(os.environ.get("D2INV_CACHE_DIR", default))


def _compile(source: Path, target: Path, flags: Sequence[str]) -> None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private file and rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *flags, str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            # -march=native is unknown to some compilers: retry without it.
            cmd.remove("-march=native")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    flags = _FLAGS + ["-march=native"]
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"involution_cpu_{key}.so"
    if not target.exists():
        _compile(_SOURCE, target, flags)
    lib = ctypes.CDLL(str(target))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "forward": [ptr] * 3,
        "grad_input": [ptr] * 3,
        "grad_weight": [ptr] * 3,
        "fused_forward": [ptr] * 5 + [i64],
        "fused_backward": [ptr] * 9 + [i64],
    }
    for suffix in _SUFFIX.values():
        for name, args in signatures.items():
            for lay in _LAYOUTS:
                fn = getattr(lib, f"d2i_{name}_{lay}_{suffix}")
                fn.argtypes = args + [i64] * _N_SIZES
                fn.restype = None
    lib.d2i_use_openmp.argtypes = [ptr] * len(_OPENMP_SYMBOLS)
    lib.d2i_use_openmp.restype = ctypes.c_int
    _bind_openmp(lib)
    return lib


def _loaded_openmp() -> Optional[Tuple[str, ctypes.CDLL]]:
    """The OpenMP runtime already loaded into this process (by PyTorch), with its path."""
    if os.environ.get("D2INV_CPU_OPENMP", "1") == "0" or not hasattr(os, "RTLD_NOLOAD"):
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for prefix in _OPENMP_LIBRARIES:
        for path in sorted(p for p in paths if Path(p).name.startswith(prefix + ".so")):
            try:
                runtime = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
            except OSError:
                continue
            if all(hasattr(runtime, name) for name in _OPENMP_SYMBOLS):
                return path, runtime
    return None


def _bind_openmp(lib: ctypes.CDLL) -> None:
    """Run the kernels on PyTorch's OpenMP team when it is found, else on the library's pool."""
    global _openmp_path
    found = _loaded_openmp()
    if found is None:
        return
    path, runtime = found
    entry_points = [ctypes.cast(getattr(runtime, n), ctypes.c_void_p) for n in _OPENMP_SYMBOLS]
    if lib.d2i_use_openmp(*entry_points):
        _openmp_path = path


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("D2INV_CPU_KERNEL", "1") == "0":
                _reason = "disabled by D2INV_CPU_KERNEL=0"
            else:
                try:
                    _lib = _build()
                except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
                    _reason = f"{type(e).__name__}: {e}"
            if _lib is None:
                warnings.warn(
                    "d2_involution: the C++ CPU involution kernel is unavailable "
                    f"({_reason}); using the slower pure-PyTorch path.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _lib


def available() -> bool:
    """True when the C++ kernels are built and loaded (building them on first call)."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why the C++ kernels could not be used, or None when they can."""
    _load()
    return _reason


def thread_runtime() -> Optional[str]:
    """Where the kernels' threads come from: ``"openmp:<path of the runtime>"`` (PyTorch's OpenMP
    team) or ``"pool"`` (the library's own threads); None without the C++ kernels."""
    if _load() is None:
        return None
    return f"openmp:{_openmp_path}" if _openmp_path else "pool"


# ---------------------------------------------------------------------------------------------
# Layouts


def layout(t: Tensor) -> str:
    """``"nhwc"`` for a channels_last tensor that is not NCHW-contiguous too, else ``"nchw"``."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "nchw"


def memory_format(lay: str) -> torch.memory_format:
    return torch.channels_last if lay == "nhwc" else torch.contiguous_format


def _dense_map(t: Tensor, lay: str) -> Tensor:
    return t.contiguous(memory_format=memory_format(lay))


def _dense_weight(w: Tensor, lay: str) -> Tensor:
    """(N, G, K, K, Ho, Wo) weights as a dense tensor of the layout's order (for its data_ptr)."""
    return w.contiguous() if lay == "nchw" else w.permute(0, 4, 5, 1, 2, 3).contiguous()


def empty_weight(shape: Sequence[int], lay: str, like: Tensor) -> Tensor:
    """Uninitialised (N, G, K, K, Ho, Wo) weights stored in the layout's order."""
    if lay == "nchw":
        return like.new_empty(shape)
    N, G, K, _, Ho, Wo = shape
    return like.new_empty((N, Ho, Wo, G, K, K)).permute(0, 3, 4, 5, 1, 2)


def _empty_map(shape: Sequence[int], lay: str, like: Tensor) -> Tensor:
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=memory_format(lay)
    )


# ---------------------------------------------------------------------------------------------
# Calls


def _call(name: str, lay: str, tensors: Sequence[Tensor], extra: Tuple[int, ...], sizes) -> None:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"d2_involution CPU kernel unavailable: {_reason}")
    fn = getattr(lib, f"d2i_{name}_{lay}_{_SUFFIX[tensors[0].dtype]}")
    fn(*(t.data_ptr() for t in tensors), *extra, *sizes, torch.get_num_threads())


def _sizes(x_shape, w_shape, stride: int, padding: int, dilation: int) -> Tuple[int, ...]:
    N, C, H, W = x_shape
    _, G, K, _, Ho, Wo = w_shape
    return (N, C, G, H, W, Ho, Wo, K, stride, padding, dilation)


def _empty_inputs(*tensors: Tensor) -> bool:
    return any(t.numel() == 0 for t in tensors)


def forward(x: Tensor, weight: Tensor, stride: int, padding: int, dilation: int) -> Tensor:
    """out (N, C, Ho, Wo) in x's layout; x and weight float32/float64 on the CPU, same dtype."""
    lay = layout(x)
    N, C = x.shape[:2]
    out = _empty_map((N, C, weight.shape[4], weight.shape[5]), lay, x)
    if _empty_inputs(out, x, weight):
        return out.zero_()
    x, w = _dense_map(x, lay), _dense_weight(weight, lay)
    _call("forward", lay, (x, w, out), (), _sizes(x.shape, weight.shape, stride, padding, dilation))
    return out


def grad_input(
    grad_out: Tensor, weight: Tensor, H: int, W: int, stride: int, padding: int, dilation: int
) -> Tensor:
    """Gradient w.r.t. x: (N, C, H, W) in grad_out's layout."""
    lay = layout(grad_out)
    N, C = grad_out.shape[:2]
    gx = _empty_map((N, C, H, W), lay, grad_out)
    if _empty_inputs(gx, grad_out, weight):
        return gx.zero_()
    go, w = _dense_map(grad_out, lay), _dense_weight(weight, lay)
    _call(
        "grad_input",
        lay,
        (go, w, gx),
        (),
        _sizes(gx.shape, weight.shape, stride, padding, dilation),
    )
    return gx


def grad_weight(
    grad_out: Tensor,
    x: Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> Tensor:
    """Gradient w.r.t. the weight: (N, G, K, K, Ho, Wo) in x's layout (see the module doc)."""
    lay = layout(x)
    N, _, Ho, Wo = grad_out.shape
    shape = (N, groups, kernel_size, kernel_size, Ho, Wo)
    gw = empty_weight(shape, lay, x)
    if _empty_inputs(gw, grad_out, x):
        return gw.zero_()
    go, x = _dense_map(grad_out, lay), _dense_map(x, lay)
    _call(
        "grad_weight",
        lay,
        (go, x, _dense_weight(gw, lay)),
        (),
        _sizes(x.shape, shape, stride, padding, dilation),
    )
    return gw


def _generator(gen_weight: Tensor, gen_bias: Tensor) -> Tuple[Tensor, Tensor]:
    """gen_weight as a dense (K*K*G, R) matrix and gen_bias as a dense vector."""
    return gen_weight.reshape(gen_weight.shape[0], -1).contiguous(), gen_bias.contiguous()


def _fused_sizes(x: Tensor, reduced: Tensor, geometry: Tuple[int, ...]) -> Tuple[int, ...]:
    stride, padding, dilation, K, G = geometry
    N, C, H, W = x.shape
    return (N, C, G, H, W, reduced.shape[2], reduced.shape[3], K, stride, padding, dilation)


def fused_forward(
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    stride: int,
    padding: int,
    dilation: int,
    kernel_size: int,
    groups: int,
) -> Tensor:
    """Involution with weights generated from ``reduced`` inside the kernel; out in x's layout."""
    lay = layout(x)
    N, C = x.shape[:2]
    out = _empty_map((N, C, reduced.shape[2], reduced.shape[3]), lay, x)
    if _empty_inputs(out, x):
        return out.zero_()
    A, b = _generator(gen_weight, gen_bias)
    sizes = _fused_sizes(x, reduced, (stride, padding, dilation, kernel_size, groups))
    x, red = _dense_map(x, lay), _dense_map(reduced, lay)
    _call("fused_forward", lay, (x, red, A, b, out), (red.shape[1],), sizes)
    return out


def fused_backward(
    grad_out: Tensor,
    x: Tensor,
    reduced: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor,
    stride: int,
    padding: int,
    dilation: int,
    kernel_size: int,
    groups: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. x, reduced, gen_weight (its shape), gen_bias; regenerates the weights."""
    lay = layout(x)
    A, b = _generator(gen_weight, gen_bias)
    gx, gred = _empty_map(x.shape, lay, x), _empty_map(reduced.shape, lay, reduced)
    gA, gb = torch.zeros_like(A), torch.zeros_like(b)
    if _empty_inputs(x, reduced):
        return gx.zero_(), gred.zero_(), gA.view_as(gen_weight), gb
    sizes = _fused_sizes(x, reduced, (stride, padding, dilation, kernel_size, groups))
    go, x, red = _dense_map(grad_out, lay), _dense_map(x, lay), _dense_map(reduced, lay)
    _call("fused_backward", lay, (go, x, red, A, b, gx, gred, gA, gb), (red.shape[1],), sizes)
    return gx, gred, gA.view_as(gen_weight), gb
