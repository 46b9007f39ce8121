// CPU kernels of the PPO token losses (forward: per-row loss sums and
// statistics, then the aggregated loss and metrics; backward: per-token
// gradient) and of the KL estimators.
// ppo.h states the math; the per-token formulas are in ppo_loss_math.h,
// shared with the CUDA kernels (ppo_loss.cu).
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds); within a row the five sums are loops over t in the input type
// (float: 8 lanes at a time, double: scalar), so the result does not depend
// on the thread count. The KL estimators are elementwise, split into contiguous ranges.
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
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "logprobs_cpu.h"
#include "ppo.h"
#include "ppo_loss_math.h"

namespace rlhf {
namespace {

// float32 rows run 8 tokens per step as simd::vf8 lanes through the same
// token functions (ppo_loss_math.h instantiates them on vf8): masked lanes and
// the padding of a row's last step are computed and not selected. float64
// rows (the gradcheck path) are scalar, with libm's exp. The row loops are
// always_inline and instantiated once per ISA (the entry points below), like
// logprobs_cpu.h's. Row sums add lane-wise partial sums, then the lanes in
// order: reassociated against a serial sum, but fixed for any thread count.
using simd::vf8;
using simd::vi8;
using simd::load8;
using simd::store8;
constexpr int kLanes = simd::kLanes8;

// Tokens [t, t + n) of a row into lanes (n <= 8; the rest 0, mask 0).
struct Lanes {
  vf8 x, old, third;
  vi8 keep;  // -1 where valid
};
RLHF_INLINE Lanes load_tokens(const PpoLossParams& p, int64_t base, int64_t n) {
  Lanes l;
  l.x = load8(static_cast<const float*>(p.x) + base, n);
  l.old = load8(static_cast<const float*>(p.old) + base, n);
  l.third = load8(static_cast<const float*>(p.third) + base, n);
  l.keep = simd::mask8(p.mask + base, n);
  return l;
}

// The per-call constants in the type the token loop runs in: lanes for float, else A.
template <typename A>
RLHF_INLINE auto loop_consts(const PpoLossParams& p) {
  const ppo_loss::LossConsts<A> k = ppo_loss::make_consts<A>(p);
  if constexpr (std::is_same_v<A, float>) {
    return ppo_loss::LossConsts<vf8>{simd::splat8(k.lo), simd::splat8(k.hi), simd::splat8(k.c), simd::splat8(k.eps)};
  } else {
    return k;
  }
}

template <typename A, int kKind, bool kDual>
RLHF_INLINE void loss_fwd_rows(const PpoLossParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t time = p.time;
  if constexpr (std::is_same_v<A, float>) {
    const auto k = loop_consts<A>(p);
    const vf8 zero{}, one = simd::splat8(1.0f);
    for (int64_t row = row_begin; row < row_end; ++row) {
      vf8 loss_sum{}, count{}, clip_sum{}, kl_sum{}, lower_sum{};
      for (int64_t t = 0; t < time; t += kLanes) {
        const Lanes l = load_tokens(p, row * time + t, std::min<int64_t>(kLanes, time - t));
        const ppo_loss::TokenOut<vf8> o = ppo_loss::loss_token<vf8, kKind, kDual>(l.x, l.old, l.third, k);
        loss_sum += l.keep ? o.loss : zero;
        count += l.keep ? one : zero;
        clip_sum += l.keep ? o.clip : zero;
        if (kKind == ppo_loss::kPolicy) {
          kl_sum += l.keep ? o.kl : zero;
          lower_sum += l.keep ? o.lower : zero;
        }
      }
      float* const r = static_cast<float*>(p.rows) + row * ppo_loss::kRowSums;
      r[0] = simd::hsum(loss_sum);
      r[1] = simd::hsum(count);
      r[2] = simd::hsum(clip_sum);
      r[3] = simd::hsum(kl_sum);
      r[4] = simd::hsum(lower_sum);
    }
  } else {
    const auto k = loop_consts<A>(p);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const A* const x = static_cast<const A*>(p.x) + row * time;
      const A* const old = static_cast<const A*>(p.old) + row * time;
      const A* const third = static_cast<const A*>(p.third) + row * time;
      const uint8_t* const mask = p.mask + row * time;
      A loss_sum = A(0), count = A(0), clip_sum = A(0), kl_sum = A(0), lower_sum = A(0);
      for (int64_t t = 0; t < time; ++t) {
        if (mask[t] == 0) continue;
        const ppo_loss::TokenOut<A> o = ppo_loss::loss_token<A, kKind, kDual>(x[t], old[t], third[t], k);
        loss_sum += o.loss;
        count += A(1);
        clip_sum += o.clip;
        kl_sum += o.kl;
        lower_sum += o.lower;
      }
      A* const r = static_cast<A*>(p.rows) + row * ppo_loss::kRowSums;
      r[0] = loss_sum;
      r[1] = count;
      r[2] = clip_sum;
      r[3] = kl_sum;
      r[4] = lower_sum;
    }
  }
}

template <typename A, int kKind, bool kDual>
RLHF_INLINE void loss_bwd_rows(const PpoLossParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t time = p.time;
  const A* const metrics = static_cast<const A*>(p.metrics);
  const A grad_loss = *static_cast<const A*>(p.grad_loss);
  const auto k = loop_consts<A>(p);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const A count = static_cast<const A*>(p.rows)[row * ppo_loss::kRowSums + 1];
    const A g = grad_loss * ppo_loss::row_weight<A>(p.agg, count, metrics, time);
    A* const grad = static_cast<A*>(p.grad_x) + row * time;
    if constexpr (std::is_same_v<A, float>) {
      const vf8 gv = simd::splat8(g);
      for (int64_t t = 0; t < time; t += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, time - t);
        const Lanes l = load_tokens(p, row * time + t, n);
        const ppo_loss::TokenOut<vf8> o = ppo_loss::loss_token<vf8, kKind, kDual>(l.x, l.old, l.third, k);
        const vf8 out = l.keep ? gv * o.dloss : vf8{};
        store8(grad + t, out, n);
      }
    } else {
      const A* const x = static_cast<const A*>(p.x) + row * time;
      const A* const old = static_cast<const A*>(p.old) + row * time;
      const A* const third = static_cast<const A*>(p.third) + row * time;
      const uint8_t* const mask = p.mask + row * time;
      for (int64_t t = 0; t < time; ++t) {
        grad[t] = mask[t] != 0 ? g * ppo_loss::loss_token<A, kKind, kDual>(x[t], old[t], third[t], k).dloss : A(0);
      }
    }
  }
}

