// Device helpers shared by the token log-prob CUDA kernels (logprobs.cu,
// ppo_logits.cu).
//
// Contents:
//   * accumulation type per storage type (float, or double for double) and
//     conversions between the two (exact widening, round-to-nearest back),
//   * the base-2 row math: row_scale, exp2_ftz, max_keep_nan, mul_rn,
//   * Vec<T>: 16-byte vector loads / stores that unpack to / pack from the
//     accumulation type (8 x half/bf16, 4 x float, 2 x double),
//   * split_row(): scalar head / 16-byte aligned body / scalar tail of a row,
//   * OnlineLSE: the streaming (max, sum 2^d, weighted sum) state, its merge,
//     warp / block reductions of it, and row_stats (lse, log-prob, entropy),
//   * GradOp / grad_vec / grad_row: the gradient of a row.
// The scalar math (OnlineLSE, row_stats, GradOp, grad_vec) is also compiled
// for the host, where tests/test_cuda_math.py checks it against float64.
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
template <typename Acc> __host__ __device__ __forceinline__ Acc neg_inf() {
  return static_cast<Acc>(-INFINITY);
}
template <typename Acc> __host__ __device__ __forceinline__ Acc quiet_nan() {
  return static_cast<Acc>(NAN);
}

// The row math runs in base 2: a logit x is scaled once to z = x * c with
// c = log2(e) / T (row_scale), so that every exponential is a bare 2^d (one
// MUFU.EX2 for float) and no per-element multiply by log2(e) is needed;
// results are converted back to nats once per row (row_stats, GradOp).
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// The base-2 scale c = log2(e) / T of a row, rounded once from double.
template <typename Acc>
__host__ __device__ __forceinline__ Acc row_scale(double inv_temperature) {
  return static_cast<Acc>(inv_temperature * kLog2e);
}

// 2^d with results below the smallest normal flushed to 0: for float a bare
// MUFU.EX2 (within 2 ulp; exp2f would add a 3-instruction
// denormal fix-up). Harmless everywhere it is used: a flushed term of the
// log-sum-exp sum is below 2^-126 while the sum is >= 1 (the row max
// contributes 2^0 = 1), a flushed entropy term e * d (d >= dead_exp = -256) is
// below 2^-118, and a flushed probability changes a gradient by less than 2^-126
// times its scale. -inf gives +0, NaN gives NaN. On the host (tests of this
// header, tests/test_cuda_math.py) the same function with libm.
__host__ __device__ __forceinline__ float exp2_ftz(float d) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return r;
#else
  const float r = std::exp2(d);
  return std::fpclassify(r) == FP_SUBNORMAL ? 0.0f : r;
#endif
}
__host__ __device__ __forceinline__ double exp2_ftz(double d) { return exp2(d); }
__host__ __device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__host__ __device__ __forceinline__ double log2_acc(double x) { return log2(x); }

// A base-2 exponent d that stands for "no probability": 2^dead_exp is exactly 0
// (float: below 2^-149, and flushed by exp2_ftz; double: below 2^-1074), and
// it is small enough in magnitude that coefficient * dead_exp stays finite for
// any coefficient below ~1e36 (float): -inf logits are clamped to it where
// 0 * -inf would be NaN.
template <typename Acc> __host__ __device__ __forceinline__ Acc dead_exp();
template <> __host__ __device__ __forceinline__ float dead_exp<float>() { return -256.0f; }
template <> __host__ __device__ __forceinline__ double dead_exp<double>() { return -2048.0; }

// max(d, lo) for a constant, non-NaN lo that keeps a NaN d: one FMNMX.NaN on
// sm_80+, a compare and select elsewhere (d < lo is false for NaN).
__host__ __device__ __forceinline__ float max_keep_nan(float d, float lo) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(d), "f"(lo));
  return r;
#else
  return d < lo ? lo : d;
#endif
}
__host__ __device__ __forceinline__ double max_keep_nan(double d, double lo) { return d < lo ? lo : d; }

// Logits within a factor ~1.44 / T of the float maximum overflow to +-inf when
// scaled (float only; |x| > 2.3e38 at T = 1): their rows come out NaN.
//
// z = x * c, always rounded to the accumulation type: the explicit
// rounding multiply keeps the compiler from contracting it into the FMA of a
// following subtraction, so every use of z (the max, 2^(z - m), the -inf
// test, the label's logit) sees the same value; e.g. a one-token vocabulary
// then gives logprob exactly 0.
template <typename Acc>
__host__ __device__ __forceinline__ Acc mul_rn(Acc a, Acc b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(Acc) == 8) {
    return __dmul_rn(a, b);
  } else {
    return __fmul_rn(a, b);
  }
