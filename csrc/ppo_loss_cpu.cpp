// CPU kernels of the PPO token losses (forward: per-row loss sums and
// statistics, then the aggregated loss and metrics; backward: per-token
// gradient) and of the KL estimators.
// ppo.h states the math; the per-token formulas are in ppo_loss_math.h,
// shared with the CUDA kernels (ppo_loss.cu).
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds); within a row the five sums are plain serial loops over t in the
// input type (float or double), so the result does not depend on the thread
// count. The KL estimators are elementwise, split into contiguous ranges.
// Bytes: the forward reads x, old, third and the mask once and writes
// 5 values per row, then folds those into the loss and metrics (ppo.h); the
// backward also reads the row's count once and writes grad_x once; the KL
// kernels read 2 (3 for backward) arrays once and write one.
//
// The fused PPO sweep from logits (PpoLogitsParams): rows in parallel; per
// row the vectorised log-sum-exp and gradient loops of logprobs_cpu.h around
// the scalar fused_token of ppo_loss_math.h. Reads each kept row once from
// memory (the second read for the gradient comes from L2: a row is at most a
// few hundred KiB) and writes its gradient once when asked.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "cpu_simd.h"
#include "logprobs_cpu.h"
#include "ppo.h"
#include "ppo_loss_math.h"

namespace rlhf {
namespace {

template <typename A, int kKind, bool kDual>
void loss_fwd_rows(const PpoLossParams& p, int64_t row_begin, int64_t row_end) {
  const ppo_loss::LossConsts<A> k = ppo_loss::make_consts<A>(p);
  const int64_t time = p.time;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const A* const x = static_cast<const A*>(p.x) + row * time;
    const A* const old = static_cast<const A*>(p.old) + row * time;
    const A* const third = static_cast<const A*>(p.third) + row * time;
    const uint8_t* const mask = p.mask + row * time;
    A loss_sum = A(0), count = A(0), clip_sum = A(0), kl_sum = A(0), lower_sum = A(0);
    for (int64_t t = 0; t < time; ++t) {
      if (mask[t] == 0) continue;
      const ppo_loss::TokenOut<A> o =
          ppo_loss::loss_token<A, kKind, kDual>(x[t], old[t], third[t], k);
      loss_sum += o.loss;
      count += A(1);
      clip_sum += o.clip;
      if (kKind == ppo_loss::kPolicy) {
        kl_sum += o.kl;
        lower_sum += o.lower;
      }
    }
    A* const r = static_cast<A*>(p.rows) + row * ppo_loss::kRowSums;
    r[0] = loss_sum;
    r[1] = count;
    r[2] = clip_sum;
    r[3] = kl_sum;
    r[4] = lower_sum;
  }
}

template <typename A, int kKind, bool kDual>
void loss_bwd_rows(const PpoLossParams& p, int64_t row_begin, int64_t row_end) {
  const ppo_loss::LossConsts<A> k = ppo_loss::make_consts<A>(p);
  const int64_t time = p.time;
  const A* const metrics = static_cast<const A*>(p.metrics);
  const A grad_loss = *static_cast<const A*>(p.grad_loss);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const A* const x = static_cast<const A*>(p.x) + row * time;
    const A* const old = static_cast<const A*>(p.old) + row * time;
    const A* const third = static_cast<const A*>(p.third) + row * time;
    const uint8_t* const mask = p.mask + row * time;
    A* const grad = static_cast<A*>(p.grad_x) + row * time;
    const A count = static_cast<const A*>(p.rows)[row * ppo_loss::kRowSums + 1];
    const A g = grad_loss * ppo_loss::row_weight<A>(p.agg, count, metrics, time);
    for (int64_t t = 0; t < time; ++t) {
      if (mask[t] == 0) {
        grad[t] = A(0);
        continue;
      }
      const ppo_loss::TokenOut<A> o =
          ppo_loss::loss_token<A, kKind, kDual>(x[t], old[t], third[t], k);
      grad[t] = g * o.dloss;
    }
  }
}

template <typename A, int kKind>
void kl_range(const KlParams& p, int64_t begin, int64_t end) {
  const A* const logp = static_cast<const A*>(p.logp);
  const A* const ref = static_cast<const A*>(p.ref);
  A* const out = static_cast<A*>(p.out);
  if (p.grad_out != nullptr) {
    const A* const g = static_cast<const A*>(p.grad_out);
    for (int64_t i = begin; i < end; ++i) {
      out[i] = g[i] * ppo_loss::kl_token<A, kKind>(logp[i], ref[i]).d;
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = ppo_loss::kl_token<A, kKind>(logp[i], ref[i]).value;
    }
  }
}

