// Per-token math of the PPO token losses (clipped policy surrogate, clipped
// value loss) and of the KL estimators, written once for the CPU kernels
// (ppo_loss_cpu.cpp) and the CUDA kernels (ppo_loss.cu). ppo.h states the
// formulas (PpoLossParams, KlParams); this file is their only implementation,
// and it mirrors the Triton reference (rlhf_kernels/triton/ppo.py:
// _policy_token, _value_token, _kl_token) expression by expression,
// including the strict comparisons that decide ties and clamp boundaries.
//
// Every device-callable function is RLHF_HD (logprobs.h: __host__ __device__
// __forceinline__ under nvcc, plain inline otherwise) and templated on the
// compute type A (float for float32, double for float64; on the host also
// simd::vf8, 8 float lanes, see lit below). exp goes through expf / exp:
// nvcc's accurate device versions on the GPU, libm on the host, and
// cpu_simd.h's polynomial for simd::vf8 (< 2e-7 relative).
// The constants derived from the double parameters (1 - low, 1 + high, ...)
// are formed in A, as the Triton kernels do after rounding the parameters.
// nvcc contracts a * b + c into an FMA where the host compiler does not (the
// entropy and KL terms of fused_token, for instance), so CUDA and CPU results
// can differ in the last bit, and a ratio within an ulp of 1 +- eps can land on
// the other side of a clip on the two devices: tests compare with tolerances.
//
// NaN inputs: clamp and max below propagate NaN (as torch.clamp /
// torch.maximum in the torch reference), so a NaN token gives a NaN loss and
// gradient; indicators computed from comparisons with NaN are 0.
#pragma once

#include <math.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ppo.h"
#if !defined(__CUDACC__)
#include "cpu_simd.h"
#endif

