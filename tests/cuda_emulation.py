"""The CUDA kernels run on the host: the code cuda_kernel.py hands to NVRTC, compiled as host C++
and launched block by block, and a fake CuPy module whose kernels are those host builds, so that
cuda_kernel.py's launch logic runs end to end on CPU tensors (no GPU needed).

How a launch is emulated:

* Every CUDA thread of a block is a coroutine (``ucontext``) with its own stack: it runs until
  ``__syncthreads()``, where it yields; when every thread of the block has arrived, all resume.
  A block where some threads reach a barrier that others have left for good is an error. So
  kernels that stage tiles in shared memory run as on the GPU, barrier by barrier.
* ``extern __shared__`` memory is one buffer, sized by the launch, filled with NaN bytes before
  each block: a kernel that reads shared memory nobody wrote produces NaN.
* Every access the kernels make through ``d2i_load``/``d2i_store`` and ``d2i_lds``/``d2i_sts``
  (involution_common.cuh) is checked: global accesses must fall inside one of the launch's tensors
  (stores only inside the output), shared accesses inside the launch's dynamic shared memory, all
  naturally aligned, and no shared word may be written by one thread and read or written by
  another between the same two barriers (a race). The first violation fails the launch.
"""

import ctypes
import hashlib
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

CXX = shutil.which("c++") or shutil.which("g++")
SMEM_CAPACITY = 1 << 18  # bytes of emulated dynamic shared memory

SHIM = r"""
#include <algorithm>
#include <cstdio>
#include <cstring>
struct d2i_dim3 { unsigned int x = 0, y = 0, z = 0; };
static d2i_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__
#define __align__(n)
#define __forceinline__ inline
#define __launch_bounds__(...)
template <typename T> inline T __ldg(const T* p) { return *p; }
using std::min;
using std::max;
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
void __syncthreads();
alignas(16) unsigned char d2i_smem[D2I_EMU_SMEM];
"""

