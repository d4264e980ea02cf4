// CPU involution kernels: forward, grad-input, grad-weight, and the fused kernel generation
// (weights computed from the reduced features inside the aggregation), float and double, for
// NCHW and channels_last (NHWC) tensors.
//
// Built on first use by d2_involution/ops/cpu_kernel.py with the system C++ compiler and loaded
// with ctypes (plain C entry points, raw pointers, no PyTorch headers: needs only a C++ compiler).
// Layouts (dense, no other strides):
//   NCHW: x (N, C, H, W), weight (N, G, K, K, Ho, Wo), out (N, C, Ho, Wo)
//   NHWC: x (N, H, W, C), weight (N, Ho, Wo, G, K, K), out (N, Ho, Wo, C)
//   fused: reduced (N, R, Ho, Wo) / (N, Ho, Wo, R); gen_weight (K*K*G, R); gen_bias (K*K*G)
//   with generated weight[n, g, u, v, i, j] = gen_bias[gk] + sum_r gen_weight[gk, r] *
//   reduced[n, r, i, j], gk = (g * K + u) * K + v.
//
// Vectorisation (GCC/Clang vector extensions, 32-byte vectors: AVX2 + FMA with -march=native,
// split into two 16-byte halves elsewhere; 64-byte ones for two NHWC kernels, see kWideBytes):
// * NCHW: vectors run along an output row (L = 8 floats / 4 doubles of consecutive pixels) and a
//   block of up to 8 channels of one group is accumulated in registers, so each tap costs one
//   weight vector load for up to 8 multiply-adds, each with one unaligned load of x. x is first
//   copied into a zero-padded per-task tile split into `stride` column phases, so that every tap
//   of every pixel vector is one unit-stride load with no border test. Grad-input is a gather
//   (one input row at a time, from a zero-margin copy of the go rows and weight rows it needs),
//   so nothing is stored in the inner loops and no two tasks write the same memory.
// * NHWC: vectors run along channels (a group's channels are contiguous); per output pixel a
//   block of up to 8 channel vectors is accumulated in registers, each tap costs one broadcast
//   weight per group; borders are loop bounds (no copies). Grad-weight reduces the channels of a
//   group with a transposing horizontal sum over 8 taps at a time.
// Tasks (one image and group, or one image) never write the same memory: no atomics, and every
// sum is taken in an order fixed at compile time, so results do not depend on the thread count.
#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Vector widths in bytes: 32 (AVX2 + FMA with -march=native) for most kernels; kWideBytes (64
// where the CPU has AVX-512) for the NHWC forward and grad-input, whose vectors are a group's 16
// channels: measured 2x faster with it, while the others measured no faster or slower (rows of
// 7-56 pixels fill 16 lanes worse; NHWC grad-weight is bound by its transposing shuffles).
#if defined(__AVX512F__)
constexpr int kWideBytes = 64;
#else
constexpr int kWideBytes = 32;
#endif

template <typename T, int B = 32>
struct Vec {
  static constexpr int L = B / sizeof(T);
  typedef T V __attribute__((vector_size(B)));
  typedef T U __attribute__((vector_size(B), aligned(sizeof(T)), may_alias));
};
template <typename T, int B = 32>
using vec_t = typename Vec<T, B>::V;

template <int B = 32, typename T>
inline vec_t<T, B> vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T, B>::U*>(p);
}
template <int B = 32, typename T>
inline void vstore(T* p, vec_t<T, B> v) {
  *reinterpret_cast<typename Vec<T, B>::U*>(p) = v;
}
template <int B = 32, typename T>
inline vec_t<T, B> vsplat(T s) {
  return vec_t<T, B>{} + s;
}
// Stores the first n <= L lanes of v. Partial stores, and the copies below, are written as
// unrolled conditional lane stores: the compiler turns a plain element loop into a libc
// memcpy / memset call, which for these rows of 7-56 elements cost more than the copy (more than
// half of grad-weight's time at res5, 7x7).
template <typename T>
inline void store_lanes(T* p, vec_t<T> v, int64_t n) {
  constexpr int L = Vec<T>::L;
  if (n == L) {
    vstore(p, v);
    return;
  }
#pragma GCC unroll 16
  for (int l = 0; l < L; ++l)
    if (l < n) p[l] = v[l];
}

// dst[0, n) = src[0, n) and dst[0, n) = 0 for short rows (see store_lanes).
template <typename T>
inline void copy_short(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  constexpr int L = Vec<T>::L;
  int64_t j = 0;
  for (; j + L <= n; j += L) vstore(dst + j, vload(src + j));
#pragma GCC unroll 16
  for (int l = 0; l < L; ++l)
    if (j + l < n) dst[j + l] = src[j + l];
}
template <typename T>
inline void zero_short(T* dst, int64_t n) {
  constexpr int L = Vec<T>::L;
  int64_t j = 0;
  for (; j + L <= n; j += L) vstore(dst + j, vec_t<T>{});
  store_lanes(dst + j, vec_t<T>{}, n - j);
}

template <typename T>
inline T hsum(vec_t<T> v) {
  T s = v[0];
  for (int l = 1; l < Vec<T>::L; ++l) s += v[l];
  return s;
}

// Calls fn(std::integral_constant<int, n>()) for a runtime n in [1, N] (template unrolling).
template <int N, typename Fn>
inline void with_count(int n, Fn&& fn) {
  if constexpr (N > 0) {
    if (n == N) {
      fn(std::integral_constant<int, N>());
    } else {
      with_count<N - 1>(n, fn);
    }
  }
}

struct Geometry {
  int64_t N, C, G, H, W, Ho, Wo, K, stride, pad, dil;
  int64_t cpg() const { return C / G; }
  int64_t kk() const { return K * K; }
  int64_t plane_in() const { return H * W; }
  int64_t plane_out() const { return Ho * Wo; }
};

// A persistent pool of worker threads that sleep on a condition variable between calls: the
// fallback when PyTorch's OpenMP runtime is not found (see OpenMP below). They do not spin: on a
// loaded machine a separate spinning pool is served late when woken, which made the 2-thread
// calls several scheduler ticks slower than single-threaded ones (measured 2026-12-02). One call
// at a time; a concurrent or nested call runs on its caller's thread alone. After fork() the
// child starts a new pool.
class Pool {
 public:
  static Pool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { pool_ = nullptr; }); });
    if (pool_ == nullptr) pool_ = new Pool();  // never destroyed: workers die with the process
    return *pool_;
  }

  // Runs work(t) for t in [0, n) with t = 0 on the calling thread; returns when all are done.
  void run(int64_t n, const std::function<void(int64_t)>& work) {
    std::unique_lock<std::mutex> call(call_, std::try_to_lock);
    if (!call.owns_lock() || n == 1) {
      for (int64_t t = 0; t < n; ++t) work(t);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(m_);
      while (static_cast<int64_t>(workers_.size()) < n - 1) {
        const int64_t index = workers_.size();
        workers_.emplace_back([this, index] { loop(index + 1); });
        workers_.back().detach();
      }
      job_ = &work;
      size_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    start_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int64_t t) {
    int64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (t >= size_) continue;
      const std::function<void(int64_t)>* job = job_;
      lock.unlock();
      (*job)(t);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  static Pool* pool_;
  std::mutex call_, m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t size_ = 0, pending_ = 0, generation_ = 0;
};
Pool* Pool::pool_ = nullptr;

// PyTorch's OpenMP runtime, when the loader found it in the process (d2i_use_openmp): the calls
// then run on the OpenMP team that PyTorch's own ops use. That team's workers spin for a while
// after every PyTorch op, so inside a model the pool's workers had to share the cores with them:
// in RedNet-50 training the kernels ran 1.4-1.5x longer on the pool (docs/benchmarks.md).
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;                                            // omp_get_thread_num
  int (*num_threads)() = nullptr;                                           // omp_get_num_threads
  int (*in_parallel)() = nullptr;                                           // omp_in_parallel
};
OpenMP openmp;

