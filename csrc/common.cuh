// Device helpers shared by the token log-prob CUDA kernels (logprobs.cu).
//
// Contents:
//   * accumulation type per storage type (float, or double for double) and
//     conversions between the two (exact widening, round-to-nearest back),
//   * Vec<T>: 16-byte vector loads / stores that unpack to / pack from the
//     accumulation type (8 x half/bf16, 4 x float, 2 x double),
//   * split_row(): scalar head / 16-byte aligned body / scalar tail of a row,
//   * OnlineLSE: the streaming (max, sum-exp, weighted sum) state, its merge,
//     and warp / block reductions of it.
//
// No torch headers: this is compiled by plain nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "logprobs.h"

namespace rlhf {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------
// Accumulation type and conversions
// ---------------------------------------------------------------------------

// Half precision types accumulate in float (their whole range and precision
// fit exactly); double keeps double so that a float64 reference stays exact.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even back to storage; NaN and +-inf survive the rounding.
template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// INFINITY / NAN are constant expressions usable on the device without
// --expt-relaxed-constexpr (std::numeric_limits would need that flag).
template <typename Acc> __device__ __forceinline__ Acc neg_inf() {
  return static_cast<Acc>(-INFINITY);
}
template <typename Acc> __device__ __forceinline__ Acc quiet_nan() {
  return static_cast<Acc>(NAN);
}

// exp(d) for d <= 0 (or NaN). For float, exp2f of a pre-scaled argument is one
// MUFU.EX2 plus a multiply (max error 2 ulp); the extra rounding of d * log2(e)
// costs a relative |d| * 6e-8, negligible where exp(d) is not already tiny.
// Multiplying the difference (not folding the scale into an FMA with -m*log2e)
// keeps exp(0) == 1 exactly for the row maximum.
__device__ __forceinline__ float exp_acc(float d) {
  return exp2f(d * 1.4426950408889634f);
}
__device__ __forceinline__ double exp_acc(double d) { return exp(d); }

// exp(d) for the online state only: a bare MUFU.EX2 whose results below
// 2^-126 are flushed to 0 (saves exp2f's 3-instruction denormal fix-up in the
// hottest loop). Harmless there: a flushed term of s is below 2^-126 while
// s >= 1 (the row max contributes exp(0) = 1), and a flushed term of w,
// e * d with d > -104, is below 2^-119, i.e. far below the float rounding of
// either sum. Same for the rescale factors. -inf gives +0, NaN gives NaN.
__device__ __forceinline__ float exp_sum_term(float d) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d * 1.4426950408889634f));
  return r;
}
__device__ __forceinline__ double exp_sum_term(double d) { return exp(d); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// z = x * inv_t, always rounded to the accumulation type: the explicit
// rounding multiply keeps the compiler from contracting it into the FMA of a
// following subtraction, so every use of z (the max, exp(z - m), the -inf
// test, the label's logit) sees the same value; e.g. a one-token vocabulary
// then gives logprob exactly 0.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// fmax/fmaxf ignore a NaN operand (IEEE maxNum). The online state relies on
// that: NaN logits never become the running max, and reach the outputs through
// the sum instead (exp(NaN - m) = NaN).
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------
// 16-byte vectors
// ---------------------------------------------------------------------------
// Loads go through uint4 (one LDG.128 / STG.128) and are unpacked with bit
// operations, so no type punning of __half / __nv_bfloat16 objects is needed.
// Lower-indexed elements sit at lower addresses: for 2-byte types element 2i
// is the low half and element 2i + 1 the high half of 32-bit word i (little
// endian); a double is (low word, high word).

template <typename T> struct Vec;

template <> struct Vec<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ void load(const float* p, float* out) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ void store(float* p, const float* in) {
    *reinterpret_cast<uint4*>(p) = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]),
                                              __float_as_uint(in[2]), __float_as_uint(in[3]));
  }
};

