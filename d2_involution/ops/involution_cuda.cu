// Involution CUDA kernels designed for Hopper: forward, grad-input and grad-weight, NCHW and NHWC.
//
// x (N, C, H, W), weight (N, G, K, K, Ho, Wo), out (N, C, Ho, Wo); g(c) = c / (C / G).
// NCHW kernels take contiguous tensors; NHWC kernels take channels_last x / grad_out / grad_x
// and the weight as the channels_last (N, G*K*K, Ho, Wo) tensor a kernel generator produces
// ([n][i][j][g*K*K + u*K + v]), so channels_last models need no layout copy.
// Compiled by cuda_kernel.py with NVRTC once per (dtype, K, stride, dilation): -DD2I_T, -DD2I_K,
// -DD2I_S, -DD2I_D (default 1); sizes and padding are kernel arguments. involution_tile.cuh has
// the tiles, the register-window compute and the launch configuration of forward and
// grad-input (next to FwdCfg and GradInputCfg); grad-weight's is next to GradWeightCfg below.
// Each kernel exports its launch configuration as <kernel>_config = {threads, tile rows,
// tile columns, channel chunks a block, dynamic shared memory bytes, channels a chunk}; the host
// reads it from the module, so the numbers live here only.
//
// Every kernel is deterministic: each output element is written once, by one thread, which sums
// its terms in a fixed order (grad-input gathers, grad-weight reduces a group's channels in
// registers); there are no atomics.
//
// Args of every kernel: (in0, in1, in2, in3, out, N, C, G, H, W, Ho, Wo, pad, Cr, flags); flags
// bit 0: NHWC channel runs aligned for 16-byte loads. Unused pointers are null.
#include "involution_tile.cuh"

#ifndef D2I_D
#define D2I_D 1
#endif

namespace d2i {

// Weights read from the weight tensor for forward: the K x P weights of tap row u at the
// thread's outputs (i, j0 + q). NCHW: P consecutive values a tap, taps H*W apart; NHWC: the
// K*K*G weights of a pixel contiguous, taps adjacent.
template <typename T, int K_, int S_, int D_, int P, int LAYOUT>
struct LoadedForwardWeights {
  static constexpr int K = K_, S = S_, D = D_;
  typedef typename Acc<T>::type A;
  const T* w;
  int G, Ho, Wo;
  const T* base;
  int step[K > P ? K : P];  // NCHW: tap v's plane offset v*Ho*Wo; NHWC: output q's q*G*K*K
  unsigned int qmask;
  __device__ __forceinline__ void start(int n, int g, int i, int j0, unsigned int mask) {
    qmask = mask;
    const int pitch = LAYOUT == kNCHW ? Ho * Wo : G * K * K;
#pragma unroll
    for (int k = 0; k < (K > P ? K : P); ++k) step[k] = k * pitch;
    if (LAYOUT == kNCHW) {
      base = w + (static_cast<d2i_int64>(n) * G + g) * (K * K) * Ho * Wo + i * Wo + j0;
    } else {
      base = w + ((static_cast<d2i_int64>(n) * Ho + i) * Wo + j0) * (G * K * K) + g * K * K;
    }
    base = d2i_opaque(base);
  }
  // One 64-bit pointer a tap (NCHW) or an output (NHWC); the rest are immediate offsets.
  __device__ __forceinline__ void row(int u, A (&wr)[K][P]) const {
    const T* wu = base + (LAYOUT == kNCHW ? u * K * (Ho * Wo) : u * K);
    if (LAYOUT == kNCHW) {
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const T* wv = d2i_opaque(wu + step[v]);
#pragma unroll
        for (int q = 0; q < P; ++q) {
          if ((qmask >> q) & 1u) wr[v][q] = d2i_load(wv + q);
        }
      }
    } else {
#pragma unroll
      for (int q = 0; q < P; ++q) {
        const T* wq = d2i_opaque(wu + step[q]);
        if ((qmask >> q) & 1u) {
#pragma unroll
          for (int v = 0; v < K; ++v) wr[v][q] = d2i_load(wq + v);
        }
      }
    }
  }
};