// Runs chunk(t) for t in [0, n) on the OpenMP team (n > 1, not inside a parallel region); every
// chunk runs even if the runtime grants fewer threads.
template <typename Chunk>
void run_openmp(int64_t n, const Chunk& chunk) {
  struct Job {
    const Chunk* chunk;
    int64_t n;
  } job{&chunk, n};
  openmp.parallel(
      [](void* p) {
        const Job& j = *static_cast<const Job*>(p);
        for (int64_t t = openmp.thread_num(); t < j.n; t += openmp.num_threads()) (*j.chunk)(t);
      },
      &job, static_cast<unsigned>(n), 0);
}

// Runs fn(i) for i in [0, count) on up to nthreads threads (PyTorch's OpenMP team, else the
// pool), in contiguous equal chunks (so which thread computes a task never changes a result).
template <typename Fn>
void parallel_for(int64_t count, int64_t nthreads, const Fn& fn) {
  const int64_t n = std::max<int64_t>(1, std::min(nthreads, count));
  const auto chunk = [&](int64_t t) {
    for (int64_t i = count * t / n; i < count * (t + 1) / n; ++i) fn(i);
  };
  if (n > 1 && openmp.parallel != nullptr && !openmp.in_parallel()) return run_openmp(n, chunk);
  Pool::get().run(n, chunk);
}

// Per-thread scratch buffers, reused across tasks and calls (grown, never shrunk).
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> bufs[8];
  std::vector<T>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// A set of planes: plane p, row i, column j at ptr[p * plane + i * pitch + j].
template <typename T>
struct Planes {
  T* ptr;
  int64_t plane, pitch;
  T* row(int64_t p, int64_t i) const { return ptr + p * plane + i * pitch; }
};

// Copies `count` planes of rows x cols (pitch cols) into planes of pitch `pitch` >= cols, zeroing
// the columns beyond cols; returns the copy (slot: which scratch buffer).
template <typename T>
Planes<T> padded_copy(const T* src, int64_t count, int64_t rows, int64_t cols, int64_t pitch,
                      int slot) {
  T* dst = scratch<T>(slot, count * rows * pitch);
  for (int64_t p = 0; p < count * rows; ++p) {
    copy_short(dst + p * pitch, src + p * cols, cols);
    zero_short(dst + p * pitch + cols, pitch - cols);
  }
  return {dst, rows * pitch, pitch};
}

// The inverse: the first cols columns of each row of `src` into dense planes at dst.
template <typename T>
void unpad_copy(const Planes<T>& src, T* dst, int64_t count, int64_t rows, int64_t cols) {
  for (int64_t p = 0; p < count; ++p)
    for (int64_t i = 0; i < rows; ++i)
      copy_short(dst + (p * rows + i) * cols, src.row(p, i), cols);
}

// =============================================================================================
// NCHW
// =============================================================================================

// A group's input planes, zero-padded and split into `stride` column phases:
// input (c, y, x) -> tile[phase][c][y + pad][col] with phase = (x + pad) % s, col = (x + pad) / s.
// Output pixel (i, j), tap (u, v) then reads phase (v * dil) % s, row i * s + u * dil, column
// j + (v * dil) / s: consecutive j are consecutive columns for every stride.
template <typename T>
struct PhaseTile {
  int64_t rows, cols, cs, ps;  // padded rows, columns per phase, channel and phase strides
  T* data;
  std::vector<int64_t> off;  // per tap k = u * K + v: offset from (channel, i * s, j)
  const T* at(int64_t c, int64_t i, int64_t j, int64_t s) const {
    return data + c * cs + i * s * cols + j;
  }
};

template <typename T>
PhaseTile<T> phase_tile(const T* src, int64_t nch, const Geometry& g, int64_t nvec, int slot) {
  constexpr int L = Vec<T>::L;
  const int64_t s = g.stride, d = g.dil, p = g.pad;
  PhaseTile<T> t;
  t.rows = (g.Ho - 1) * s + (g.K - 1) * d + 1;
  t.cols = nvec * L + ((g.K - 1) * d) / s + 1;
  t.cs = t.rows * t.cols;
  t.ps = nch * t.cs;
  t.data = scratch<T>(slot, s * t.ps);
  std::fill(t.data, t.data + s * t.ps, T(0));
  for (int64_t c = 0; c < nch; ++c) {
    for (int64_t y = 0; y < g.H && y + p < t.rows; ++y) {
      const T* row = src + (c * g.H + y) * g.W;
      T* dst = t.data + c * t.cs + (y + p) * t.cols;
      if (s == 1) {
        const int64_t n = std::min(g.W, t.cols - p);
        copy_short(dst + p, row, n);
        continue;
      }
      for (int64_t ph = 0; ph < s; ++ph) {  // input column x = col * s + ph - p
        T* dph = dst + ph * t.ps;
        const int64_t col0 = std::max<int64_t>(0, ceil_div(p - ph, s));
        for (int64_t col = col0, x = col0 * s + ph - p; col < t.cols && x < g.W; ++col, x += s)
          dph[col] = row[x];
      }
    }
  }
  t.off.resize(g.kk());
  for (int64_t u = 0; u < g.K; ++u)
    for (int64_t v = 0; v < g.K; ++v)
      t.off[u * g.K + v] = ((v * d) % s) * t.ps + u * d * t.cols + (v * d) / s;
  return t;
}

// out[b] = sum_k w[k] * x[off[k] + b * cs] for NB channels and one vector of pixels (of which
// the first nl are stored).
template <typename T, int NB>
inline void fwd_block(const T* __restrict__ x, int64_t cs, const T* __restrict__ w, int64_t wtap,
                      const int64_t* __restrict__ off, int64_t kk, T* __restrict__ out,
                      int64_t oplane, int64_t nl) {
  vec_t<T> acc[NB] = {};
  for (int64_t k = 0; k < kk; ++k) {
    const vec_t<T> wv = vload(w + k * wtap);
    const T* xp = x + off[k];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[b] += wv * vload(xp + b * cs);
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) store_lanes(out + b * oplane, acc[b], nl);
}

// The K*K weight planes are read one pixel vector at a time, i.e. as K*K interleaved streams
// that hardware prefetchers do not follow: while row i is computed, row `ahead` of every plane
// is prefetched, one vector per plane and pixel vector of row i.
template <typename T>
inline void prefetch_planes(const Planes<const T>& p, int64_t count, int64_t ahead, int64_t j) {
  for (int64_t k = 0; k < count; ++k) __builtin_prefetch(p.row(k, ahead) + j);
}

// Forward of one group over output rows [i0, i1): w plane k = tap k (rows numbered from i0),
// out plane c = channel c of the group; nvec vectors per row, of which `cols` pixels are stored
// (weight rows are read as whole vectors: their pitch may be Wo when the rows after them exist).
template <typename T>
void forward_rows(const PhaseTile<T>& xt, Planes<const T> w, Planes<T> out, const Geometry& g,
                  int64_t nvec, int64_t cols, int64_t i0, int64_t i1) {
  constexpr int L = Vec<T>::L;
  const int64_t cpg = g.cpg();
  // Channel blocks outside the pixel vectors: one block's K rows of x and the weight row stay
  // in L1 while the row is swept.
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t c0 = 0; c0 < cpg; c0 += 8)
      with_count<8>(static_cast<int>(std::min<int64_t>(8, cpg - c0)), [&](auto nb) {
        for (int64_t jv = 0; jv < nvec; ++jv) {
          if (c0 == 0 && i + 1 < i1) prefetch_planes(w, g.kk(), i + 1 - i0, jv * L);
          fwd_block<T, decltype(nb)::value>(xt.at(c0, i, jv * L, g.stride), xt.cs,
                                            w.row(0, i - i0) + jv * L, w.plane, xt.off.data(),
                                            g.kk(), out.row(c0, i) + jv * L, out.plane,
                                            std::min<int64_t>(L, cols - jv * L));
        }
      });
}

