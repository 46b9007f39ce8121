// CPU kernels of the fused preference losses (DPO family, SimPO, ORPO, KTO,
// Bradley-Terry). preference.h states the math; the per-element formulas are
// in preference_math.h, shared with the CUDA kernels (preference.cu).
//
// n is a batch of pairs (typically 8 .. 4096), so plain serial loops: no
// threading overhead, and the results (metrics included) do not depend on
// the machine's thread count.
//   forward:  [bco_pair with a batch-mean delta: one pass summing
//             beta a_j + beta b_j] then one pass writing losses[i], the
//             rewards and accumulating the metric sums in double.
//             Bytes: reads 2..5 inputs of n values, writes 1..3 outputs of n
//             values plus 8 metrics.
//   backward: one pass writing grad_a[i], grad_b[i] (those requested).
#include <cstdint>

#include "preference.h"
#include "preference_math.h"

namespace rlhf {
namespace {

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
  if (p.loss == PrefLoss::BcoPair && p.s.bco_batch_mean && n > 0) {
    // d = mean of the 2n values {beta a_j, beta b_j}.
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      sum += static_cast<double>(c.beta * in.a(i));
      sum += static_cast<double>(c.beta * in.b(i));
    }
    c.delta = static_cast<Acc>(sum / (2.0 * static_cast<double>(n)));
  }

  double sums[pref::kSums] = {};
  for (int64_t i = 0; i < n; ++i) {
    const Acc a = in.a(i);
    const Acc b = in.b(i);
    const pref::FwdOut<Acc> f = pref::forward(c, a, b, in.m(i));
    losses[i] = f.loss;
    if (chosen_rewards != nullptr) chosen_rewards[i] = c.beta * a;
    if (rejected_rewards != nullptr) rejected_rewards[i] = c.beta * b;
    pref::accumulate_metrics(c, a, b, f, sums);
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
  for (int64_t i = 0; i < p.n; ++i) {
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
