// Parameters of the fused preference-loss kernels (DPO family, SimPO, ORPO,
// KTO, Bradley-Terry), shared by preference.cu, preference_cpu.cpp and the
// bindings. No torch headers.
//
// One forward kernel computes, for i in [0, n), from the chosen and rejected
// log-ratios
//     a_i = chosen_i   - (ref_chosen_i   or 0)
//     b_i = rejected_i - (ref_rejected_i or 0)
// the per-pair loss, the rewards beta*a_i and beta*b_i, and the batch
// metrics (sums turned into means over n), in one pass (two for bco_pair
// with a batch-mean delta). One backward kernel computes
//     grad_a_i = g_i * dL_i/da_i,   grad_b_i = g_i * dL_i/db_i,
// with g_i = grad_scale * grad_losses[i * grad_stride] (grad_stride 0 when
// the upstream gradient is one scalar for the mean loss). Gradients for the
// reference inputs are -grad_a, -grad_b (taken by the Python side).
//
// Notation: s(x) = 1 / (1 + exp(-x)) (sigmoid), ls(x) = log s(x) computed
// stably as min(x, 0) - log1p(exp(-|x|)), s'(x) = s(x) s(-x),
// sp(x) = softplus(x) = -ls(-x), ls_ = label_smoothing, h = a - b,
// z = beta*h - gamma - m_i (m_i = margin[i] or 0), c = center coefficient.
//
//   id loss          L_i                                              dL/da | dL/db
//   0  Sigmoid       -(1-ls_) ls(z) - ls_ ls(-z) + c (a+b)^2            beta*D + 2c(a+b) | -beta*D + 2c(a+b),
//                      D = -(1-ls_) s(-z) + ls_ s(z)
//   1  Robust        (-(1-ls_) ls(z) + ls_ ls(-z)) / (1 - 2 ls_)       beta*D | -beta*D,
//                      D = (-(1-ls_) s(-z) - ls_ s(z)) / (1 - 2 ls_)
//   2  ExoPair       e = ls_ if ls_ > 0 else 1e-3:
//                    s(z) (ls(z) - log(1-e)) + s(-z) (ls(-z) - log e)  beta*D | -beta*D,
//                      D = s(z) s(-z) (z - log((1-e)/e))
//   3  Hinge         max(0, 1 - z)                                    beta*D | -beta*D, D = -1 if z < 1 else 0
//   4  Ipo           (h - 1/(2 beta))^2                               2(h - 1/(2beta)) | -2(h - 1/(2beta))
//   5  BcoPair       d = bco_delta, or (bco_batch_mean) the mean of the 2n values {beta a_j, beta b_j}:
//                    -ls(beta a - d) - ls(d - beta b)                 -beta s(d - beta a) | beta s(beta b - d)
//                    (d is a constant for the gradient; forward stores it in metrics[7], backward reads it there)
//   6  SppoHard      (a - 1/(2beta))^2 + (b + 1/(2beta))^2            2(a - 1/(2beta)) | 2(b + 1/(2beta))
//   7  NcaPair       -ls(beta a) - 0.5 ls(-beta a) - 0.5 ls(-beta b)  beta(-s(-beta a) + 0.5 s(beta a)) | 0.5 beta s(beta b)
//   8  ApoZero       1 - s(beta a) + s(beta b)                        -beta s'(beta a) | beta s'(beta b)
//   9  ApoDown       s(beta a) + 1 - s(beta h)                        beta s'(beta a) - beta s'(beta h) | beta s'(beta h)
//   10 Discopop      z = beta h, q = s(z / tau), E = exp(-z + ls(z / tau))   (= exp(-z) q, without overflow)
//                    sp(-z) (1 - q) + E                               beta*D | -beta*D,
//                      D = -s(-z)(1-q) - sp(-z) q(1-q)/tau + E(-1 + (1-q)/tau)
//   11 Orpo          a, b are average log-probs (no reference); x = min(a, -1e-6), y = min(b, -1e-6),
//                    lo = (x - y) - (l1me(x) - l1me(y)),  l1me(t) = log(1 - exp(t)) computed as
//                    log(-expm1(t)) for t > -ln2, else log1p(-exp(t)):
//                    -beta ls(lo)                                     -beta s(-lo) / (1 - e^x) * [a < -1e-6] |
//                                                                      beta s(-lo) / (1 - e^y) * [b < -1e-6]
//   12 KtoChosen     only a is used (b absent): w (1 - s(beta (a - kl)))        -w beta s'(beta (a - kl)) | -
//   13 KtoRejected   only b is used (a absent): w (1 - s(beta (kl - b)))        - | w beta s'(beta (kl - b))
//                    (w = weight, kl = *kl, a device scalar; kl is a constant for the gradient)
//
// metrics (kMetrics = 8 accumulation-type values, all means over n):
//   [0] loss  [1] accuracy: fraction with beta*a > beta*b (a, b present)  [2] margin: beta*(a - b)
//   [3] chosen reward beta*a  [4] rejected reward beta*b  [5] ORPO: ls(lo)  [6] ORPO: lo
//   [7] bco_pair: the delta d used (not a mean); else 0.
// Entries that do not apply to a loss (e.g. [1] for KTO) are 0. n == 0: all metrics 0.
// Inputs are contiguous [n] in the accumulation type (float, or double when
// dtype is Float64): the Python side converts them (they are tiny).
#pragma once
#include <cstdint>