namespace rlhf {
namespace ppo_loss {

constexpr int kPolicy = 0;
constexpr int kValue = 1;
constexpr int kRowSums = 5;  // rows[b, 0..4]: loss, count, clipped, kl, clipped-lower
constexpr int kMetrics = 5;  // metrics[0..4]: clipfrac, approx kl, clipfrac lower, total, seqs

// loss_agg_mode ids (rlhf_kernels/ops/ppo.py: _AGG_IDS)
constexpr int kTokenMean = 0;
constexpr int kSeqMeanTokenSum = 1;
constexpr int kSeqMeanTokenMean = 2;
constexpr int kSeqMeanTokenSumNorm = 3;
constexpr int kTokenSum = 4;

// The fused step's inputs (ppo.h: PpoInputsParams): the denominator d_b of a valid token's
// aggregation weight 1 / d_b, in A as the ATen composition forms it (its counts are A
// values; products of two exact integers are rounded once either way).
template <typename A>
RLHF_HD A input_denominator(int agg, int64_t n, int64_t s, int64_t n_b, int64_t time) {
  switch (agg) {
    case kTokenMean: return static_cast<A>(n);
    case kSeqMeanTokenSum: return static_cast<A>(s);
    case kSeqMeanTokenMean: return static_cast<A>(n_b > 1 ? n_b : 1) * static_cast<A>(s);
    case kSeqMeanTokenSumNorm: return static_cast<A>(s) * static_cast<A>(time > 1 ? time : 1);
    default: return A(1);  // kTokenSum
  }
}

// A mask element is "valid" when nonzero (NaN included, -0 not), for every mask dtype the
// inputs take; 16-bit floats as raw bits (Bits16).
struct Bits16 {
  uint16_t bits;
};
template <typename M>
RLHF_HD bool mask_nonzero(M m) { return m != M(0); }
RLHF_HD bool mask_nonzero(Bits16 m) { return (m.bits & 0x7fffu) != 0; }

// Pass 1 of the inputs at row b, position t (ppo.h: PpoInputsParams): the flat label and the
// 0 / 1 weight written; returns whether the token is valid. The label and mask loads are
// independent (no short-circuit), so that a loop over positions keeps several in flight.
template <typename L, typename M, typename A>
RLHF_HD bool input_token(const PpoInputsParams& p, const L* labels, const M* mask, int64_t* out, A* w, int64_t b,
                         int64_t t) {
  const int64_t y = static_cast<int64_t>(labels[b * p.labels_stride0 + t * p.labels_stride1]);
  const bool keep = mask_nonzero(mask[b * p.mask_stride0 + t * p.mask_stride1]);
  const bool valid = keep & (y != p.ignore_index);
  out[b * p.time + t] = valid ? y : p.ignore_index;
  w[b * p.time + t] = valid ? A(1) : A(0);
  return valid;
}

// Calls f(Label{}, Mask{}, A{}) with the inputs' element types (host code; a generic lambda
// instantiates the kernel of each combination).
template <typename F>
void visit_inputs(const PpoInputsParams& p, F&& f) {
  const auto with_mask = [&](auto label, auto acc) {
    switch (p.mask_kind) {
      case MaskKind::Byte: f(label, uint8_t{}, acc); break;
      case MaskKind::Int32: f(label, int32_t{}, acc); break;
      case MaskKind::Int64: f(label, int64_t{}, acc); break;
      case MaskKind::Float32: f(label, float{}, acc); break;
      case MaskKind::Float64: f(label, double{}, acc); break;
      case MaskKind::Bits16: f(label, Bits16{}, acc); break;
      default: throw std::invalid_argument("rlhf_kernels: ppo_fused_inputs: unsupported mask kind");
    }
  };
  const auto with_acc = [&](auto label) {
    if (p.double_acc) {
      with_mask(label, double{});
    } else {
      with_mask(label, float{});
    }
  };
  if (p.labels_int32) {
    with_acc(int32_t{});
  } else {
    with_acc(int64_t{});
  }
}

// Argument checks shared by both devices.
inline void check_inputs(const PpoInputsParams& p, const char* who) {
  if (p.batch < 0 || p.time < 0 || p.agg < kTokenMean || p.agg > kTokenSum) {
    throw std::invalid_argument(std::string("rlhf_kernels: ") + who + ": bad shape or agg");
  }
  if (p.n_valid == nullptr || (p.batch * p.time > 0 && (p.labels == nullptr || p.mask == nullptr ||
                                                        p.labels_out == nullptr || p.weights == nullptr))) {
    throw std::invalid_argument(std::string("rlhf_kernels: ") + who + ": missing pointer");
  }
}

constexpr int kKlK1 = 0;
constexpr int kKlAbs = 1;
constexpr int kKlK2 = 2;
constexpr int kKlK3 = 3;

// ---------------------------------------------------------------------------
// Elementary functions (overloads, so that templates pick the precision)
// ---------------------------------------------------------------------------
RLHF_HD float m_exp(float x) { return expf(x); }
RLHF_HD double m_exp(double x) { return exp(x); }
RLHF_HD float m_abs(float x) { return fabsf(x); }
RLHF_HD double m_abs(double x) { return fabs(x); }

// min(max(x, lo), hi) for lo <= hi; NaN x stays NaN.
template <typename A>
RLHF_HD A clamp(A x, A lo, A hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// max(a, b); NaN if either is NaN. Ties return b (same value).
template <typename A>
RLHF_HD A max_nan(A a, A b) {
  return ((a > b) | (a != a)) ? a : b;  // | and & rather than || and &&: lane-wise on simd::vf
}

// min(a, b); NaN if either is NaN. Ties return b (same value).
template <typename A>
RLHF_HD A min_nan(A a, A b) {
  return ((a < b) | (a != a)) ? a : b;
}

// The constant v in type A. The token functions below are also instantiated
// on the host for A = simd::vf8 (8 floats: ppo_loss_cpu.cpp), where
// comparisons give lane masks, `auto` holds them, and ?: selects per lane.
template <typename A>
RLHF_HD A lit(double v) {
  return static_cast<A>(v);
}

#if !defined(__CUDACC__)
template <>
RLHF_HD simd::vf8 lit<simd::vf8>(double v) {
  return simd::splat8(static_cast<float>(v));
}
RLHF_HD simd::vf8 m_exp(simd::vf8 x) { return simd::exp_bounded(x); }
RLHF_HD simd::vf8 m_abs(simd::vf8 x) { return simd::abs(x); }
#endif

// ---------------------------------------------------------------------------
// Per-call constants
// ---------------------------------------------------------------------------
// POLICY: lo = 1 - p0, hi = 1 + p1 (the ratio clamp), c = p2 (dual clip).
// VALUE: eps = p0. All rounded to A first, then combined in A.
template <typename A>
struct LossConsts {
  A lo;
  A hi;
  A c;
  A eps;
};

template <typename A>
inline LossConsts<A> make_consts(const PpoLossParams& p) {
  LossConsts<A> k;
  const A p0 = static_cast<A>(p.p0);
  const A p1 = static_cast<A>(p.p1);
  k.lo = A(1) - p0;
  k.hi = A(1) + p1;
  k.c = static_cast<A>(p.p2);
  k.eps = p0;
  return k;
}

// Everything one token produces. clip / lower are 0 or 1; kl and lower are 0
// for VALUE.
template <typename A>
struct TokenOut {
  A loss;
  A dloss;  // d loss / d x
  A clip;
  A kl;
  A lower;
};

// ---------------------------------------------------------------------------
// POLICY (verl's compute_policy_loss): x = logp, old = old logp, adv = A
// ---------------------------------------------------------------------------
template <typename A, bool kDual>
RLHF_HD TokenOut<A> policy_token(A logp, A old, A adv, const LossConsts<A>& k) {
  const A diff = logp - old;
  const A log_ratio = clamp(diff, lit<A>(-20), lit<A>(20));
  const A ratio = m_exp(log_ratio);
  const A dratio = m_abs(diff) < lit<A>(20) ? ratio : lit<A>(0);  // the clamp cuts the gradient outside
  const A clipped_ratio = clamp(ratio, k.lo, k.hi);
  const auto in_clip = (ratio > k.lo) & (ratio < k.hi);
  const A loss1 = -adv * ratio;
  const A loss2 = -adv * clipped_ratio;
  const auto clip_hit = loss2 > loss1;
  const A clipped = max_nan(loss1, loss2);
  // The max picks the unclipped term unless the clipped one is strictly
  // larger (ties: the unclipped term's gradient, equal to the clipped one's
  // inside the clip range).
  const A dunclipped = -adv * dratio;
  const A dclipped = clip_hit ? (in_clip ? dunclipped : lit<A>(0)) : dunclipped;
  TokenOut<A> o;
  o.loss = clipped;
  o.dloss = dclipped;
  o.clip = clip_hit ? lit<A>(1) : lit<A>(0);
  o.kl = -log_ratio;
  o.lower = lit<A>(0);
  if (kDual) {
    const A loss3 = -adv * k.c;
    const auto neg = adv < lit<A>(0);
    const auto use3 = neg & (loss3 < clipped);
    o.loss = use3 ? loss3 : clipped;
    o.dloss = use3 ? lit<A>(0) : dclipped;
    o.lower = (neg & (clipped > loss3)) ? lit<A>(1) : lit<A>(0);
  }
  return o;
}

// ---------------------------------------------------------------------------
// VALUE: x = v, old = old v, ret = R: 0.5 max((v - R)^2, (vc - R)^2)
// ---------------------------------------------------------------------------
template <typename A>
RLHF_HD TokenOut<A> value_token(A v, A old, A ret, const LossConsts<A>& k) {
  // clip(v, old - eps, old + eps), not old + clip(v - old, +-eps): inside the range it is v
  // itself, bit for bit, so an unclipped token never counts as clipped by rounding (TRL's
  // and verl's form). Then l2 > l1 only where v lies outside, where vc does not depend on v.
  // NaN in v or old gives NaN (a NaN-keeping clamp, as torch.clamp), loss and gradient.
  const A clipped_v = max_nan(min_nan(v, old + k.eps), old - k.eps);
  const A e1 = v - ret;
  const A e2 = clipped_v - ret;
  const A l1 = e1 * e1;
  const A l2 = e2 * e2;
  const auto use2 = l2 > l1;
  TokenOut<A> o;
  o.loss = lit<A>(0.5) * max_nan(l1, l2);
  o.dloss = use2 ? lit<A>(0) : ((l2 != l2) ? l2 : e1);
  o.clip = use2 ? lit<A>(1) : lit<A>(0);
  o.kl = lit<A>(0);
  o.lower = lit<A>(0);
  return o;
}

template <typename A, int kKind, bool kDual>
RLHF_HD TokenOut<A> loss_token(A x, A old, A third, const LossConsts<A>& k) {
  static_assert(kKind == kPolicy || (kKind == kValue && !kDual), "loss_token: bad kind");
  if (kKind == kPolicy) return policy_token<A, kDual>(x, old, third, k);
  return value_token<A>(x, old, third, k);
}

// ---------------------------------------------------------------------------
// Aggregation over rows (ppo.h, PpoLossParams): the running sums in double,
// whatever A is, folded row by row (CPU, in row order) or per thread and then
// in a fixed tree (CUDA): deterministic either way.
// ---------------------------------------------------------------------------
struct AggSums {
  double loss = 0, loss_per_token = 0, count = 0, clip = 0, kl = 0, lower = 0, seqs = 0;

  template <typename A>
  RLHF_HD void add_row(const A* r) {  // r = rows[b, 0..4]
    const double count_b = static_cast<double>(r[1]);
    loss += static_cast<double>(r[0]);
    loss_per_token += static_cast<double>(r[0]) / (count_b > 1.0 ? count_b : 1.0);
    count += count_b;
    clip += static_cast<double>(r[2]);
    kl += static_cast<double>(r[3]);
    lower += static_cast<double>(r[4]);
    seqs += count_b > 0.0 ? 1.0 : 0.0;
  }
};

// Writes the aggregated loss and metrics[0..4] from the sums over all rows.
template <typename A>
RLHF_HD void finish_agg(const AggSums& s, int agg, int64_t time, A* loss, A* metrics) {
  const double total = s.count > 1.0 ? s.count : 1.0;
  const double seqs = s.seqs > 1.0 ? s.seqs : 1.0;
  double l;
  switch (agg) {
    case kTokenMean: l = s.loss / total; break;
    case kSeqMeanTokenSum: l = s.loss / seqs; break;
    case kSeqMeanTokenMean: l = s.loss_per_token / seqs; break;
    case kTokenSum: l = s.loss; break;
    default: l = s.loss / (seqs * static_cast<double>(time > 0 ? time : 1)); break;  // kSeqMeanTokenSumNorm
  }
  *loss = static_cast<A>(l);
  metrics[0] = static_cast<A>(s.clip / total);
  metrics[1] = static_cast<A>(s.kl / total);
  metrics[2] = static_cast<A>(s.lower / total);
  metrics[3] = static_cast<A>(total);
  metrics[4] = static_cast<A>(seqs);
}

// d loss / d (row b's loss sum): the backward's per-row factor.
template <typename A>
RLHF_HD A row_weight(int agg, A count_b, const A* metrics, int64_t time) {
  // One division for all modes (four division sites made ptxas spill in the float value
  // backward on sm_80).
  A denominator;
  switch (agg) {
    case kTokenMean: denominator = metrics[3]; break;
    case kSeqMeanTokenSum: denominator = metrics[4]; break;
    case kSeqMeanTokenMean: denominator = (count_b > A(1) ? count_b : A(1)) * metrics[4]; break;
    case kTokenSum: denominator = A(1); break;
    default: denominator = metrics[4] * static_cast<A>(time > 0 ? time : 1); break;  // kSeqMeanTokenSumNorm
  }
  return A(1) / denominator;
}

// ---------------------------------------------------------------------------
// KL estimators, d = logp - ref: value and d value / d logp
// ---------------------------------------------------------------------------
template <typename A>
struct KlOut {
  A value;
  A d;
};

template <typename A, int kKind>
RLHF_HD KlOut<A> kl_token(A logp, A ref) {
  static_assert(kKind >= kKlK1 && kKind <= kKlK3, "kl_token: bad kind");
  const A diff = logp - ref;
  KlOut<A> o;
  if (kKind == kKlK1) {
    o.value = diff;
    o.d = lit<A>(1);
  } else if (kKind == kKlAbs) {
    o.value = m_abs(diff);
    o.d = diff > lit<A>(0) ? lit<A>(1) : (diff < lit<A>(0) ? lit<A>(-1) : lit<A>(0));
  } else if (kKind == kKlK2) {
    o.value = lit<A>(0.5) * diff * diff;
    o.d = diff;
  } else {
    const A kl = clamp(-diff, lit<A>(-20), lit<A>(20));
    const A e = m_exp(kl);
    const A raw = e - kl - lit<A>(1);
    o.value = clamp(raw, lit<A>(-10), lit<A>(10));
    // d/dlogp = -(e - 1) inside both clamps, 0 outside
    const auto live = (m_abs(diff) < lit<A>(20)) & (raw < lit<A>(10)) & (raw > lit<A>(-10));
    o.d = live ? lit<A>(1) - e : lit<A>(0);
  }
  return o;
}

// ---------------------------------------------------------------------------
// The fused PPO-from-logits token (ppo.h, PpoLogitsParams): everything after
// the log-sum-exp sweep, for one token. has_dual and kl_kind are runtime
// values, uniform over a row (a CUDA block), so the branches cost nothing
// next to the V-long sweeps; kl_kind < 0 means no reference.
// ---------------------------------------------------------------------------
template <typename A>
struct FusedTokenOut {
  A weighted;  // w (pg - c_H H + c_KL kl)
  A pg;
  A kl;
  A clip;
  A lower;
  A neg_log_ratio;
  A g;   // dL / dlogp
  A gh;  // dL / dH
};

template <typename A>
struct FusedConsts {
  LossConsts<A> k;
  A kl_coef;
  A entropy_coef;
};

template <typename A>
inline FusedConsts<A> make_fused_consts(const PpoLogitsParams& p) {
  PpoLossParams q;
  q.p0 = p.clip_low;
  q.p1 = p.clip_high;
  q.p2 = p.clip_c;
  FusedConsts<A> c;
  c.k = make_consts<A>(q);
  c.kl_coef = static_cast<A>(p.kl_coef);
  c.entropy_coef = static_cast<A>(p.entropy_coef);
  return c;
}

template <typename A>
RLHF_HD KlOut<A> kl_any(int kind, A logp, A ref) {
  switch (kind) {
    case kKlK1: return kl_token<A, kKlK1>(logp, ref);
    case kKlAbs: return kl_token<A, kKlAbs>(logp, ref);
    case kKlK2: return kl_token<A, kKlK2>(logp, ref);
    default: return kl_token<A, kKlK3>(logp, ref);
  }
}

template <typename A>
RLHF_HD FusedTokenOut<A> fused_token(A logp, A entropy, A old, A adv, A ref, A weight, const FusedConsts<A>& c,
                                     bool has_dual, int kl_kind) {
  const TokenOut<A> o =
      has_dual ? policy_token<A, true>(logp, old, adv, c.k) : policy_token<A, false>(logp, old, adv, c.k);
  A term = o.loss - c.entropy_coef * entropy;
  A dlogp = o.dloss;
  A kl = A(0);
  if (kl_kind >= 0) {
    const KlOut<A> q = kl_any<A>(kl_kind, logp, ref);
    kl = q.value;
    if (c.kl_coef != A(0)) {  // kl_coef = 0: the KL is a metric only; an inf / NaN KL must not reach the loss
      term += c.kl_coef * q.value;
      dlogp += c.kl_coef * q.d;
    }
  }
  FusedTokenOut<A> f;
  f.weighted = weight * term;
  f.pg = o.loss;
  f.kl = kl;
  f.clip = o.clip;
  f.lower = o.lower;
  f.neg_log_ratio = o.kl;
  f.g = weight * dlogp;
  f.gh = -c.entropy_coef * weight;
  return f;
}

// --- launcher argument checks, shared by the CPU and CUDA entry points (host code) ---

[[noreturn]] inline void fail(const char* what, const char* msg) {
  throw std::runtime_error(std::string("rlhf_kernels: ") + what + ": " + msg);
}

// Validates p; returns false when there is nothing to write. The forward
// always writes the loss and metrics (B == 0 or T == 0: no valid token).
inline bool check_loss(const PpoLossParams& p, const char* what, bool forward) {
  if (p.batch < 0 || p.time < 0) fail(what, "negative batch or time");
  if (p.kind != kPolicy && p.kind != kValue) fail(what, "kind must be 0 (policy) or 1 (value)");
  if (p.agg < kTokenMean || p.agg > kTokenSum) fail(what, "agg must be in 0..4");
  if (p.dtype != ScalarKind::Float32 && p.dtype != ScalarKind::Float64) {
    fail(what, "dtype must be float32 or float64");
  }
  return forward || (p.batch > 0 && p.time > 0);
}

// Validates p; returns false when there is nothing to write.
inline bool check_fused(const PpoLogitsParams& p, const char* what) {
  if (p.rows < 0 || p.vocab < 1) fail(what, "negative rows or empty vocab");
  if (p.vocab > (int64_t(1) << 30)) fail(what, "vocab size above 2^30 is not supported");
  if (p.rows == 0) return false;  // before the layout checks: [B, 0, V] has size2 == 0
  if (p.logits_layout.size1 < 1 || p.logits_layout.size2 < 1 || p.grad_layout.size1 < 1 ||
      p.grad_layout.size2 < 1) {
    fail(what, "row layout sizes must be >= 1");
  }
  if (p.ref != nullptr && (p.kl_kind < kKlK1 || p.kl_kind > kKlK3)) fail(what, "kl_kind must be in 0..3");
  return p.rows > 0;
}

// Validates p; returns false when there is nothing to write.
inline bool check_kl(const KlParams& p, const char* what) {
  if (p.n < 0) fail(what, "negative n");
  if (p.kind < kKlK1 || p.kind > kKlK3) fail(what, "kind must be 0 (k1), 1 (abs), 2 (k2) or 3 (k3)");
  if (p.dtype != ScalarKind::Float32 && p.dtype != ScalarKind::Float64) {
    fail(what, "dtype must be float32 or float64");
  }
  return p.n > 0;
}

}  // namespace ppo_loss
}  // namespace rlhf