// gw[t] = sum_c go[c] * x[c * cs + off[t]] for TB taps and one vector of pixels.
template <typename T, int TB>
inline void gw_block(const T* __restrict__ x, int64_t cs, const T* __restrict__ go,
                     int64_t gplane, int64_t cpg, const int64_t* __restrict__ off,
                     T* __restrict__ gw, int64_t wtap, int64_t nl) {
  vec_t<T> acc[TB] = {};
  for (int64_t c = 0; c < cpg; ++c) {
    const vec_t<T> gv = vload(go + c * gplane);
    const T* xp = x + c * cs;
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[t] += gv * vload(xp + off[t]);
  }
#pragma GCC unroll 8
  for (int t = 0; t < TB; ++t) store_lanes(gw + t * wtap, acc[t], nl);
}

// Grad-weight of one group: go (cpg planes, read as whole vectors) and gw (K*K planes, `cols`
// pixels of each row stored).
template <typename T>
void grad_weight_rows(const PhaseTile<T>& xt, Planes<const T> go, Planes<T> gw,
                      const Geometry& g, int64_t nvec, int64_t cols) {
  constexpr int L = Vec<T>::L;
  const int64_t kk = g.kk();
  for (int64_t i = 0; i < g.Ho; ++i)
    for (int64_t jv = 0; jv < nvec; ++jv)
      for (int64_t k0 = 0; k0 < kk; k0 += 8)
        with_count<8>(static_cast<int>(std::min<int64_t>(8, kk - k0)), [&](auto tb) {
          gw_block<T, decltype(tb)::value>(xt.at(0, i, jv * L, g.stride), xt.cs,
                                           go.row(0, i) + jv * L, go.plane, g.cpg(),
                                           xt.off.data() + k0, gw.row(k0, i) + jv * L, gw.plane,
                                           std::min<int64_t>(L, cols - jv * L));
        });
}

// Grad-input (gather) of one group. Input column x = rx + s * t reaches output column
// j = t + (rx + pad - v * dil) / s from tap v when the division is exact; likewise rows. For each
// input row, the go rows and weight rows it needs are read from zero-margin copies (go: one tile
// for the group; weight: the rows of this input row only, each weight row is used by exactly one
// input row), so that out-of-range j reads zeros and every tap is one unit-stride load.
struct GatherTap {
  int64_t w_off, go_off;
};

template <typename T, int NB>
inline void gi_block(const T* __restrict__ wb, const T* __restrict__ gb, int64_t cs,
                     const GatherTap* __restrict__ taps, int64_t ntaps, vec_t<T>* acc_out) {
  vec_t<T> acc[NB] = {};
  for (int64_t e = 0; e < ntaps; ++e) {
    const vec_t<T> wv = vload(wb + taps[e].w_off);
    const T* gp = gb + taps[e].go_off;
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[b] += wv * vload(gp + b * cs);
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) acc_out[b] = acc[b];
}

// dst[0, n) = src[0, n) and dst[n, ceil(n / L) * L) = 0, with whole-vector loads when `whole`
// (the source may then be read up to the next multiple of L), else element-wise.
template <typename T>
inline void copy_row(T* __restrict__ dst, const T* __restrict__ src, int64_t n, bool whole) {
  constexpr int L = Vec<T>::L;
  if (!whole) {
    copy_short(dst, src, n);
  } else {
    for (int64_t j = 0; j < n; j += L) vstore(dst + j, vload(src + j));
  }
  zero_short(dst + n, (L - n % L) % L);
}