template <> struct Vec<double> {
  static constexpr int kN = 2;
  static __device__ __forceinline__ void load(const double* p, double* out) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    out[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    out[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static __device__ __forceinline__ void store(double* p, const double* in) {
    *reinterpret_cast<uint4*>(p) = make_uint4(
        static_cast<unsigned>(__double2loint(in[0])), static_cast<unsigned>(__double2hiint(in[0])),
        static_cast<unsigned>(__double2loint(in[1])), static_cast<unsigned>(__double2hiint(in[1])));
  }
};

namespace detail {
// bf16 is the upper half of a float: widening is a shift, exact.
__device__ __forceinline__ float bf16_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ unsigned bf16_pack(float lo, float hi) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}
__device__ __forceinline__ float f16_lo(unsigned w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
__device__ __forceinline__ float f16_hi(unsigned w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}
__device__ __forceinline__ unsigned f16_pack(float lo, float hi) {
  return static_cast<unsigned>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<unsigned>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
}  // namespace detail

template <> struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  static __device__ __forceinline__ void load(const __nv_bfloat16* p, float* out) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    out[0] = detail::bf16_lo(r.x); out[1] = detail::bf16_hi(r.x);
    out[2] = detail::bf16_lo(r.y); out[3] = detail::bf16_hi(r.y);
    out[4] = detail::bf16_lo(r.z); out[5] = detail::bf16_hi(r.z);
    out[6] = detail::bf16_lo(r.w); out[7] = detail::bf16_hi(r.w);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float* in) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(detail::bf16_pack(in[0], in[1]), detail::bf16_pack(in[2], in[3]),
                   detail::bf16_pack(in[4], in[5]), detail::bf16_pack(in[6], in[7]));
  }
};

template <> struct Vec<__half> {
  static constexpr int kN = 8;
  static __device__ __forceinline__ void load(const __half* p, float* out) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    out[0] = detail::f16_lo(r.x); out[1] = detail::f16_hi(r.x);
    out[2] = detail::f16_lo(r.y); out[3] = detail::f16_hi(r.y);
    out[4] = detail::f16_lo(r.z); out[5] = detail::f16_hi(r.z);
    out[6] = detail::f16_lo(r.w); out[7] = detail::f16_hi(r.w);
  }
  static __device__ __forceinline__ void store(__half* p, const float* in) {
    *reinterpret_cast<uint4*>(p) =
        make_uint4(detail::f16_pack(in[0], in[1]), detail::f16_pack(in[2], in[3]),
                   detail::f16_pack(in[4], in[5]), detail::f16_pack(in[6], in[7]));
  }
};

// A row of `n` elements starting at `p`, cut into
//   [0, head)                 scalar, until p + head is 16-byte aligned,
//   [head, body_end)          nvec aligned 16-byte vectors,
//   [body_end, n)             scalar tail, fewer than Vec<T>::kN elements.
// head < kN, and head <= n, so rows shorter than the head are all scalar.
// Precondition: p is aligned to sizeof(T) (torch guarantees it for any tensor
// of dtype T, whatever its storage offset and strides).
struct RowSplit {
  int head;
  int nvec;
  int body_end;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int n) {
  constexpr int kN = Vec<T>::kN;
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  int head = static_cast<int>(((16u - mis) & 15u) / sizeof(T));
  head = min(head, n);
  const int nvec = (n - head) / kN;
  return RowSplit{head, nvec, head + nvec * kN};
}

// ---------------------------------------------------------------------------
// Row offsets without 64-bit division
// ---------------------------------------------------------------------------
// RowLayout::offset divides int64 values, which on the GPU is a call to a
// slow subroutine (and its calling convention costs registers / spills).
// FastDivU64 replaces n / d by a multiply-high and a shift, with the magic
// number computed once on the host (Granlund & Montgomery, "Division by
// invariant integers using multiplication", 1994, section 4):
//   l = ceil(log2 d),  m' = floor(2^64 (2^l - d) / d) + 1  (< 2^64),
//   n / d = (n + umulhi(m', n)) >> l        exact for all 0 <= n < 2^64;
// the 64-bit sum does not wrap because n < 2^63 (int64 row indices) and
// umulhi(m', n) < n. d = 1 gives l = 0, m' = 1, i.e. the identity.
struct FastDivU64 {
  uint64_t magic;
  unsigned shift;