// About 32k tokens per task: rows are independent and cheap.
int64_t grain_size(int64_t time) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, time));
}
constexpr int64_t kKlGrain = 32768;

// Runs rows(p, row_begin, row_end) over all rows in parallel.
using RowsFn = void (*)(const PpoLossParams&, int64_t, int64_t);
void parallel_rows(const PpoLossParams& p, RowsFn rows) {
  if (p.batch == 0) return;
  at::parallel_for(0, p.batch, grain_size(p.time), [&](int64_t b, int64_t e) { rows(p, b, e); });
}

template <typename A>
void loss_fwd(const PpoLossParams& p) {
  using namespace ppo_loss;
  parallel_rows(p, p.kind == kValue ? &loss_fwd_rows<A, kValue, false>
                   : p.has_dual    ? &loss_fwd_rows<A, kPolicy, true>
                                   : &loss_fwd_rows<A, kPolicy, false>);
  AggSums sums;  // in row order: the same result for any thread count
  const A* const rows = static_cast<const A*>(p.rows);
  for (int64_t row = 0; row < p.batch; ++row) sums.add_row(rows + row * kRowSums);
  finish_agg<A>(sums, p.agg, p.time, static_cast<A*>(p.loss), static_cast<A*>(p.metrics));
}

template <typename A>
void loss_bwd(const PpoLossParams& p) {
  using namespace ppo_loss;
  parallel_rows(p, p.kind == kValue ? &loss_bwd_rows<A, kValue, false>
                   : p.has_dual    ? &loss_bwd_rows<A, kPolicy, true>
                                   : &loss_bwd_rows<A, kPolicy, false>);
}

