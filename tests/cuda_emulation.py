"""The CUDA kernels run on the host: the code cuda_kernel.py hands to NVRTC, compiled as host C++
(a shim maps blockIdx/threadIdx/__ldg to host code) and "launched" block by block, thread by
thread; and a fake CuPy module whose kernels are those host builds, so that cuda_kernel.py's launch
logic runs end to end on CPU tensors (no GPU needed)."""

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

CXX = shutil.which("c++") or shutil.which("g++")

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
"""
DRIVER = r"""
#define RUN(call) \
  blockDim.x = block; \
  for (unsigned int b = 0; b < grid; ++b) { blockIdx.x = b; \
    for (unsigned int t = 0; t < block; ++t) { threadIdx.x = t; call; } } \
  return 0;
#define INTS10 v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]
typedef D2I_T T;
extern "C" int emu_launch(const char* name, unsigned int grid, unsigned int block, const void* a,
                          const void* b, void* o, const int* v, long long total) {
  const T* pa = static_cast<const T*>(a);
  const T* pb = static_cast<const T*>(b);
  T* po = static_cast<T*>(o);
#ifdef D2I_K
  if (!std::strcmp(name, "involution_forward")) {
    RUN(involution_forward(pa, pb, po, INTS10, total)) }
  if (!std::strcmp(name, "involution_grad_input")) {
    RUN(involution_grad_input(pa, pb, po, INTS10, total)) }
  if (!std::strcmp(name, "involution_grad_weight")) {
    RUN(involution_grad_weight(pa, pb, po, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], total)) }
#else
  if (!std::strcmp(name, "involution_naive_forward")) {
    RUN(involution_naive_forward(pa, pb, po, INTS10, total)) }
  if (!std::strcmp(name, "involution_naive_grad_input")) {
    RUN(involution_naive_grad_input(pa, pb, po, INTS10, total)) }
  if (!std::strcmp(name, "involution_naive_grad_weight")) {
    RUN(involution_naive_grad_weight(pa, pb, po, INTS10, total)) }