DRIVER = r"""
#include <ucontext.h>
#include <string>
#include <vector>
namespace emu {
struct Range { const char* lo; const char* hi; bool writable; };
struct Shadow { long long w_epoch = -1, r_epoch = -1; int w_tid = -1, r_tid = -1; };
enum State { kRun, kWait, kDone };
struct Thread { ucontext_t ctx; State state; std::vector<char> stack; };
static std::vector<Range> ranges;
static std::vector<Shadow> shadow;
static std::vector<Thread> threads;
static ucontext_t main_ctx;
static unsigned long smem_bytes = 0;
static long long epoch = 0;
static int current = 0;
static std::string error;
alignas(16) static char scratch[64];
static void (*kernel)() = nullptr;

static void fail(const std::string& what) {
  if (error.empty()) {
    char where[160];
    std::snprintf(where, sizeof(where), " (block %u,%u,%u thread %u)", blockIdx.x, blockIdx.y,
                  blockIdx.z, threadIdx.x);
    error = what + where;
  }
}

static void trampoline() {
  kernel();
  threads[current].state = kDone;
}

static bool run_block(unsigned int nt) {
  if (threads.size() < nt) threads.resize(nt);
  for (unsigned int t = 0; t < nt; ++t) {
    Thread& th = threads[t];
    if (th.stack.empty()) th.stack.resize(1 << 18);
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = th.stack.data();
    th.ctx.uc_stack.ss_size = th.stack.size();
    th.ctx.uc_link = &main_ctx;
    makecontext(&th.ctx, trampoline, 0);
    th.state = kRun;
  }
  std::memset(d2i_smem, 0xff, smem_bytes);
  ++epoch;
  for (;;) {
    unsigned int done = 0, waiting = 0;
    for (unsigned int t = 0; t < nt; ++t) {
      Thread& th = threads[t];
      if (th.state == kDone) { ++done; continue; }
      th.state = kRun;
      current = static_cast<int>(t);
      threadIdx.x = t;
      swapcontext(&main_ctx, &th.ctx);
      if (th.state == kDone) ++done; else ++waiting;
    }
    if (done == nt) return true;
    if (done > 0) {
      fail("__syncthreads() reached by " + std::to_string(waiting) + " threads while " +
           std::to_string(done) + " had exited");
      return false;
    }
    ++epoch;  // every thread is at the barrier: release it
  }
}
}  // namespace emu

void __syncthreads() {
  emu::Thread& th = emu::threads[emu::current];
  th.state = emu::kWait;
  swapcontext(&th.ctx, &emu::main_ctx);
}

const void* d2i_emu_access(const void* p, unsigned long bytes, bool shared, bool write) {
  const char* c = static_cast<const char*>(p);
  const unsigned long addr = reinterpret_cast<unsigned long>(p);
  if (addr % bytes != 0) {
    emu::fail(std::string(shared ? "shared" : "global") + " access of " + std::to_string(bytes) +
              " bytes misaligned");
    return emu::scratch;
  }
  if (!shared) {
    for (const emu::Range& r : emu::ranges) {
      if (c >= r.lo && c + bytes <= r.hi) {
        if (write && !r.writable) {
          emu::fail("global store into an input tensor");
          return emu::scratch;
        }
        return p;
      }
    }
    emu::fail(std::string("global ") + (write ? "store" : "load") + " outside every tensor");
    return emu::scratch;
  }
  const long off = c - reinterpret_cast<const char*>(d2i_smem);
  if (off < 0 || off + static_cast<long>(bytes) > static_cast<long>(emu::smem_bytes)) {
    emu::fail("shared access at byte " + std::to_string(off) + " outside the " +
              std::to_string(emu::smem_bytes) + " bytes of the launch");
    return emu::scratch;
  }
  for (long w = off / 4; w < (off + static_cast<long>(bytes) + 3) / 4; ++w) {
    emu::Shadow& s = emu::shadow[w];
    const int me = emu::current;
    if (s.w_epoch == emu::epoch && s.w_tid != me) {
      emu::fail("shared race: word " + std::to_string(w) + " written by thread " +
                std::to_string(s.w_tid) + " and " + (write ? "written" : "read") +
                " by another between two barriers");
      return emu::scratch;
    }
    if (write) {
      if (s.r_epoch == emu::epoch && s.r_tid != me) {
        emu::fail("shared race: word " + std::to_string(w) + " read by another thread and " +
                  "written between two barriers");
        return emu::scratch;
      }
      s.w_epoch = emu::epoch;
      s.w_tid = me;
    } else {
      s.r_tid = s.r_epoch == emu::epoch && s.r_tid != me ? -2 : me;
      s.r_epoch = emu::epoch;
    }
  }
  return p;
}

typedef D2I_T T;
static const void* const* g_ptrs;
static const int* g_ints;
static long long g_total;

extern "C" int emu_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz,
                          unsigned int block, unsigned long smem, const void* const* ptrs,
                          const long long* nbytes, int nptrs, int out_index, const int* ints,
                          long long total, char* err, int err_len) {
  emu::error.clear();
  emu::kernel = nullptr;
  DISPATCH
  if (emu::kernel == nullptr) {
    std::snprintf(err, err_len, "no kernel %s in this build", name);
    return 1;
  }
  if (smem > D2I_EMU_SMEM) {
    std::snprintf(err, err_len, "%lu bytes of shared memory requested", smem);
    return 1;
  }
  emu::ranges.clear();
  for (int k = 0; k < nptrs; ++k) {
    const char* lo = static_cast<const char*>(ptrs[k]);
    if (lo != nullptr) emu::ranges.push_back({lo, lo + nbytes[k], k == out_index});
  }
  emu::smem_bytes = smem;
  emu::shadow.assign((smem + 3) / 4, emu::Shadow());
  g_ptrs = ptrs;
  g_ints = ints;
  g_total = total;
  blockDim.x = block;
  gridDim.x = gx;
  gridDim.y = gy;
  gridDim.z = gz;
  for (unsigned int z = 0; z < gz && emu::error.empty(); ++z)
    for (unsigned int y = 0; y < gy && emu::error.empty(); ++y)
      for (unsigned int x = 0; x < gx && emu::error.empty(); ++x) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = z;
        emu::run_block(block);
      }
  if (!emu::error.empty()) {
    std::snprintf(err, err_len, "%s: %s", name, emu::error.c_str());
    return 2;
  }
  return 0;
}
extern "C" void emu_half_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = d2i_to_acc(reinterpret_cast<const d2i_half*>(in)[i]);
}
extern "C" void emu_float_to_half(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) d2i_from_acc(in[i], reinterpret_cast<d2i_half*>(out + i));
}
"""

KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)'
)
MACRO_KERNEL_RE = re.compile(r"^D2I_\w+\((involution_\w+),", re.M)
PTRS = "static_cast<const T*>(g_ptrs[{}])"
INTS = ", ".join(f"g_ints[{k}]" for k in range(10))


def _dispatch(code: str) -> str:
    """One `if (name == ...) emu::kernel = <thunk>;` per kernel defined in ``code``."""
    names = sorted(set(KERNEL_RE.findall(code)) | set(MACRO_KERNEL_RE.findall(code)))
    names = [n for n in names if n != "name"]
    lines = []
    for name in names:
        if name.startswith("involution_naive_"):  # (a, b, out, 10 ints, total)
            call = f"{name}({PTRS.format(0)}, {PTRS.format(1)}, (T*)g_ptrs[2], {INTS}, g_total)"
        else:  # (in0, in1, in2, in3, out, 10 ints)
            ins = ", ".join(PTRS.format(k) for k in range(4))
            call = f"{name}({ins}, (T*)g_ptrs[4], {INTS})"
        lines.append(f'  if (!std::strcmp(name, "{name}")) emu::kernel = [] {{ {call}; }};')
    return "\n".join(lines)


_libs: Dict[str, ctypes.CDLL] = {}


def build(code: str, options: Sequence[str], build_dir: Path) -> ctypes.CDLL:
    """Compile NVRTC ``code`` with its ``-D`` options as a host library (cached by content)."""
    defines = [o for o in options if o.startswith("-D")]
    key = hashlib.sha256((code + "\0".join(defines)).encode()).hexdigest()[:16]
    if key not in _libs:
        build_dir.mkdir(parents=True, exist_ok=True)
        src, lib = build_dir / f"emu_{key}.cpp", build_dir / f"emu_{key}.so"
        src.write_text(SHIM + code + DRIVER.replace("DISPATCH", _dispatch(code)))
        cmd = [CXX, "-O1", "-std=c++17", "-shared", "-fPIC", "-DD2I_HOST_EMULATION"]
        cmd += [f"-DD2I_EMU_SMEM={SMEM_CAPACITY}", *defines]
        proc = subprocess.run([*cmd, str(src), "-o", str(lib)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _libs[key] = ctypes.CDLL(str(lib))
        _libs[key].emu_launch.restype = ctypes.c_int
        for name in ("emu_half_to_float", "emu_float_to_half"):
            getattr(_libs[key], name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return _libs[key]


def config(lib, kernel: str) -> List[int]:
    """The launch configuration a kernel exports (``<kernel>_config``)."""
    return list((ctypes.c_int * 6).in_dll(lib, f"{kernel}_config"))


def launch(
    lib,
    name: str,
    grid: Sequence[int],
    block: int,
    tensors: Sequence[Optional[torch.Tensor]],
    ints: Sequence[int],
    smem: int = 0,
    total: int = 0,
) -> None:
    """Run kernel ``name`` over ``grid`` blocks of ``block`` threads; the last tensor is the output
    (the only one it may write). Raises AssertionError on any failed check."""
    spans = [
        (t.data_ptr(), t.numel() * t.element_size()) if t is not None else (0, 0) for t in tensors
    ]
    _launch_raw(lib, name, grid, block, spans, len(tensors) - 1, ints, smem, total)


def _launch_raw(lib, name, grid, block, spans, out_index, ints, smem, total) -> None:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    ptrs = (ctypes.c_void_p * len(spans))(*[p or None for p, _ in spans])
    sizes = (ctypes.c_longlong * len(spans))(*[n for _, n in spans])
    values = (ctypes.c_int * max(1, len(ints)))(*ints)
    err = ctypes.create_string_buffer(600)
    rc = lib.emu_launch(
        name.encode(),
        *[ctypes.c_uint(g) for g in grid],
        ctypes.c_uint(block),
        ctypes.c_ulong(smem),
        ptrs,
        sizes,
        len(spans),
        out_index,
        values,
        ctypes.c_longlong(total),
        err,
        len(err),
    )
    assert rc == 0, err.value.decode()


# ------------------------------------------------------------------------------------------------
# A fake CuPy: just the API cuda_kernel.py uses, with host-emulated kernels.


class Launch(NamedTuple):
    name: str
    options: tuple
    grid: tuple
    block: tuple
    shared_mem: int
    tensors: list  # the torch tensors whose memory the kernel got (None: a null pointer)
    ints: List[int]
    total: Optional[int]  # the naive kernels' trailing int64
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
    dtype: object

    def get(self) -> np.ndarray:
        """Device-to-host copy (used for a module's exported configuration arrays)."""
        count = self.memptr.mem.size // np.dtype(self.dtype).itemsize
        buf = (ctypes.c_char * self.memptr.mem.size).from_address(self.memptr.mem.ptr)
        return np.frombuffer(bytes(buf), dtype=self.dtype, count=count).copy()


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
        self.max_dynamic_shared_size_bytes = 0
        self.preferred_shared_memory_carveout = -1

    def __call__(self, grid, block, args, shared_mem: int = 0):
        fake = self.module.fake
        pointers = []
        for a in args:
            if isinstance(a, _Array):
                pointers.append(a.memptr)
            elif isinstance(a, np.uint64) and int(a) == 0:
                pointers.append(None)
            else:
                break
        rest = args[len(pointers) :]
        assert all(isinstance(a, np.int32) for a in rest[:10]) and len(rest) in (10, 11), rest
        total = int(rest[10]) if len(rest) == 11 else None
        assert total is None or isinstance(rest[10], np.int64)
        assert shared_mem <= max(
            48 * 1024, self.max_dynamic_shared_size_bytes
        ), f"{self.name}: {shared_mem} bytes of shared memory without raising the limit"
        tensors = [p.mem.owner if p is not None else None for p in pointers]
        ints = [int(a) for a in rest[:10]]
        record = Launch(
            self.name,
            self.module.options,
            tuple(grid),
            tuple(block),
            shared_mem,
            tensors,
            ints,
            total,
            fake.current_stream,
        )
        fake.launches.append(record)
        spans = [(p.mem.ptr + p.offset, p.mem.size) if p is not None else (0, 0) for p in pointers]
        _launch_raw(
            self.module.lib(),
            self.name,
            grid,
            block[0],
            spans,
            len(spans) - 1,
            ints,
            shared_mem,
            total or 0,
        )


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

    def get_global(self, name: str) -> _Pointer:
        symbol = (ctypes.c_int * 6).in_dll(self.lib(), name)
        return _Pointer(_Memory(ctypes.addressof(symbol), ctypes.sizeof(symbol), self), 0)


class FakeCupy:
    """Stands in for ``cupy`` in ``cuda_kernel._cupy``; records every compile and launch.

    ``sms`` and ``blocks_per_sm`` are what the device and the occupancy query report;
    ``local_size_bytes`` maps kernel names to the local memory their build reports (spills);
    ``from_external=False`` is CuPy 13 (``ExternalStream`` only).
    """

    uint8 = np.uint8
    int32 = np.int32

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
        self.occupancy_queries: List[tuple] = []
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
            assert block_size > 0 and dynamic_smem >= 0
            fake.occupancy_queries.append((func_ptr, block_size, dynamic_smem))
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
        assert shape == (memptr.mem.size // np.dtype(dtype).itemsize,)
        return _Array(memptr, dtype)
