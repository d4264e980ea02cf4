// Involution CUDA kernels: forward, grad-input and grad-weight (NCHW, contiguous tensors).
//
// x (N, C, H, W), weight (N, G, K, K, Ho, Wo), out (N, C, Ho, Wo); g(c) = c / (C / G).
// Compiled by cuda_kernel.py with NVRTC once per (dtype, K, stride) through -DD2I_T, -DD2I_K and
// -DD2I_S; every size, the padding and the dilation are kernel arguments.
//
// Design (the baseline is one thread per output element that re-reads the K*K weights for every
// channel of its group):
// * One thread per pixel of one (n, group), looping over a chunk of the group's channels. The K*K
//   weights of the pixel are read once into registers and reused for every channel of the chunk,
//   so the weight tensor (the largest input: K*K*G values per pixel against C for x) is read once.
// * Consecutive threads take consecutive pixels of a row: every load of x, weight and grad_out
//   and every store is coalesced across the warp for stride 1, and the K*K overlapping reads of x
//   by neighbouring threads hit L1.
// * Grad-input is a gather (one thread per input pixel, the taps that reach it found with the
//   stride's divisibility test), so no atomics; grad-weight keeps the pixel's K*K sums in
//   registers while it walks the group's channels, so each weight gradient is written exactly
//   once with no reduction across threads (and is deterministic).
// * Row/column validity of each tap is precomputed as two K-bit masks plus K row and K column
//   offsets, instead of K*K offsets, to save registers. Padding never reads memory.
// Launch: 1-D grid of 128-thread blocks over N * G * chunks * pixels; the host (cuda_kernel.py)
// halves the channel chunk while the grid would hold fewer than two waves of the threads the GPU
// keeps resident for the kernel (CUDA's occupancy query, i.e. its real register use).
// Registers (ptxas of CUDA 13.0 through NVRTC, sm_90, K = 7, stride 1): forward 104 (fp32), 112
// (fp16/bf16), 153 (fp64); grad-input 188, 186, 233; grad-weight 122, 118/128, 168 (the K*K
// register arrays): 2 (grad-input) to 4 (forward) 128-thread blocks share an SM, and each thread
// has K*K independent loads in flight per channel. ptxas spills from forward K = 11, grad-input
// K = 9 and grad-weight K = 11 (fp64) / 13 in every dtype; cuda_kernel.FAST_MAX_K sends those
// to involution_naive.cu, and any instantiation that uses local memory on the running GPU too
// (sm_80 spills 8-16 bytes in grad-input K = 7, stride >= 2, for fp32/fp16/bf16).
#include "involution_common.cuh"

template <typename T, int K, int S>
__device__ __forceinline__ void forward_impl(const T* __restrict__ x, const T* __restrict__ w,
                                             T* __restrict__ out, int C, int G, int H, int W, int Ho,
                                             int Wo, int pad, int dil, int chunk, int n_chunks,
                                             d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int HWo = Ho * Wo;
  const int pix = static_cast<int>(idx % HWo);
  const d2i_int64 rest = idx / HWo;
  const int chunk_id = static_cast<int>(rest % n_chunks);
  const d2i_int64 ng = rest / n_chunks;
  const int g = static_cast<int>(ng % G);
  const d2i_int64 n = ng / G;
  const int i = pix / Wo, j = pix - (pix / Wo) * Wo;

  int rowoff[K], coloff[K];
  unsigned int rowmask = 0u, colmask = 0u;
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int y = i * S - pad + u * dil;
    rowoff[u] = y * W;
    if (y >= 0 && y < H) rowmask |= 1u << u;
  }
#pragma unroll
  for (int v = 0; v < K; ++v) {
    const int xx = j * S - pad + v * dil;
    coloff[v] = xx;
    if (xx >= 0 && xx < W) colmask |= 1u << v;
  }
  acc_t wk[K * K];
  const T* wp = w + ng * (K * K) * static_cast<d2i_int64>(HWo) + pix;
#pragma unroll
  for (int u = 0; u < K; ++u) {
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const bool in = (rowmask >> u) & (colmask >> v) & 1u;
      wk[u * K + v] = in ? static_cast<acc_t>(d2i_load(wp + (u * K + v) * HWo)) : acc_t(0);
    }
  }
  const int cpg = C / G;
  const int c_begin = g * cpg + chunk_id * chunk;
  const int c_end = min(c_begin + chunk, (g + 1) * cpg);
  const d2i_int64 HW = static_cast<d2i_int64>(H) * W;
  for (int c = c_begin; c < c_end; ++c) {
    const T* xp = x + (n * C + c) * HW;
    acc_t s = acc_t(0);
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if ((rowmask >> u) & 1u) {
        const T* xr = xp + rowoff[u];
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if ((colmask >> v) & 1u) s += wk[u * K + v] * static_cast<acc_t>(d2i_load(xr + coloff[v]));
        }
      }
    }
    d2i_store(out + (n * C + c) * HWo + pix, s);
  }
}

