// SIMD building blocks shared by the CPU kernels (logprobs_cpu.cpp,
// preference_cpu.cpp): GCC vector extensions of 16 floats, a branch-free exp,
// and run-time ISA selection. Kernels mark their loop bodies RLHF_INLINE and
// instantiate them once per target (RLHF_TARGET_AVX2 / RLHF_TARGET_AVX512 /
// none), so one build runs at full width on any x86-64.
// No torch headers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace rlhf {
namespace simd {

#define RLHF_INLINE __attribute__((always_inline)) inline
#if defined(__x86_64__) && defined(__GNUC__)
#define RLHF_HAS_ISA_DISPATCH 1
#define RLHF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define RLHF_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
// The entry point among name_base<T>, name_avx2<T>, name_avx512<T> that this CPU runs.
#define RLHF_PICK(name, T)                                                               \
  (::rlhf::simd::cpu_isa() == ::rlhf::simd::Isa::Avx512 ? &name##_avx512<T>              \
   : ::rlhf::simd::cpu_isa() == ::rlhf::simd::Isa::Avx2 ? &name##_avx2<T>                \
                                                        : &name##_base<T>)
#else
#define RLHF_PICK(name, T) (&name##_base<T>)
#endif

// 16 floats per vector: one zmm register with AVX-512, two ymm with AVX2.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
constexpr int kLanes = 16;

// 8 floats: one ymm register. The PPO token math (ppo_loss_math.h on lanes)
// keeps comparison masks as values; GCC lowers a 64-byte comparison whose mask
// is a value lane by lane in the always_inline helpers (they are compiled for
// the baseline ISA before being inlined into the per-ISA entry points), while
// 32-byte ones come out as whole-register compares and blends.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));

constexpr int kLanes8 = 8;

RLHF_INLINE vf splat(float v) { return vf{} + v; }
RLHF_INLINE vf8 splat8(float v) { return vf8{} + v; }

// a[0, n) into lanes, n <= 8, the rest 0. (Fixed-size copies compile to vector
// moves; only a row's last, partial step pays a memcpy call.)
RLHF_INLINE vf8 load8(const float* a, int64_t n) {
  vf8 v{};
  if (n == kLanes8) {
    memcpy(&v, a, sizeof(vf8));
  } else {
    memcpy(&v, a, static_cast<size_t>(n) * sizeof(float));
  }
  return v;
}
RLHF_INLINE void store8(float* a, vf8 v, int64_t n) {
  if (n == kLanes8) {
    memcpy(a, &v, sizeof(vf8));
  } else {
    memcpy(a, &v, static_cast<size_t>(n) * sizeof(float));
  }
}
// -1 where mask[i] != 0 for i < n, else 0. Widened by a plain loop (the compiler
// vectorises it): __builtin_convertvector from bytes to ints is lowered lane by lane.
RLHF_INLINE vi8 mask8(const uint8_t* mask, int64_t n) {
  int32_t m[kLanes8];
  if (n == kLanes8) {
    for (int i = 0; i < kLanes8; ++i) m[i] = mask[i];
  } else {
    for (int i = 0; i < kLanes8; ++i) m[i] = i < n ? mask[i] : 0;
  }
  vi8 v;
  memcpy(&v, m, sizeof(vi8));
  return v != 0;
}

// 2^n p(r) for xc in [-87, 88]: Cody-Waite reduction to r in [-ln2/2, ln2/2]
// and a degree-6 Taylor polynomial (truncation < 1.2e-7 relative), the
// exponent n in [-126, 127] written straight into the float's bits.
// V / VI: vf / vi or vf8 / vi8.
template <typename V, typename VI>
RLHF_INLINE V exp_core(V xc) {
  const V shifter = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (xc * 1.4426950408889634f + shifter) - shifter;
  const V r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = V{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * (V)e;
}

// exp(x) for x <= 0 (x = z - max). Exactly 0 below -87 (where float exp is
// subnormal) and for -inf; NaN stays NaN.
RLHF_INLINE vf exp_nonpos(vf x) {
  const vf lo = splat(-87.0f);
  const vf y = exp_core<vf, vi>(x < lo ? lo : x);
  return x < lo ? vf{} : y;
}

// exp(x) for |x| <= 87 (clamped to [-87, 88] outside); NaN stays NaN.
RLHF_INLINE vf8 exp_bounded(vf8 x) {
  const vf8 lo = splat8(-87.0f), hi = splat8(88.0f);
  return exp_core<vf8, vi8>(x < lo ? lo : (x > hi ? hi : x));
}

RLHF_INLINE vf8 abs(vf8 x) { return (vf8)((vu8)x & 0x7fffffffu); }

// log1p(e) for e in [0, 1]: 2 atanh(u) with u = e / (2 + e) in [0, 1/3], as
// 2u (1 + u^2/3 + ... + u^14/15) (truncation < 3e-9 relative). Relative
// accuracy holds for tiny e (u ~ e / 2), unlike log(1 + e). NaN stays NaN.
RLHF_INLINE vf log1p_unit(vf e) {
  const vf u = e / (e + 2.0f);
  const vf u2 = u * u;
  vf p = splat(1.0f / 15.0f);
  p = p * u2 + 1.0f / 13.0f;
  p = p * u2 + 1.0f / 11.0f;
  p = p * u2 + 1.0f / 9.0f;
  p = p * u2 + 1.0f / 7.0f;
  p = p * u2 + 1.0f / 5.0f;
  p = p * u2 + 1.0f / 3.0f;
  p = p * u2 + 1.0f;
  return (u + u) * p;
}

RLHF_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
RLHF_INLINE float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
RLHF_INLINE float hsum(vf8 v) {
  float s = 0;
  for (int i = 0; i < kLanes8; ++i) s += v[i];
  return s;
}

enum class Isa { Base, Avx2, Avx512 };
inline Isa cpu_isa() {
#ifdef RLHF_HAS_ISA_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Base;
  }();
  return isa;
#else
  return Isa::Base;
#endif
}

}  // namespace simd
}  // namespace rlhf

