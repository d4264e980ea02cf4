// CPU involution kernels (forward, grad-input, grad-weight), float and double.
//
// Built on first use by d2_involution/ops/cpu_kernel.py with the system C++ compiler and loaded with
// ctypes (plain C entry points, raw pointers, no PyTorch headers: needs only a C++ compiler).
// Every tensor is contiguous: x (N, C, H, W), weight (N, G, K, K, Ho, Wo), out (N, C, Ho, Wo).
//
// Two variants of each kernel; cpu_kernel.use_tiled picks one per call (measured, see there).
// Both: tasks never write the same memory (no atomics; results do not depend on the thread
// count), and nothing of size K*K times the input is allocated: the only extra memory is the
// output itself plus, for the tiled variant, a per-thread tile of one channel group.
// Row variant: one task per plane; the innermost loop runs along a row of the output with unit
// stride in the output and the weight (and in x when stride == 1), so the compiler vectorises it,
// and the plane being accumulated stays in L1/L2.
//   forward:     task (n, c): out[n, c]     += w[n, g(c), u, v] * shifted x[n, c]   over u, v
//   grad-input:  task (n, c): gx[n, c]      += w[n, g(c), u, v] * go[n, c] scattered back to x
//   grad-weight: task (n, g): gw[n, g, u, v] = sum over c in g of go[n, c] * shifted x[n, c]
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

struct Geometry {
  int64_t N, C, G, H, W, Ho, Wo, K, stride, pad, dil;
};

