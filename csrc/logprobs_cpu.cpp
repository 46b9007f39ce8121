// CPU kernels for per-token log-probs.
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds). The row loops (logprobs_cpu.h) use GCC vector extensions of 16
// floats, compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked
// at run time by what the CPU supports. Forward converts a chunk of the row
// into an L1-resident buffer of scaled logits z = x / T while taking its max,
// then sums exp(z - m) over the buffer, merging chunks with the online
// log-sum-exp rule. Backward recomputes p = exp(z - lse) and writes the
// gradient in the same pass.
//
// Bytes: forward reads each kept row once (V * itemsize); backward reads and
// writes each row once (2 * V * itemsize). No [rows, V] temporary.
// sequence_logprobs' forward runs the same row code over work items of
// `chunk` consecutive tokens of one sequence (logprobs.h), in parallel over
// items; each item writes one partial sum and count instead of per-token
// log-probs.
// float64 logits (used for gradcheck) take a plain scalar path.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "cpu_simd.h"
#include "logprobs.h"
#include "logprobs_cpu.h"

namespace rlhf {
namespace {

using namespace cpu;  // row_lse, row_grad, ... (logprobs_cpu.h) and the cpu_simd.h names they use

// One row whose label is in [0, V): streams the logits once, writes lse[row]
// (and entropy[row]) and returns the label's log-prob.
template <typename T, bool kEntropy>
RLHF_INLINE float fwd_kept_row(const LogprobsFwdParams& p, int64_t row, int64_t label) {
  const T* x = static_cast<const T*>(p.logits) + p.logits_layout.offset(row);
  const float inv_t = static_cast<float>(p.inv_temperature);
  const RowLse r = row_lse<T, kEntropy>(x, p.vocab, inv_t);
  static_cast<float*>(p.lse)[row] = r.lse;
  if (kEntropy) static_cast<float*>(p.entropy)[row] = r.entropy;
  return static_cast<float>(x[label]) * inv_t - r.lse;
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
  const float g = static_cast<const float*>(p.grad_logprobs)[row];
  const float gh = kEntropy ? static_cast<const float*>(p.grad_entropy)[row] : 0.0f;
  const float h = kEntropy ? static_cast<const float*>(p.entropy)[row] : 0.0f;
  row_grad<T, kEntropy>(x, gx, V, label, static_cast<float>(p.inv_temperature),
                        static_cast<const float*>(p.lse)[row], g, gh, h);
}

// float64: scalar, exact exp; only used for gradcheck-style checks.
template <bool kEntropy>
double fwd_kept_row_f64(const LogprobsFwdParams& p, int64_t row, int64_t label) {
  const double* x = static_cast<const double*>(p.logits) + p.logits_layout.offset(row);
  const RowLseF64 r = row_lse_f64<kEntropy>(x, p.vocab, p.inv_temperature);
  static_cast<double*>(p.lse)[row] = r.lse;
  if (kEntropy) static_cast<double*>(p.entropy)[row] = r.entropy;
  return x[label] * p.inv_temperature - r.lse;
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
  row_grad_f64<kEntropy>(x, gx, V, label, p.inv_temperature, static_cast<const double*>(p.lse)[row],
                         static_cast<const double*>(p.grad_logprobs)[row],
                         kEntropy ? static_cast<const double*>(p.grad_entropy)[row] : 0.0,
                         kEntropy ? static_cast<const double*>(p.entropy)[row] : 0.0);
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
RLHF_TARGET_AVX2 void fwd_rows_avx2(const LogprobsFwdParams& p, int64_t b, int64_t e) { fwd_rows<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX2 void bwd_rows_avx2(const LogprobsBwdParams& p, int64_t b, int64_t e) { bwd_rows<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX2 void seq_items_avx2(const SeqLogprobsFwdParams& p, int64_t b, int64_t e) { seq_items<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX512 void fwd_rows_avx512(const LogprobsFwdParams& p, int64_t b, int64_t e) { fwd_rows<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX512 void bwd_rows_avx512(const LogprobsBwdParams& p, int64_t b, int64_t e) { bwd_rows<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX512 void seq_items_avx512(const SeqLogprobsFwdParams& p, int64_t b, int64_t e) {
  seq_items<T>(p, b, e);
}
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