  // d in [1, 2^63).
  __host__ static FastDivU64 make(uint64_t d) {
    unsigned l = 0;
    while (l < 63 && (uint64_t(1) << l) < d) ++l;
    // floor(2^64 * r / d) with r = 2^l - d < d, by binary long division
    // (portable: no 128-bit integer type). rem < d < 2^63, so rem << 1 fits.
    uint64_t rem = (uint64_t(1) << l) - d;
    uint64_t q = 0;
    for (int bit = 0; bit < 64; ++bit) {
      rem <<= 1;
      q <<= 1;
      if (rem >= d) {
        rem -= d;
        q |= 1;
      }
    }
    FastDivU64 f;
    f.magic = q + 1;
    f.shift = l;
    return f;
  }

  __device__ __forceinline__ uint64_t div(uint64_t n) const {
    return (n + __umul64hi(magic, n)) >> shift;
  }
};

// Same mapping as RowLayout::offset (row n -> element offset of its start).
struct FastRowLayout {
  int64_t size1, size2;
  int64_t stride0, stride1, stride2;
  FastDivU64 div1, div2;

  // Requires size1 >= 1 and size2 >= 1 (checked by the launchers).
  __host__ static FastRowLayout make(const RowLayout& l) {
    FastRowLayout f;
    f.size1 = l.size1;
    f.size2 = l.size2;
    f.stride0 = l.stride0;
    f.stride1 = l.stride1;
    f.stride2 = l.stride2;
    f.div1 = FastDivU64::make(static_cast<uint64_t>(l.size1));
    f.div2 = FastDivU64::make(static_cast<uint64_t>(l.size2));
    return f;
  }

  // n in [0, rows).
  __device__ __forceinline__ int64_t offset(int64_t n) const {
    const int64_t q2 = static_cast<int64_t>(div2.div(static_cast<uint64_t>(n)));
    const int64_t i2 = n - q2 * size2;
    const int64_t i0 = static_cast<int64_t>(div1.div(static_cast<uint64_t>(q2)));
    const int64_t i1 = q2 - i0 * size1;
    return i0 * stride0 + i1 * stride1 + i2 * stride2;
  }
};

// ---------------------------------------------------------------------------
// Online log-sum-exp state
// ---------------------------------------------------------------------------
// Over a set of values z_j the state holds
//   m = max_j z_j                         (-inf for an empty set),
//   s = sum_j exp(z_j - m),
//   w = sum_j exp(z_j - m) * (z_j - m)    (only when kW).
// Then lse = m + log(s) and, with p_j = exp(z_j - lse),
//   entropy = lse - sum_j p_j z_j = log(s) - w / s.
// w is taken relative to m (rather than sum exp(z - m) * z, which would give
// entropy = lse - w' / s) so that the entropy never subtracts two numbers of
// the size of the logits: once m is finite, s >= 1 and w <= 0, so
// entropy = log(s) + |w| / s adds two non-negative terms and small entropies
// of confident rows keep their relative accuracy.
//
// -inf logits (masked vocabulary) contribute exactly 0 to s and w. A state
// whose m is -inf is "empty": its s and w are 0 (or NaN if it saw a NaN) and
// are never rescaled, so exp(-inf - -inf) and 0 * -inf never happen.
// NaN logits: max_acc skips them, exp(NaN - m) = NaN poisons s, so lse,
// logprob and entropy come out NaN. +inf logits give NaN as well.
//
// Plain aggregate (no constructors) so that it can live in __shared__.
template <typename Acc, bool kW>
struct OnlineLSE {
  Acc m, s, w;

