// Shared-memory tiles and the register-window compute of the involution kernels
// (involution_cuda.cu, involution_fused.cu).
//
// Geometry (K, stride S, dilation D) is compile-time, so every tap offset below is an immediate.
// A block stages a tile of one image in shared memory, in the accumulator type, zero-filled
// where it lies outside the plane (no per-tap predicates afterwards), as planes of
// [row][col] (row pitch PITCH), one plane a channel slot, SS elements apart. Threads then read
// windows of a tile row into registers with 8- or 16-byte loads and reuse each value for the K
// taps that hit it.
#pragma once
#include "involution_common.cuh"

// The block's dynamic shared memory (sized by the launch: the kernel's exported configuration).
extern __shared__ __align__(16) unsigned char d2i_smem[];

namespace d2i {

enum Layout { kNCHW = 0, kNHWC = 1 };

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return cdiv(a, b) * b; }
__host__ __device__ constexpr int max2(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int min2(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// Shared memory of one SM and the runtime's reserve per block (sm_90: 228 KB, 1 KB), the most
// a block may ask for (227 KB), and what a block may use when four (or `blocks`) share an SM.
constexpr int kSmemPerSM = 233472, kSmemReserved = 1024, kSmemMaxBlock = 232448;
__host__ __device__ constexpr int smem_budget(int blocks) { return kSmemPerSM / blocks - kSmemReserved; }

// Elements a shared vector load moves: 8 bytes of fp32 (LDS.64), 16 bytes of fp64 (LDS.128).
template <typename A>
struct SharedVec {
  static constexpr int value = 2;
};

// A plane stride whose length in vector units is odd: consecutive channel slots, read by
// consecutive threads, fall into different banks.
__host__ __device__ constexpr int odd_units(int elements, int vw) {
  return (elements / vw) % 2 == 1 ? elements : elements + vw;
}

// The largest channel count c <= cmax (at least 1) whose tile fits `budget` bytes, given the
// bytes one channel slot takes for each of `ways` thread groups and a fixed overhead per slot.
__host__ __device__ constexpr int fit_channels(int cmax, int ways, int slot_bytes, int budget) {
  return cmax <= 1 || ways * cmax * slot_bytes <= budget
             ? (cmax < 1 ? 1 : cmax)
             : fit_channels(cmax - 1, ways, slot_bytes, budget);
}

// The tile a block stages: FH rows of FW columns a channel slot, read by TX threads a row whose
// windows of L values start STEP columns apart. CT thread groups each own CB channel slots.
template <typename A, int FH, int FW, int L, int STEP, int TX, int CT, int CBMAX>
struct Tile {
  static constexpr int VW = SharedVec<A>::value;
  static constexpr int LPAD = round_up(L, VW);  // window values actually loaded
  static constexpr int PITCH = round_up(max2(FW, (TX - 1) * STEP + LPAD), VW);
  static constexpr int SS = odd_units(FH * PITCH, VW);
  static constexpr int SLOT_BYTES = SS * int(sizeof(A)) + int(sizeof(int));
  static constexpr int CB = fit_channels(CBMAX, CT, SLOT_BYTES, smem_budget(4));
  static constexpr int SLOTS = CT * CB;
  static constexpr int SMEM = SLOTS * SLOT_BYTES;  // the tile, then one channel index a slot
  static constexpr bool FITS = SMEM <= kSmemMaxBlock;
};

template <typename A>
__device__ __forceinline__ A* shared_tile() {
  return reinterpret_cast<A*>(d2i_smem);
}

// Loads L consecutive shared values (LPAD, a multiple of VW, actually read) starting at p.
template <int LPAD, int VW, typename A>
__device__ __forceinline__ void load_window(const A* p, A (&win)[LPAD]) {
#pragma unroll
  for (int k = 0; k < LPAD; k += VW) {
    const d2i_vec<A, VW> v = d2i_lds_vec<VW>(p + k);
#pragma unroll
    for (int e = 0; e < VW; ++e) win[k + e] = v.v[e];
  }
}

// ---------------------------------------------------------------------------------------------
// Tile fills. chan[s] is the channel held by slot s (-1: none, zeros). The tile's origin is
// (row0, col0) in a plane of Hs x Ws; whatever falls outside the plane is zero.

// NCHW source: one work item per (slot, row, run of up to 8 columns), loaded with immediate
// offsets (short runs keep few loads in flight, i.e. few registers).
template <int NT, int FH, int FW, int PITCH, int SS, typename A, typename T>
__device__ __forceinline__ void fill_nchw(A* tile, const int* chan, int slots, const T* src,
                                          int Hs, int Ws, int row0, int col0) {
  constexpr int RUN = 8, RUNS = cdiv(FW, RUN);
#pragma unroll 1
  for (int item = threadIdx.x; item < slots * FH * RUNS; item += NT) {
    const int sr = item / RUNS, k0 = (item - sr * RUNS) * RUN;
    const int s = sr / FH, r = sr - s * FH;
    const int c = chan[s], y = row0 + r;
    A* dst = tile + s * SS + r * PITCH + k0;
    const bool row_in = c >= 0 && y >= 0 && y < Hs;
    const T* row = src + (static_cast<d2i_int64>(row_in ? c : 0) * Hs + y) * Ws + col0 + k0;
#pragma unroll
    for (int k = 0; k < RUN; ++k) {
      const int x = col0 + k0 + k;
      if (k0 + k < FW) d2i_sts(dst + k, row_in && x >= 0 && x < Ws ? d2i_load(row + k) : A(0));
    }
  }
}

// NHWC source (channels contiguous, C of them a pixel): one work item per (pixel, slot), slots
// fastest so that a warp reads consecutive channels.
template <int NT, int SLOTS, int FH, int FW, int PITCH, int SS, typename A, typename T>
__device__ __forceinline__ void fill_nhwc(A* tile, const int* chan, const T* src, int C, int Hs,
                                          int Ws, int row0, int col0) {
#pragma unroll 1
  for (int item = threadIdx.x; item < SLOTS * FH * FW; item += NT) {
    const int s = item % SLOTS, pix = item / SLOTS;
    const int r = pix / FW, k = pix - (pix / FW) * FW;
    const int c = chan[s], y = row0 + r, x = col0 + k;
    const bool in = c >= 0 && y >= 0 && y < Hs && x >= 0 && x < Ws;
    const T* p = src + (static_cast<d2i_int64>(y) * Ws + x) * C + c;
    d2i_sts(tile + s * SS + r * PITCH + k, in ? static_cast<A>(d2i_load(p)) : A(0));
  }
}

// NHWC source whose slots hold consecutive channels in runs of V = 16 / sizeof(T), each run
// starting at a multiple of V (the host checks C, the channel runs and the pointer alignment):
// one 16-byte load a work item.
template <int NT, int SLOTS, int FH, int FW, int PITCH, int SS, typename A, typename T>
__device__ __forceinline__ void fill_nhwc16(A* tile, const int* chan, const T* src, int C,
                                            int Hs, int Ws, int row0, int col0) {
  constexpr int V = 16 / sizeof(T), RUNS = SLOTS / V;
#pragma unroll 1
  for (int item = threadIdx.x; item < RUNS * FH * FW; item += NT) {
    const int s = (item % RUNS) * V, pix = item / RUNS;
    const int r = pix / FW, k = pix - (pix / FW) * FW;
    const int c = chan[s], y = row0 + r, x = col0 + k;
    A* dst = tile + s * SS + r * PITCH + k;
    if (c >= 0 && y >= 0 && y < Hs && x >= 0 && x < Ws) {
      const d2i_vec<T, V> v = d2i_load16(src + (static_cast<d2i_int64>(y) * Ws + x) * C + c);
#pragma unroll
      for (int e = 0; e < V; ++e) d2i_sts(dst + e * SS, static_cast<A>(d2i_to_acc(v.v[e])));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) d2i_sts(dst + e * SS, A(0));
    }
  }
}

// Either NHWC fill: the vector one when the host found the channel runs aligned (vec16).
template <int NT, int SLOTS, int FH, int FW, int PITCH, int SS, typename A, typename T>
__device__ __forceinline__ void fill_nhwc_any(A* tile, const int* chan, const T* src, int C,
                                              int Hs, int Ws, int row0, int col0, bool vec16) {
  if (SLOTS % (16 / sizeof(T)) == 0 && vec16) {
    fill_nhwc16<NT, SLOTS, FH, FW, PITCH, SS>(tile, chan, src, C, Hs, Ws, row0, col0);
  } else {
    fill_nhwc<NT, SLOTS, FH, FW, PITCH, SS>(tile, chan, src, C, Hs, Ws, row0, col0);
  }
}

// The channel of each slot of a block whose CT thread groups own channel chunks
// chunk0 .. chunk0 + CT - 1 (CB channels each; a group's last chunk may be short).
template <int CB, int SLOTS>
__device__ __forceinline__ void chunk_channels(int* chan, int chunk0, int n_chunks, int cpc,
                                               int cpg) {
  for (int s = threadIdx.x; s < SLOTS; s += blockDim.x) {
    const int chunk = chunk0 + s / CB, b = s % CB;
    const int g = chunk / cpc, first = (chunk - g * cpc) * CB;
    chan[s] = chunk < n_chunks && first + b < cpg ? g * cpg + first + b : -1;
  }
}

// ---------------------------------------------------------------------------------------------
// The aggregation: acc[c][q] += wr[v][q] * x[c][q * S + v * D] over one tap row u, for CB
// channel slots (SS apart) and P outputs along the row; xr points at the thread's window.
template <int K, int S, int D, int P, int CB, int SS, int LPAD, int VW, typename A>
__device__ __forceinline__ void aggregate_row(const A* xr, const A (&wr)[K][P],
                                              A (&acc)[CB][P]) {
#pragma unroll
  for (int c = 0; c < CB; ++c) {
    A win[LPAD];
    load_window<LPAD, VW>(xr + c * SS, win);
#pragma unroll
    for (int v = 0; v < K; ++v) {
#pragma unroll
      for (int q = 0; q < P; ++q) acc[c][q] += wr[v][q] * win[q * S + v * D];
    }
  }
}

// Stores acc[c][q] (channels c0 + c < c0 + nc, outputs whose bit is set in qmask) of row i,
// columns j0 + q * JS + jofs, of an (N, C, Hs, Ws) output in either layout.
template <int LAYOUT, int P, int CB, typename T, typename A>
__device__ __forceinline__ void store_outputs(T* out, const A (&acc)[CB][P], int n, int C, int c0,
                                              int nc, int Hs, int Ws, int i, int j0, int js,
                                              unsigned int qmask) {
#pragma unroll
  for (int c = 0; c < CB; ++c) {
#pragma unroll
    for (int q = 0; q < P; ++q) {
      if (c < nc && ((qmask >> q) & 1u)) {
        const int j = j0 + q * js;
        const d2i_int64 at =
            LAYOUT == kNCHW
                ? ((static_cast<d2i_int64>(n) * C + c0 + c) * Hs + i) * Ws + j
                : ((static_cast<d2i_int64>(n) * Hs + i) * Ws + j) * C + c0 + c;
        d2i_store(out + at, acc[c][q]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: out[n, c, i, j] = sum_{u,v} w(n, g, u, v, i, j) * x[n, c, i*S + u*D - p, j*S + v*D - p].
//
// Launch (cuda_kernel.py reads FwdCfg through the kernel's *_config array): 128 threads; a block
// owns an 8 x 8 output tile of one image and CT = 8 channel chunks of CB channels (CB = 8 for
// fp32/fp16/bf16, 2 for fp64, fewer where the tile would not fit). Thread (ct, tx, ty) computes
// P = 4 consecutive outputs of row ty for its CB channels: per tap row u it takes its K x P
// weights into registers, then per channel one window of (P-1)*S + (K-1)*D + 1 inputs, which it
// reuses for all K * P multiply-adds (each weight serves CB channels, each input K taps). The
// tile in shared memory (fp32 for the half types) is sized so that four blocks share an SM
// (16 warps: <= 128 registers a thread and <= 56 KB a block); grid = (tiles, chunk blocks, N).
template <typename T, int K, int S, int D, int CBMAX64 = 3>
struct FwdCfg {
  typedef typename Acc<T>::type A;
  static constexpr int NT = 128, P = 4, TX = 2, TH = 8, TW = TX * P, CT = NT / (TX * TH);
  static constexpr int FH = (TH - 1) * S + (K - 1) * D + 1, FW = (TW - 1) * S + (K - 1) * D + 1;
  static constexpr int L = (P - 1) * S + (K - 1) * D + 1;
  typedef Tile<A, FH, FW, L, P * S, TX, CT, sizeof(A) == 8 ? CBMAX64 : 8> TileT;
};

// WSRC supplies the weights of a tap row: WSRC::row(u, wr) fills wr[v][q] for the thread's
// outputs (the loaded weights of involution_cuda.cu or the generated ones of involution_fused.cu).
template <int LAYOUT, typename Cfg, typename WSRC, typename T>
__device__ __forceinline__ void forward_tile(const T* __restrict__ x, T* __restrict__ out,
                                             WSRC& wsrc, int C, int G, int H, int W, int Ho,
                                             int Wo, int pad, bool vec16) {
  typedef typename Cfg::A A;
  typedef typename Cfg::TileT TL;
  constexpr int K = WSRC::K, S = WSRC::S, D = WSRC::D, P = Cfg::P, CB = TL::CB;
  A* tile = shared_tile<A>();
  int* chan = reinterpret_cast<int*>(tile + TL::SLOTS * TL::SS);
  const int cpg = C / G, cpc = cdiv(cpg, CB), n_chunks = G * cpc;
  const int n = blockIdx.z, chunk0 = blockIdx.y * Cfg::CT;
  const int tiles_w = cdiv(Wo, Cfg::TW);
  const int ti0 = (blockIdx.x / tiles_w) * Cfg::TH, tj0 = (blockIdx.x % tiles_w) * Cfg::TW;
  chunk_channels<CB, TL::SLOTS>(chan, chunk0, n_chunks, cpc, cpg);
  __syncthreads();
  const d2i_int64 image = static_cast<d2i_int64>(n) * C * H * W;
  if (LAYOUT == kNCHW) {
    fill_nchw<Cfg::NT, Cfg::FH, Cfg::FW, TL::PITCH, TL::SS>(tile, chan, TL::SLOTS, x + image, H, W,
                                                            ti0 * S - pad, tj0 * S - pad);
  } else {
    fill_nhwc_any<Cfg::NT, TL::SLOTS, Cfg::FH, Cfg::FW, TL::PITCH, TL::SS>(
        tile, chan, x + image, C, H, W, ti0 * S - pad, tj0 * S - pad, vec16);
  }
  __syncthreads();

  const int t = threadIdx.x, ct = t % Cfg::CT, pt = t / Cfg::CT;
  const int tx = pt % Cfg::TX, ty = pt / Cfg::TX;
  const int chunk = chunk0 + ct, i = ti0 + ty, j0 = tj0 + tx * P;
  if (chunk >= n_chunks || i >= Ho) return;  // no barrier follows
  const int g = chunk / cpc, c0 = g * cpg + (chunk - g * cpc) * CB;
  const int nc = min2(CB, (g + 1) * cpg - c0);
  unsigned int qmask = 0u;
#pragma unroll
  for (int q = 0; q < P; ++q) qmask |= (j0 + q < Wo ? 1u : 0u) << q;
  wsrc.start(n, g, i, j0, qmask);
  A acc[CB][P], wr[K][P];
#pragma unroll
  for (int c = 0; c < CB; ++c) {
#pragma unroll
    for (int q = 0; q < P; ++q) acc[c][q] = A(0);
  }
#pragma unroll
  for (int v = 0; v < K; ++v) {
#pragma unroll
    for (int q = 0; q < P; ++q) wr[v][q] = A(0);
  }
  const A* xs = tile + ct * CB * TL::SS + ty * S * TL::PITCH + tx * P * S;
#pragma unroll 1
  for (int u = 0; u < K; ++u) {
    wsrc.row(u, wr);
    aggregate_row<K, S, D, P, CB, TL::SS, TL::LPAD, TL::VW>(xs + u * D * TL::PITCH, wr, acc);
  }
  store_outputs<LAYOUT, P, CB>(out, acc, n, C, c0, nc, Ho, Wo, i, j0, 1, qmask);
}

// ---------------------------------------------------------------------------------------------
// Grad-input: gx[n, c, y, x] = sum over the taps (u, v) and outputs (i, j) with
// i*S = y + p - u*D and j*S = x + p - v*D of w(n, g, u, v, i, j) * go[n, c, i, j], as a gather
// (no atomics). Input pixels are split into S x S phases (py, px) with (y + p) % S = py,
// (x + p) % S = px: in phase coordinates m = (y + p) / S the outputs a tap reaches are
// i = m + (py - u*D) / S, a compile-time shift, and only taps with (py - u*D) % S == 0 reach
// the phase at all, so each phase is a stride-1 gather over its own compile-time set of taps.
//
// Launch: as the forward (128 threads, CT = 8 chunks of CB channels, P = 4 outputs along a row,
// four blocks an SM); a block owns an 8 x 8 tile in phase coordinates, i.e. an 8S x 8S input
// tile, and stages the grad_out tile it needs (R = (K-1)*D / S more rows and columns).
template <typename T, int K, int S, int D, int CBMAX64 = 3, int CBMAX32 = 8>
struct GradInputCfg {
  typedef typename Acc<T>::type A;
  static constexpr int NT = 128, P = 4, TX = 2, TH = 8, TW = TX * P, CT = NT / (TX * TH);
  static constexpr int R = (K - 1) * D / S, FH = TH + R, FW = TW + R, L = P + R;
  typedef Tile<A, FH, FW, L, P, TX, CT, sizeof(A) == 8 ? min2(CBMAX64, S > 1 ? 2 : 3) : min2(CBMAX32, S > 1 ? 6 : 8)>
      TileT;
  // The first tap row reaching phase row py and the step between such rows (K: none).
  __host__ __device__ static constexpr int first_tap(int phase, int k = 0) {
    return k >= K ? K : ((phase - k * D) % S == 0 ? k : first_tap(phase, k + 1));
  }
  static constexpr int STEP = S / gcd(S, D);
};

template <int V>
struct Const {
  static constexpr int value = V;
};

// One phase (PY, PX) of grad-input for the thread's outputs: phase row m, phase columns
// nb .. nb + P - 1, CB channels.
template <int PY, int PX, int LAYOUT, typename Cfg, typename WSRC, typename A, typename T>
__device__ __forceinline__ void grad_input_phase(const A* gs, WSRC& wsrc, T* gx, int n, int C,
                                                 int c0, int nc, int H, int W, int Ho, int m,
                                                 int nb, int pad) {
  typedef typename Cfg::TileT TL;
  constexpr int K = WSRC::K, S = WSRC::S, D = WSRC::D, P = Cfg::P, CB = TL::CB, R = Cfg::R;
  A acc[CB][P], wr[K][P];
#pragma unroll
  for (int c = 0; c < CB; ++c) {
#pragma unroll
    for (int q = 0; q < P; ++q) acc[c][q] = A(0);
  }
#pragma unroll 1
  for (int u = Cfg::first_tap(PY); u < K; u += Cfg::STEP) {
    const int cu = (PY - u * D) / S, i = m + cu;
    if (i < 0 || i >= Ho) continue;
    wsrc.template row<PX>(u, i, wr);
    const A* gr = gs + (R + cu) * TL::PITCH;
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      A win[TL::LPAD];
      load_window<TL::LPAD, TL::VW>(gr + c * TL::SS, win);
#pragma unroll
      for (int v = 0; v < K; ++v) {
        if ((PX - v * D) % S == 0) {
#pragma unroll
          for (int q = 0; q < P; ++q) acc[c][q] += wr[v][q] * win[q + R + (PX - v * D) / S];
        }
      }
    }
  }
  const int y = m * S + PY - pad, x0 = nb * S + PX - pad;
  if (y < 0 || y >= H) return;
  unsigned int qmask = 0u;
#pragma unroll
  for (int q = 0; q < P; ++q) qmask |= (x0 + q * S >= 0 && x0 + q * S < W ? 1u : 0u) << q;
  store_outputs<LAYOUT, P, CB>(gx, acc, n, C, c0, nc, H, W, y, x0, S, qmask);
}

template <int PH, int LAYOUT, typename Cfg, typename WSRC, typename A, typename T>
__device__ __forceinline__ void grad_input_phases(const A* gs, WSRC& wsrc, T* gx, int n, int C,
                                                  int c0, int nc, int H, int W, int Ho, int m,
                                                  int nb, int pad) {
  constexpr int S = WSRC::S;
  if constexpr (PH < S * S) {
    grad_input_phase<PH / S, PH % S, LAYOUT, Cfg>(gs, wsrc, gx, n, C, c0, nc, H, W, Ho, m, nb,
                                                  pad);
    grad_input_phases<PH + 1, LAYOUT, Cfg>(gs, wsrc, gx, n, C, c0, nc, H, W, Ho, m, nb, pad);
  }
}

// WSRC::start(n, g, m, nb) prepares the weights of phase row m, columns nb - R .. nb + P - 1;
// WSRC::row<PX>(u, i, wr) fills wr[v][q] = w(u, v, i, nb + q + (PX - v*D)/S) for the taps v of
// phase column PX, zero where that output lies outside the plane.
template <int LAYOUT, typename Cfg, typename WSRC, typename T>
__device__ __forceinline__ void grad_input_tile(const T* __restrict__ go, T* __restrict__ gx,
                                                WSRC& wsrc, int C, int G, int H, int W, int Ho,
                                                int Wo, int pad, bool vec16) {
  typedef typename Cfg::A A;
  typedef typename Cfg::TileT TL;
  constexpr int S = WSRC::S, P = Cfg::P, CB = TL::CB, R = Cfg::R;
  A* tile = shared_tile<A>();
  int* chan = reinterpret_cast<int*>(tile + TL::SLOTS * TL::SS);
  const int cpg = C / G, cpc = cdiv(cpg, CB), n_chunks = G * cpc;
  const int n = blockIdx.z, chunk0 = blockIdx.y * Cfg::CT;
  const int m_start = pad / S, n_start = pad / S;
  const int tiles_w = cdiv((W - 1 + pad) / S + 1 - n_start, Cfg::TW);
  const int m0 = m_start + (blockIdx.x / tiles_w) * Cfg::TH;
  const int n0 = n_start + (blockIdx.x % tiles_w) * Cfg::TW;
  chunk_channels<CB, TL::SLOTS>(chan, chunk0, n_chunks, cpc, cpg);
  __syncthreads();
  const d2i_int64 image = static_cast<d2i_int64>(n) * C * Ho * Wo;
  if (LAYOUT == kNCHW) {
    fill_nchw<Cfg::NT, Cfg::FH, Cfg::FW, TL::PITCH, TL::SS>(tile, chan, TL::SLOTS, go + image, Ho,
                                                            Wo, m0 - R, n0 - R);
  } else {
    fill_nhwc_any<Cfg::NT, TL::SLOTS, Cfg::FH, Cfg::FW, TL::PITCH, TL::SS>(
        tile, chan, go + image, C, Ho, Wo, m0 - R, n0 - R, vec16);
  }
  __syncthreads();

  const int t = threadIdx.x, ct = t % Cfg::CT, pt = t / Cfg::CT;
  const int tx = pt % Cfg::TX, ty = pt / Cfg::TX;
  const int chunk = chunk0 + ct, m = m0 + ty, nb = n0 + tx * P;
  if (chunk >= n_chunks || m * S - pad >= H) return;  // no barrier follows
  const int g = chunk / cpc, c0 = g * cpg + (chunk - g * cpc) * CB;
  const int nc = min2(CB, (g + 1) * cpg - c0);
  wsrc.start(n, g, nb);
  const A* gs = tile + ct * CB * TL::SS + ty * TL::PITCH + tx * P;
  grad_input_phases<0, LAYOUT, Cfg>(gs, wsrc, gx, n, C, c0, nc, H, W, Ho, m, nb, pad);
}

// The column-validity mask of a window of L outputs starting at column j (bit l: j + l in
// [0, Wo)).
template <int L>
__device__ __forceinline__ unsigned int window_mask(int j, int Wo) {
  unsigned int mask = 0u;
#pragma unroll
  for (int l = 0; l < L; ++l) mask |= (j + l >= 0 && j + l < Wo ? 1u : 0u) << l;
  return mask;
}

}  // namespace d2i