// go: the group's cpg planes (Ho x Wo, pitch go.pitch); w: its K*K weight planes (pitch w.pitch,
// followed by at least `w_after` more readable elements); gx: cpg dense H x W planes.
template <typename T>
void grad_input_group(Planes<const T> go, Planes<const T> w, int64_t w_after, T* gx,
                      const Geometry& g) {
  constexpr int L = Vec<T>::L;
  const int64_t s = g.stride, d = g.dil, p = g.pad, K = g.K, cpg = g.cpg();
  const int64_t nvx = ceil_div(ceil_div(g.W, s), L);  // vectors per input-row phase
  const int64_t PL = std::max<int64_t>(0, ceil_div((K - 1) * d - p, s));
  const int64_t jo_max = (s - 1 + p) / s;
  const int64_t Jw = std::max(PL + ceil_div(g.Wo, L) * L, PL + jo_max + nvx * L) + 1;
  const bool whole = w_after >= ceil_div(g.Wo, L) * L - g.Wo;
  // go tile [c][i][Jw] and weight rows [k][Jw], zero margins.
  T* gt = scratch<T>(2, cpg * g.Ho * Jw);
  std::fill(gt, gt + cpg * g.Ho * Jw, T(0));
  for (int64_t c = 0; c < cpg; ++c)
    for (int64_t i = 0; i < g.Ho; ++i)
      copy_short(gt + (c * g.Ho + i) * Jw + PL, go.row(c, i), g.Wo);
  T* wb = scratch<T>(3, g.kk() * Jw);
  std::fill(wb, wb + g.kk() * Jw, T(0));
  const int64_t cs = g.Ho * Jw;
  std::vector<GatherTap> taps(g.kk());
  std::vector<int64_t> urow(K);
  T lanes[8][Vec<T>::L];
  const int64_t line = 64 / sizeof(T);
  for (int64_t y = 0; y < g.H; ++y) {
    for (int64_t u = 0; u < K; ++u) {
      const int64_t t = y + p - u * d;
      urow[u] = (t >= 0 && t % s == 0 && t / s < g.Ho) ? t / s : -1;
      if (urow[u] < 0) continue;
      for (int64_t v = 0; v < K; ++v)
        copy_row(wb + (u * K + v) * Jw + PL, w.row(u * K + v, urow[u]), g.Wo, whole);
      // The K*K weight rows are K*K short streams: prefetch the next row of each.
      if (urow[u] + 1 < g.Ho)
        for (int64_t v = 0; v < K; ++v)
          for (int64_t j = 0; j < g.Wo; j += line)
            __builtin_prefetch(w.row(u * K + v, urow[u] + 1) + j);
    }
    for (int64_t rx = 0; rx < s && rx < g.W; ++rx) {
      const int64_t ntx = ceil_div(g.W - rx, s);
      int64_t ntaps = 0;
      for (int64_t u = 0; u < K; ++u) {
        if (urow[u] < 0) continue;
        for (int64_t v = 0; v < K; ++v) {
          const int64_t t = rx + p - v * d;
          if (((t % s) + s) % s != 0) continue;
          const int64_t jo = floor_div(t, s);
          taps[ntaps++] = {(u * K + v) * Jw + PL + jo, urow[u] * Jw + PL + jo};
        }
      }
      for (int64_t tv = 0; tv * L < ntx; ++tv) {
        const int64_t nl = std::min<int64_t>(L, ntx - tv * L);
        for (int64_t c0 = 0; c0 < cpg; c0 += 8) {
          const int nb = static_cast<int>(std::min<int64_t>(8, cpg - c0));
          vec_t<T> acc[8];
          with_count<8>(nb, [&](auto n) {
            gi_block<T, decltype(n)::value>(wb + tv * L, gt + c0 * cs + tv * L, cs, taps.data(),
                                            ntaps, acc);
          });
          for (int b = 0; b < nb; ++b) {
            T* row = gx + ((c0 + b) * g.H + y) * g.W;
            if (s == 1 && nl == L) {
              vstore(row + tv * L, acc[b]);
              continue;
            }
            vstore(lanes[b], acc[b]);
            for (int64_t l = 0; l < nl; ++l) row[rx + s * (tv * L + l)] = lanes[b][l];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel generation: generated weights W[k][pix] = bias[k] + sum_r A[k][r] * red[r][pix] for the
// K*K taps of one group (A = the group's K*K rows of gen_weight, row stride R), and the two
// products of the backward. Vectors run along pixels (pitch-padded planes, flattened).

// MB taps x PV pixel vectors of W.
template <typename T, int MB, int PV>
inline void gen_block(const T* __restrict__ A, int64_t R, const T* __restrict__ bias,
                      const T* __restrict__ red, int64_t rplane, T* __restrict__ W,
                      int64_t wplane) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[MB][PV];
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < PV; ++q) acc[m][q] = vsplat(bias[m]);
  for (int64_t r = 0; r < R; ++r) {
    vec_t<T> rv[PV];
    for (int q = 0; q < PV; ++q) rv[q] = vload(red + r * rplane + q * L);
    for (int m = 0; m < MB; ++m) {
      const vec_t<T> a = vsplat(A[m * R + r]);
      for (int q = 0; q < PV; ++q) acc[m][q] += a * rv[q];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < PV; ++q) vstore(W + m * wplane + q * L, acc[m][q]);
}

// W (kk planes of npix, npix a multiple of L) from red (R planes, plane stride rplane).
template <typename T>
void generate(const T* A, int64_t R, const T* bias, const T* red, int64_t rplane, T* W,
              int64_t kk, int64_t npix) {
  constexpr int L = Vec<T>::L;
  for (int64_t pix = 0; pix < npix; pix += 3 * L) {
    const int pv = static_cast<int>(std::min<int64_t>(3, (npix - pix) / L));
    for (int64_t k = 0; k < kk; k += 4) {
      const int mb = static_cast<int>(std::min<int64_t>(4, kk - k));
      with_count<4>(mb, [&](auto m) {
        with_count<3>(pv, [&](auto q) {
          gen_block<T, decltype(m)::value, decltype(q)::value>(
              A + k * R, R, bias + k, red + pix, rplane, W + k * npix + pix, npix);
        });
      });
    }
  }
}

// dred[r][pix] += sum_k A[k][r] * dW[k][pix] for RB reductions x PV pixel vectors.
template <typename T, int RB, int PV>
inline void gen_t_block(const T* __restrict__ A, int64_t R, int64_t kk, const T* __restrict__ dW,
                        int64_t wplane, T* __restrict__ dred, int64_t rplane) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[RB][PV];
  for (int m = 0; m < RB; ++m)
    for (int q = 0; q < PV; ++q) acc[m][q] = vload(dred + m * rplane + q * L);
  for (int64_t k = 0; k < kk; ++k) {
    vec_t<T> dv[PV];
    for (int q = 0; q < PV; ++q) dv[q] = vload(dW + k * wplane + q * L);
    for (int m = 0; m < RB; ++m) {
      const vec_t<T> a = vsplat(A[k * R + m]);
      for (int q = 0; q < PV; ++q) acc[m][q] += a * dv[q];
    }
  }
  for (int m = 0; m < RB; ++m)
    for (int q = 0; q < PV; ++q) vstore(dred + m * rplane + q * L, acc[m][q]);
}

template <typename T>
void generate_t(const T* A, int64_t R, const T* dW, int64_t kk, T* dred, int64_t npix) {
  constexpr int L = Vec<T>::L;
  for (int64_t pix = 0; pix < npix; pix += 3 * L) {
    const int pv = static_cast<int>(std::min<int64_t>(3, (npix - pix) / L));
    for (int64_t r = 0; r < R; r += 4) {
      const int rb = static_cast<int>(std::min<int64_t>(4, R - r));
      with_count<4>(rb, [&](auto m) {
        with_count<3>(pv, [&](auto q) {
          gen_t_block<T, decltype(m)::value, decltype(q)::value>(
              A + r, R, kk, dW + pix, npix, dred + r * npix + pix, npix);
        });
      });
    }
  }
}

// dA[k][r] += sum_pix dW[k][pix] * red[r][pix] and dbias[k] += sum_pix dW[k][pix].
template <typename T, int MB, int RB>
inline void gen_w_block(const T* __restrict__ dW, const T* __restrict__ red, int64_t rplane,
                        int64_t npix, T* __restrict__ dA, int64_t R) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[MB][RB] = {};
  for (int64_t pix = 0; pix < npix; pix += L) {
    vec_t<T> rv[RB];
    for (int q = 0; q < RB; ++q) rv[q] = vload(red + q * rplane + pix);
    for (int m = 0; m < MB; ++m) {
      const vec_t<T> dv = vload(dW + m * npix + pix);
      for (int q = 0; q < RB; ++q) acc[m][q] += dv * rv[q];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < RB; ++q) dA[m * R + q] += hsum<T>(acc[m][q]);
}

template <typename T>
void generate_grad(const T* dW, int64_t kk, const T* red, int64_t R, int64_t npix, T* dA,
                   T* dbias) {
  constexpr int L = Vec<T>::L;
  for (int64_t k = 0; k < kk; k += 4) {
    const int mb = static_cast<int>(std::min<int64_t>(4, kk - k));
    for (int64_t r = 0; r < R; r += 2) {
      const int rb = static_cast<int>(std::min<int64_t>(2, R - r));
      with_count<4>(mb, [&](auto m) {
        with_count<2>(rb, [&](auto q) {
          gen_w_block<T, decltype(m)::value, decltype(q)::value>(
              dW + k * npix, red + r * npix, npix, npix, dA + k * R + r, R);
        });
      });
    }
  }
  for (int64_t k = 0; k < kk; ++k) {
    vec_t<T> acc = {};
    for (int64_t pix = 0; pix < npix; pix += L) acc += vload(dW + k * npix + pix);
    dbias[k] += hsum<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW entry points. nvec = vectors per output row (Wp = nvec * L pixels).

template <typename T>
struct NchwTask {
  const Geometry& g;
  int64_t nvec, Wp;
  explicit NchwTask(const Geometry& geom)
      : g(geom), nvec(ceil_div(geom.Wo, Vec<T>::L)), Wp(nvec * Vec<T>::L) {}
  // Output-sized planes `src` (count planes, followed by `after` more elements of the tensor) to
  // be read as whole vectors: in place, unless the last row's vectors would read past the end of
  // the tensor or `flat` (rows must be of pitch Wp); then a zero-padded copy.
  Planes<const T> in(const T* src, int64_t count, int slot, int64_t after,
                     bool flat = false) const {
    if (Wp == g.Wo || (!flat && after >= Wp - g.Wo)) return {src, g.plane_out(), g.Wo};
    Planes<T> p = padded_copy(src, count, g.Ho, g.Wo, Wp, slot);
    return {p.ptr, p.plane, p.pitch};
  }
};

template <typename T>
void forward_nchw(const T* x, const T* w, T* out, const Geometry& g, int64_t nthreads) {
  const int64_t cpg = g.cpg(), kk = g.kk();
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    const NchwTask<T> task(g);
    const PhaseTile<T> xt = phase_tile(x + ng * cpg * g.plane_in(), cpg, g, task.nvec, 0);
    const int64_t after = (g.N * g.G - 1 - ng) * kk * g.plane_out();
    const Planes<const T> wv = task.in(w + ng * kk * g.plane_out(), kk, 1, after);
    const Planes<T> ov = {out + ng * cpg * g.plane_out(), g.plane_out(), g.Wo};
    forward_rows(xt, wv, ov, g, task.nvec, g.Wo, 0, g.Ho);
  });
}

template <typename T>
void grad_weight_nchw(const T* go, const T* x, T* gw, const Geometry& g, int64_t nthreads) {
  const int64_t cpg = g.cpg(), kk = g.kk();
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    const NchwTask<T> task(g);
    const PhaseTile<T> xt = phase_tile(x + ng * cpg * g.plane_in(), cpg, g, task.nvec, 0);
    const int64_t after = (g.N * g.G - 1 - ng) * cpg * g.plane_out();
    const Planes<const T> gv = task.in(go + ng * cpg * g.plane_out(), cpg, 1, after);
    const Planes<T> wv = {gw + ng * kk * g.plane_out(), g.plane_out(), g.Wo};
    grad_weight_rows(xt, gv, wv, g, task.nvec, g.Wo);
  });
}

template <typename T>
void grad_input_nchw(const T* go, const T* w, T* gx, const Geometry& g, int64_t nthreads) {
  const int64_t cpg = g.cpg(), kk = g.kk(), po = g.plane_out();
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    const int64_t after = (g.N * g.G - 1 - ng) * kk * po;
    grad_input_group<T>({go + ng * cpg * po, po, g.Wo}, {w + ng * kk * po, po, g.Wo}, after,
                        gx + ng * cpg * g.plane_in(), g);
  });
}