  __device__ __forceinline__ void reset() {
    m = neg_inf<Acc>();
    s = Acc(0);
    w = Acc(0);
  }

  // Adds K values. The chunk maximum is taken first, so the state is rescaled
  // at most once per chunk (and rarely at all once the row max was seen).
  template <int K>
  __device__ __forceinline__ void push(const Acc* z) {
    Acc cm = z[0];
#pragma unroll
    for (int k = 1; k < K; ++k) cm = max_acc(cm, z[k]);
    if (cm > m) {  // false for NaN cm
      if (m != neg_inf<Acc>()) {
        const Acc dm = m - cm;  // < 0
        const Acc a = exp_sum_term(dm);
        if (kW) w = a * fma(s, dm, w);
        s *= a;
      }
      m = cm;
    }
    // exp(kDead) underflows to exactly 0 in float and double, and
    // 0 * kDead is 0: used for z == -inf, where z - m is -inf (m finite) or
    // NaN (m still -inf).
    const Acc kDead = Acc(-1.0e4);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Acc d = (z[k] == neg_inf<Acc>()) ? kDead : z[k] - m;
      const Acc e = exp_sum_term(d);
      s += e;
      if (kW) w = fma(e, d, w);
    }
  }

  // Merges the state (om, os, ow) into this one. Symmetric, so a butterfly
  // reduction gives every lane the same bits.
  __device__ __forceinline__ void merge(Acc om, Acc os, Acc ow) {
    const Acc mn = max_acc(m, om);
    Acc sa = s, wa = w, sb = os, wb = ow;
    if (m != neg_inf<Acc>()) {
      const Acc dm = m - mn;
      const Acc a = exp_sum_term(dm);
      sa = s * a;
      if (kW) wa = a * fma(s, dm, w);
    }
    if (om != neg_inf<Acc>()) {
      const Acc dm = om - mn;
      const Acc a = exp_sum_term(dm);
      sb = os * a;
      if (kW) wb = a * fma(os, dm, ow);
    }
    m = mn;
    s = sa + sb;
    w = kW ? wa + wb : Acc(0);
  }
};

// Butterfly all-reduce over the 32 lanes of a warp; all lanes must be active.
template <typename Acc, bool kW>
__device__ __forceinline__ void warp_reduce(OnlineLSE<Acc, kW>& st) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const Acc om = __shfl_xor_sync(kFullMask, st.m, off);
    const Acc os = __shfl_xor_sync(kFullMask, st.s, off);
    const Acc ow = kW ? __shfl_xor_sync(kFullMask, st.w, off) : Acc(0);
    st.merge(om, os, ow);
  }
}

// Reduces the states of all kThreads threads of the block; the result is valid
// in warp 0 (thread 0 is the one that uses it). `smem` holds kThreads / 32
// states. Must be reached by every thread of the block. Ends with a barrier so
// that the caller may call it again right away (grid-stride row loop) without
// a fast warp overwriting `smem` before warp 0 has read it.
template <int kThreads, typename Acc, bool kW>
__device__ __forceinline__ void block_reduce(OnlineLSE<Acc, kW>& st, OnlineLSE<Acc, kW>* smem) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize,
                "block size must be a multiple of 32 and at most 1024");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  warp_reduce(st);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    if (lane < kWarps) {
      st = smem[lane];
    } else {
      st.reset();
    }
    warp_reduce(st);
  }
  __syncthreads();
}

// Butterfly sum over the 32 lanes of a warp (all lanes active): every lane
// gets the same bits.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums v[0 .. K) (K <= N) over the kThreads threads of the block with a
// fixed tree, so the result is the same on every run; the totals are valid in
// every lane of warp 0. smem: [kThreads / 32][N]. Must be reached by every
// thread of the block; ends with a barrier, so smem may be reused at once.
template <int kThreads, int K, int N, typename T>
__device__ __forceinline__ void block_sum(T (&v)[N], T (*smem)[N]) {
  static_assert(K <= N, "block_sum: K > N");
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "block_sum: block size");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp][k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < kWarps ? smem[lane][k] : T(0));
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Rows of the log-prob family (logprobs.cu, ppo_logits.cu)
// ---------------------------------------------------------------------------