// Runs fn(t) for t in [0, count) on up to nthreads threads, in contiguous equal chunks.
template <typename Fn>
void parallel_for(int64_t count, int64_t nthreads, const Fn& fn) {
  nthreads = std::max<int64_t>(1, std::min(nthreads, count));
  auto work = [&](int64_t t) {
    const int64_t begin = count * t / nthreads, end = count * (t + 1) / nthreads;
    for (int64_t i = begin; i < end; ++i) fn(i);
  };
  if (nthreads == 1) {
    work(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (int64_t t = 1; t < nthreads; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
}

// Output indices o in [lo, hi) whose input index o * stride + offset lies in [0, length).
inline void valid_range(int64_t offset, int64_t stride, int64_t length, int64_t n_out, int64_t& lo,
                        int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = (length - 1 - offset) >= 0 ? (length - 1 - offset) / stride + 1 : 0;
  hi = std::min(hi, n_out);
  lo = std::min(lo, hi);
}

// Calls row(i, x_row_offset, j0, j1, x_col_offset, k) for every kernel tap k = u * K + v and every
// output row i whose input row exists; [j0, j1) are the output columns whose input column exists.
template <typename Row>
inline void for_each_tap_row(const Geometry& g, const Row& row) {
  for (int64_t u = 0; u < g.K; ++u) {
    const int64_t off_h = u * g.dil - g.pad;
    int64_t i0, i1;
    valid_range(off_h, g.stride, g.H, g.Ho, i0, i1);
    for (int64_t v = 0; v < g.K; ++v) {
      const int64_t off_w = v * g.dil - g.pad;
      int64_t j0, j1;
      valid_range(off_w, g.stride, g.W, g.Wo, j0, j1);
      if (j0 >= j1) continue;
      for (int64_t i = i0; i < i1; ++i) row(i, (i * g.stride + off_h) * g.W, j0, j1, off_w, u * g.K + v);
    }
  }
}

template <typename T>
void forward(const T* x, const T* w, T* out, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  parallel_for(g.N * g.C, nthreads, [&](int64_t nc) {
    const int64_t n = nc / g.C, c = nc % g.C;
    const T* __restrict__ xp = x + nc * plane_in;
    const T* __restrict__ wp = w + (n * g.G + c / cpg) * g.K * g.K * plane_out;
    T* __restrict__ op = out + nc * plane_out;
    std::fill(op, op + plane_out, T(0));
    for_each_tap_row(g, [&](int64_t i, int64_t xrow, int64_t j0, int64_t j1, int64_t off_w,
                            int64_t k) {
      T* __restrict__ o = op + i * g.Wo;
      const T* __restrict__ wr = wp + k * plane_out + i * g.Wo;
      const T* __restrict__ xr = xp + xrow + off_w;
      if (g.stride == 1) {
        for (int64_t j = j0; j < j1; ++j) o[j] += wr[j] * xr[j];
      } else {
        for (int64_t j = j0; j < j1; ++j) o[j] += wr[j] * xr[j * g.stride];
      }
    });
  });
}

template <typename T>
void grad_input(const T* go, const T* w, T* gx, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  parallel_for(g.N * g.C, nthreads, [&](int64_t nc) {
    const int64_t n = nc / g.C, c = nc % g.C;
    const T* __restrict__ gp = go + nc * plane_out;
    const T* __restrict__ wp = w + (n * g.G + c / cpg) * g.K * g.K * plane_out;
    T* __restrict__ xp = gx + nc * plane_in;
    std::fill(xp, xp + plane_in, T(0));
    for_each_tap_row(g, [&](int64_t i, int64_t xrow, int64_t j0, int64_t j1, int64_t off_w,
                            int64_t k) {
      const T* __restrict__ gr = gp + i * g.Wo;
      const T* __restrict__ wr = wp + k * plane_out + i * g.Wo;
      T* __restrict__ xr = xp + xrow + off_w;
      if (g.stride == 1) {
        for (int64_t j = j0; j < j1; ++j) xr[j] += wr[j] * gr[j];
      } else {
        for (int64_t j = j0; j < j1; ++j) xr[j * g.stride] += wr[j] * gr[j];
      }
    });
  });
}

template <typename T>
void grad_weight(const T* go, const T* x, T* gw, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  const int64_t kplane = g.K * g.K * plane_out;
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    const int64_t n = ng / g.G, grp = ng % g.G;
    T* __restrict__ wp = gw + ng * kplane;
    std::fill(wp, wp + kplane, T(0));
    for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
      const T* __restrict__ gp = go + (n * g.C + c) * plane_out;
      const T* __restrict__ xp = x + (n * g.C + c) * plane_in;
      for_each_tap_row(g, [&](int64_t i, int64_t xrow, int64_t j0, int64_t j1, int64_t off_w,
                              int64_t k) {
        const T* __restrict__ gr = gp + i * g.Wo;
        const T* __restrict__ xr = xp + xrow + off_w;
        T* __restrict__ wr = wp + k * plane_out + i * g.Wo;
        if (g.stride == 1) {
          for (int64_t j = j0; j < j1; ++j) wr[j] += gr[j] * xr[j];
        } else {
          for (int64_t j = j0; j < j1; ++j) wr[j] += gr[j] * xr[j * g.stride];
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Channel-tiled variants, for small planes (short rows make the row loops above overhead-bound).
// One task per (n, group): the group's channels are transposed into a per-thread (H, W, C/G)
// scratch tile (a few KiB to a few hundred KiB), so that for each output pixel and tap the K*K
// weight is broadcast over a contiguous run of C/G channels, as the CUDA kernels do.

// dst[p * cpg + c] = src[c * plane + p]
template <typename T>
inline void to_channels_last(const T* __restrict__ src, T* __restrict__ dst, int64_t cpg,
                             int64_t plane) {
  for (int64_t c = 0; c < cpg; ++c)
    for (int64_t p = 0; p < plane; ++p) dst[p * cpg + c] = src[c * plane + p];
}

// Calls tap(pixel, k, y * W + x) for every output pixel and every tap k whose input (y, x) exists.
template <typename Tap>
inline void for_each_pixel_tap(const Geometry& g, const Tap& tap) {
  for (int64_t i = 0; i < g.Ho; ++i) {
    for (int64_t j = 0; j < g.Wo; ++j) {
      const int64_t pix = i * g.Wo + j;
      for (int64_t u = 0; u < g.K; ++u) {
        const int64_t y = i * g.stride + u * g.dil - g.pad;
        if (y < 0 || y >= g.H) continue;
        for (int64_t v = 0; v < g.K; ++v) {
          const int64_t x = j * g.stride + v * g.dil - g.pad;
          if (x < 0 || x >= g.W) continue;
          tap(pix, u * g.K + v, y * g.W + x);
        }
      }
    }
  }
}

template <typename T>
void forward_tiled(const T* x, const T* w, T* out, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    std::vector<T> xt(plane_in * cpg), acc(plane_out * cpg, T(0));
    const T* __restrict__ wp = w + ng * g.K * g.K * plane_out;
    to_channels_last(x + ng * cpg * plane_in, xt.data(), cpg, plane_in);
    T* __restrict__ a = acc.data();
    const T* __restrict__ xs = xt.data();
    for_each_pixel_tap(g, [&](int64_t pix, int64_t k, int64_t src) {
      const T wv = wp[k * plane_out + pix];
      T* __restrict__ ap = a + pix * cpg;
      const T* __restrict__ xp = xs + src * cpg;
      for (int64_t c = 0; c < cpg; ++c) ap[c] += wv * xp[c];
    });
    T* __restrict__ op = out + ng * cpg * plane_out;
    for (int64_t c = 0; c < cpg; ++c)
      for (int64_t p = 0; p < plane_out; ++p) op[c * plane_out + p] = a[p * cpg + c];
  });
}

template <typename T>
void grad_input_tiled(const T* go, const T* w, T* gx, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    std::vector<T> got(plane_out * cpg), acc(plane_in * cpg, T(0));
    const T* __restrict__ wp = w + ng * g.K * g.K * plane_out;
    to_channels_last(go + ng * cpg * plane_out, got.data(), cpg, plane_out);
    T* __restrict__ a = acc.data();
    const T* __restrict__ gs = got.data();
    for_each_pixel_tap(g, [&](int64_t pix, int64_t k, int64_t src) {
      const T wv = wp[k * plane_out + pix];
      T* __restrict__ ap = a + src * cpg;
      const T* __restrict__ gp = gs + pix * cpg;
      for (int64_t c = 0; c < cpg; ++c) ap[c] += wv * gp[c];
    });
    T* __restrict__ xp = gx + ng * cpg * plane_in;
    for (int64_t c = 0; c < cpg; ++c)
      for (int64_t p = 0; p < plane_in; ++p) xp[c * plane_in + p] = a[p * cpg + c];
  });
}

template <typename T>
void grad_weight_tiled(const T* go, const T* x, T* gw, const Geometry& g, int64_t nthreads) {
  const int64_t plane_in = g.H * g.W, plane_out = g.Ho * g.Wo, cpg = g.C / g.G;
  const int64_t kplane = g.K * g.K * plane_out;
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    std::vector<T> xt(plane_in * cpg), got(plane_out * cpg);
    to_channels_last(x + ng * cpg * plane_in, xt.data(), cpg, plane_in);
    to_channels_last(go + ng * cpg * plane_out, got.data(), cpg, plane_out);
    T* __restrict__ wp = gw + ng * kplane;
    std::fill(wp, wp + kplane, T(0));
    const T* __restrict__ xs = xt.data();
    const T* __restrict__ gs = got.data();
    for_each_pixel_tap(g, [&](int64_t pix, int64_t k, int64_t src) {
      const T* __restrict__ gp = gs + pix * cpg;
      const T* __restrict__ xp = xs + src * cpg;
      T s = T(0);
      // A vectorised reduction (-fopenmp-simd: no OpenMP runtime); its order is fixed at compile
      // time, so results stay independent of the thread count.
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < cpg; ++c) s += gp[c] * xp[c];
      wp[k * plane_out + pix] = s;
    });
  });
}

}  // namespace

