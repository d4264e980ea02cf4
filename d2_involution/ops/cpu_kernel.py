"""Build (once) and call the C++ CPU involution kernels in ``involution_cpu.cpp``.

The source has plain C entry points and no PyTorch headers, so it is compiled with the system C++
compiler alone (11 s measured on a loaded 2-core machine, once per machine) and loaded with ctypes;
``torch.utils.cpp_extension.load`` would also need ninja and PyTorch's C++ headers. The library is
cached under ``$D2INV_CACHE_DIR`` (default ``~/.cache/d2_involution``), keyed by the source, the
flags and the CPU, so a cache shared between machines never runs code built for another CPU.
Without a compiler (or with ``D2INV_CPU_KERNEL=0``) :func:`available` is False and the op falls
back to its pure-PyTorch path, after one warning saying why.
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
from typing import Optional

import torch

__all__ = ["available", "unavailable_reason", "forward", "grad_input", "grad_weight"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("involution_cpu.cpp")
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-fopenmp-simd"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
TILED_BELOW_WIDTH = 24
TILED_GRAD_INPUT_BELOW_WIDTH = 40

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None
_tried = False


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


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    source = _SOURCE.read_bytes()
    flags = _FLAGS + ["-march=native"]
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = _cache_dir() / f"involution_cpu_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build into a private file and rename: concurrent processes never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [compiler, *flags, str(_SOURCE), "-o", tmp]
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
    lib = ctypes.CDLL(str(target))
    i64 = ctypes.c_int64
    for suffix in _SUFFIX.values():
        for name in ("forward", "grad_input", "grad_weight"):
            for variant in ("", "_tiled"):
                fn = getattr(lib, f"d2i_{name}{variant}_{suffix}")
                fn.argtypes = [ctypes.c_void_p] * 3 + [i64] * 12
                fn.restype = None
    return lib


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


def use_tiled(name: str, Wo: int, stride: int) -> bool:
    """Whether kernel ``name`` runs its channel-tiled variant (else the row variant).

    The row kernels vectorise along output rows; on short rows (RedNet's 14x14 and 7x7 stages)
    their loop overhead dominates and the tiled kernels (vectorised over a group's channels) win,
    as do the tiled forward and grad-input on strided rows (their row variants gather or scatter
    with a stride); on long rows the two tie or the rows win (measured: docs/benchmarks.md).
    ``D2INV_CPU_TILED=0/1`` forces one variant (for benchmarks).
    """
    forced = os.environ.get("D2INV_CPU_TILED")
    if forced in ("0", "1"):
        return forced == "1"
    if name == "grad_input":
        return stride > 1 or Wo < TILED_GRAD_INPUT_BELOW_WIDTH
    if name == "forward":
        return stride > 1 or Wo < TILED_BELOW_WIDTH
    return Wo < TILED_BELOW_WIDTH


def _call(name: str, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, sizes) -> torch.Tensor:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"d2_involution CPU kernel unavailable: {_reason}")
    if out.numel() == 0 or a.numel() == 0 or b.numel() == 0:
        return out.zero_()
    variant = "_tiled" if use_tiled(name, sizes[6], sizes[8]) else ""
    fn = getattr(lib, f"d2i_{name}{variant}_{_SUFFIX[a.dtype]}")
    fn(a.data_ptr(), b.data_ptr(), out.data_ptr(), *sizes, torch.get_num_threads())
    return out


def forward(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, dilation: int
) -> torch.Tensor:
    """out (N, C, Ho, Wo); x and weight contiguous float32/float64 on the CPU, same dtype."""
    N, C, H, W = x.shape
    _, G, K, _, Ho, Wo = weight.shape
    out = torch.empty((N, C, Ho, Wo), dtype=x.dtype)
    return _call("forward", x, weight, out, (N, C, G, H, W, Ho, Wo, K, stride, padding, dilation))


def grad_input(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    H: int,
    W: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """Gradient of the output w.r.t. x: (N, C, H, W)."""
    N, C, Ho, Wo = grad_out.shape
    G, K = weight.shape[1], weight.shape[2]
    gx = torch.empty((N, C, H, W), dtype=grad_out.dtype)
    sizes = (N, C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    return _call("grad_input", grad_out, weight, gx, sizes)


def grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    groups: int,
    kernel_size: int,
    stride: int,
    padding: int,
    dilation: int,
) -> torch.Tensor:
    """Gradient of the output w.r.t. the weight: (N, G, K, K, Ho, Wo)."""
    N, C, Ho, Wo = grad_out.shape
    H, W = x.shape[2], x.shape[3]
    G, K = groups, kernel_size
    gw = torch.empty((N, G, K, K, Ho, Wo), dtype=grad_out.dtype)
    sizes = (N, C, G, H, W, Ho, Wo, K, stride, padding, dilation)
    return _call("grad_weight", grad_out, x, gw, sizes)