#endif
  return 1;
}
extern "C" void emu_half_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = d2i_load(reinterpret_cast<const d2i_half*>(in + i));
}
extern "C" void emu_float_to_half(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) d2i_store(reinterpret_cast<d2i_half*>(out + i), in[i]);
}
"""

_libs: Dict[str, ctypes.CDLL] = {}


def build(code: str, options: Sequence[str], build_dir: Path) -> ctypes.CDLL:
    """Compile NVRTC ``code`` with its ``-D`` options as a host library (cached by content)."""
    defines = [o for o in options if o.startswith("-D")]
    key = hashlib.sha256((code + "\0".join(defines)).encode()).hexdigest()[:16]
    if key not in _libs:
        build_dir.mkdir(parents=True, exist_ok=True)
        src, lib = build_dir / f"emu_{key}.cpp", build_dir / f"emu_{key}.so"
        src.write_text(SHIM + code + DRIVER)
        cmd = [CXX, "-O1", "-std=c++14", "-shared", "-fPIC", "-DD2I_HOST_EMULATION", *defines]
        proc = subprocess.run([*cmd, str(src), "-o", str(lib)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _libs[key] = ctypes.CDLL(str(lib))
        _libs[key].emu_launch.restype = ctypes.c_int
        for name in ("emu_half_to_float", "emu_float_to_half"):
            getattr(_libs[key], name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return _libs[key]


def launch(lib, name: str, grid: int, block: int, ptrs: Sequence[int], ints, total: int) -> None:
    """Run kernel ``name`` over ``grid`` blocks of ``block`` threads."""
    values = (ctypes.c_int * max(1, len(ints)))(*ints)
    args = [ctypes.c_void_p(p) for p in ptrs]
    rc = lib.emu_launch(name.encode(), grid, block, *args, values, ctypes.c_longlong(total))
    assert rc == 0, f"no kernel {name} in this build"


# ------------------------------------------------------------------------------------------------
# A fake CuPy: just the API cuda_kernel.py uses, with host-emulated kernels.


class Launch(NamedTuple):
    name: str
    options: tuple
    grid: tuple
    block: tuple
    tensors: list  # the torch tensors whose memory the kernel got
    ints: List[int]
    total: int
    stream: Optional[int]


class _Memory(NamedTuple):
    ptr: int
    size: int
    owner: object


class _Pointer(NamedTuple):
    mem: _Memory
    offset: int


class _Array(NamedTuple):
    memptr: _Pointer


class _Stream:
    def __init__(self, fake: "FakeCupy", ptr: int):
        self.fake, self.ptr = fake, ptr

    def __enter__(self):
        self.fake.current_stream = self.ptr
        return self

    def __exit__(self, *exc):
        self.fake.current_stream = None


class _Device:
    def __init__(self, fake: "FakeCupy", index):
        self.index = index
        self.attributes = {"MultiProcessorCount": fake.sms}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _Function:
    def __init__(self, module: "_Module", name: str):
        self.module, self.name = module, name
        self.kernel = SimpleNamespace(ptr=name)
        self.local_size_bytes = module.fake.local_size_bytes.get(name, 0)

    def __call__(self, grid, block, args):
        fake = self.module.fake
        arrays = [a for a in args if isinstance(a, _Array)]
        ints = [int(a) for a in args[len(arrays) : -1]]
        assert all(isinstance(a, np.int32) for a in args[len(arrays) : -1])
        assert isinstance(args[-1], np.int64)
        total = int(args[-1])
        tensors = [a.memptr.mem.owner for a in arrays]
        options, stream = self.module.options, fake.current_stream
        fake.launches.append(Launch(self.name, options, grid, block, tensors, ints, total, stream))
        ptrs = [a.memptr.mem.ptr + a.memptr.offset for a in arrays]
        launch(self.module.lib(), self.name, grid[0], block[0], ptrs, ints, total)


class _Module:
    def __init__(self, fake: "FakeCupy", code: str, options: tuple):
        self.fake, self.code, self.options = fake, code, tuple(options)
        self._lib = None

    def lib(self):
        if self._lib is None:
            self._lib = build(self.code, self.options, self.fake.build_dir)
        return self._lib

    def get_function(self, name: str) -> _Function:
        return _Function(self, name)


class FakeCupy:
    """Stands in for ``cupy`` in ``cuda_kernel._cupy``; records every compile and launch.

    ``sms`` and ``blocks_per_sm`` are what the device and the occupancy query report;
    ``local_size_bytes`` maps kernel names to the local memory their build reports (spills);
    ``from_external=False`` is CuPy 13 (``ExternalStream`` only).
    """

    uint8 = np.uint8

    def __init__(
        self,
        build_dir: Path,
        sms: int = 132,
        blocks_per_sm: int = 4,
        local_size_bytes: Optional[Dict[str, int]] = None,
        from_external: bool = True,
    ):
        self.build_dir, self.sms, self.blocks_per_sm = build_dir, sms, blocks_per_sm
        self.local_size_bytes = local_size_bytes or {}
        self.launches: List[Launch] = []
        self.modules: List[_Module] = []
        self.external_streams: List[tuple] = []
        self.current_stream: Optional[int] = None
        fake = self

        class Stream:
            pass

        if from_external:
            Stream.from_external = staticmethod(lambda obj: _Stream(fake, obj.__cuda_stream__()[1]))

        def external_stream(ptr: int, device_id: int = -1):
            fake.external_streams.append((ptr, device_id))
            return _Stream(fake, ptr)

        def occupancy(func_ptr, block_size: int, dynamic_smem: int) -> int:
            assert block_size > 0 and dynamic_smem == 0
            return fake.blocks_per_sm

        self.cuda = SimpleNamespace(
            Device=lambda index=None: _Device(fake, index),
            UnownedMemory=lambda ptr, size, owner, device_id=-1: _Memory(ptr, size, owner),
            MemoryPointer=_Pointer,
            Stream=Stream,
            ExternalStream=external_stream,
            driver=SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=occupancy),
        )

    def RawModule(self, code: str, options: tuple = ()) -> _Module:
        module = _Module(self, code, options)
        self.modules.append(module)
        return module

    def ndarray(self, shape, dtype, memptr: _Pointer) -> _Array:
        assert dtype == np.uint8 and shape == (memptr.mem.size,)
        return _Array(memptr)