#define D2I_SIZES                                                                             \
  int64_t N, int64_t C, int64_t G, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t K, \
      int64_t stride, int64_t pad, int64_t dil, int64_t nthreads
#define D2I_GEOMETRY Geometry{N, C, G, H, W, Ho, Wo, K, stride, pad, dil}

#define D2I_ENTRY_POINTS(T, SUFFIX)                                                         \
  extern "C" void d2i_forward_##SUFFIX(const T* x, const T* w, T* out, D2I_SIZES) {        \
    forward<T>(x, w, out, D2I_GEOMETRY, nthreads);                                          \
  }                                                                                         \
  extern "C" void d2i_grad_input_##SUFFIX(const T* go, const T* w, T* gx, D2I_SIZES) {     \
    grad_input<T>(go, w, gx, D2I_GEOMETRY, nthreads);                                       \
  }                                                                                         \
  extern "C" void d2i_grad_weight_##SUFFIX(const T* go, const T* x, T* gw, D2I_SIZES) {    \
    grad_weight<T>(go, x, gw, D2I_GEOMETRY, nthreads);                                      \
  }                                                                                         \
  extern "C" void d2i_forward_tiled_##SUFFIX(const T* x, const T* w, T* out, D2I_SIZES) {  \
    forward_tiled<T>(x, w, out, D2I_GEOMETRY, nthreads);                                    \
  }                                                                                         \
  extern "C" void d2i_grad_input_tiled_##SUFFIX(const T* go, const T* w, T* gx, D2I_SIZES) { \
    grad_input_tiled<T>(go, w, gx, D2I_GEOMETRY, nthreads);                                 \
  }                                                                                         \
  extern "C" void d2i_grad_weight_tiled_##SUFFIX(const T* go, const T* x, T* gw, D2I_SIZES) { \
    grad_weight_tiled<T>(go, x, gw, D2I_GEOMETRY, nthreads);                                \
  }

D2I_ENTRY_POINTS(float, f32)
D2I_ENTRY_POINTS(double, f64)