template <typename A>
void kl(const KlParams& p) {
  void (*fn)(const KlParams&, int64_t, int64_t) = nullptr;
  switch (p.kind) {
    case ppo_loss::kKlK1: fn = &kl_range<A, ppo_loss::kKlK1>; break;
    case ppo_loss::kKlAbs: fn = &kl_range<A, ppo_loss::kKlAbs>; break;
    case ppo_loss::kKlK2: fn = &kl_range<A, ppo_loss::kKlK2>; break;
    default: fn = &kl_range<A, ppo_loss::kKlK3>; break;
  }
  at::parallel_for(0, p.n, kKlGrain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

// --- fused PPO from logits ------------------------------------------------------

template <typename A, typename Lse>
RLHF_INLINE ppo_loss::FusedTokenOut<A> fused_scalars(const PpoLogitsParams& p, int64_t row, A x_label, Lse r,
                                                     const ppo_loss::FusedConsts<A>& c) {
  const A logp = x_label * static_cast<A>(p.inv_temperature) - r.lse;
  const A ref = p.ref != nullptr ? static_cast<const A*>(p.ref)[row] : A(0);
  ppo_loss::FusedTokenOut<A> o = ppo_loss::fused_token<A>(
      logp, r.entropy, static_cast<const A*>(p.old)[row], static_cast<const A*>(p.adv)[row], ref,
      static_cast<const A*>(p.weights)[row], c, p.has_dual, p.ref != nullptr ? p.kl_kind : -1);
  A* st = static_cast<A*>(p.stats) + row * kFusedStats;
  st[0] = o.weighted;
  st[1] = o.pg;
  st[2] = r.entropy;
  st[3] = o.kl;
  st[4] = o.clip;
  st[5] = o.lower;
  st[6] = o.neg_log_ratio;
  return o;
}

// Writes the stats (and gradient row) of an ignored (0) or out-of-range (NaN) label; true if it was one.
template <typename A, typename T>
RLHF_INLINE bool fused_skip_row(const PpoLogitsParams& p, int64_t row, int64_t label) {
  if (label != p.ignore_index && label >= 0 && label < p.vocab) return false;
  const A v = label == p.ignore_index ? A(0) : std::numeric_limits<A>::quiet_NaN();
  std::fill_n(static_cast<A*>(p.stats) + row * kFusedStats, kFusedStats, v);
  if (p.grad != nullptr) {
    T* gx = static_cast<T*>(p.grad) + p.grad_layout.offset(row);
    std::fill(gx, gx + p.vocab, static_cast<T>(v));
  }
  return true;
}

template <typename T>
RLHF_INLINE void fused_rows(const PpoLogitsParams& p, int64_t b, int64_t e) {
  const ppo_loss::FusedConsts<float> c = ppo_loss::make_fused_consts<float>(p);
  const float inv_t = static_cast<float>(p.inv_temperature);
  for (int64_t row = b; row < e; ++row) {
    const int64_t label = p.labels[row];
    if (fused_skip_row<float, T>(p, row, label)) continue;
    const T* x = static_cast<const T*>(p.logits) + p.logits_layout.offset(row);
    const cpu::RowLse r = cpu::row_lse<T, true>(x, p.vocab, inv_t);
    const auto o = fused_scalars<float>(p, row, static_cast<float>(x[label]), r, c);
    if (p.grad == nullptr) continue;
    T* gx = static_cast<T*>(p.grad) + p.grad_layout.offset(row);
    if (o.gh != 0.0f) {
      cpu::row_grad<T, true>(x, gx, p.vocab, label, inv_t, r.lse, o.g, o.gh, r.entropy);
    } else {
      cpu::row_grad<T, false>(x, gx, p.vocab, label, inv_t, r.lse, o.g, 0.0f, 0.0f);
    }
  }
}

void fused_rows_f64(const PpoLogitsParams& p, int64_t b, int64_t e) {
  const ppo_loss::FusedConsts<double> c = ppo_loss::make_fused_consts<double>(p);
  for (int64_t row = b; row < e; ++row) {
    const int64_t label = p.labels[row];
    if (fused_skip_row<double, double>(p, row, label)) continue;
    const double* x = static_cast<const double*>(p.logits) + p.logits_layout.offset(row);
    const cpu::RowLseF64 r = cpu::row_lse_f64<true>(x, p.vocab, p.inv_temperature);
    const auto o = fused_scalars<double>(p, row, x[label], r, c);
    if (p.grad == nullptr) continue;
    double* gx = static_cast<double*>(p.grad) + p.grad_layout.offset(row);
    cpu::row_grad_f64<true>(x, gx, p.vocab, label, p.inv_temperature, r.lse, o.g, o.gh, r.entropy);
  }
}

// Entry points per ISA (the row loops are always_inline, see logprobs_cpu.h;
// RLHF_PICK and the target attributes are cpu_simd.h's).
template <typename T>
void fused_rows_base(const PpoLogitsParams& p, int64_t b, int64_t e) { fused_rows<T>(p, b, e); }
#ifdef RLHF_HAS_ISA_DISPATCH
template <typename T>
RLHF_TARGET_AVX2 void fused_rows_avx2(const PpoLogitsParams& p, int64_t b, int64_t e) { fused_rows<T>(p, b, e); }
template <typename T>
RLHF_TARGET_AVX512 void fused_rows_avx512(const PpoLogitsParams& p, int64_t b, int64_t e) {
  fused_rows<T>(p, b, e);
}
#endif

}  // namespace

void ppo_logits_fused_cpu(const PpoLogitsParams& p) {
  if (!ppo_loss::check_fused(p, "ppo_logits_fused_cpu")) return;
  void (*fn)(const PpoLogitsParams&, int64_t, int64_t) = nullptr;
  switch (p.dtype) {
    case ScalarKind::Float32: fn = RLHF_PICK(fused_rows, float); break;
    case ScalarKind::BFloat16: fn = RLHF_PICK(fused_rows, c10::BFloat16); break;
    case ScalarKind::Float16: fn = RLHF_PICK(fused_rows, c10::Half); break;
    case ScalarKind::Float64: fn = &fused_rows_f64; break;
  }
  // About 64k logits per task, as the log-prob kernels.
  const int64_t grain = std::max<int64_t>(1, 65536 / p.vocab);
  at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { fn(p, b, e); });
}

void ppo_loss_fwd_cpu(const PpoLossParams& p) {
  if (!ppo_loss::check_loss(p, "ppo_loss_fwd_cpu", true)) return;
  if (p.dtype == ScalarKind::Float64) {
    loss_fwd<double>(p);
  } else {
    loss_fwd<float>(p);
  }
}

void ppo_loss_bwd_cpu(const PpoLossParams& p) {
  if (!ppo_loss::check_loss(p, "ppo_loss_bwd_cpu", false)) return;
  if (p.dtype == ScalarKind::Float64) {
    loss_bwd<double>(p);
  } else {
    loss_bwd<float>(p);
  }
}

void kl_penalty_cpu(const KlParams& p) {
  if (!ppo_loss::check_kl(p, "kl_penalty_cpu")) return;
  if (p.dtype == ScalarKind::Float64) {
    kl<double>(p);
  } else {
    kl<float>(p);
  }
}

}  // namespace rlhf