// Fused forward: per (image, group), the group's K*K weight planes are generated into a
// per-thread scratch (pitch-padded, never a tensor) and aggregated.
template <typename T>
void fused_forward_nchw(const T* x, const T* red, const T* A, const T* bias, T* out, int64_t R,
                        const Geometry& g, int64_t nthreads) {
  const int64_t cpg = g.cpg(), kk = g.kk();
  parallel_for(g.N * g.G, nthreads, [&](int64_t ng) {
    const int64_t n = ng / g.G, grp = ng % g.G;
    const NchwTask<T> task(g);
    const PhaseTile<T> xt = phase_tile(x + ng * cpg * g.plane_in(), cpg, g, task.nvec, 0);
    const Planes<const T> rv = task.in(red + n * R * g.plane_out(), R, 1, 0, true);
    const int64_t npix = g.Ho * task.Wp;
    T* Wt = scratch<T>(3, kk * npix);
    generate(A + grp * kk * R, R, bias + grp * kk, rv.ptr, rv.plane, Wt, kk, npix);
    const Planes<T> ov = {out + ng * cpg * g.plane_out(), g.plane_out(), g.Wo};
    forward_rows<T>(xt, {Wt, npix, task.Wp}, ov, g, task.nvec, g.Wo, 0, g.Ho);
  });
}

// Fused backward, one task per image (the groups share the reduced features): per group, the
// weights are regenerated, grad-input and grad-weight computed from them, and the weight
// gradient (a per-thread scratch) is contracted at once into the gradients of the reduced
// features, gen_weight and gen_bias. gen_weight/gen_bias gradients are summed per image into
// dA_part (N, K*K*G, R) / dbias_part (N, K*K*G) (see sum_images).
template <typename T>
void fused_backward_nchw(const T* go, const T* x, const T* red, const T* A, const T* bias, T* gx,
                         T* dred, T* dA_part, T* dbias_part, int64_t R, const Geometry& g,
                         int64_t nthreads) {
  const int64_t cpg = g.cpg(), kk = g.kk(), po = g.plane_out();
  parallel_for(g.N, nthreads, [&](int64_t n) {
    const NchwTask<T> task(g);
    const int64_t npix = g.Ho * task.Wp;
    const Planes<const T> rv = task.in(red + n * R * po, R, 1, 0, true);
    T* dred_t = scratch<T>(4, R * npix);
    std::fill(dred_t, dred_t + R * npix, T(0));
    T* dA = dA_part + n * g.G * kk * R;
    T* db = dbias_part + n * g.G * kk;
    std::fill(dA, dA + g.G * kk * R, T(0));
    std::fill(db, db + g.G * kk, T(0));
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const int64_t ng = n * g.G + grp;
      const T* Ag = A + grp * kk * R;
      T* Wt = scratch<T>(5, kk * npix);
      generate(Ag, R, bias + grp * kk, rv.ptr, rv.plane, Wt, kk, npix);
      const int64_t after = (g.N * g.G - 1 - ng) * cpg * po;
      const Planes<const T> gov = task.in(go + ng * cpg * po, cpg, 6, after);
      grad_input_group<T>(gov, {Wt, npix, task.Wp}, task.Wp, gx + ng * cpg * g.plane_in(), g);
      const PhaseTile<T> xt = phase_tile(x + ng * cpg * g.plane_in(), cpg, g, task.nvec, 0);
      T* dW = scratch<T>(7, kk * npix);
      grad_weight_rows<T>(xt, gov, {dW, npix, task.Wp}, g, task.nvec, task.Wp);
      for (int64_t k = 0; k < kk; ++k)  // lanes beyond Wo: exactly zero
        for (int64_t i = 0; i < g.Ho; ++i)
          zero_short(dW + k * npix + i * task.Wp + g.Wo, task.Wp - g.Wo);
      generate_t(Ag, R, dW, kk, dred_t, npix);
      generate_grad(dW, kk, rv.ptr, R, npix, dA + grp * kk * R, db + grp * kk);
    }
    unpad_copy<T>({dred_t, npix, task.Wp}, dred + n * R * po, R, g.Ho, g.Wo);
  });
}

// =============================================================================================
// NHWC
// =============================================================================================

#if defined(__clang__)
#define D2I_SHUFFLE(a, b, I, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define D2I_SHUFFLE(a, b, I, ...) __builtin_shuffle(a, b, I{__VA_ARGS__})
#endif

