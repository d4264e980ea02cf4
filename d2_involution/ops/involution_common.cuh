// Scalar types, conversions, loads and stores shared by the involution CUDA kernels.
//
// No CUDA headers are included (not even cuda_fp16.h), so the kernels compile with NVRTC from any
// CuPy install, with or without a CUDA toolkit. fp16 and bf16 are stored as 16-bit patterns and
// converted to fp32 in registers; every kernel accumulates in Acc<T>::type (fp32, or fp64 for
// double).
//
// Every global and shared-memory access of the tiled kernels goes through d2i_load/d2i_store,
// d2i_lds/d2i_sts and their vector forms. On the GPU they are plain accesses; in the host
// emulation (tests/cuda_emulation.py, D2I_HOST_EMULATION) they are checked: global accesses must
// fall inside the launch's tensors (writes only into the output), shared accesses inside the
// block's dynamic shared memory, naturally aligned, and free of races between two barriers.
#pragma once

typedef long long d2i_int64;

#ifdef D2I_HOST_EMULATION
// Defined by the emulation's shim: returns p when the access is allowed, else records the error
// and returns a harmless scratch address.
const void* d2i_emu_access(const void* p, unsigned long bytes, bool shared, bool write);
#endif
// p itself on the GPU; the emulation's checked address on the host.
template <typename P>
__device__ __forceinline__ P* d2i_checked(P* p, bool shared, bool write) {
#ifdef D2I_HOST_EMULATION
  return static_cast<P*>(const_cast<void*>(d2i_emu_access(p, sizeof(P), shared, write)));
#else
  return p;
#endif
}

struct d2i_half {
  unsigned short bits;
};
struct d2i_bf16 {
  unsigned short bits;
};

template <typename T>
struct Acc {
  typedef float type;
};
template <>
struct Acc<double> {
  typedef double type;
};

// The same pointer, hidden from the optimiser: it stays one 64-bit register instead of being
// re-derived from the kernel parameter and re-associated into every address that uses it.
template <typename P>
__device__ __forceinline__ P* d2i_opaque(P* p) {
#ifndef D2I_HOST_EMULATION
  asm("mov.b64 %0, %0;" : "+l"(p));
#endif
  return p;
}

// p + k for a 32-bit element offset k, as one wide multiply-add (IMAD.WIDE) on the GPU: the
// optimiser would otherwise keep k sign-extended to 64 bits and add both halves.
template <typename P>
__device__ __forceinline__ P* d2i_offset(P* p, int k) {
#ifndef D2I_HOST_EMULATION
  asm("mad.wide.s32 %0, %1, %2, %0;" : "+l"(p) : "r"(k), "n"(static_cast<int>(sizeof(P))));
  return p;
#else
  return p + k;
#endif
}

// Conversions between the stored type T and the accumulator type, one value at a time.
__device__ __forceinline__ float d2i_to_acc(float v) { return v; }
__device__ __forceinline__ double d2i_to_acc(double v) { return v; }
__device__ __forceinline__ float d2i_to_acc(d2i_bf16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}
__device__ __forceinline__ void d2i_from_acc(float v, float* out) { *out = v; }
__device__ __forceinline__ void d2i_from_acc(double v, double* out) { *out = v; }
__device__ __forceinline__ void d2i_from_acc(float v, d2i_bf16* out) {
  // Round to nearest even, keeping NaN a (quiet) NaN.
  const unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = static_cast<unsigned short>((u >> 16) | 0x40u);
  } else {
    out->bits = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}
// tests/test_ops_cuda_emulated.py compiles the kernels as host C++ (D2I_HOST_EMULATION) to check
// them without a GPU; there the fp16 conversions are done in software (same rounding as PTX).
#ifndef D2I_HOST_EMULATION
__device__ __forceinline__ float d2i_to_acc(d2i_half v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ void d2i_from_acc(float v, d2i_half* out) {
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out->bits) : "f"(v));
}
#else
// IEEE binary16 -> binary32, exact (subnormals, infinities and NaN payloads kept).
inline float d2i_half_to_float(unsigned short h) {
  const unsigned int sign = (h & 0x8000u) << 16;
  unsigned int exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return __uint_as_float(sign);
    exp = 113;  // normalise the subnormal: value = man * 2^-24
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    return __uint_as_float(sign | (exp << 23) | ((man & 0x3ffu) << 13));
  }
  return __uint_as_float(sign | ((exp + 112) << 23) | (man << 13));
}
// binary32 -> binary16, round to nearest even (cvt.rn.f16.f32); NaN stays a (quiet) NaN.
inline unsigned short d2i_float_to_half(float f) {
  const unsigned int u = __float_as_uint(f);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const unsigned int a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<unsigned short>((a >> 13) & 0x1ffu);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {                        // below 2^-14: subnormal half (or zero)
    const unsigned int man = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(a >> 23);  // 14 + (127 - exp) - 1 + 10 - 23 + 24
    if (shift > 24) return sign;
    const unsigned int q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return sign | static_cast<unsigned short>(q + (rem > half || (rem == half && (q & 1u))));
  }
  const unsigned int r = a - 0x38000000u;  // rebias the exponent (127 -> 15)
  const unsigned int q = r >> 13, rem = r & 0x1fffu;
  return sign | static_cast<unsigned short>(q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u))));
}
inline float d2i_to_acc(d2i_half v) { return d2i_half_to_float(v.bits); }
inline void d2i_from_acc(float v, d2i_half* out) { out->bits = d2i_float_to_half(v); }
#endif

// Global memory: read-only loads (through the non-coherent cache) converted to the accumulator
// type, and stores rounded to T.
__device__ __forceinline__ float d2i_load(const float* p) { return __ldg(d2i_checked(p, 0, 0)); }
__device__ __forceinline__ double d2i_load(const double* p) { return __ldg(d2i_checked(p, 0, 0)); }
template <typename T>
__device__ __forceinline__ float d2i_load(const T* p) {  // fp16, bf16: 16-bit loads
  T v;
  v.bits = __ldg(reinterpret_cast<const unsigned short*>(d2i_checked(p, 0, 0)));
  return d2i_to_acc(v);
}
template <typename T, typename A>
__device__ __forceinline__ void d2i_store(T* p, A v) {
  d2i_from_acc(v, d2i_checked(p, 0, 1));
}

// N values as one access of N * sizeof(A) bytes (LDS.64 / LDS.128, LDG.128, ...).
template <typename A, int N>
struct alignas(sizeof(A) * N) d2i_vec {
  A v[N];
};
// A 16-byte global load of 16 / sizeof(T) consecutive values of T (p 16-byte aligned).
template <typename T>
__device__ __forceinline__ d2i_vec<T, 16 / sizeof(T)> d2i_load16(const T* p) {
  return *d2i_checked(reinterpret_cast<const d2i_vec<T, 16 / sizeof(T)>*>(p), 0, 0);
}

// Shared memory (the tiled kernels keep their tiles in the accumulator type).
template <typename A>
__device__ __forceinline__ A d2i_lds(const A* p) {
  return *d2i_checked(p, 1, 0);
}
template <typename A>
__device__ __forceinline__ void d2i_sts(A* p, A v) {
  *d2i_checked(p, 1, 1) = v;
}
template <int N, typename A>
__device__ __forceinline__ d2i_vec<A, N> d2i_lds_vec(const A* p) {
  return *d2i_checked(reinterpret_cast<const d2i_vec<A, N>*>(p), 1, 0);
}
