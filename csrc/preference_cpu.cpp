// CPU kernels of the fused preference losses (DPO family, SimPO, ORPO, KTO,
// Bradley-Terry). preference.h states the math; the per-element formulas are
// in preference_math.h, shared with the CUDA kernels (preference.cu).
//
// Parallelism: pairs are cut into fixed chunks of kChunk (boundaries depend
// on n only). Chunks run in parallel with OpenMP when n > kParallelMin (below
// that a fork/join costs more than the loop: a realistic batch of 8 .. 4096
// pairs stays on the calling thread). Every reduction (the metric sums, the
// bco_pair batch mean) is a per-chunk partial sum in double, combined in
// chunk order by one thread, so results are bitwise the same for any thread
// count and with or without the parallel region.
//   forward:  [bco_pair with a batch-mean delta: one pass of per-chunk sums
//             of beta a_j + beta b_j] then one pass writing losses[i], the
//             rewards and the per-chunk metric sums.
//             Bytes: reads 2..5 inputs of n values, writes 1..3 outputs of n
//             values, n / kChunk * 7 doubles of partial sums and 8 metrics.
//   backward: one pass writing grad_a[i], grad_b[i] (those requested); no
//             reduction, each pair independent.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "preference.h"
#include "preference_math.h"

namespace rlhf {
namespace {

constexpr int64_t kChunk = 2048;         // pairs per work item (and per partial sum)
constexpr int64_t kParallelMin = 16384;  // n above which the chunks run in parallel

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

template <typename Acc>
void fwd_cpu(const PrefFwdParams& p) {
  pref::Consts<Acc> c = pref::make_consts<Acc>(p.loss, p.s);
  const pref::Inputs<Acc> in = pref::make_inputs<Acc>(p.loss, p.chosen, p.rejected, p.ref_chosen,
                                                       p.ref_rejected, p.margin);
  const int64_t n = p.n;
  Acc* const losses = static_cast<Acc*>(p.losses);
  Acc* const chosen_rewards = static_cast<Acc*>(p.chosen_rewards);
  Acc* const rejected_rewards = static_cast<Acc*>(p.rejected_rewards);
  Acc* const metrics = static_cast<Acc*>(p.metrics);

  if (pref::is_kto(p.loss) && n > 0) c.kl = *static_cast<const Acc*>(p.kl);
  const int64_t chunks = num_chunks(n);
  const int threads = at::get_num_threads();
  if (p.loss == PrefLoss::BcoPair && p.s.bco_batch_mean && n > 0) {
    // d = mean of the 2n values {beta a_j, beta b_j}.
    std::vector<double> part(chunks, 0.0);
#pragma omp parallel for if (n > kParallelMin) num_threads(threads) schedule(static)
    for (int64_t k = 0; k < chunks; ++k) {
      double sum = 0.0;
      for (int64_t i = k * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
        sum += static_cast<double>(c.beta * in.a(i));
        sum += static_cast<double>(c.beta * in.b(i));
      }
      part[k] = sum;
    }
    double sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) sum += part[k];
    c.delta = static_cast<Acc>(sum / (2.0 * static_cast<double>(n)));
  }

  std::vector<double> part(chunks * pref::kSums, 0.0);
#pragma omp parallel for if (n > kParallelMin) num_threads(threads) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    double* const s = part.data() + k * pref::kSums;
    for (int64_t i = k * kChunk, e = std::min(n, i + kChunk); i < e; ++i) {
      const Acc a = in.a(i);
      const Acc b = in.b(i);
      const pref::FwdOut<Acc> f = pref::forward(c, a, b, in.m(i));
      losses[i] = f.loss;
      if (chosen_rewards != nullptr) chosen_rewards[i] = c.beta * a;
      if (rejected_rewards != nullptr) rejected_rewards[i] = c.beta * b;
      pref::accumulate_metrics(c, a, b, f, s);
    }
  }
  double sums[pref::kSums] = {};
  for (int64_t k = 0; k < chunks; ++k) {
    for (int j = 0; j < pref::kSums; ++j) sums[j] += part[k * pref::kSums + j];
  }

  for (int k = 0; k < pref::kSums; ++k) {
    metrics[k] = n > 0 ? static_cast<Acc>(sums[k] / static_cast<double>(n)) : Acc(0);
  }
  metrics[pref::kSums] = (p.loss == PrefLoss::BcoPair && n > 0) ? c.delta : Acc(0);
}

template <typename Acc>
void bwd_cpu(const PrefBwdParams& p) {
  pref::Consts<Acc> c = pref::make_consts<Acc>(p.loss, p.s);
  const pref::Inputs<Acc> in = pref::make_inputs<Acc>(p.loss, p.chosen, p.rejected, p.ref_chosen,
                                                       p.ref_rejected, p.margin);
  if (pref::is_kto(p.loss)) c.kl = *static_cast<const Acc*>(p.kl);
  if (p.loss == PrefLoss::BcoPair && p.metrics != nullptr) {
    c.delta = static_cast<const Acc*>(p.metrics)[pref::kSums];
  }
  const Acc* const grad_losses = static_cast<const Acc*>(p.grad_losses);
  const Acc grad_scale = static_cast<Acc>(p.grad_scale);
  Acc* const grad_a = static_cast<Acc*>(p.grad_a);
  Acc* const grad_b = static_cast<Acc*>(p.grad_b);
  const int64_t n = p.n;
#pragma omp parallel for if (n > kParallelMin) num_threads(at::get_num_threads()) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const Acc g = grad_scale * grad_losses[i * p.grad_stride];
    const pref::Grad<Acc> d = pref::backward(c, in.a(i), in.b(i), in.m(i));
    if (grad_a != nullptr) grad_a[i] = g * d.da;
    if (grad_b != nullptr) grad_b[i] = g * d.db;
  }
}

}  // namespace

void preference_fwd_cpu(const PrefFwdParams& p) {
  pref::check_fwd(p, "preference_fwd_cpu");
  if (p.dtype == ScalarKind::Float64) {
    fwd_cpu<double>(p);
  } else {
    fwd_cpu<float>(p);
  }
}

void preference_bwd_cpu(const PrefBwdParams& p) {
  if (!pref::check_bwd(p, "preference_bwd_cpu")) return;
  if (p.dtype == ScalarKind::Float64) {
    bwd_cpu<double>(p);
  } else {
    bwd_cpu<float>(p);
  }
}

}  // namespace rlhf