template <typename T, int K, int S>
__device__ __forceinline__ void grad_input_impl(const T* __restrict__ go, const T* __restrict__ w,
                                                T* __restrict__ gx, int C, int G, int H, int W,
                                                int Ho, int Wo, int pad, int dil, int chunk,
                                                int n_chunks, d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int HW = H * W;
  const int pix = static_cast<int>(idx % HW);
  const d2i_int64 rest = idx / HW;
  const int chunk_id = static_cast<int>(rest % n_chunks);
  const d2i_int64 ng = rest / n_chunks;
  const int g = static_cast<int>(ng % G);
  const d2i_int64 n = ng / G;
  const int y = pix / W, xx = pix - (pix / W) * W;

  // Tap (u, v) reaches input (y, xx) from output (i, j) when i * S = y + pad - u * dil.
  int rowoff[K], coloff[K];
  unsigned int rowmask = 0u, colmask = 0u;
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int t = y + pad - u * dil;
    const int i = t / S;
    rowoff[u] = i * Wo;
    if (t >= 0 && t - i * S == 0 && i < Ho) rowmask |= 1u << u;
  }
#pragma unroll
  for (int v = 0; v < K; ++v) {
    const int t = xx + pad - v * dil;
    const int j = t / S;
    coloff[v] = j;
    if (t >= 0 && t - j * S == 0 && j < Wo) colmask |= 1u << v;
  }
  const int HWo = Ho * Wo;
  acc_t wk[K * K];
  const T* wp = w + ng * (K * K) * static_cast<d2i_int64>(HWo);
#pragma unroll
  for (int u = 0; u < K; ++u) {
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const bool in = (rowmask >> u) & (colmask >> v) & 1u;
      wk[u * K + v] =
          in ? static_cast<acc_t>(d2i_load(wp + (u * K + v) * HWo + rowoff[u] + coloff[v]))
             : acc_t(0);
    }
  }
  const int cpg = C / G;
  const int c_begin = g * cpg + chunk_id * chunk;
  const int c_end = min(c_begin + chunk, (g + 1) * cpg);
  for (int c = c_begin; c < c_end; ++c) {
    const T* gp = go + (n * C + c) * HWo;
    acc_t s = acc_t(0);
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if ((rowmask >> u) & 1u) {
        const T* gr = gp + rowoff[u];
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if ((colmask >> v) & 1u) s += wk[u * K + v] * static_cast<acc_t>(d2i_load(gr + coloff[v]));
        }
      }
    }
    d2i_store(gx + (n * C + c) * static_cast<d2i_int64>(HW) + pix, s);
  }
}

template <typename T, int K, int S>
__device__ __forceinline__ void grad_weight_impl(const T* __restrict__ go, const T* __restrict__ x,
                                                 T* __restrict__ gw, int C, int G, int H, int W,
                                                 int Ho, int Wo, int pad, int dil,
                                                 d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int HWo = Ho * Wo;
  const int pix = static_cast<int>(idx % HWo);
  const d2i_int64 ng = idx / HWo;
  const int g = static_cast<int>(ng % G);
  const d2i_int64 n = ng / G;
  const int i = pix / Wo, j = pix - (pix / Wo) * Wo;

  int rowoff[K], coloff[K];
  unsigned int rowmask = 0u, colmask = 0u;
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int y = i * S - pad + u * dil;
    rowoff[u] = y * W;
    if (y >= 0 && y < H) rowmask |= 1u << u;
  }
#pragma unroll
  for (int v = 0; v < K; ++v) {
    const int xx = j * S - pad + v * dil;
    coloff[v] = xx;
    if (xx >= 0 && xx < W) colmask |= 1u << v;
  }
  acc_t acc[K * K];
#pragma unroll
  for (int k = 0; k < K * K; ++k) acc[k] = acc_t(0);
  const int cpg = C / G;
  const d2i_int64 HW = static_cast<d2i_int64>(H) * W;
  for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
    const acc_t gv = static_cast<acc_t>(d2i_load(go + (n * C + c) * HWo + pix));
    const T* xp = x + (n * C + c) * HW;
#pragma unroll
    for (int u = 0; u < K; ++u) {
      if ((rowmask >> u) & 1u) {
        const T* xr = xp + rowoff[u];
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if ((colmask >> v) & 1u) acc[u * K + v] += gv * static_cast<acc_t>(d2i_load(xr + coloff[v]));
        }
      }
    }
  }
  T* wp = gw + ng * (K * K) * static_cast<d2i_int64>(HWo) + pix;
#pragma unroll
  for (int k = 0; k < K * K; ++k) d2i_store(wp + k * HWo, acc[k]);
}

#if defined(D2I_T) && defined(D2I_K) && defined(D2I_S)
extern "C" __global__ void __launch_bounds__(128)
    involution_forward(const D2I_T* x, const D2I_T* w, D2I_T* out, int C, int G, int H, int W,
                       int Ho, int Wo, int pad, int dil, int chunk, int n_chunks, d2i_int64 total) {
  forward_impl<D2I_T, D2I_K, D2I_S>(x, w, out, C, G, H, W, Ho, Wo, pad, dil, chunk, n_chunks,
                                    total);
}

extern "C" __global__ void __launch_bounds__(128)
    involution_grad_input(const D2I_T* go, const D2I_T* w, D2I_T* gx, int C, int G, int H, int W,
                          int Ho, int Wo, int pad, int dil, int chunk, int n_chunks,
                          d2i_int64 total) {
  grad_input_impl<D2I_T, D2I_K, D2I_S>(go, w, gx, C, G, H, W, Ho, Wo, pad, dil, chunk, n_chunks,
                                       total);
}

extern "C" __global__ void __launch_bounds__(128)
    involution_grad_weight(const D2I_T* go, const D2I_T* x, D2I_T* gw, int C, int G, int H, int W,
                           int Ho, int Wo, int pad, int dil, d2i_int64 total) {
  grad_weight_impl<D2I_T, D2I_K, D2I_S>(go, x, gw, C, G, H, W, Ho, Wo, pad, dil, total);
}
#endif