// r[t] = the sum of the lanes of a[t] for t < L (a transposing reduction tree, fixed order).
inline vec_t<float> transpose_sum(const vec_t<float>* a) {
  typedef int32_t I __attribute__((vector_size(32)));
  vec_t<float> c[4], d[2];
  for (int q = 0; q < 4; ++q)
    c[q] = D2I_SHUFFLE(a[2 * q], a[2 * q + 1], I, 0, 8, 2, 10, 4, 12, 6, 14) +
           D2I_SHUFFLE(a[2 * q], a[2 * q + 1], I, 1, 9, 3, 11, 5, 13, 7, 15);
  for (int q = 0; q < 2; ++q)
    d[q] = D2I_SHUFFLE(c[2 * q], c[2 * q + 1], I, 0, 1, 8, 9, 4, 5, 12, 13) +
           D2I_SHUFFLE(c[2 * q], c[2 * q + 1], I, 2, 3, 10, 11, 6, 7, 14, 15);
  return D2I_SHUFFLE(d[0], d[1], I, 0, 1, 2, 3, 8, 9, 10, 11) +
         D2I_SHUFFLE(d[0], d[1], I, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline vec_t<double> transpose_sum(const vec_t<double>* a) {
  typedef int64_t I __attribute__((vector_size(32)));
  vec_t<double> c[2];
  for (int q = 0; q < 2; ++q)
    c[q] = D2I_SHUFFLE(a[2 * q], a[2 * q + 1], I, 0, 4, 2, 6) +
           D2I_SHUFFLE(a[2 * q], a[2 * q + 1], I, 1, 5, 3, 7);
  return D2I_SHUFFLE(c[0], c[1], I, 0, 1, 4, 5) + D2I_SHUFFLE(c[0], c[1], I, 2, 3, 6, 7);
}

// Taps in [lo, hi) whose input index o * s - pad + t * dil lies in [0, n).
inline void tap_range(int64_t o, const Geometry& g, int64_t n, int64_t& lo, int64_t& hi) {
  const int64_t base = o * g.stride - g.pad;
  lo = std::max<int64_t>(0, -floor_div(base, g.dil));
  hi = std::min<int64_t>(g.K, floor_div(n - 1 - base, g.dil) + 1);
  lo = std::min(lo, std::max<int64_t>(hi, 0));
}

// One tap of one pixel: the offset of its source pixel (x or go) and of its weight.
struct TapRef {
  int64_t src, w;
};

// out[c] = sum_e w[taps[e].w + group(c) * kk] * src[taps[e].src + c] over NG groups of VPG
// channel vectors: one broadcast weight per group and tap.
template <typename T, int B, int NG, int VPG>
inline void nhwc_block(const T* __restrict__ src, const T* __restrict__ w, int64_t kk,
                       const TapRef* __restrict__ taps, int64_t ntaps, T* __restrict__ out) {
  constexpr int L = Vec<T, B>::L;
  vec_t<T, B> acc[NG * VPG] = {};
  for (int64_t e = 0; e < ntaps; ++e) {
    const T* sp = src + taps[e].src;
    const T* wp = w + taps[e].w;
#pragma GCC unroll 8
    for (int gb = 0; gb < NG; ++gb) {
      const vec_t<T, B> wv = vsplat<B>(wp[gb * kk]);
#pragma GCC unroll 8
      for (int q = 0; q < VPG; ++q) acc[gb * VPG + q] += wv * vload<B>(sp + (gb * VPG + q) * L);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < NG * VPG; ++b) vstore<B>(out + b * L, acc[b]);
}

// nhwc_pixel with B-byte vectors (cpg a multiple of their length).
template <typename T, int B>
void nhwc_pixel_vec(const T* src, const T* w, const TapRef* taps, int64_t ntaps, T* out,
                    const Geometry& g) {
  constexpr int L = Vec<T, B>::L;
  const int64_t cpg = g.cpg(), kk = g.kk();
  const int64_t vpg = cpg / L;
  if (vpg > 8) {
    for (int64_t grp = 0; grp < g.G; ++grp)
      for (int64_t q0 = 0; q0 < vpg; q0 += 8) {
        const int64_t c0 = grp * cpg + q0 * L;
        with_count<8>(static_cast<int>(std::min<int64_t>(8, vpg - q0)), [&](auto nv) {
          nhwc_block<T, B, 1, decltype(nv)::value>(src + c0, w + grp * kk, kk, taps, ntaps,
                                                   out + c0);
        });
      }
    return;
  }
  with_count<8>(static_cast<int>(vpg), [&](auto nv) {
    constexpr int VPG = decltype(nv)::value, GMAX = 8 / VPG;
    for (int64_t g0 = 0; g0 < g.G; g0 += GMAX)
      with_count<GMAX>(static_cast<int>(std::min<int64_t>(GMAX, g.G - g0)), [&](auto ng) {
        nhwc_block<T, B, decltype(ng)::value, VPG>(src + g0 * cpg, w + g0 * kk, kk, taps,
                                                   ntaps, out + g0 * cpg);
      });
  });
}

// All C channels of one pixel: out[c] = sum over taps of w * src (forward and grad-input).
template <typename T>
void nhwc_pixel(const T* src, const T* w, const TapRef* taps, int64_t ntaps, T* out,
                const Geometry& g) {
  const int64_t cpg = g.cpg(), kk = g.kk();
  if (cpg % Vec<T, kWideBytes>::L == 0)
    return nhwc_pixel_vec<T, kWideBytes>(src, w, taps, ntaps, out, g);
  if (cpg % Vec<T>::L == 0) return nhwc_pixel_vec<T, 32>(src, w, taps, ntaps, out, g);
  for (int64_t c = 0; c < g.C; ++c) {
    T s = T(0);
    const T* wg = w + (c / cpg) * kk;
    for (int64_t e = 0; e < ntaps; ++e) s += wg[taps[e].w] * src[taps[e].src + c];
    out[c] = s;
  }
}

// Forward of output row i of image n; w: that row's weights, pixel stride wps.
template <typename T>
void forward_row_nhwc(const T* x_img, const T* w_row, int64_t wps, T* out_row, int64_t i,
                      const Geometry& g, TapRef* taps) {
  int64_t u0, u1;
  tap_range(i, g, g.H, u0, u1);
  for (int64_t j = 0; j < g.Wo; ++j) {
    int64_t v0, v1, ntaps = 0;
    tap_range(j, g, g.W, v0, v1);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t y = i * g.stride - g.pad + u * g.dil;
      for (int64_t v = v0; v < v1; ++v) {
        const int64_t xx = j * g.stride - g.pad + v * g.dil;
        taps[ntaps++] = {(y * g.W + xx) * g.C, u * g.K + v};
      }
    }
    nhwc_pixel(x_img, w_row + j * wps, taps, ntaps, out_row + j * g.C, g);
  }
}

// Grad-input (gather) of input row y of image n; w_img: the image's weights, pixel stride wps.
template <typename T>
void grad_input_row_nhwc(const T* go_img, const T* w_img, int64_t wps, T* gx_row, int64_t y,
                         const Geometry& g, TapRef* taps) {
  const int64_t s = g.stride, K = g.K;
  // Output row / column reached from input row y / column xx by tap u / v, or -1.
  auto reach = [&](int64_t in, int64_t t, int64_t n_out) {
    const int64_t q = in + g.pad - t * g.dil;
    return (q >= 0 && q % s == 0 && q / s < n_out) ? q / s : -1;
  };
  std::vector<int64_t> jv(g.W * K);
  for (int64_t xx = 0; xx < g.W; ++xx)
    for (int64_t v = 0; v < K; ++v) jv[xx * K + v] = reach(xx, v, g.Wo);
  for (int64_t xx = 0; xx < g.W; ++xx) {
    int64_t ntaps = 0;
    for (int64_t u = 0; u < K; ++u) {
      const int64_t i = reach(y, u, g.Ho);
      if (i < 0) continue;
      for (int64_t v = 0; v < K; ++v) {
        const int64_t j = jv[xx * K + v];
        if (j < 0) continue;
        const int64_t pix = i * g.Wo + j;
        taps[ntaps++] = {pix * g.C, pix * wps + u * K + v};
      }
    }
    nhwc_pixel(go_img, w_img, taps, ntaps, gx_row + xx * g.C, g);
  }
}

// gw[k0 + t] = sum over the group's VPG vectors of go * x(tap k0 + t), t < L taps at a time.
template <typename T, int VPG>
inline void nhwc_gw_group(const T* __restrict__ go, const T* const* xp, int64_t kk,
                          T* __restrict__ gw) {
  constexpr int L = Vec<T>::L;
  vec_t<T> gv[VPG];
  for (int q = 0; q < VPG; ++q) gv[q] = vload(go + q * L);
  for (int64_t k0 = 0; k0 < kk; k0 += L) {
    vec_t<T> acc[L];
#pragma GCC unroll 8
    for (int t = 0; t < L; ++t) {
      const T* x = xp[k0 + t];
      vec_t<T> a = gv[0] * vload(x);
#pragma GCC unroll 8
      for (int q = 1; q < VPG; ++q) a += gv[q] * vload(x + q * L);
      acc[t] = a;
    }
    const vec_t<T> r = transpose_sum(acc);
    store_lanes(gw + k0, r, std::min<int64_t>(L, kk - k0));
  }
}

// Grad-weight of output row i; gw_row: pixel stride wps. xp: scratch for 2 * (K*K + L)
// pointers, zeros: C zeros (the source of taps outside the input).
template <typename T>
void grad_weight_row_nhwc(const T* go_row, const T* x_img, T* gw_row, int64_t wps, int64_t i,
                          const Geometry& g, const T** xp, const T* zeros) {
  constexpr int L = Vec<T>::L;
  const int64_t cpg = g.cpg(), kk = g.kk();
  int64_t u0, u1;
  tap_range(i, g, g.H, u0, u1);
  const T** xg = xp + kk + L;
  for (int64_t t = 0; t < kk + L; ++t) xp[t] = zeros;
  for (int64_t j = 0; j < g.Wo; ++j) {
    int64_t v0, v1;
    tap_range(j, g, g.W, v0, v1);
    for (int64_t u = 0; u < g.K; ++u)
      for (int64_t v = 0; v < g.K; ++v) {
        const bool in = u >= u0 && u < u1 && v >= v0 && v < v1;
        const int64_t y = i * g.stride - g.pad + u * g.dil;
        const int64_t xx = j * g.stride - g.pad + v * g.dil;
        xp[u * g.K + v] = in ? x_img + (y * g.W + xx) * g.C : zeros;
      }
    const T* go = go_row + j * g.C;
    T* gw = gw_row + j * wps;
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const int64_t c0 = grp * cpg;
      if (cpg % L == 0 && cpg / L <= 8) {
        for (int64_t t = 0; t < kk + L; ++t) xg[t] = xp[t] + c0;
        with_count<8>(static_cast<int>(cpg / L), [&](auto nv) {
          nhwc_gw_group<T, decltype(nv)::value>(go + c0, xg, kk, gw + grp * kk);
        });
        continue;
      }
      for (int64_t k = 0; k < kk; ++k) {
        T s = T(0);
        for (int64_t c = c0; c < c0 + cpg; ++c) s += go[c] * xp[k][c];
        gw[grp * kk + k] = s;
      }
    }
  }
}

template <typename T>
void forward_nhwc(const T* x, const T* w, T* out, const Geometry& g, int64_t nthreads) {
  const int64_t wps = g.G * g.kk();
  parallel_for(g.N * g.Ho, nthreads, [&](int64_t ni) {
    const int64_t n = ni / g.Ho, i = ni % g.Ho;
    std::vector<TapRef> taps(g.kk());
    forward_row_nhwc(x + n * g.plane_in() * g.C, w + ni * g.Wo * wps, wps, out + ni * g.Wo * g.C,
                     i, g, taps.data());
  });
}

template <typename T>
void grad_input_nhwc(const T* go, const T* w, T* gx, const Geometry& g, int64_t nthreads) {
  const int64_t wps = g.G * g.kk();
  parallel_for(g.N * g.H, nthreads, [&](int64_t ny) {
    const int64_t n = ny / g.H, y = ny % g.H;
    std::vector<TapRef> taps(g.kk());
    grad_input_row_nhwc(go + n * g.plane_out() * g.C, w + n * g.plane_out() * wps, wps,
                        gx + ny * g.W * g.C, y, g, taps.data());
  });
}

template <typename T>
void grad_weight_nhwc(const T* go, const T* x, T* gw, const Geometry& g, int64_t nthreads) {
  const int64_t wps = g.G * g.kk();
  parallel_for(g.N * g.Ho, nthreads, [&](int64_t ni) {
    const int64_t n = ni / g.Ho, i = ni % g.Ho;
    std::vector<const T*> xp(2 * (g.kk() + Vec<T>::L));
    std::vector<T> zeros(g.C, T(0));
    grad_weight_row_nhwc(go + ni * g.Wo * g.C, x + n * g.plane_in() * g.C, gw + ni * g.Wo * wps,
                         wps, i, g, xp.data(), zeros.data());
  });
}

// ---------------------------------------------------------------------------------------------
// Kernel generation, pixel-major: W[pix][gk] (pitch Mp = K*K*G rounded up to whole vectors).

// W[p][m] = bias[m] + sum_r red[p][r] * At[r][m] for P pixels x NV vectors of m.
template <typename T, int P, int NV>
inline void gen_nhwc_block(const T* __restrict__ red, int64_t R, const T* __restrict__ At,
                           int64_t Mp, const T* __restrict__ bias, T* __restrict__ W) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[P][NV];
  for (int q = 0; q < NV; ++q) {
    const vec_t<T> b = vload(bias + q * L);
    for (int p = 0; p < P; ++p) acc[p][q] = b;
  }
  for (int64_t r = 0; r < R; ++r) {
    vec_t<T> a[NV];
    for (int q = 0; q < NV; ++q) a[q] = vload(At + r * Mp + q * L);
    for (int p = 0; p < P; ++p) {
      const vec_t<T> rv = vsplat(red[p * R + r]);
      for (int q = 0; q < NV; ++q) acc[p][q] += rv * a[q];
    }
  }
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < NV; ++q) vstore(W + p * Mp + q * L, acc[p][q]);
}

