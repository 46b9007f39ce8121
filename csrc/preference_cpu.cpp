// CPU kernels of the fused preference losses (DPO family, SimPO, ORPO, KTO,
// Bradley-Terry). preference.h states the math; the per-element formulas are
// in preference_math.h, shared with the CUDA kernels (preference.cu).
//
// Parallelism: pairs are cut into fixed chunks of kChunk (boundaries depend
// on n only). Chunks run in parallel with OpenMP when n > kParallelMin (below
// that a fork/join costs more than the loop: a realistic batch of 8 .. 4096
// pairs, and anything up to 32k, stays on the calling thread). Every reduction (the metric sums, the
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
// The sigmoid loss (DPO's default, also SimPO) in float runs 16 pairs per
// step with the vector exp / log1p of cpu_simd.h (a few ulp from libm's, see
// the tests' tolerances), compiled for AVX-512, AVX2 and baseline x86-64 and
// picked at run time; every other loss, float64, and the last < 16 pairs of a
// chunk go through the scalar formulas of preference_math.h.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "preference.h"
#include "preference_math.h"

namespace rlhf {
namespace {

constexpr int64_t kChunk = 2048;         // pairs per work item (and per partial sum)
// n above which the chunks run in parallel: the vector sigmoid path does a
// 2048-pair chunk in ~4 us on one core, so below ~32k pairs a fork/join (and
// waiting for a core that may be busy) costs about what it saves.
constexpr int64_t kParallelMin = 32768;

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

using simd::vf;
using simd::vi;
using simd::vu;
using simd::kLanes;
typedef double vd __attribute__((vector_size(128)));  // kLanes doubles

RLHF_INLINE vf load(const float* p, int64_t i) {
  vf v;
  std::memcpy(&v, p + i, sizeof(v));
  return v;
}
RLHF_INLINE vf load_or_zero(const float* p, int64_t i) { return p != nullptr ? load(p, i) : vf{}; }
RLHF_INLINE void store(float* p, int64_t i, vf v) { std::memcpy(p + i, &v, sizeof(v)); }
RLHF_INLINE vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
RLHF_INLINE double hsum(vd v) {
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

// Sigmoid loss, float, pairs [i0, i0 + 16 * floor((i1 - i0) / 16)): the
// formula of pref::forward (ls(+-z) = min(+-z, 0) - log1p(exp(-|z|))) and the
// metric sums of pref::accumulate_metrics, accumulated per lane in double (the
// count in int32) and added to s at the end. Returns the first pair not done.
RLHF_INLINE int64_t sigmoid_fwd_vec(const pref::Consts<float>& c, const pref::Inputs<float>& in, int64_t i0,
                                    int64_t i1, float* losses, float* chosen_rewards, float* rejected_rewards,
                                    double* s) {
  vd loss_sum{}, margin_sum{}, chosen_sum{}, rejected_sum{};
  vi wins{};
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    const vf a = load(in.chosen, i) - load_or_zero(in.ref_chosen, i);
    const vf b = load(in.rejected, i) - load_or_zero(in.ref_rejected, i);
    const vf z = c.beta * (a - b) - c.gamma - load_or_zero(in.margin, i);
    const vf l = simd::log1p_unit(simd::exp_nonpos(-vabs(z)));
    const vf lpos = (z < 0.0f ? z : vf{}) - l;
    const vf lneg = (-z < 0.0f ? -z : vf{}) - l;
    const vf sum = a + b;
    vf loss = -c.one_m_ls * lpos;  // terms with a coefficient of 0 skipped (preference_math.h: 0 * inf)
    if (c.ls != 0.0f) loss -= c.ls * lneg;
    if (c.center != 0.0f) loss += c.center * sum * sum;
    const vf ra = c.beta * a;
    const vf rb = c.beta * b;
    store(losses, i, loss);
    if (chosen_rewards != nullptr) store(chosen_rewards, i, ra);
    if (rejected_rewards != nullptr) store(rejected_rewards, i, rb);
    loss_sum += __builtin_convertvector(loss, vd);
    wins -= (vi)(ra > rb);  // a true lane compares as -1
    margin_sum += __builtin_convertvector(c.beta * (a - b), vd);
    chosen_sum += __builtin_convertvector(ra, vd);
    rejected_sum += __builtin_convertvector(rb, vd);
  }
  int64_t win_count = 0;
  for (int k = 0; k < kLanes; ++k) win_count += wins[k];
  s[0] += hsum(loss_sum);
  s[1] += static_cast<double>(win_count);
  s[2] += hsum(margin_sum);
  s[3] += hsum(chosen_sum);
  s[4] += hsum(rejected_sum);
  return i;
}

// Sigmoid loss gradient, float: D = -(1 - ls) s(-z) + ls s(z) from one exp,
// da = beta D + 2c (a + b), db = -beta D + 2c (a + b), times g_i.
RLHF_INLINE int64_t sigmoid_bwd_vec(const pref::Consts<float>& c, const pref::Inputs<float>& in, int64_t i0,
                                    int64_t i1, const float* grad_losses, int64_t grad_stride, float grad_scale,
                                    float* grad_a, float* grad_b) {
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    vf g;
    if (grad_stride == 1) {
      g = load(grad_losses, i);
    } else {
      for (int k = 0; k < kLanes; ++k) g[k] = grad_losses[(i + k) * grad_stride];
    }
    g = grad_scale * g;
    const vf a = load(in.chosen, i) - load_or_zero(in.ref_chosen, i);
    const vf b = load(in.rejected, i) - load_or_zero(in.ref_rejected, i);
    const vf z = c.beta * (a - b) - c.gamma - load_or_zero(in.margin, i);
    const vf e = simd::exp_nonpos(-vabs(z));
    const vf r = 1.0f / (1.0f + e);
    const vf er = e * r;
    const vf spos = z < 0.0f ? er : r;
    const vf sneg = -z < 0.0f ? er : r;
    const vf dz = -c.one_m_ls * sneg + c.ls * spos;
    const vf t = c.two_center != 0.0f ? c.two_center * (a + b) : vf{};
    if (grad_a != nullptr) store(grad_a, i, g * (c.beta * dz + t));
    if (grad_b != nullptr) store(grad_b, i, g * (-c.beta * dz + t));
  }
  return i;
}

#define RLHF_SIGMOID_VARIANT(suffix, attr)                                                                   \
  attr int64_t sigmoid_fwd_##suffix(const pref::Consts<float>& c, const pref::Inputs<float>& in, int64_t i0, \
                                    int64_t i1, float* l, float* cr, float* rr, double* s) {                 \
    return sigmoid_fwd_vec(c, in, i0, i1, l, cr, rr, s);                                                     \
  }                                                                                                          \
  attr int64_t sigmoid_bwd_##suffix(const pref::Consts<float>& c, const pref::Inputs<float>& in, int64_t i0, \
                                    int64_t i1, const float* g, int64_t gs, float scale, float* ga,          \
                                    float* gb) {                                                             \
    return sigmoid_bwd_vec(c, in, i0, i1, g, gs, scale, ga, gb);                                             \
  }