// Streams one kept row x[0:V] through the block's kThreads threads: each
// thread pushes its share of z = x / T into an OnlineLSE state (scalar head,
// 16-byte body, scalar tail), then the states are merged across the block.
// The returned state is valid in thread 0. Reached by every thread (it has
// block barriers).
template <int kThreads, typename T, bool kEntropy>
__device__ __forceinline__ OnlineLSE<acc_t<T>, kEntropy> stream_row(const T* x, int V, acc_t<T> inv_t,
                                                                    OnlineLSE<acc_t<T>, kEntropy>* smem) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  OnlineLSE<Acc, kEntropy> st;
  st.reset();
  const RowSplit sp = split_row(x, V);

  if (tid < sp.head) {  // head < kN <= kThreads
    const Acc z[1] = {mul_rn(to_acc(x[tid]), inv_t)};
    st.template push<1>(z);
  }

  // kU independent 16-byte loads per iteration multiply the bytes in flight
  // per thread; the kU * kN values are then pushed as one chunk (one max,
  // at most one rescale). Not for double: its exp() is a long polynomial
  // whose hoisted constants leave no registers for a second vector.
  constexpr int kU = sizeof(T) == 8 ? 1 : 2;
  const T* body = x + sp.head;
  int i = tid;
  for (; i + (kU - 1) * kThreads < sp.nvec; i += kU * kThreads) {
    Acc z[kU * kN];
#pragma unroll
    for (int u = 0; u < kU; ++u) Vec<T>::load(body + (i + u * kThreads) * kN, z + u * kN);
#pragma unroll
    for (int k = 0; k < kU * kN; ++k) z[k] = mul_rn(z[k], inv_t);
    st.template push<kU * kN>(z);
  }
  if (kU > 1 && i < sp.nvec) {
    Acc z[kN];
    Vec<T>::load(body + i * kN, z);
#pragma unroll
    for (int k = 0; k < kN; ++k) z[k] = mul_rn(z[k], inv_t);
    st.template push<kN>(z);
  }

  if (tid < V - sp.body_end) {  // tail < kN <= kThreads
    const Acc z[1] = {mul_rn(to_acc(x[sp.body_end + tid]), inv_t)};
    st.template push<1>(z);
  }

  block_reduce<kThreads>(st, smem);
  return st;
}

// Gradient of one element, in the accumulation type:
//   d = z - lse, p = exp(d),
//   grad = ( g * (1[j == y] - p) - gH * p * (d + H) ) / T
//        = ( 1[j == y] * g  -  p * (g + gH * (d + H)) ) * inv_t.
// The fma form rounds g * (1 - p) once for the label. A z of -inf has p = 0
// and contributes nothing else (d + H = -inf would make 0 * -inf = NaN), so it
// is selected explicitly. A row of only -inf logits (lse = -inf) has a NaN
// log-prob, and its gradient is NaN too, as in torch, the CPU kernel and the
// Triton kernel: build the op with inv_t = row_inv_t(lse, inv_t).
template <typename Acc, bool kEntropy>
struct GradOp {
  Acc lse, g, gH, H, inv_t;
  int y;

  __device__ __forceinline__ Acc operator()(Acc xv, int j) const {
    const Acc z = mul_rn(xv, inv_t);
    const Acc d = z - lse;
    const Acc p = exp_acc(d);
    const Acc onehot_g = (j == y) ? g : Acc(0);
    const Acc t = kEntropy ? fma(gH, d + H, g) : g;
    const Acc r = (z == neg_inf<Acc>()) ? onehot_g : fma(-p, t, onehot_g);
    return r * inv_t;
  }
};