// dred[p][r] = sum_m dW[p][m] * Ap[m][r] for P pixels x NV vectors of r (Ap: pitch Rp).
template <typename T, int P, int NV>
inline void gen_t_nhwc_block(const T* __restrict__ dW, int64_t Mp, int64_t M,
                             const T* __restrict__ Ap, int64_t Rp, T* __restrict__ dred) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[P][NV] = {};
  for (int64_t m = 0; m < M; ++m) {
    vec_t<T> a[NV];
    for (int q = 0; q < NV; ++q) a[q] = vload(Ap + m * Rp + q * L);
    for (int p = 0; p < P; ++p) {
      const vec_t<T> dv = vsplat(dW[p * Mp + m]);
      for (int q = 0; q < NV; ++q) acc[p][q] += dv * a[q];
    }
  }
  for (int p = 0; p < P; ++p)
    for (int q = 0; q < NV; ++q) vstore(dred + p * Rp + q * L, acc[p][q]);
}

// dA[m][r] += sum_p dW[p][m] * red[p][r] for MB values of m x NV vectors of r (red: pitch Rp).
template <typename T, int MB, int NV>
inline void gen_w_nhwc_block(const T* __restrict__ dW, int64_t Mp, const T* __restrict__ red,
                             int64_t Rp, int64_t npix, T* __restrict__ dA) {
  constexpr int L = Vec<T>::L;
  vec_t<T> acc[MB][NV] = {};
  for (int64_t p = 0; p < npix; ++p) {
    vec_t<T> rv[NV];
    for (int q = 0; q < NV; ++q) rv[q] = vload(red + p * Rp + q * L);
    for (int m = 0; m < MB; ++m) {
      const vec_t<T> dv = vsplat(dW[p * Mp + m]);
      for (int q = 0; q < NV; ++q) acc[m][q] += dv * rv[q];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int q = 0; q < NV; ++q) vstore(dA + m * Rp + q * L, vload(dA + m * Rp + q * L) + acc[m][q]);
}

// The generator's matrices, padded to whole vectors: At (R, Mp) = gen_weight transposed, Ap
// (M, Rp) = gen_weight, bias (Mp); zero padding.
template <typename T>
struct GenMatrices {
  int64_t M, R, Mp, Rp;
  std::vector<T> At, Ap, bias;
  GenMatrices(const T* A, const T* b, int64_t m, int64_t r)
      : M(m), R(r), Mp(ceil_div(m, Vec<T>::L) * Vec<T>::L), Rp(ceil_div(r, Vec<T>::L) * Vec<T>::L),
        At(R * Mp, T(0)), Ap(M * Rp, T(0)), bias(Mp, T(0)) {
    for (int64_t i = 0; i < M; ++i) {
      bias[i] = b[i];
      for (int64_t j = 0; j < R; ++j) At[j * Mp + i] = Ap[i * Rp + j] = A[i * R + j];
    }
  }
};

// W (npix x Mp) from npix pixels of red (pitch R).
template <typename T>
void generate_nhwc(const GenMatrices<T>& A, const T* red, int64_t npix, T* W) {
  constexpr int L = Vec<T>::L;
  const int64_t nv = A.Mp / L;
  for (int64_t p = 0; p < npix; p += 4) {
    const int pb = static_cast<int>(std::min<int64_t>(4, npix - p));
    for (int64_t q = 0; q < nv; q += 3)
      with_count<4>(pb, [&](auto P) {
        with_count<3>(static_cast<int>(std::min<int64_t>(3, nv - q)), [&](auto NV) {
          gen_nhwc_block<T, decltype(P)::value, decltype(NV)::value>(
              red + p * A.R, A.R, A.At.data() + q * L, A.Mp, A.bias.data() + q * L,
              W + p * A.Mp + q * L);
        });
      });
  }
}

template <typename T>
void fused_forward_nhwc(const T* x, const T* red, const T* A, const T* bias, T* out, int64_t R,
                        const Geometry& g, int64_t nthreads) {
  const GenMatrices<T> gm(A, bias, g.G * g.kk(), R);
  parallel_for(g.N * g.Ho, nthreads, [&](int64_t ni) {
    const int64_t n = ni / g.Ho, i = ni % g.Ho;
    T* Wrow = scratch<T>(0, g.Wo * gm.Mp);
    generate_nhwc(gm, red + ni * g.Wo * R, g.Wo, Wrow);
    std::vector<TapRef> taps(g.kk());
    forward_row_nhwc<T>(x + n * g.plane_in() * g.C, Wrow, gm.Mp, out + ni * g.Wo * g.C, i, g,
                        taps.data());
  });
}

// Fused backward, one task per image: regenerate the image's weights, grad-input from them,
// grad-weight into a scratch, contracted at once into the gradients of red, gen_weight and
// gen_bias (the last two summed per image into dA_part / dbias_part, see sum_images).
template <typename T>
void fused_backward_nhwc(const T* go, const T* x, const T* red, const T* A, const T* bias, T* gx,
                         T* dred, T* dA_part, T* dbias_part, int64_t R, const Geometry& g,
                         int64_t nthreads) {
  constexpr int L = Vec<T>::L;
  const GenMatrices<T> gm(A, bias, g.G * g.kk(), R);
  const int64_t M = gm.M, Mp = gm.Mp, Rp = gm.Rp, npix = g.plane_out();
  parallel_for(g.N, nthreads, [&](int64_t n) {
    const T* red_img = red + n * npix * R;
    T* Wimg = scratch<T>(0, npix * Mp);
    generate_nhwc(gm, red_img, npix, Wimg);
    std::vector<TapRef> taps(g.kk());
    const T* go_img = go + n * npix * g.C;
    for (int64_t y = 0; y < g.H; ++y)
      grad_input_row_nhwc<T>(go_img, Wimg, Mp, gx + (n * g.H + y) * g.W * g.C, y, g,
                             taps.data());
    T* dW = Wimg;  // the weights are no longer needed
    std::vector<const T*> xp(2 * (g.kk() + L));
    std::vector<T> zeros(g.C, T(0));
    for (int64_t i = 0; i < g.Ho; ++i) {
      grad_weight_row_nhwc<T>(go_img + i * g.Wo * g.C, x + n * g.plane_in() * g.C,
                              dW + i * g.Wo * Mp, Mp, i, g, xp.data(), zeros.data());
      for (int64_t j = 0; j < g.Wo; ++j)
        zero_short(dW + (i * g.Wo + j) * Mp + M, Mp - M);
    }
    // red with pitch Rp; dred and dA accumulated with pitch Rp, copied out at the end.
    T* redp = scratch<T>(1, npix * Rp);
    T* dredp = scratch<T>(2, npix * Rp);
    T* dAp = scratch<T>(3, M * Rp);
    std::fill(redp, redp + npix * Rp, T(0));
    std::fill(dAp, dAp + M * Rp, T(0));
    for (int64_t p = 0; p < npix; ++p) copy_short(redp + p * Rp, red_img + p * R, R);
    const int64_t nv = Rp / L;
    for (int64_t p = 0; p < npix; p += 4)
      for (int64_t q = 0; q < nv; q += 3)
        with_count<4>(static_cast<int>(std::min<int64_t>(4, npix - p)), [&](auto P) {
          with_count<3>(static_cast<int>(std::min<int64_t>(3, nv - q)), [&](auto NV) {
            gen_t_nhwc_block<T, decltype(P)::value, decltype(NV)::value>(
                dW + p * Mp, Mp, M, gm.Ap.data() + q * L, Rp, dredp + p * Rp + q * L);
          });
        });
    for (int64_t m = 0; m < M; m += 4)
      for (int64_t q = 0; q < nv; q += 3)
        with_count<4>(static_cast<int>(std::min<int64_t>(4, M - m)), [&](auto MB) {
          with_count<3>(static_cast<int>(std::min<int64_t>(3, nv - q)), [&](auto NV) {
            gen_w_nhwc_block<T, decltype(MB)::value, decltype(NV)::value>(
                dW + m, Mp, redp + q * L, Rp, npix, dAp + m * Rp + q * L);
          });
        });
    for (int64_t p = 0; p < npix; ++p)
      copy_short(dred + (n * npix + p) * R, dredp + p * Rp, R);
    T* dA = dA_part + n * M * R;
    for (int64_t m = 0; m < M; ++m) copy_short(dA + m * R, dAp + m * Rp, R);
    T* db = dbias_part + n * M;
    std::vector<vec_t<T>> acc(Mp / L, vec_t<T>{});
    for (int64_t p = 0; p < npix; ++p)
      for (int64_t q = 0; q < Mp / L; ++q) acc[q] += vload(dW + p * Mp + q * L);
    for (int64_t m = 0; m < M; ++m) db[m] = acc[m / L][m % L];
  });
}

// dst[e] = sum over n of parts[n * count + e], summed in image order (thread-count independent).
template <typename T>
void sum_images(const T* parts, int64_t N, int64_t count, T* dst, int64_t nthreads) {
  const int64_t chunk = 4096;
  parallel_for(ceil_div(count, chunk), nthreads, [&](int64_t b) {
    for (int64_t e = b * chunk; e < std::min(count, (b + 1) * chunk); ++e) {
      T s = parts[e];
      for (int64_t n = 1; n < N; ++n) s += parts[n * count + e];
      dst[e] = s;
    }
  });
}

// The fused backward of either layout: per-image partial sums of the generator's gradients,
// then their sums over the images.
template <typename T, typename Backward>
void fused_backward(const Backward& backward, T* dA, T* dbias, int64_t R, const Geometry& g,
                    int64_t nthreads) {
  const int64_t M = g.G * g.kk();
  std::vector<T> dA_part(g.N * M * R), db_part(g.N * M);
  backward(dA_part.data(), db_part.data());
  sum_images(dA_part.data(), g.N, M * R, dA, nthreads);
  sum_images(db_part.data(), g.N, M, dbias, nthreads);
}

}  // namespace