#else
  return a * b;  // (the host compiler contracts nothing into an FMA here: no -ffp-contract=fast)
#endif
}

// fmax/fmaxf ignore a NaN operand (IEEE maxNum). The online state relies on
// that: NaN logits never become the running max, and reach the outputs through
// the sum instead (exp(NaN - m) = NaN).
__host__ __device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__host__ __device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------
// 16-byte vectors
// ---------------------------------------------------------------------------
// Loads go through uint4 (one LDG.128 / STG.128) and are unpacked with bit
// operations, so no type punning of __half / __nv_bfloat16 objects is needed.
// Lower-indexed elements sit at lower addresses: for 2-byte types element 2i
// is the low half and element 2i + 1 the high half of 32-bit word i (little
// endian); a double is (low word, high word).

template <typename T> struct Vec;
// Each Vec<T> unpacks 16 bytes (unpack), loads them (load: a plain 16-byte load) and stores
// them (store); vec_load<kStream> picks the load.

template <> struct Vec<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ void load(const float* p, float* out) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);  // one 16-byte load, then unpacked
    unpack(r, out);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* out) {
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
    const uint4 r = *reinterpret_cast<const uint4*>(p);  // one 16-byte load, then unpacked
    unpack(r, out);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, double* out) {
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
    const uint4 r = *reinterpret_cast<const uint4*>(p);  // one 16-byte load, then unpacked
    unpack(r, out);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* out) {
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
    const uint4 r = *reinterpret_cast<const uint4*>(p);  // one 16-byte load, then unpacked
    unpack(r, out);
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* out) {
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

// 16 bytes of a stream that this kernel reads once and never writes: through the read-only
// (non-coherent) path, not kept in L1, with L2 asked to fetch the 256-byte block around them
// (.L2::256B, a prefetch-size hint). A knob (RLHF_KERNELS_LOAD_HINT=1) of the log-prob
// forward, whose target sits within 1% of what its plain loads reached on an H100.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// One 16-byte vector of T as accumulation values: a plain load, or (kStream) ld_stream16.
template <bool kStream, typename T>
__device__ __forceinline__ void vec_load(const T* p, acc_t<T>* out) {
  if constexpr (kStream) {
    Vec<T>::unpack(ld_stream16(p), out);
  } else {
    Vec<T>::load(p, out);
  }
}

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
// Over a set of values z_j, logits in base-2 units (z = x * row_scale(1/T)),
// the state holds
//   m = max_j z_j                         (-inf for an empty set),
//   s = sum_j 2^(z_j - m),
//   w = sum_j 2^(z_j - m) * (z_j - m)     (only when kW).
// Then, in nats, with p_j = 2^(z_j - m) / s the softmax,
//   lse = ln2 * (m + log2(s)),
//   logprob_y = ln2 * ((z_y - m) - log2(s)),
//   entropy = -sum_j p_j ln(p_j) = ln2 * (log2(s) - w / s)   (row_stats).
// w is taken relative to m (rather than sum 2^(z - m) * z, which would give
// entropy = lse - w' / s) so that the entropy never subtracts two numbers of
// the size of the logits: once m is finite, s >= 1 and w <= 0, so the entropy
// adds two non-negative terms and small entropies of confident rows keep
// their relative accuracy; for the same reason logprob_y subtracts m from z_y
// before log2(s) (exactly 0 for the row's maximum), never lse from z_y.
//
// -inf logits (masked vocabulary) contribute exactly 0 to s and w. A state
// whose m is -inf is "empty": its s and w are 0 (or NaN if it saw a NaN) and
// are never rescaled, so 2^(-inf - -inf) and 0 * -inf never happen.
// NaN logits: max_acc skips them, 2^(NaN - m) = NaN poisons s, so lse,
// logprob and entropy come out NaN. +inf logits give NaN as well.
//
// Plain aggregate (no constructors) so that it can live in __shared__.
template <typename Acc, bool kW>
struct OnlineLSE {
  Acc m, s, w;

  __host__ __device__ __forceinline__ void reset() {
    m = neg_inf<Acc>();
    s = Acc(0);
    w = Acc(0);
  }

  // Adds K values. The chunk maximum is taken first, so the state is rescaled
  // at most once per chunk (and rarely at all once the row max was seen).
  // Per value, once m is finite: a subtraction, one 2^d, an add (and for kW
  // a NaN-keeping max and an fma). 2^kDead is exactly 0 and 0 * kDead is 0
  // (dead_exp): kDead stands in for d = -inf (z = -inf with m finite; also
  // clamps finite d below it, whose terms are 0 either way), and, while m is
  // still -inf, for every z = -inf (whose z - m would be NaN).
  template <int K>
  __host__ __device__ __forceinline__ void push(const Acc* z) {
    Acc cm = z[0];
#pragma unroll
    for (int k = 1; k < K; ++k) cm = max_acc(cm, z[k]);
    if (cm > m) {  // false for NaN cm
      if (m != neg_inf<Acc>()) {
        const Acc dm = m - cm;  // < 0
        const Acc a = exp2_ftz(dm);
        if (kW) w = a * fma(s, dm, w);
        s *= a;
      }
      m = cm;
    }
    const Acc kDead = dead_exp<Acc>();
    if (m != neg_inf<Acc>()) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        Acc d = z[k] - m;  // -inf for z = -inf, NaN for NaN
        if (kW) d = max_keep_nan(d, kDead);
        const Acc e = exp2_ftz(d);
        s += e;
        if (kW) w = fma(e, d, w);
      }
    } else {  // nothing but -inf (and NaN) seen so far
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const Acc d = (z[k] == neg_inf<Acc>()) ? kDead : z[k] - m;
        const Acc e = exp2_ftz(d);
        s += e;
        if (kW) w = fma(e, d, w);
      }
    }
  }

  // Merges the state (om, os, ow) into this one. Symmetric, so a butterfly
  // reduction gives every lane the same bits.
  __host__ __device__ __forceinline__ void merge(Acc om, Acc os, Acc ow) {
    const Acc mn = max_acc(m, om);
    Acc sa = s, wa = w, sb = os, wb = ow;
    if (m != neg_inf<Acc>()) {
      const Acc dm = m - mn;
      const Acc a = exp2_ftz(dm);
      sa = s * a;
      if (kW) wa = a * fma(s, dm, w);
    }
    if (om != neg_inf<Acc>()) {
      const Acc dm = om - mn;
      const Acc a = exp2_ftz(dm);
      sb = os * a;
      if (kW) wb = a * fma(os, dm, ow);
    }
    m = mn;
    s = sa + sb;
    w = kW ? wa + wb : Acc(0);
  }
};

