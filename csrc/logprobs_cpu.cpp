// CPU kernels for per-token log-probs.
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds). Within a row, float math uses GCC vector extensions of 16 floats,
// compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked at run
// time by what the CPU supports. Forward converts a chunk of the row
// into an L1-resident buffer of scaled logits z = x / T while taking its max,
// then sums exp(z - m) over the buffer, merging chunks with the online
// log-sum-exp rule. Backward recomputes p = exp(z - lse) and writes the
// gradient in the same pass. exp is a branch-free polynomial (~1 ulp).
//
// Bytes: forward reads each kept row once (V * itemsize); backward reads and
// writes each row once (2 * V * itemsize). No [rows, V] temporary.
// sequence_logprobs' forward runs the same row code over work items of
// `chunk` consecutive tokens of one sequence (logprobs.h), in parallel over
// items; each item writes one partial sum and count instead of per-token
// log-probs.
// float64 logits (used for gradcheck) take a plain scalar path.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_simd.h"
#include "logprobs.h"

namespace rlhf {
namespace {

using namespace simd;  // vf, kLanes, exp_nonpos, ... (cpu_simd.h)

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

// One row whose label is in [0, V): streams the logits once, writes lse[row]
// (and entropy[row]) and returns the label's log-prob.
template <typename T, bool kEntropy>
RLHF_INLINE float fwd_kept_row(const LogprobsFwdParams& p, int64_t row, int64_t label) {
  float* lse_out = static_cast<float*>(p.lse);
  float* entropy = static_cast<float*>(p.entropy);
  const int64_t V = p.vocab;
  const T* x = static_cast<const T*>(p.logits) + p.logits_layout.offset(row);
  const float inv_t = static_cast<float>(p.inv_temperature);
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
  const float lse = m + std::log(s);
  lse_out[row] = lse;
  if (kEntropy) entropy[row] = std::log(s) - w / s;
  return static_cast<float>(x[label]) * inv_t - lse;
}

template <typename T, bool kEntropy>
RLHF_INLINE void fwd_row(const LogprobsFwdParams& p, int64_t row) {
  float* logprobs = static_cast<float*>(p.logprobs);
  const int64_t label = p.labels[row];
  if (label == p.ignore_index || label < 0 || label >= p.vocab) {
    const float v = label == p.ignore_index ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    logprobs[row] = v;
    static_cast<float*>(p.lse)[row] = v;
    if (kEntropy) static_cast<float*>(p.entropy)[row] = v;
    return;
  }
  logprobs[row] = fwd_kept_row<T, kEntropy>(p, row, label);
}

template <typename T, bool kEntropy>
RLHF_INLINE void bwd_row(const LogprobsBwdParams& p, int64_t row) {
  const int64_t label = p.labels[row];
  const int64_t V = p.vocab;
  const T* x = static_cast<const T*>(p.logits) + p.logits_layout.offset(row);
  T* gx = static_cast<T*>(p.grad_logits) + p.grad_layout.offset(row);
  if (label == p.ignore_index || label < 0 || label >= V) {
    const T v = static_cast<T>(label == p.ignore_index ? 0.0f : std::numeric_limits<float>::quiet_NaN());
    std::fill(gx, gx + V, v);
    return;
  }
  const float inv_t = static_cast<float>(p.inv_temperature);
  const float lse = static_cast<const float*>(p.lse)[row];
  const float g = static_cast<const float*>(p.grad_logprobs)[row];
  float gh = 0.0f, shift = 0.0f;
  if (kEntropy) {
    gh = static_cast<const float*>(p.grad_entropy)[row];
    shift = static_cast<const float*>(p.entropy)[row] - lse;  // z - lse + H = z + shift
  }
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

// float64: scalar, exact exp; only used for gradcheck-style checks.
template <bool kEntropy>
double fwd_kept_row_f64(const LogprobsFwdParams& p, int64_t row, int64_t label) {
  double* lse_out = static_cast<double*>(p.lse);
  double* entropy = static_cast<double*>(p.entropy);
  const int64_t V = p.vocab;
  const double* x = static_cast<const double*>(p.logits) + p.logits_layout.offset(row);
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, x[j] * p.inv_temperature);
  double s = 0, w = 0;
  if (m > -std::numeric_limits<double>::infinity()) {
    for (int64_t j = 0; j < V; ++j) {
      const double z = x[j] * p.inv_temperature;
      const double e = std::exp(z - m);
      s += e;
      if (kEntropy && e > 0) w += e * (z - m);
    }
  }
  const double lse = m + std::log(s);
  lse_out[row] = lse;
  if (kEntropy) entropy[row] = std::log(s) - w / s;
  return x[label] * p.inv_temperature - lse;
}

template <bool kEntropy>
void fwd_row_f64(const LogprobsFwdParams& p, int64_t row) {
  double* logprobs = static_cast<double*>(p.logprobs);
  const int64_t label = p.labels[row];
  if (label == p.ignore_index || label < 0 || label >= p.vocab) {
    const double v = label == p.ignore_index ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    logprobs[row] = static_cast<double*>(p.lse)[row] = v;
    if (kEntropy) static_cast<double*>(p.entropy)[row] = v;
    return;
  }
  logprobs[row] = fwd_kept_row_f64<kEntropy>(p, row, label);
}

template <bool kEntropy>
void bwd_row_f64(const LogprobsBwdParams& p, int64_t row) {
  const int64_t label = p.labels[row];
  const int64_t V = p.vocab;
  const double* x = static_cast<const double*>(p.logits) + p.logits_layout.offset(row);
  double* gx = static_cast<double*>(p.grad_logits) + p.grad_layout.offset(row);
  if (label == p.ignore_index || label < 0 || label >= V) {
    std::fill(gx, gx + V, label == p.ignore_index ? 0.0 : std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const double t = p.inv_temperature;
  const double lse = static_cast<const double*>(p.lse)[row];
  const double g = static_cast<const double*>(p.grad_logprobs)[row];
  const double gh = kEntropy ? static_cast<const double*>(p.grad_entropy)[row] : 0.0;
  const double shift = kEntropy ? static_cast<const double*>(p.entropy)[row] - lse : 0.0;
  for (int64_t j = 0; j < V; ++j) {
    const double z = x[j] * t;
    const double prob = std::exp(z - lse);
    double d = (j == label ? g : 0.0) - g * prob;
    if (kEntropy && prob > 0) d -= gh * prob * (z + shift);
    gx[j] = d * t;
  }
}

template <typename T>
RLHF_INLINE void fwd_rows(const LogprobsFwdParams& p, int64_t b, int64_t e) {
  if (p.entropy != nullptr) {
    for (int64_t r = b; r < e; ++r) fwd_row<T, true>(p, r);
  } else {
    for (int64_t r = b; r < e; ++r) fwd_row<T, false>(p, r);
  }
}
template <typename T>
RLHF_INLINE void bwd_rows(const LogprobsBwdParams& p, int64_t b, int64_t e) {
  if (p.grad_entropy != nullptr) {
    for (int64_t r = b; r < e; ++r) bwd_row<T, true>(p, r);
  } else {
    for (int64_t r = b; r < e; ++r) bwd_row<T, false>(p, r);
  }
}

// Work items [b, e) of sequence_logprobs (logprobs.h, SeqLogprobsFwdParams):
// item i sums the log-probs of its chunk of one sequence's tokens in order,
// in the accumulation type, and counts its kept tokens.
template <typename T>
RLHF_INLINE void seq_items(const SeqLogprobsFwdParams& q, int64_t b, int64_t e) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const LogprobsFwdParams& p = q.tok;
  Acc* const lse = static_cast<Acc*>(p.lse);
  for (int64_t item = b; item < e; ++item) {
    const int64_t seq = item / q.n_chunks;
    const int64_t t0 = (item - seq * q.n_chunks) * q.chunk;
    const int64_t t1 = std::min(q.time, t0 + q.chunk);
    Acc sum = 0;
    int32_t count = 0;
    for (int64_t row = seq * q.time + t0, end = seq * q.time + t1; row < end; ++row) {
      const int64_t label = p.labels[row];
      if (label == p.ignore_index) {
        lse[row] = 0;
        continue;
      }
      ++count;
      if (label < 0 || label >= p.vocab) {
        lse[row] = sum = std::numeric_limits<Acc>::quiet_NaN();
        continue;
      }
      if constexpr (std::is_same_v<T, double>) {
        sum += fwd_kept_row_f64<false>(p, row, label);
      } else {
        sum += fwd_kept_row<T, false>(p, row, label);
      }
    }
    static_cast<Acc*>(q.partial)[item] = sum;
    q.count[item] = count;
  }
}

// Two instantiations of the row loops: the bodies are always_inline, so each
// entry point compiles them for its own target ISA.
template <typename T>
void fwd_rows_base(const LogprobsFwdParams& p, int64_t b, int64_t e) { fwd_rows<T>(p, b, e); }
template <typename T>
void bwd_rows_base(const LogprobsBwdParams& p, int64_t b, int64_t e) { bwd_rows<T>(p, b, e); }
template <typename T>
void seq_items_base(const SeqLogprobsFwdParams& p, int64_t b, int64_t e) { seq_items<T>(p, b, e); }
#ifdef RLHF_HAS_ISA_DISPATCH
template <typename T>
RLHF_TARGET_AVX2 void fwd_rows_avx2(const LogprobsFwdParams& p, int64_t b, int64_t e) {
  fwd_rows<T>(p, b, e);
}
template <typename T>
RLHF_TARGET_AVX2 void bwd_rows_avx2(const LogprobsBwdParams& p, int64_t b, int64_t e) {
  bwd_rows<T>(p, b, e);
}
template <typename T>
RLHF_TARGET_AVX512 void fwd_rows_avx512(const LogprobsFwdParams& p,
                                                                                 int64_t b, int64_t e) {
  fwd_rows<T>(p, b, e);
}
template <typename T>
RLHF_TARGET_AVX512 void bwd_rows_avx512(const LogprobsBwdParams& p,
                                                                                 int64_t b, int64_t e) {
  bwd_rows<T>(p, b, e);
}
template <typename T>
RLHF_TARGET_AVX2 void seq_items_avx2(const SeqLogprobsFwdParams& p, int64_t b, int64_t e) {
  seq_items<T>(p, b, e);
}
template <typename T>
RLHF_TARGET_AVX512 void seq_items_avx512(const SeqLogprobsFwdParams& p,
                                                                                   int64_t b, int64_t e) {
  seq_items<T>(p, b, e);
}
#define RLHF_PICK(name, T) \
  (cpu_isa() == Isa::Avx512 ? &name##_avx512<T> : cpu_isa() == Isa::Avx2 ? &name##_avx2<T> : &name##_base<T>)
#else
#define RLHF_PICK(name, T) (&name##_base<T>)
#endif

int64_t grain_size(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, vocab)); }

template <typename Params, typename Fn>
void parallel_rows(const Params& p, Fn fn) {
  at::parallel_for(0, p.rows, grain_size(p.vocab), [&](int64_t b, int64_t e) { fn(p, b, e); });
}

template <typename Fn>
void parallel_items(const SeqLogprobsFwdParams& p, Fn fn) {
  const int64_t work = std::max<int64_t>(1, p.tok.vocab * p.chunk);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, p.batch * p.n_chunks, grain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

}  // namespace

void logprobs_fwd_cpu(const LogprobsFwdParams& p) {
  switch (p.dtype) {
    case ScalarKind::Float32: return parallel_rows(p, RLHF_PICK(fwd_rows, float));
    case ScalarKind::BFloat16: return parallel_rows(p, RLHF_PICK(fwd_rows, c10::BFloat16));
    case ScalarKind::Float16: return parallel_rows(p, RLHF_PICK(fwd_rows, c10::Half));
    case ScalarKind::Float64:
      return parallel_rows(p, [](const LogprobsFwdParams& q, int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) q.entropy ? fwd_row_f64<true>(q, r) : fwd_row_f64<false>(q, r);
      });
  }
}

void logprobs_bwd_cpu(const LogprobsBwdParams& p) {
  switch (p.dtype) {
    case ScalarKind::Float32: return parallel_rows(p, RLHF_PICK(bwd_rows, float));
    case ScalarKind::BFloat16: return parallel_rows(p, RLHF_PICK(bwd_rows, c10::BFloat16));
    case ScalarKind::Float16: return parallel_rows(p, RLHF_PICK(bwd_rows, c10::Half));
    case ScalarKind::Float64:
      return parallel_rows(p, [](const LogprobsBwdParams& q, int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) q.grad_entropy ? bwd_row_f64<true>(q, r) : bwd_row_f64<false>(q, r);
      });
  }
}

void seq_logprobs_fwd_cpu(const SeqLogprobsFwdParams& p) {
  switch (p.tok.dtype) {
    case ScalarKind::Float32: return parallel_items(p, RLHF_PICK(seq_items, float));
    case ScalarKind::BFloat16: return parallel_items(p, RLHF_PICK(seq_items, c10::BFloat16));
    case ScalarKind::Float16: return parallel_items(p, RLHF_PICK(seq_items, c10::Half));
    case ScalarKind::Float64: return parallel_items(p, &seq_items_base<double>);
  }
}

}  // namespace rlhf
