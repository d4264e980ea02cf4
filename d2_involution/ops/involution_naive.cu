// Naive involution CUDA kernels: the official design (one thread per output element, NCHW), written
// here as the baseline for tools/benchmark_involution.py and as the fallback where the
// register-tiled kernels of involution_cuda.cu would spill (cuda_kernel.FAST_MAX_K).
//
// Compiled once per dtype (-DD2I_T); K, stride, dilation, padding and all sizes are arguments.
// Launch: 1-D grid of 128-thread blocks (bounds: 256), one thread per element of the tensor
// being written:
//   forward:     out[n, c, i, j]        loops over the K*K taps, re-reading the weights per channel
//   grad-input:  gx[n, c, y, x]         loops over the K*K taps that reach (y, x)
//   grad-weight: gw[n, g, u, v, i, j]   loops over the channels of group g
#include "involution_common.cuh"

template <typename T>
__device__ __forceinline__ void naive_forward_impl(const T* x, const T* w, T* out, int C, int G,
                                                   int H, int W, int Ho, int Wo, int K, int S,
                                                   int pad, int dil, d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int j = static_cast<int>(idx % Wo);
  const int i = static_cast<int>((idx / Wo) % Ho);
  const int c = static_cast<int>((idx / (static_cast<d2i_int64>(Wo) * Ho)) % C);
  const d2i_int64 n = idx / (static_cast<d2i_int64>(Wo) * Ho * C);
  const int g = c / (C / G);
  acc_t s = acc_t(0);
  for (int u = 0; u < K; ++u) {
    const int y = i * S - pad + u * dil;
    if (y < 0 || y >= H) continue;
    for (int v = 0; v < K; ++v) {
      const int xx = j * S - pad + v * dil;
      if (xx < 0 || xx >= W) continue;
      const d2i_int64 wi = (((n * G + g) * K + u) * K + v) * Ho * Wo + i * Wo + j;
      const d2i_int64 xi = ((n * C + c) * H + y) * W + xx;
      s += static_cast<acc_t>(d2i_load(w + wi)) * static_cast<acc_t>(d2i_load(x + xi));
    }
  }
  d2i_store(out + idx, s);
}

template <typename T>
__device__ __forceinline__ void naive_grad_input_impl(const T* go, const T* w, T* gx, int C, int G,
                                                      int H, int W, int Ho, int Wo, int K, int S,
                                                      int pad, int dil, d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int xx = static_cast<int>(idx % W);
  const int y = static_cast<int>((idx / W) % H);
  const int c = static_cast<int>((idx / (static_cast<d2i_int64>(W) * H)) % C);
  const d2i_int64 n = idx / (static_cast<d2i_int64>(W) * H * C);
  const int g = c / (C / G);
  acc_t s = acc_t(0);
  for (int u = 0; u < K; ++u) {
    const int ti = y + pad - u * dil;
    if (ti < 0 || ti % S != 0 || ti / S >= Ho) continue;
    const int i = ti / S;
    for (int v = 0; v < K; ++v) {
      const int tj = xx + pad - v * dil;
      if (tj < 0 || tj % S != 0 || tj / S >= Wo) continue;
      const int j = tj / S;
      const d2i_int64 wi = (((n * G + g) * K + u) * K + v) * Ho * Wo + i * Wo + j;
      const d2i_int64 oi = ((n * C + c) * Ho + i) * Wo + j;
      s += static_cast<acc_t>(d2i_load(w + wi)) * static_cast<acc_t>(d2i_load(go + oi));
    }
  }
  d2i_store(gx + idx, s);
}

template <typename T>
__device__ __forceinline__ void naive_grad_weight_impl(const T* go, const T* x, T* gw, int C,
                                                       int G, int H, int W, int Ho, int Wo, int K,
                                                       int S, int pad, int dil, d2i_int64 total) {
  typedef typename Acc<T>::type acc_t;
  const d2i_int64 idx = static_cast<d2i_int64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int j = static_cast<int>(idx % Wo);
  const int i = static_cast<int>((idx / Wo) % Ho);
  const int v = static_cast<int>((idx / (static_cast<d2i_int64>(Wo) * Ho)) % K);
  const int u = static_cast<int>((idx / (static_cast<d2i_int64>(Wo) * Ho * K)) % K);
  const d2i_int64 ng = idx / (static_cast<d2i_int64>(Wo) * Ho * K * K);
  const int g = static_cast<int>(ng % G);
  const d2i_int64 n = ng / G;
  const int y = i * S - pad + u * dil, xx = j * S - pad + v * dil;
  acc_t s = acc_t(0);
  if (y >= 0 && y < H && xx >= 0 && xx < W) {
    const int cpg = C / G;
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
      const d2i_int64 oi = ((n * C + c) * Ho + i) * Wo + j;
      const d2i_int64 xi = ((n * C + c) * H + y) * W + xx;
      s += static_cast<acc_t>(d2i_load(go + oi)) * static_cast<acc_t>(d2i_load(x + xi));
    }
  }
  d2i_store(gw + idx, s);
}

#if defined(D2I_T)
extern "C" __global__ void __launch_bounds__(256)
    involution_naive_forward(const D2I_T* x, const D2I_T* w, D2I_T* out, int C, int G, int H,
                             int W, int Ho, int Wo, int K, int S, int pad, int dil,
                             d2i_int64 total) {
  naive_forward_impl<D2I_T>(x, w, out, C, G, H, W, Ho, Wo, K, S, pad, dil, total);
}

extern "C" __global__ void __launch_bounds__(256)
    involution_naive_grad_input(const D2I_T* go, const D2I_T* w, D2I_T* gx, int C, int G, int H,
                                int W, int Ho, int Wo, int K, int S, int pad, int dil,
                                d2i_int64 total) {
  naive_grad_input_impl<D2I_T>(go, w, gx, C, G, H, W, Ho, Wo, K, S, pad, dil, total);
}

extern "C" __global__ void __launch_bounds__(256)
    involution_naive_grad_weight(const D2I_T* go, const D2I_T* x, D2I_T* gw, int C, int G, int H,
                                 int W, int Ho, int Wo, int K, int S, int pad, int dil,
                                 d2i_int64 total) {
  naive_grad_weight_impl<D2I_T>(go, x, gw, C, G, H, W, Ho, Wo, K, S, pad, dil, total);
}
#endif