// A row's results in nats from its merged state and the label's base-2 logit
// z_y (the same rounding as the values pushed: mul_rn(x_y, scale)).
template <typename Acc>
struct RowStats {
  Acc lse, logprob, entropy;
  Acc lse2;  // the log-normalizer in base 2, m + log2(s), for GradOp in the same kernel
};

// The once-per-row conversions to nats are done in double (free at one row
// per block): each result is then rounded once. A backward kernel that only has
// the saved lse (nats) converts it back with lse2_from_nats, within about one
// float ulp of lse2; kernels that compute the gradient in the same pass use
// lse2 as it is.
template <typename Acc, bool kW>
__host__ __device__ __forceinline__ RowStats<Acc> row_stats(const OnlineLSE<Acc, kW>& st, Acc z_label) {
  const double log2_s = static_cast<double>(log2_acc(st.s));
  const double m = static_cast<double>(st.m);
  RowStats<Acc> r;
  r.lse = static_cast<Acc>((m + log2_s) * kLn2);
  r.lse2 = static_cast<Acc>(m + log2_s);
  r.logprob = static_cast<Acc>(((static_cast<double>(z_label) - m) - log2_s) * kLn2);
  r.entropy = kW ? static_cast<Acc>((log2_s - static_cast<double>(st.w) / static_cast<double>(st.s)) * kLn2) : Acc(0);
  return r;
}

template <typename Acc>
__host__ __device__ __forceinline__ Acc lse2_from_nats(Acc lse) {
  return static_cast<Acc>(static_cast<double>(lse) * kLog2e);
}

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

// The least power of two >= n (n >= 1).
constexpr int pow2_ceil(int n) { return n <= 1 ? 1 : 2 * pow2_ceil((n + 1) / 2); }