// A row's 1/T for GradOp: NaN when lse is -inf (the row has no distribution),
// so that every element of its gradient is NaN. Decided once per row.
template <typename Acc>
__device__ __forceinline__ Acc row_inv_t(Acc lse, Acc inv_t) {
  return lse == neg_inf<Acc>() ? quiet_nan<Acc>() : inv_t;
}

// Writes `value` (0 or NaN) to the n elements of a gradient row.
template <int kThreads, typename T>
__device__ __forceinline__ void fill_row(T* out, int n, acc_t<T> value) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  const RowSplit sp = split_row(out, n);
  const T v = from_acc<T>(value);
  if (tid < sp.head) out[tid] = v;
  Acc vals[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) vals[k] = value;
  T* body = out + sp.head;
  for (int i = tid; i < sp.nvec; i += kThreads) Vec<T>::store(body + i * kN, vals);
  if (tid < n - sp.body_end) out[sp.body_end + tid] = v;
}

// Writes out[j] = op(x[j], j) for the V elements of one row with the block's
// kThreads threads: 16-byte vectors where x and out share their alignment,
// else coalesced scalars. Each element is read and then written by the same
// thread with no other thread touching it, so out == x (in place, same
// layout) is safe.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ void grad_row(const T* x, T* out, int V, const Op& op) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  const uintptr_t x_mis = reinterpret_cast<uintptr_t>(x) & 15u;
  const uintptr_t out_mis = reinterpret_cast<uintptr_t>(out) & 15u;
  if (x_mis == out_mis) {
    // Same split for both rows, so every vector load pairs with an aligned
    // vector store at the same element offsets.
    const RowSplit sp = split_row(x, V);
    if (tid < sp.head) out[tid] = from_acc<T>(op(to_acc(x[tid]), tid));

    const T* xb = x + sp.head;
    T* ob = out + sp.head;
    int i = tid;
    // Both loads are issued before either store (memory parallelism; also
    // keeps the read-before-write order per element when in place).
    for (; i + kThreads < sp.nvec; i += 2 * kThreads) {
      Acc u[kN], v[kN];
      Vec<T>::load(xb + i * kN, u);
      Vec<T>::load(xb + (i + kThreads) * kN, v);
      const int j0 = sp.head + i * kN;
      const int j1 = j0 + kThreads * kN;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        u[k] = op(u[k], j0 + k);
        v[k] = op(v[k], j1 + k);
      }
      Vec<T>::store(ob + i * kN, u);
      Vec<T>::store(ob + (i + kThreads) * kN, v);
    }
    if (i < sp.nvec) {
      Acc u[kN];
      Vec<T>::load(xb + i * kN, u);
      const int j0 = sp.head + i * kN;
#pragma unroll
      for (int k = 0; k < kN; ++k) u[k] = op(u[k], j0 + k);
      Vec<T>::store(ob + i * kN, u);
    }

    const int j = sp.body_end + tid;
    if (tid < V - sp.body_end) out[j] = from_acc<T>(op(to_acc(x[j]), j));
  } else {
    // Rows misaligned relative to each other: scalar, still coalesced
    // (consecutive threads, consecutive elements). Four loads in flight
    // per thread before the stores.
    constexpr int kU = 4;
    int j = tid;
    for (; j + (kU - 1) * kThreads < V; j += kU * kThreads) {
      Acc u[kU];
#pragma unroll
      for (int k = 0; k < kU; ++k) u[k] = to_acc(x[j + k * kThreads]);
#pragma unroll
      for (int k = 0; k < kU; ++k) {
        out[j + k * kThreads] = from_acc<T>(op(u[k], j + k * kThreads));
      }
    }
    for (; j < V; j += kThreads) out[j] = from_acc<T>(op(to_acc(x[j]), j));
  }
}

}  // namespace gpu
}  // namespace rlhf