#include "logprobs.h"  // ScalarKind

namespace rlhf {

enum class PrefLoss : int {
  Sigmoid = 0,
  Robust = 1,
  ExoPair = 2,
  Hinge = 3,
  Ipo = 4,
  BcoPair = 5,
  SppoHard = 6,
  NcaPair = 7,
  ApoZero = 8,
  ApoDown = 9,
  Discopop = 10,
  Orpo = 11,
  KtoChosen = 12,
  KtoRejected = 13,
};
constexpr int kPrefMetrics = 8;

// The CUDA forward runs as one block up to kPrefFwdMultiMin pairs (a training
// batch: one launch, metrics reduced in the block) and as cdiv(n, kPrefFwdChunk)
// blocks above, each writing its chunk's sums to a [parts, kPrefMetrics] double
// workspace (PrefFwdParams::partials, allocated by the bindings) that one block
// then sums in a fixed order. The chunk is fixed (not derived from the device's
// SM count), so the bits depend on n alone. The Triton forward uses the same
// two numbers (FWD_MULTI_MIN, FWD_CHUNK in rlhf_kernels/triton/preference.py).
constexpr int64_t kPrefFwdMultiMin = 16384;
constexpr int64_t kPrefFwdChunk = 2048;

// Rows of the CUDA forward's workspace: 0 below the threshold.
inline int64_t pref_fwd_parts(int64_t n) {
  return n > kPrefFwdMultiMin ? (n + kPrefFwdChunk - 1) / kPrefFwdChunk : 0;
}

struct PrefScalars {
  double beta = 0.1;
  double gamma = 0.0;            // Sigmoid, Robust, ExoPair, Hinge: subtracted from z
  double label_smoothing = 0.0;  // Sigmoid, Robust, ExoPair
  double center = 0.0;           // Sigmoid: coefficient of (a + b)^2
  double tau = 0.05;             // Discopop
  double bco_delta = 0.0;        // BcoPair when !bco_batch_mean
  bool bco_batch_mean = true;
  double weight = 1.0;           // KtoChosen / KtoRejected
};

struct PrefFwdParams {
  ScalarKind dtype = ScalarKind::Float32;  // Float32 or Float64 (the accumulation type)
  PrefLoss loss = PrefLoss::Sigmoid;
  int64_t n = 0;
  const void* chosen = nullptr;        // [n]; nullptr only for KtoRejected
  const void* rejected = nullptr;      // [n]; nullptr only for KtoChosen
  const void* ref_chosen = nullptr;    // [n] or nullptr (= 0)
  const void* ref_rejected = nullptr;  // [n] or nullptr (= 0)
  const void* margin = nullptr;        // [n] or nullptr (= 0); Sigmoid, Robust, ExoPair, Hinge
  const void* kl = nullptr;            // scalar; KtoChosen / KtoRejected
  PrefScalars s;
  void* losses = nullptr;            // [n]
  void* chosen_rewards = nullptr;    // [n] or nullptr (not wanted / not present)
  void* rejected_rewards = nullptr;  // [n] or nullptr
  void* metrics = nullptr;           // [kPrefMetrics]
  // CUDA only, n > kPrefFwdMultiMin: [pref_fwd_parts(n), kPrefMetrics] doubles
  // (row p: chunk p's sums of the metric terms 0..6 and, for bco_pair's
  // batch-mean delta, of beta a_i + beta b_i in column 7).
  void* partials = nullptr;
};

struct PrefBwdParams {
  ScalarKind dtype = ScalarKind::Float32;
  PrefLoss loss = PrefLoss::Sigmoid;
  int64_t n = 0;
  const void* chosen = nullptr;
  const void* rejected = nullptr;
  const void* ref_chosen = nullptr;
  const void* ref_rejected = nullptr;
  const void* margin = nullptr;
  const void* kl = nullptr;
  const void* metrics = nullptr;  // the forward's metrics (BcoPair reads metrics[7])
  PrefScalars s;
  const void* grad_losses = nullptr;  // read at i * grad_stride
  int64_t grad_stride = 1;
  double grad_scale = 1.0;
  void* grad_a = nullptr;  // [n] or nullptr (not needed / not present)
  void* grad_b = nullptr;  // [n] or nullptr
};

void preference_fwd_cuda(const PrefFwdParams& p, void* stream);
void preference_bwd_cuda(const PrefBwdParams& p, void* stream);
void preference_fwd_cpu(const PrefFwdParams& p);
void preference_bwd_cpu(const PrefBwdParams& p);

}  // namespace rlhf