// RLHF_ISA_ENTRIES(name, body, Params, TPARAMS, TARGS) defines name_base,
// name_avx2 and name_avx512 (template <TPARAMS>, each calling body<TARGS>(p, b, e)
// under its target), RLHF_ISA_PICK(name, TARGS) the one this CPU runs. Commas
// inside TPARAMS / TARGS are written RLHF_COMMA. body must be always_inline.
#define RLHF_COMMA ,
#ifdef RLHF_HAS_ISA_DISPATCH
#define RLHF_ISA_ENTRIES(name, body, Params, TPARAMS, TARGS)                                          \
  template <TPARAMS>                                                                                 \
  void name##_base(const Params& p, int64_t b, int64_t e) { body<TARGS>(p, b, e); }                  \
  template <TPARAMS>                                                                                 \
  RLHF_TARGET_AVX2 void name##_avx2(const Params& p, int64_t b, int64_t e) { body<TARGS>(p, b, e); } \
  template <TPARAMS>                                                                                 \
  RLHF_TARGET_AVX512 void name##_avx512(const Params& p, int64_t b, int64_t e) { body<TARGS>(p, b, e); }
#define RLHF_ISA_PICK(name, TARGS)                                                      \
  (::rlhf::simd::cpu_isa() == ::rlhf::simd::Isa::Avx512 ? &name##_avx512<TARGS>        \
   : ::rlhf::simd::cpu_isa() == ::rlhf::simd::Isa::Avx2 ? &name##_avx2<TARGS>          \
                                                        : &name##_base<TARGS>)
#else
#define RLHF_ISA_ENTRIES(name, body, Params, TPARAMS, TARGS) \
  template <TPARAMS>                                         \
  void name##_base(const Params& p, int64_t b, int64_t e) { body<TARGS>(p, b, e); }
#define RLHF_ISA_PICK(name, TARGS) (&name##_base<TARGS>)
#endif