template <typename A, int kKind>
RLHF_INLINE void kl_range(const KlParams& p, int64_t begin, int64_t end) {
  const A* const logp = static_cast<const A*>(p.logp);
  const A* const ref = static_cast<const A*>(p.ref);
  const A* const g = static_cast<const A*>(p.grad_out);  // backward only
  A* const out = static_cast<A*>(p.out);
  if constexpr (std::is_same_v<A, float>) {
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, end - i);
      const ppo_loss::KlOut<vf8> o = ppo_loss::kl_token<vf8, kKind>(load8(logp + i, n), load8(ref + i, n));
      const vf8 v = g != nullptr ? load8(g + i, n) * o.d : o.value;
      store8(out + i, v, n);
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const ppo_loss::KlOut<A> o = ppo_loss::kl_token<A, kKind>(logp[i], ref[i]);
      out[i] = g != nullptr ? g[i] * o.d : o.value;
    }
  }
}

// Entry points per ISA (cpu_simd.h: RLHF_ISA_ENTRIES).
RLHF_ISA_ENTRIES(loss_fwd_entry, loss_fwd_rows, PpoLossParams,
                 typename A RLHF_COMMA int kKind RLHF_COMMA bool kDual, A RLHF_COMMA kKind RLHF_COMMA kDual)
RLHF_ISA_ENTRIES(loss_bwd_entry, loss_bwd_rows, PpoLossParams,
                 typename A RLHF_COMMA int kKind RLHF_COMMA bool kDual, A RLHF_COMMA kKind RLHF_COMMA kDual)