// Butterfly sum over the first kLanes lanes of a warp (all 32 lanes active,
// kLanes a power of two): each of those lanes gets the same bits, the sum of
// its aligned group of kLanes lanes.
template <typename T, int kLanes = kWarpSize>
__device__ __forceinline__ T warp_sum(T v) {
  static_assert(kLanes > 0 && kLanes <= kWarpSize && (kLanes & (kLanes - 1)) == 0, "warp_sum: lanes");
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sums v[0 .. K) (K <= N) over the kThreads threads of the block with a
// fixed tree, so the result is the same on every run; the totals are valid in
// thread 0 (lanes [0, pow2_ceil(kWarps)) of warp 0; other threads hold partial
// sums). The second level adds the kWarps warp totals over ceil(log2(kWarps))
// shuffles, not 5: with 4 warps (a small
// batch's block) that is 2 dependent rounds a value instead of 5, on a path
// that a latency-bound one-block kernel runs once. smem: [kThreads / 32][N].
// Must be reached by every thread of the block; ends with a barrier, so smem
// may be reused at once.
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
    for (int k = 0; k < K; ++k) v[k] = warp_sum<T, pow2_ceil(kWarps)>(lane < kWarps ? smem[lane][k] : T(0));
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Rows of the log-prob family (logprobs.cu, ppo_logits.cu)
// ---------------------------------------------------------------------------

// A part of a row, for kernels that cut rows into `parts` pieces (blocks): part
// p of a row split as split_row does owns the 16-byte body vectors [p * pv,
// min((p + 1) * pv, nvec)), part 0 also the scalar head and part parts - 1 the
// scalar tail; rows whose layout allows no vectors are cut into pieces of pv *
// kN scalars. RowPart{} is the whole row. The launcher keeps parts * pv * kN
// below 2^31 (and pv >= ceil(V / kN) when parts == 1).
struct RowPart {
  int part = 0;
  int parts = 1;
  int pv = 0x3fffffff;  // vectors per part (the whole row of any V <= 2^30; no int overflow below)
  __device__ __forceinline__ bool first() const { return part == 0; }
  __device__ __forceinline__ bool last() const { return part == parts - 1; }
  __device__ __forceinline__ int vec_begin() const { return part * pv; }
  __device__ __forceinline__ int vec_end(int nvec) const { return min(nvec, part * pv + pv); }
};

// Streams one kept row x[0:V] through the block's kThreads threads: each
// thread pushes its share of z = x * scale (scale = row_scale(1/T): base-2
// units) into an OnlineLSE state (scalar head, 16-byte body, scalar tail),
// then the states are merged across the block. The returned state is valid in
// thread 0. Reached by every thread (it has block barriers). kStream: the body's
// loads are ld_stream16 (the row must not be written while the kernel runs).
// kParts: only the part `rp` of the row (RowPart: its body vectors, the head
// with the first part, the tail with the last).
template <int kThreads, typename T, bool kEntropy, bool kStream = false, bool kParts = false>
__device__ __forceinline__ OnlineLSE<acc_t<T>, kEntropy> stream_row(const T* x, int V, acc_t<T> scale,
                                                                    OnlineLSE<acc_t<T>, kEntropy>* smem,
                                                                    const RowPart rp = RowPart{}) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  OnlineLSE<Acc, kEntropy> st;
  st.reset();
  const RowSplit sp = split_row(x, V);

  if ((!kParts || rp.first()) && tid < sp.head) {  // head < kN <= kThreads
    const Acc z[1] = {mul_rn(to_acc(x[tid]), scale)};
    st.template push<1>(z);
  }

  // kU independent 16-byte loads per iteration multiply the bytes in flight
  // per thread; the kU * kN values are then pushed as one chunk (one max,
  // at most one rescale). Not for double: its exp() is a long polynomial
  // whose hoisted constants leave no registers for a second vector.
  constexpr int kU = sizeof(T) == 8 ? 1 : 2;
  const T* body = x + sp.head;
  const int end = kParts ? rp.vec_end(sp.nvec) : sp.nvec;
  int i = (kParts ? rp.vec_begin() : 0) + tid;
  for (; i + (kU - 1) * kThreads < end; i += kU * kThreads) {
    Acc z[kU * kN];
#pragma unroll
    for (int u = 0; u < kU; ++u) vec_load<kStream>(body + (i + u * kThreads) * kN, z + u * kN);
#pragma unroll
    for (int k = 0; k < kU * kN; ++k) z[k] = mul_rn(z[k], scale);
    st.template push<kU * kN>(z);
  }
  if (kU > 1 && i < end) {
    Acc z[kN];
    vec_load<kStream>(body + i * kN, z);
#pragma unroll
    for (int k = 0; k < kN; ++k) z[k] = mul_rn(z[k], scale);
    st.template push<kN>(z);
  }

  if ((!kParts || rp.last()) && tid < V - sp.body_end) {  // tail < kN <= kThreads
    const Acc z[1] = {mul_rn(to_acc(x[sp.body_end + tid]), scale)};
    st.template push<1>(z);
  }

  block_reduce<kThreads>(st, smem);
  return st;
}