// Weights for grad-input: w(u, v, i, nb + q + (PX - v*D)/S), zero outside the output plane.
// NCHW: one 64-bit pointer a tap (32-bit plane offsets), window columns immediate; NHWC: one a
// window column (32-bit pixel offsets), taps immediate.
template <typename T, int K_, int S_, int D_, int P, int R, int LAYOUT>
struct LoadedGradInputWeights {
  static constexpr int K = K_, S = S_, D = D_, L = P + R;
  typedef typename Acc<T>::type A;
  const T* w;
  int G, Ho, Wo;
  const T* base;  // weight (n, g), column nb - R
  int step[K > L ? K : L];
  unsigned int colmask;
  __device__ __forceinline__ void start(int n, int g, int nb) {
    colmask = window_mask<L>(nb - R, Wo);
    const int pitch = LAYOUT == kNCHW ? Ho * Wo : G * K * K;
#pragma unroll
    for (int k = 0; k < (K > L ? K : L); ++k) step[k] = k * pitch;
    if (LAYOUT == kNCHW) {
      base = w + (static_cast<d2i_int64>(n) * G + g) * (K * K) * Ho * Wo + (nb - R);
    } else {
      base = w + (static_cast<d2i_int64>(n) * Ho * Wo + (nb - R)) * (G * K * K) + g * K * K;
    }
    base = d2i_opaque(base);
  }
  template <int PX>
  __device__ __forceinline__ void row(int u, int i, A (&wr)[K][P]) const {
    const T* wu = LAYOUT == kNCHW ? base + u * K * (Ho * Wo) + i * Wo
                                  : base + static_cast<d2i_int64>(i) * Wo * (G * K * K) + u * K;
    const T* wl[L];  // NHWC: window column l
    if (LAYOUT == kNHWC) {
#pragma unroll
      for (int l = 0; l < L; ++l) wl[l] = d2i_opaque(wu + step[l]);
    }
#pragma unroll
    for (int v = 0; v < K; ++v) {
      if ((PX - v * D) % S == 0) {
        const T* wv = LAYOUT == kNCHW ? d2i_opaque(wu + step[v]) : wu;
#pragma unroll
        for (int q = 0; q < P; ++q) {
          const int l = q + R + (PX - v * D) / S;
          const bool in = (colmask >> l) & 1u;
          wr[v][q] = in ? d2i_load(LAYOUT == kNCHW ? wv + l : wl[l] + v) : A(0);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Grad-weight: gw[n, g, u, v, i, j] = sum_{c in g} go[n, c, i, j] * x[n, c, i*S + u*D - p, j*S + v*D - p].
//
// Launch: K * 32 threads (K warps: warp u owns tap row u, so K = 7 gives 224 threads, a whole
// number of warps for every odd K); a block owns an 8 x 8 output tile of one (image, group), its
// 32 pixel threads P = 2 consecutive outputs each. Per channel a thread reads its x window of
// (P-1)*S + (K-1)*D + 1 values and its P grad_out values from shared memory and does K * P
// multiply-adds into K * P register sums, which it writes once at the end (deterministic, no
// cross-thread reduction). The group's channels go through shared memory CH at a time (x tile
// with halo + grad_out tile), CH chosen so that enough blocks share an SM for 16 warps
// (K = 7: three 7-warp blocks, <= 74 KB each; the sums need few registers); grid =
// (tiles, G, N).
template <typename T, int K, int S, int D>
struct GradWeightCfg {
  typedef typename Acc<T>::type A;
  static constexpr int NT = 32 * K, P = 2, TX = 4, TH = 8, TW = TX * P;
  static constexpr int FH = (TH - 1) * S + (K - 1) * D + 1, FW = (TW - 1) * S + (K - 1) * D + 1;
  static constexpr int L = (P - 1) * S + (K - 1) * D + 1, VW = SharedVec<A>::value;
  static constexpr int LPAD = round_up(L, VW);
  static constexpr int PITCH = round_up(max2(FW, (TX - 1) * P * S + LPAD), VW);
  static constexpr int XS = odd_units(FH * PITCH, VW), GS = odd_units(TH * TW, VW);
  static constexpr int BLOCKS = cdiv(16, K);  // blocks an SM for 16 warps
  static constexpr int CH = fit_channels(16, 1, (XS + GS) * int(sizeof(A)) + 4, smem_budget(BLOCKS));
  static constexpr int SMEM = CH * ((XS + GS) * int(sizeof(A)) + 4);
  static constexpr bool FITS = SMEM <= kSmemMaxBlock;
};

template <int LAYOUT, typename T, typename OutT, int K, int S, int D>
__device__ __forceinline__ void grad_weight_tile(const T* __restrict__ go,
                                                 const T* __restrict__ x, OutT* __restrict__ gw,
                                                 int C, int G, int H, int W, int Ho, int Wo,
                                                 int pad, bool vec16) {
  typedef GradWeightCfg<T, K, S, D> Cfg;
  typedef typename Cfg::A A;
  constexpr int P = Cfg::P, CH = Cfg::CH, XS = Cfg::XS, GS = Cfg::GS, PITCH = Cfg::PITCH;
  A* xt = shared_tile<A>();
  A* gt = xt + CH * XS;
  int* chan = reinterpret_cast<int*>(gt + CH * GS);
  const int cpg = C / G, g = blockIdx.y, n = blockIdx.z;
  const int tiles_w = cdiv(Wo, Cfg::TW);
  const int ti0 = (blockIdx.x / tiles_w) * Cfg::TH, tj0 = (blockIdx.x % tiles_w) * Cfg::TW;
  const int t = threadIdx.x, u = t / 32, pt = t % 32, tx = pt % Cfg::TX, ty = pt / Cfg::TX;
  const int i = ti0 + ty, j0 = tj0 + tx * P;
  const d2i_int64 x_image = static_cast<d2i_int64>(n) * C * H * W;
  const d2i_int64 go_image = static_cast<d2i_int64>(n) * C * Ho * Wo;
  A acc[K][P];
#pragma unroll
  for (int v = 0; v < K; ++v) {
#pragma unroll
    for (int q = 0; q < P; ++q) acc[v][q] = A(0);
  }
  const A* xs = xt + (ty * S + u * D) * PITCH + tx * P * S;
  const A* gs = gt + ty * Cfg::TW + tx * P;
  for (int ch0 = 0; ch0 < cpg; ch0 += CH) {
    const int nc = min2(CH, cpg - ch0);
    if (ch0 > 0) __syncthreads();  // the previous channels are consumed
    for (int s = t; s < CH; s += Cfg::NT) chan[s] = s < nc ? g * cpg + ch0 + s : -1;
    __syncthreads();
    if (LAYOUT == kNCHW) {
      fill_nchw<Cfg::NT, Cfg::FH, Cfg::FW, PITCH, XS>(xt, chan, nc, x + x_image, H, W,
                                                      ti0 * S - pad, tj0 * S - pad);
      fill_nchw<Cfg::NT, Cfg::TH, Cfg::TW, Cfg::TW, GS>(gt, chan, nc, go + go_image, Ho, Wo, ti0,
                                                        tj0);
    } else {
      fill_nhwc_any<Cfg::NT, CH, Cfg::FH, Cfg::FW, PITCH, XS>(xt, chan, x + x_image, C, H, W,
                                                              ti0 * S - pad, tj0 * S - pad, vec16);
      fill_nhwc_any<Cfg::NT, CH, Cfg::TH, Cfg::TW, Cfg::TW, GS>(gt, chan, go + go_image, C, Ho,
                                                                Wo, ti0, tj0, vec16);
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < nc; ++c) {
      A win[Cfg::LPAD];
      load_window<Cfg::LPAD, Cfg::VW>(xs + c * XS, win);
      const d2i_vec<A, P> gv = d2i_lds_vec<P>(gs + c * GS);
#pragma unroll
      for (int v = 0; v < K; ++v) {
#pragma unroll
        for (int q = 0; q < P; ++q) acc[v][q] += gv.v[q] * win[q * S + v * D];
      }
    }
  }
  if (i >= Ho) return;
#pragma unroll
  for (int q = 0; q < P; ++q) {
    if (j0 + q < Wo) {
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int k = u * K + v;
        const d2i_int64 at =
            LAYOUT == kNCHW
                ? ((static_cast<d2i_int64>(n) * G + g) * (K * K) + k) * Ho * Wo + i * Wo + j0 + q
                : ((static_cast<d2i_int64>(n) * Ho + i) * Wo + j0 + q) * (G * K * K) + g * K * K +
                      k;
        d2i_store(gw + at, acc[v][q]);
      }
    }
  }
}

}  // namespace d2i

#if defined(D2I_T) && defined(D2I_K) && defined(D2I_S)
typedef d2i::FwdCfg<D2I_T, D2I_K, D2I_S, D2I_D> d2i_fwd;
typedef d2i::GradInputCfg<D2I_T, D2I_K, D2I_S, D2I_D> d2i_gin;
typedef d2i::GradWeightCfg<D2I_T, D2I_K, D2I_S, D2I_D> d2i_gwt;
typedef Acc<D2I_T>::type d2i_acc;
#define D2I_ARGS                                                                              \
  const D2I_T *in0, const D2I_T *in1, const D2I_T *in2, const D2I_T *in3, D2I_T *out, int N,   \
      int C, int G, int H, int W, int Ho, int Wo, int pad, int Cr, int flags
#define D2I_CONFIG(name, threads, rows, cols, chunks, smem, channels)               \
  extern "C" __constant__ int name##_config[6] = {threads, rows, cols, chunks, \
                                                  (smem) * (d2i_fits), channels};

#define d2i_fits d2i_fwd::TileT::FITS
D2I_CONFIG(involution_forward_nchw, d2i_fwd::NT, d2i_fwd::TH, d2i_fwd::TW, d2i_fwd::CT,
           d2i_fwd::TileT::SMEM, d2i_fwd::TileT::CB)
D2I_CONFIG(involution_forward_nhwc, d2i_fwd::NT, d2i_fwd::TH, d2i_fwd::TW, d2i_fwd::CT,
           d2i_fwd::TileT::SMEM, d2i_fwd::TileT::CB)
#undef d2i_fits
#define d2i_fits d2i_gin::TileT::FITS
D2I_CONFIG(involution_grad_input_nchw, d2i_gin::NT, d2i_gin::TH, d2i_gin::TW, d2i_gin::CT,
           d2i_gin::TileT::SMEM, d2i_gin::TileT::CB)
D2I_CONFIG(involution_grad_input_nhwc, d2i_gin::NT, d2i_gin::TH, d2i_gin::TW, d2i_gin::CT,
           d2i_gin::TileT::SMEM, d2i_gin::TileT::CB)
#undef d2i_fits
#define d2i_fits d2i_gwt::FITS
D2I_CONFIG(involution_grad_weight_nchw, d2i_gwt::NT, d2i_gwt::TH, d2i_gwt::TW, 1, d2i_gwt::SMEM,
           d2i_gwt::CH)
D2I_CONFIG(involution_grad_weight_nhwc, d2i_gwt::NT, d2i_gwt::TH, d2i_gwt::TW, 1, d2i_gwt::SMEM,
           d2i_gwt::CH)
D2I_CONFIG(involution_grad_weight_acc_nchw, d2i_gwt::NT, d2i_gwt::TH, d2i_gwt::TW, 1,
           d2i_gwt::SMEM, d2i_gwt::CH)
D2I_CONFIG(involution_grad_weight_acc_nhwc, d2i_gwt::NT, d2i_gwt::TH, d2i_gwt::TW, 1,
           d2i_gwt::SMEM, d2i_gwt::CH)
#undef d2i_fits

#define D2I_FORWARD(name, layout)                                                              \
  extern "C" __global__ void __launch_bounds__(d2i_fwd::NT, 4) name(D2I_ARGS) {               \
    if constexpr (d2i_fwd::TileT::FITS) {                                                       \
      d2i::LoadedForwardWeights<D2I_T, D2I_K, D2I_S, D2I_D, d2i_fwd::P, layout> wsrc{in1, G, Ho, \
                                                                                     Wo};      \
      d2i::forward_tile<layout, d2i_fwd>(in0, out, wsrc, C, G, H, W, Ho, Wo, pad, flags & 1);  \
    }                                                                                           \
  }
D2I_FORWARD(involution_forward_nchw, d2i::kNCHW)
D2I_FORWARD(involution_forward_nhwc, d2i::kNHWC)

#define D2I_GRAD_INPUT(name, layout)                                                            \
  extern "C" __global__ void __launch_bounds__(d2i_gin::NT, 4) name(D2I_ARGS) {                \
    if constexpr (d2i_gin::TileT::FITS) {                                                        \
      d2i::LoadedGradInputWeights<D2I_T, D2I_K, D2I_S, D2I_D, d2i_gin::P, d2i_gin::R, layout>    \
          wsrc{in1, G, Ho, Wo};                                                                  \
      d2i::grad_input_tile<layout, d2i_gin>(in0, out, wsrc, C, G, H, W, Ho, Wo, pad, flags & 1); \
    }                                                                                            \
  }
D2I_GRAD_INPUT(involution_grad_input_nchw, d2i::kNCHW)
D2I_GRAD_INPUT(involution_grad_input_nhwc, d2i::kNHWC)

// The _acc variants write the weight gradient in the accumulator type (the fused backward
// projects it further, so it is not rounded to fp16/bf16 on the way).
#define D2I_GRAD_WEIGHT(name, layout, out_t)                                                    \
  extern "C" __global__ void __launch_bounds__(d2i_gwt::NT, d2i_gwt::BLOCKS) name(D2I_ARGS) {\
    if constexpr (d2i_gwt::FITS) {                                                               \
      d2i::grad_weight_tile<layout, D2I_T, out_t, D2I_K, D2I_S, D2I_D>(                          \
          in0, in1, reinterpret_cast<out_t*>(out), C, G, H, W, Ho, Wo, pad, flags & 1);          \
    }                                                                                            \
  }
D2I_GRAD_WEIGHT(involution_grad_weight_nchw, d2i::kNCHW, D2I_T)
D2I_GRAD_WEIGHT(involution_grad_weight_nhwc, d2i::kNHWC, D2I_T)
D2I_GRAD_WEIGHT(involution_grad_weight_acc_nchw, d2i::kNCHW, d2i_acc)
D2I_GRAD_WEIGHT(involution_grad_weight_acc_nhwc, d2i::kNHWC, d2i_acc)
#endif
