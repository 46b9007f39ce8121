// Row kernels of the CPU log-prob path, shared by logprobs_cpu.cpp (token
// log-probs) and ppo_loss_cpu.cpp (the fused PPO sweep from logits).
//
// Float math uses the 16-float vectors of cpu_simd.h; every function is
// always_inline, so each caller compiles it for the ISA of its own entry
// point (AVX-512, AVX2+FMA or baseline x86-64, picked at run time with
// RLHF_PICK). row_lse streams a row in L1-resident chunks of scaled logits
// z = x / T with the online log-sum-exp rule; row_grad recomputes
// p = exp(z - lse) and writes the gradient in the same pass. exp is a
// branch-free polynomial (~1 ulp). float64 rows (gradcheck) take a scalar path
// with libm's exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_simd.h"

namespace rlhf {
namespace cpu {
namespace {

// The generic vector pieces (vf, kLanes, splat, exp_nonpos, hmax, hsum,
// RLHF_INLINE, ISA dispatch) are cpu_simd.h's.
using simd::exp_nonpos;
using simd::hmax;
using simd::hsum;
using simd::kLanes;
using simd::splat;
using simd::vf;
using simd::vu;

typedef uint16_t vh __attribute__((vector_size(32)));
constexpr int64_t kChunk = 1024;  // floats per L1 buffer (4 KiB)
constexpr float kInf = std::numeric_limits<float>::infinity();

// kLanes elements of the logits' dtype <-> kLanes floats.
RLHF_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
RLHF_INLINE vf loadv(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
RLHF_INLINE vf loadv(const c10::Half* p) {
  vh h16;
  std::memcpy(&h16, p, sizeof(h16));
  const vu h = __builtin_convertvector(h16, vu);
  // Exponent and mantissa into float position, exponent rebiased by 112;
  // Inf/NaN get the float max exponent, zero/subnormal are renormalised by
  // subtracting 2^-14 (the value of the implicit bit we add).
  const vu em = (h & 0x7fffu) << 13;
  const vu exp = em & (0x7c00u << 13);
  vu bits = em + ((127u - 15u) << 23);
  bits = exp == (0x7c00u << 13) ? bits + ((128u - 16u) << 23) : bits;
  const vf sub = (vf)(bits + (1u << 23)) - 6.103515625e-05f;
  vu out = exp == 0u ? (vu)sub : bits;
  out |= (h & 0x8000u) << 16;
  return (vf)out;
}
RLHF_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
RLHF_INLINE void storev(c10::BFloat16* p, vf v) {
  const vu b = (vu)v;
  vu r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // round to nearest even
  r = v != v ? vu{} + 0x7fc0u : r;                 // NaN stays NaN
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof(h));
}
RLHF_INLINE void storev(c10::Half* p, vf v) {
  for (int i = 0; i < kLanes; ++i) p[i] = c10::Half(v[i]);
}

// The last n < kLanes elements of a row, padded with `pad`.
template <typename T>
RLHF_INLINE vf load_tail(const T* p, int64_t n, float pad) {
  vf v = splat(pad);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
template <typename T>
RLHF_INLINE void store_tail(T* p, int64_t n, vf v) {
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(v[i]);
}

// lse = log sum_j exp(z_j) and, with kEntropy, H = lse - sum_j p_j z_j of one row.
struct RowLse {
  float lse;
  float entropy;
};

// Reads the V logits of one row once (in chunks of kChunk, converted into an
// L1 buffer while taking their max). V >= 1.
template <typename T, bool kEntropy>
RLHF_INLINE RowLse row_lse(const T* x, int64_t V, float inv_t) {
  vf z[kChunk / kLanes];
  // Online max m, s = sum exp(z - m) and, for the entropy, w = sum exp(z - m) (z - m):
  // relative to the max, so that H = log s - w / s does not cancel for large logits.
  float m = -kInf, s = 0.0f, w = 0.0f;
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t n = std::min(kChunk, V - start);
    const int64_t full = n / kLanes;
    int64_t nvec = full;
    vf vmax = splat(-kInf);
    for (int64_t k = 0; k < full; ++k) {
      z[k] = loadv(x + start + k * kLanes) * inv_t;
      vmax = z[k] > vmax ? z[k] : vmax;
    }
    if (n % kLanes) {  // padded with -inf, which adds exp(-inf) = 0 below
      z[full] = load_tail(x + start + full * kLanes, n % kLanes, -kInf) * inv_t;
      vmax = z[full] > vmax ? z[full] : vmax;
      nvec = full + 1;
    }
    const float m_new = std::max(m, hmax(vmax));
    if (m_new == -kInf) continue;  // every logit so far is -inf
    const float alpha = std::exp(m - m_new);
    vf vs{}, vw{};
    for (int64_t k = 0; k < nvec; ++k) {
      const vf e = exp_nonpos(z[k] - m_new);
      vs += e;
      if (kEntropy) vw += e * (e > 0.0f ? z[k] - m_new : vf{});  // no 0 * -inf
    }
    // moving the pivot from m to m_new: each (z - m) becomes (z - m) + (m - m_new)
    if (kEntropy) w = (s > 0.0f ? alpha * (w + s * (m - m_new)) : 0.0f) + hsum(vw);
    s = s * alpha + hsum(vs);
    m = m_new;
  }
  return RowLse{m + std::log(s), kEntropy ? std::log(s) - w / s : 0.0f};
}

// gx_j = ( g (1[j == label] - p_j) - gh p_j (z_j - lse + H) ) / T over one row,
// p_j = exp(z_j - lse). Reads x once and writes gx once; gx may equal x (each
// vector is loaded before it is stored).
template <typename T, bool kEntropy>
RLHF_INLINE void row_grad(const T* x, T* gx, int64_t V, int64_t label, float inv_t, float lse, float g, float gh,
                          float entropy) {
  const float shift = kEntropy ? entropy - lse : 0.0f;  // z - lse + H = z + shift
  const float label_term = g * inv_t;  // the one-hot part, added before rounding to T
  auto grad = [&](vf xv, int64_t j0) {
    const vf z = xv * inv_t;
    const vf prob = exp_nonpos(z - lse);
    vf d = prob * (-g);
    if (kEntropy) d -= gh * prob * (prob > 0.0f ? z + shift : vf{});
    d *= inv_t;
    if (label >= j0 && label < j0 + kLanes) d[label - j0] += label_term;
    return d;
  };
  const int64_t full = V / kLanes;
  for (int64_t k = 0; k < full; ++k) {
    const int64_t j0 = k * kLanes;
    storev(gx + j0, grad(loadv(x + j0), j0));  // read before write: safe in place
  }
  if (V % kLanes) {
    const int64_t j0 = full * kLanes;
    store_tail(gx + j0, V % kLanes, grad(load_tail(x + j0, V % kLanes, 0.0f), j0));
  }
}

struct RowLseF64 {
  double lse;
  double entropy;
};

// float64: scalar, exact exp; only used for gradcheck-style checks.
template <bool kEntropy>
inline RowLseF64 row_lse_f64(const double* x, int64_t V, double inv_t) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, x[j] * inv_t);
  double s = 0, w = 0;
  if (m > -std::numeric_limits<double>::infinity()) {
    for (int64_t j = 0; j < V; ++j) {
      const double z = x[j] * inv_t;
      const double e = std::exp(z - m);
      s += e;
      if (kEntropy && e > 0) w += e * (z - m);
    }
  }
  return RowLseF64{m + std::log(s), kEntropy ? std::log(s) - w / s : 0.0};
}

template <bool kEntropy>
inline void row_grad_f64(const double* x, double* gx, int64_t V, int64_t label, double inv_t, double lse, double g,
                         double gh, double entropy) {
  const double shift = kEntropy ? entropy - lse : 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double z = x[j] * inv_t;
    const double prob = std::exp(z - lse);
    double d = (j == label ? g : 0.0) - g * prob;
    if (kEntropy && prob > 0) d -= gh * prob * (z + shift);
    gx[j] = d * inv_t;
  }
}

}  // namespace
}  // namespace cpu
}  // namespace rlhf