// Gradient of one element, in the accumulation type:
//   d = x / T - lse (nats), p = exp(d),
//   grad = ( g * (1[j == y] - p) - gH * p * (d + H) ) / T
//        = 1[j == y] * g / T  -  p * (g + gH * (d + H)) / T,
// evaluated in base 2 with the row's constants folded once (make):
//   d2 = fma(x, c, -lse2)       c = log2(e) / T, lse2 = lse * log2(e), d = d2 * ln2,
//   p = 2^d2,
//   grad = fma(-p, a0 + a1 * d2, 1[j == y] * gi)
//          gi = g / T, a0 = (g + gH * H) / T, a1 = gH * ln2 / T
//          (without entropy a0 = gi and the a1 term is dropped).
// Per element that is an fma, a 2^d and an fma (with entropy also a NaN-keeping
// max and one more fma); grad_row tests for the label once per 16-byte vector
// and calls the one-argument form for vectors without it. The fma form rounds
// g * (1 - p) / T once for the label. A logit of -inf has p = 0 and
// contributes nothing else: without entropy fma(-0, a0, 0) is 0; with entropy
// d2 = -inf is clamped to dead_exp() so that a0 + a1 * d2 stays finite. A row of only
// -inf logits (lse = -inf) has a NaN log-prob, and its gradient is NaN too, as
// in torch, the CPU kernel and the Triton kernel: make() then sets c and the
// coefficients to NaN.
template <typename Acc, bool kEntropy>
struct GradOp {
  Acc c, lse2, gi, a0, a1;
  int y;

  // lse2: the row's log-normalizer in base 2 (RowStats::lse2, or
  // lse2_from_nats of a saved lse); H: its entropy (nats); g, gH: the upstream
  // gradients of its log-prob and entropy; inv_t = 1 / T and
  // scale = row_scale(1 / T) as the forward used them.
  __host__ __device__ __forceinline__ static GradOp make(Acc lse2, Acc g, Acc gH, Acc H, Acc inv_t, Acc scale,
                                                         int y) {
    const bool dead = lse2 == neg_inf<Acc>();
    const Acc inv = dead ? quiet_nan<Acc>() : inv_t;
    GradOp op;
    op.c = dead ? quiet_nan<Acc>() : scale;
    op.lse2 = lse2;
    op.gi = g * inv;
    op.a0 = kEntropy ? fma(gH * inv, H, op.gi) : op.gi;
    op.a1 = kEntropy ? gH * inv * Acc(kLn2) : Acc(0);
    op.y = y;
    return op;
  }

  // Element j of the row.
  __host__ __device__ __forceinline__ Acc operator()(Acc x, int j) const { return eval(x, j == y ? gi : Acc(0)); }
  // An element known not to be the label's.
  __host__ __device__ __forceinline__ Acc operator()(Acc x) const { return eval(x, Acc(0)); }

  __host__ __device__ __forceinline__ Acc eval(Acc x, Acc onehot) const {
    Acc d2 = fma(x, c, -lse2);
    if (kEntropy) d2 = max_keep_nan(d2, dead_exp<Acc>());
    const Acc p = exp2_ftz(d2);
    const Acc t = kEntropy ? fma(a1, d2, a0) : a0;
    return fma(-p, t, onehot);
  }
};

// u[k] = op(u[k], j0 + k) for one vector of kN elements starting at element
// j0: the label test once per vector (the one vector of a row that holds the
// label takes the per-element form).
template <int kN, typename Op, typename Acc>
__host__ __device__ __forceinline__ void grad_vec(const Op& op, Acc* u, int j0) {
  if (static_cast<unsigned>(op.y - j0) < static_cast<unsigned>(kN)) {
#pragma unroll
    for (int k = 0; k < kN; ++k) u[k] = op(u[k], j0 + k);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) u[k] = op(u[k]);
  }
}