#define D2I_SIZES                                                                             \
  int64_t N, int64_t C, int64_t G, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t K, \
      int64_t stride, int64_t pad, int64_t dil, int64_t nthreads
#define D2I_GEOMETRY Geometry{N, C, G, H, W, Ho, Wo, K, stride, pad, dil}

#define D2I_LAYOUT_ENTRY_POINTS(T, SUFFIX, LAYOUT)                                            \
  extern "C" void d2i_forward_##LAYOUT##_##SUFFIX(const T* x, const T* w, T* out, D2I_SIZES) {  \
    forward_##LAYOUT<T>(x, w, out, D2I_GEOMETRY, nthreads);                                      \
  }                                                                                              \
  extern "C" void d2i_grad_input_##LAYOUT##_##SUFFIX(const T* go, const T* w, T* gx,            \
                                                     D2I_SIZES) {                                \
    grad_input_##LAYOUT<T>(go, w, gx, D2I_GEOMETRY, nthreads);                                   \
  }                                                                                              \
  extern "C" void d2i_grad_weight_##LAYOUT##_##SUFFIX(const T* go, const T* x, T* gw,           \
                                                      D2I_SIZES) {                               \
    grad_weight_##LAYOUT<T>(go, x, gw, D2I_GEOMETRY, nthreads);                                  \
  }                                                                                              \
  extern "C" void d2i_fused_forward_##LAYOUT##_##SUFFIX(                                         \
      const T* x, const T* red, const T* A, const T* bias, T* out, int64_t R, D2I_SIZES) {      \
    fused_forward_##LAYOUT<T>(x, red, A, bias, out, R, D2I_GEOMETRY, nthreads);                  \
  }                                                                                              \
  extern "C" void d2i_fused_backward_##LAYOUT##_##SUFFIX(                                        \
      const T* go, const T* x, const T* red, const T* A, const T* bias, T* gx, T* dred, T* dA,   \
      T* dbias, int64_t R, D2I_SIZES) {                                                          \
    const Geometry g = D2I_GEOMETRY;                                                             \
    fused_backward<T>(                                                                           \
        [&](T* dA_part, T* db_part) {                                                            \
          fused_backward_##LAYOUT<T>(go, x, red, A, bias, gx, dred, dA_part, db_part, R, g,      \
                                     nthreads);                                                  \
        },                                                                                       \
        dA, dbias, R, g, nthreads);                                                              \
  }
#define D2I_ENTRY_POINTS(T, SUFFIX)      \
  D2I_LAYOUT_ENTRY_POINTS(T, SUFFIX, nchw) \
  D2I_LAYOUT_ENTRY_POINTS(T, SUFFIX, nhwc)

// Binds the kernels to the OpenMP runtime at these entry points (all four non-null), or back to
// the pool (any null). Returns whether OpenMP is used.
extern "C" int d2i_use_openmp(void* parallel, void* thread_num, void* num_threads,
                              void* in_parallel) {
  OpenMP o;
  if (parallel && thread_num && num_threads && in_parallel) {
    o.parallel = reinterpret_cast<decltype(o.parallel)>(parallel);
    o.thread_num = reinterpret_cast<decltype(o.thread_num)>(thread_num);
    o.num_threads = reinterpret_cast<decltype(o.num_threads)>(num_threads);
    o.in_parallel = reinterpret_cast<decltype(o.in_parallel)>(in_parallel);
  }
  openmp = o;
  return o.parallel != nullptr;
}

D2I_ENTRY_POINTS(float, f32)
D2I_ENTRY_POINTS(double, f64)
