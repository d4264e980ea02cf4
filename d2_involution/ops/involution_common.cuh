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
// them without a GPU; there the fp16 conversions are done in software (same rounding as PTX).
#ifndef D2I_HOST_EMULATION
__device__ __forceinline__ float d2i_load(const d2i_half* p) {
  const unsigned short b = __ldg(reinterpret_cast<const unsigned short*>(p));
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
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
inline float d2i_load(const d2i_half* p) { return d2i_half_to_float(p->bits); }
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
#else
inline void d2i_store(d2i_half* p, float v) { p->bits = d2i_float_to_half(v); }
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