// Writes `value` (0 or NaN) to the n elements of a gradient row, or with
// kParts to those of its part `rp`.
template <int kThreads, bool kParts = false, typename T>
__device__ __forceinline__ void fill_row(T* out, int n, acc_t<T> value, const RowPart rp = RowPart{}) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  const RowSplit sp = split_row(out, n);
  const T v = from_acc<T>(value);
  if ((!kParts || rp.first()) && tid < sp.head) out[tid] = v;
  Acc vals[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) vals[k] = value;
  T* body = out + sp.head;
  const int end = kParts ? rp.vec_end(sp.nvec) : sp.nvec;
  for (int i = (kParts ? rp.vec_begin() : 0) + tid; i < end; i += kThreads) Vec<T>::store(body + i * kN, vals);
  if ((!kParts || rp.last()) && tid < n - sp.body_end) out[sp.body_end + tid] = v;
}

// Writes out[j] = op(x[j], j) for the V elements of one row, or with kParts
// for those of its part `rp` (RowPart), with the block's kThreads threads:
// 16-byte vectors where x and out share their alignment, else coalesced
// scalars. Each element is read and then written by the same thread with no
// other thread touching it, so out == x (in place, same layout) is safe.
// (Without kParts the part bounds are not in the code at all: on sm_90 even
// constant ones cost the bf16 backward 8 registers.)
template <int kThreads, bool kParts = false, typename T, typename Op>
__device__ __forceinline__ void grad_row(const T* x, T* out, int V, const Op& op, const RowPart rp = RowPart{}) {
  using Acc = acc_t<T>;
  constexpr int kN = Vec<T>::kN;
  const int tid = static_cast<int>(threadIdx.x);
  const uintptr_t x_mis = reinterpret_cast<uintptr_t>(x) & 15u;
  const uintptr_t out_mis = reinterpret_cast<uintptr_t>(out) & 15u;
  if (x_mis == out_mis) {
    // Same split for both rows, so every vector load pairs with an aligned
    // vector store at the same element offsets.
    const RowSplit sp = split_row(x, V);
    if ((!kParts || rp.first()) && tid < sp.head) out[tid] = from_acc<T>(op(to_acc(x[tid]), tid));

    const T* xb = x + sp.head;
    T* ob = out + sp.head;
    const int end = kParts ? rp.vec_end(sp.nvec) : sp.nvec;
    int i = (kParts ? rp.vec_begin() : 0) + tid;
    // Both loads are issued before either store (memory parallelism; also
    // keeps the read-before-write order per element when in place).
    for (; i + kThreads < end; i += 2 * kThreads) {
      Acc u[kN], v[kN];
      Vec<T>::load(xb + i * kN, u);
      Vec<T>::load(xb + (i + kThreads) * kN, v);
      const int j0 = sp.head + i * kN;
      const int j1 = j0 + kThreads * kN;
      grad_vec<kN>(op, u, j0);
      grad_vec<kN>(op, v, j1);
      Vec<T>::store(ob + i * kN, u);
      Vec<T>::store(ob + (i + kThreads) * kN, v);
    }
    if (i < end) {
      Acc u[kN];
      Vec<T>::load(xb + i * kN, u);
      const int j0 = sp.head + i * kN;
      grad_vec<kN>(op, u, j0);
      Vec<T>::store(ob + i * kN, u);
    }

    const int j = sp.body_end + tid;
    if ((!kParts || rp.last()) && tid < V - sp.body_end) out[j] = from_acc<T>(op(to_acc(x[j]), j));
  } else {
    // Rows misaligned relative to each other: scalar, still coalesced
    // (consecutive threads, consecutive elements). Four loads in flight
    // per thread before the stores. A part is pv * kN scalars here.
    constexpr int kU = 4;
    const int end = kParts ? min(V, rp.vec_end(0x7fffffff / kN) * kN) : V;
    int j = (kParts ? rp.vec_begin() * kN : 0) + tid;
    for (; j + (kU - 1) * kThreads < end; j += kU * kThreads) {
      Acc u[kU];
#pragma unroll
      for (int k = 0; k < kU; ++k) u[k] = to_acc(x[j + k * kThreads]);
#pragma unroll
      for (int k = 0; k < kU; ++k) {
        out[j + k * kThreads] = from_acc<T>(op(u[k], j + k * kThreads));
      }
    }
    for (; j < end; j += kThreads) out[j] = from_acc<T>(op(to_acc(x[j]), j));
  }
}

}  // namespace gpu
}  // namespace rlhf
