// CPU kernels of the PPO token losses (forward: per-row loss sums and
// statistics; backward: per-token gradient) and of the KL estimators.
// ppo.h states the math; the per-token formulas are in ppo_loss_math.h,
// shared with the CUDA kernels (ppo_loss.cu).
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds); within a row the five sums are plain serial loops over t in the
// input type (float or double), so the result does not depend on the thread
// count. The KL estimators are elementwise, split into contiguous ranges.
// Bytes: the forward reads x, old, third and the mask once and writes
// 5 values per row; the backward also reads grad_row[b] once per row and
// writes grad_x once; the KL kernels read 2 (3 for backward) arrays once and
// write one.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

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
    static_cast<A*>(p.row_loss)[row] = loss_sum;
    A* const stats = static_cast<A*>(p.stats) + row * ppo_loss::kStats;
    stats[0] = count;
    stats[1] = clip_sum;
    stats[2] = kl_sum;
    stats[3] = lower_sum;
  }
}

template <typename A, int kKind, bool kDual>
void loss_bwd_rows(const PpoLossParams& p, int64_t row_begin, int64_t row_end) {
  const ppo_loss::LossConsts<A> k = ppo_loss::make_consts<A>(p);
  const int64_t time = p.time;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const A* const x = static_cast<const A*>(p.x) + row * time;
    const A* const old = static_cast<const A*>(p.old) + row * time;
    const A* const third = static_cast<const A*>(p.third) + row * time;
    const uint8_t* const mask = p.mask + row * time;
    A* const grad = static_cast<A*>(p.grad_x) + row * time;
    const A g = static_cast<const A*>(p.grad_row)[row];
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
  at::parallel_for(0, p.batch, grain_size(p.time), [&](int64_t b, int64_t e) { rows(p, b, e); });
}

template <typename A>
void loss_fwd(const PpoLossParams& p) {
  using namespace ppo_loss;
  parallel_rows(p, p.kind == kValue ? &loss_fwd_rows<A, kValue, false>
                   : p.has_dual    ? &loss_fwd_rows<A, kPolicy, true>
                                   : &loss_fwd_rows<A, kPolicy, false>);
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

}  // namespace

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