RLHF_ISA_ENTRIES(kl_entry, kl_range, KlParams, typename A RLHF_COMMA int kKind, A RLHF_COMMA kKind)

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
  parallel_rows(p, p.kind == kValue ? RLHF_ISA_PICK(loss_fwd_entry, A RLHF_COMMA kValue RLHF_COMMA false)
                   : p.has_dual    ? RLHF_ISA_PICK(loss_fwd_entry, A RLHF_COMMA kPolicy RLHF_COMMA true)
                                   : RLHF_ISA_PICK(loss_fwd_entry, A RLHF_COMMA kPolicy RLHF_COMMA false));
  AggSums sums;  // in row order: the same result for any thread count
  const A* const rows = static_cast<const A*>(p.rows);
  for (int64_t row = 0; row < p.batch; ++row) sums.add_row(rows + row * kRowSums);
  finish_agg<A>(sums, p.agg, p.time, static_cast<A*>(p.loss), static_cast<A*>(p.metrics));
}

template <typename A>
void loss_bwd(const PpoLossParams& p) {
  using namespace ppo_loss;
  parallel_rows(p, p.kind == kValue ? RLHF_ISA_PICK(loss_bwd_entry, A RLHF_COMMA kValue RLHF_COMMA false)
                   : p.has_dual    ? RLHF_ISA_PICK(loss_bwd_entry, A RLHF_COMMA kPolicy RLHF_COMMA true)
                                   : RLHF_ISA_PICK(loss_bwd_entry, A RLHF_COMMA kPolicy RLHF_COMMA false));
}

template <typename A>
void kl(const KlParams& p) {
  void (*fn)(const KlParams&, int64_t, int64_t) = nullptr;
  switch (p.kind) {
    case ppo_loss::kKlK1: fn = RLHF_ISA_PICK(kl_entry, A RLHF_COMMA ppo_loss::kKlK1); break;
    case ppo_loss::kKlAbs: fn = RLHF_ISA_PICK(kl_entry, A RLHF_COMMA ppo_loss::kKlAbs); break;
    case ppo_loss::kKlK2: fn = RLHF_ISA_PICK(kl_entry, A RLHF_COMMA ppo_loss::kKlK2); break;
    default: fn = RLHF_ISA_PICK(kl_entry, A RLHF_COMMA ppo_loss::kKlK3); break;
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

void ppo_fused_inputs_cpu(const PpoInputsParams& p) {
  ppo_loss::check_inputs(p, "ppo_fused_inputs_cpu");
  // One thread: at most kMaxInputsTokens tokens (the bindings' bound), a small fraction of the
  // sweep after it; the per-row counts are kept for the weights' second pass.
  ppo_loss::visit_inputs(p, [&](auto label_t, auto mask_t, auto acc_t) {
    using L = decltype(label_t);
    using M = decltype(mask_t);
    using A = decltype(acc_t);
    const L* labels = static_cast<const L*>(p.labels);
    const M* mask = static_cast<const M*>(p.mask);
    A* w = static_cast<A*>(p.weights);
    std::vector<int64_t> counts(static_cast<size_t>(p.batch));
    int64_t total = 0, seqs = 0;
    for (int64_t b = 0; b < p.batch; ++b) {
      int64_t count = 0;
      for (int64_t t = 0; t < p.time; ++t) {
        count += ppo_loss::input_token<L, M, A>(p, labels, mask, p.labels_out, w, b, t);
      }
      counts[static_cast<size_t>(b)] = count;
      total += count;
      seqs += count > 0;
    }
    const int64_t n = std::max<int64_t>(total, 1), s = std::max<int64_t>(seqs, 1);
    *static_cast<A*>(p.n_valid) = static_cast<A>(n);
    if (p.agg == ppo_loss::kTokenSum) return;
    for (int64_t b = 0; b < p.batch; ++b) {
      const A inv = A(1) / ppo_loss::input_denominator<A>(p.agg, n, s, counts[static_cast<size_t>(b)], p.time);
      A* row = w + b * p.time;
      for (int64_t t = 0; t < p.time; ++t) row[t] = row[t] != A(0) ? inv : A(0);
    }
  });
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
