// Scalar types, loads and stores shared by the involution CUDA kernels.
//
// No CUDA headers are included (not even cuda_fp16.h), so the kernels compile with NVRTC from any
// CuPy install, with or without a CUDA toolkit. fp16 and bf16 are stored as 16-bit patterns and
// converted to fp32 in registers; every kernel accumulates in Acc<T>::type (fp32, or fp64 for
// double).
#pragma once

typedef long long d2i_int64;

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

__device__ __forceinline__ float d2i_load(const float* p) { return __ldg(p); }
__device__ __forceinline__ double d2i_load(const double* p) { return __ldg(p); }
// tests/test_ops_cuda_emulated.py compiles the kernels as host C++ (D2I_HOST_EMULATION) to check
// their index logic without a GPU; it has no PTX, hence no fp16 there.
#ifndef D2I_HOST_EMULATION
__device__ __forceinline__ float d2i_load(const d2i_half* p) {
  const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
#endif
__device__ __forceinline__ float d2i_load(const d2i_bf16* p) {
  const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
  return __uint_as_float(static_cast<unsigned int>(b) << 16);
}

__device__ __forceinline__ void d2i_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void d2i_store(double* p, double v) { *p = v; }
#ifndef D2I_HOST_EMULATION
__device__ __forceinline__ void d2i_store(d2i_half* p, float v) {
  unsigned short b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
  *reinterpret_cast<unsigned short*>(p) = b;
}
#endif
__device__ __forceinline__ void d2i_store(d2i_bf16* p, float v) {
  // Round to nearest even, keeping NaN a (quiet) NaN.
  const unsigned int u = __float_as_uint(v);
  unsigned short b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b = static_cast<unsigned short>((u >> 16) | 0x40u);
  } else {
    b = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  *reinterpret_cast<unsigned short*>(p) = b;
}