RLHF_SIGMOID_VARIANT(base, )
#ifdef RLHF_HAS_ISA_DISPATCH
RLHF_SIGMOID_VARIANT(avx2, RLHF_TARGET_AVX2)
RLHF_SIGMOID_VARIANT(avx512, RLHF_TARGET_AVX512)
#define RLHF_PICK_SIGMOID(dir)                                                            \
  (simd::cpu_isa() == simd::Isa::Avx512 ? &sigmoid_##dir##_avx512                         \
   : simd::cpu_isa() == simd::Isa::Avx2 ? &sigmoid_##dir##_avx2                           \
                                        : &sigmoid_##dir##_base)
#else
#define RLHF_PICK_SIGMOID(dir) (&sigmoid_##dir##_base)
#endif

// The vector path covers the loss with no per-pair branches in its formula.
template <typename Acc>
bool vector_sigmoid(PrefLoss loss) {
  return std::is_same_v<Acc, float> && loss == PrefLoss::Sigmoid;
}

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
    const int64_t e = std::min(n, k * kChunk + kChunk);
    int64_t i = k * kChunk;
    if constexpr (std::is_same_v<Acc, float>) {
      if (vector_sigmoid<Acc>(p.loss)) {
        i = RLHF_PICK_SIGMOID(fwd)(c, in, i, e, losses, chosen_rewards, rejected_rewards, s);
      }
    }
    for (; i < e; ++i) {
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
  const int64_t chunks = num_chunks(n);
#pragma omp parallel for if (n > kParallelMin) num_threads(at::get_num_threads()) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t e = std::min(n, k * kChunk + kChunk);
    int64_t i = k * kChunk;
    if constexpr (std::is_same_v<Acc, float>) {
      if (vector_sigmoid<Acc>(p.loss)) {
        i = RLHF_PICK_SIGMOID(bwd)(c, in, i, e, grad_losses, p.grad_stride, grad_scale, grad_a, grad_b);
      }
    }
    for (; i < e; ++i) {
      const Acc g = grad_scale * grad_losses[i * p.grad_stride];
      const pref::Grad<Acc> d = pref::backward(c, in.a(i), in.b(i), in.m(i));
      if (grad_a != nullptr) grad_a[i] = g * d.da;
      if (grad_b != nullptr) grad_b[i] = g * d.db;
    }
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
