// Per-element math of the fused preference losses, written once for the CPU
// kernels (preference_cpu.cpp) and the CUDA kernels (preference.cu).
// preference.h states the formulas; this file is their only implementation.
//
// Every device-callable function is RLHF_HD (logprobs.h: __host__ __device__
// __forceinline__ under nvcc, plain inline otherwise) and templated on the
// accumulation type Acc (float or double). Elementary functions go through
// the C functions expf / expm1f / logf / log1pf (exp / expm1 / log / log1p
// for double): nvcc's accurate device versions (no fast-math intrinsics) on
// the GPU, libm on the host. No torch headers.
//
// Stability for finite inputs of any size (|x| up to 1e4 and beyond):
//   * log-sigmoid is min(x, 0) - log1p(exp(-|x|)), sigmoid and its
//     derivative use the single exponential exp(-|x|) in (0, 1]: no overflow,
//     and the tiny tail values keep their relative accuracy.
//   * softplus(x) = -ls(-x) likewise.
//   * Discopop's E = exp(-z) s(z / tau) is exp(-z + ls(z / tau)); the
//     argument is <= 0 for all z when tau <= 1 (for tau > 1 and z very
//     negative E itself is huge: that overflow is the math's).
//   * ORPO's log(1 - e^t) (t <= -1e-6) is log(-expm1(t)) above -ln 2 and
//     log1p(-exp(t)) below, and 1 / (1 - e^x) is -1 / expm1(x).
//   * Products like s(-z) * ls(-z) only ever multiply a tiny (or zero)
//     sigmoid by a finite log-sigmoid, never 0 * inf.
#pragma once

#include <math.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "preference.h"

namespace rlhf {
namespace pref {

// metrics[0 .. kSums) are per-element sums divided by n at the end;
// metrics[kSums] (= 7) is the bco_pair delta.
constexpr int kSums = 7;
static_assert(kSums + 1 == kPrefMetrics, "metrics layout");

// ---------------------------------------------------------------------------
// Elementary functions (overloads, so that templates pick the precision)
// ---------------------------------------------------------------------------
RLHF_HD float m_exp(float x) { return expf(x); }
RLHF_HD double m_exp(double x) { return exp(x); }
RLHF_HD float m_expm1(float x) { return expm1f(x); }
RLHF_HD double m_expm1(double x) { return expm1(x); }
RLHF_HD float m_log(float x) { return logf(x); }
RLHF_HD double m_log(double x) { return log(x); }
RLHF_HD float m_log1p(float x) { return log1pf(x); }
RLHF_HD double m_log1p(double x) { return log1p(x); }
RLHF_HD float m_abs(float x) { return fabsf(x); }
RLHF_HD double m_abs(double x) { return fabs(x); }

// ls(x) = log s(x) = min(x, 0) - log1p(exp(-|x|)). NaN in, NaN out.
template <typename Acc>
RLHF_HD Acc log_sigmoid(Acc x) {
  const Acc lo = x < Acc(0) ? x : Acc(0);
  return lo - m_log1p(m_exp(-m_abs(x)));
}

// sp(x) = log(1 + e^x) = -ls(-x).
template <typename Acc>
RLHF_HD Acc softplus(Acc x) {
  return -log_sigmoid(-x);
}

// s(x) = 1 / (1 + e^-x): 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0,
// with e = exp(-|x|) in (0, 1].
template <typename Acc>
RLHF_HD Acc sigmoid(Acc x) {
  const Acc e = m_exp(-m_abs(x));
  const Acc r = Acc(1) / (Acc(1) + e);
  return x < Acc(0) ? e * r : r;
}

// ls(x) and ls(-x) from one exp and one log1p: both are min(+-x, 0) - log1p(exp(-|x|)),
// bit for bit what two log_sigmoid calls give.
template <typename Acc>
struct LogSigmoidPair {
  Acc pos, neg;  // ls(x), ls(-x)
};
template <typename Acc>
RLHF_HD LogSigmoidPair<Acc> log_sigmoid_pair(Acc x) {
  const Acc l = m_log1p(m_exp(-m_abs(x)));
  const Acc lo = x < Acc(0) ? x : Acc(0);
  const Acc nlo = -x < Acc(0) ? -x : Acc(0);
  return {lo - l, nlo - l};
}

// s(x) and s(-x) from one exp, bit for bit what two sigmoid calls give.
template <typename Acc>
struct SigmoidPair {
  Acc pos, neg;  // s(x), s(-x)
};
template <typename Acc>
RLHF_HD SigmoidPair<Acc> sigmoid_pair(Acc x) {
  const Acc e = m_exp(-m_abs(x));
  const Acc r = Acc(1) / (Acc(1) + e);
  const Acc er = e * r;
  return {x < Acc(0) ? er : r, -x < Acc(0) ? er : r};
}

// s'(x) = s(x) s(-x) = e / (1 + e)^2, e = exp(-|x|) (even in x).
template <typename Acc>
RLHF_HD Acc dsigmoid(Acc x) {
  const Acc e = m_exp(-m_abs(x));
  const Acc r = Acc(1) / (Acc(1) + e);
  return e * r * r;
}

// log(1 - e^t) for t < 0.
template <typename Acc>
RLHF_HD Acc log1mexp(Acc t) {
  return t > Acc(-0.6931471805599453) ? m_log(-m_expm1(t)) : m_log1p(-m_exp(t));
}

// ---------------------------------------------------------------------------
// Per-call constants
// ---------------------------------------------------------------------------
// Everything derived from PrefScalars, computed once in double on the host
// and rounded to Acc. kl and delta are filled in by the kernels (kl lives in
// device memory; delta may be a batch mean or the forward's metrics[7]).
template <typename Acc>
struct Consts {
  PrefLoss loss;
  Acc beta;
  Acc gamma;
  Acc ls;             // label smoothing
  Acc one_m_ls;       // 1 - ls
  Acc robust_den;     // 1 - 2 ls
  Acc center;         // Sigmoid: coefficient of (a + b)^2
  Acc two_center;     // 2 * center
  Acc exo_log_1me;    // ExoPair: log(1 - e)
  Acc exo_log_e;      //          log(e)
  Acc exo_logit;      //          log((1 - e) / e)
  Acc half_inv_beta;  // Ipo, SppoHard: 1 / (2 beta)
  Acc tau;            // Discopop
  Acc weight;         // Kto*
  Acc kl;             // Kto*: *kl
  Acc delta;          // BcoPair: d
};

constexpr double kExoDefaultEps = 1e-3;
constexpr double kOrpoMax = -1e-6;  // ORPO clamps the average log-probs to <= this

inline bool is_kto(PrefLoss loss) {
  return loss == PrefLoss::KtoChosen || loss == PrefLoss::KtoRejected;
}

inline bool uses_margin(PrefLoss loss) {
  return loss == PrefLoss::Sigmoid || loss == PrefLoss::Robust || loss == PrefLoss::ExoPair ||
         loss == PrefLoss::Hinge;
}

template <typename Acc>
inline Consts<Acc> make_consts(PrefLoss loss, const PrefScalars& s) {
  Consts<Acc> c;
  c.loss = loss;
  c.beta = static_cast<Acc>(s.beta);
  c.gamma = static_cast<Acc>(s.gamma);
  c.ls = static_cast<Acc>(s.label_smoothing);
  c.one_m_ls = static_cast<Acc>(1.0 - s.label_smoothing);
  c.robust_den = static_cast<Acc>(1.0 - 2.0 * s.label_smoothing);
  c.center = static_cast<Acc>(s.center);
  c.two_center = static_cast<Acc>(2.0 * s.center);
  const double e = s.label_smoothing > 0.0 ? s.label_smoothing : kExoDefaultEps;
  c.exo_log_1me = static_cast<Acc>(::log1p(-e));
  c.exo_log_e = static_cast<Acc>(::log(e));
  c.exo_logit = static_cast<Acc>(::log1p(-e) - ::log(e));
  c.half_inv_beta = static_cast<Acc>(1.0 / (2.0 * s.beta));
  c.tau = static_cast<Acc>(s.tau);
  c.weight = static_cast<Acc>(s.weight);
  c.kl = Acc(0);
  c.delta = static_cast<Acc>(s.bco_delta);
  return c;
}

// ---------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------
// a_i = chosen_i - (ref_chosen_i or 0), b_i likewise, m_i = margin_i or 0.
// An absent side (chosen for KtoRejected, rejected for KtoChosen) reads as 0.
template <typename Acc>
struct Inputs {
  const Acc* chosen;
  const Acc* rejected;
  const Acc* ref_chosen;
  const Acc* ref_rejected;
  const Acc* margin;  // nullptr unless the loss uses it

  RLHF_HD Acc a(int64_t i) const {
    if (chosen == nullptr) return Acc(0);
    return ref_chosen != nullptr ? chosen[i] - ref_chosen[i] : chosen[i];
  }
  RLHF_HD Acc b(int64_t i) const {
    if (rejected == nullptr) return Acc(0);
    return ref_rejected != nullptr ? rejected[i] - ref_rejected[i] : rejected[i];
  }
  RLHF_HD Acc m(int64_t i) const { return margin != nullptr ? margin[i] : Acc(0); }
};

template <typename Acc>
inline Inputs<Acc> make_inputs(PrefLoss loss, const void* chosen, const void* rejected,
                               const void* ref_chosen, const void* ref_rejected,
                               const void* margin) {
  Inputs<Acc> in;
  in.chosen = loss == PrefLoss::KtoRejected ? nullptr : static_cast<const Acc*>(chosen);
  in.rejected = loss == PrefLoss::KtoChosen ? nullptr : static_cast<const Acc*>(rejected);
  in.ref_chosen = in.chosen != nullptr ? static_cast<const Acc*>(ref_chosen) : nullptr;
  in.ref_rejected = in.rejected != nullptr ? static_cast<const Acc*>(ref_rejected) : nullptr;
  in.margin = uses_margin(loss) ? static_cast<const Acc*>(margin) : nullptr;
  return in;
}

// ---------------------------------------------------------------------------
// Shared sub-expressions
// ---------------------------------------------------------------------------

// z = beta (a - b) - gamma - m (Sigmoid, Robust, ExoPair, Hinge).
template <typename Acc>
RLHF_HD Acc pair_z(const Consts<Acc>& c, Acc h, Acc m) {
  return c.beta * h - c.gamma - m;
}

// ORPO: x = min(a, -1e-6), y = min(b, -1e-6) (NaN propagates),
// lo = (x - y) - (log(1 - e^x) - log(1 - e^y)).
template <typename Acc>
struct OrpoTerms {
  Acc x, y, lo;
};

template <typename Acc>
RLHF_HD OrpoTerms<Acc> orpo_terms(Acc a, Acc b) {
  const Acc k = Acc(kOrpoMax);
  OrpoTerms<Acc> t;
  t.x = a > k ? k : a;
  t.y = b > k ? k : b;
  t.lo = (t.x - t.y) - (log1mexp(t.x) - log1mexp(t.y));
  return t;
}

// ---------------------------------------------------------------------------
// Forward: the loss of one pair (and ORPO's per-pair ls(lo), lo)
// ---------------------------------------------------------------------------
template <typename Acc>
struct FwdOut {
  Acc loss;
  Acc orpo_ls;  // ls(lo), ORPO only (else 0)
  Acc orpo_lo;  // lo,     ORPO only (else 0)
};

template <typename Acc>
RLHF_HD FwdOut<Acc> forward(const Consts<Acc>& c, Acc a, Acc b, Acc m) {
  FwdOut<Acc> o;
  o.loss = Acc(0);
  o.orpo_ls = Acc(0);
  o.orpo_lo = Acc(0);
  const Acc h = a - b;
  switch (c.loss) {
    case PrefLoss::Sigmoid: {
      const Acc z = pair_z(c, h, m);
      const Acc sum = a + b;
      const LogSigmoidPair<Acc> l = log_sigmoid_pair(z);
      // Terms with a coefficient of 0 are skipped, not multiplied: an infinite input makes
      // them 0 * inf = NaN (label smoothing off, Bradley-Terry centring off).
      o.loss = -c.one_m_ls * l.pos;
      if (c.ls != Acc(0)) o.loss -= c.ls * l.neg;
      if (c.center != Acc(0)) o.loss += c.center * sum * sum;
      break;
    }
    case PrefLoss::Robust: {
      const Acc z = pair_z(c, h, m);
      const LogSigmoidPair<Acc> l = log_sigmoid_pair(z);
      o.loss = (-c.one_m_ls * l.pos + (c.ls != Acc(0) ? c.ls * l.neg : Acc(0))) / c.robust_den;
      break;
    }
    case PrefLoss::ExoPair: {
      const Acc z = pair_z(c, h, m);
      o.loss = sigmoid(z) * (log_sigmoid(z) - c.exo_log_1me) +
               sigmoid(-z) * (log_sigmoid(-z) - c.exo_log_e);
      break;
    }
    case PrefLoss::Hinge: {
      const Acc t = Acc(1) - pair_z(c, h, m);
      o.loss = t < Acc(0) ? Acc(0) : t;  // NaN stays NaN
      break;
    }
    case PrefLoss::Ipo: {
      const Acc t = h - c.half_inv_beta;
      o.loss = t * t;
      break;
    }
    case PrefLoss::BcoPair:
      o.loss = -log_sigmoid(c.beta * a - c.delta) - log_sigmoid(c.delta - c.beta * b);
      break;
    case PrefLoss::SppoHard: {
      const Acc ta = a - c.half_inv_beta;
      const Acc tb = b + c.half_inv_beta;
      o.loss = ta * ta + tb * tb;
      break;
    }
    case PrefLoss::NcaPair: {
      const Acc ca = c.beta * a;
      o.loss = -log_sigmoid(ca) - Acc(0.5) * log_sigmoid(-ca) - Acc(0.5) * log_sigmoid(-(c.beta * b));
      break;
    }
    case PrefLoss::ApoZero:  // 1 - s(beta a) written as s(-beta a)
      o.loss = sigmoid(-(c.beta * a)) + sigmoid(c.beta * b);
      break;
    case PrefLoss::ApoDown:  // 1 - s(beta h) written as s(-beta h)
      o.loss = sigmoid(c.beta * a) + sigmoid(-(c.beta * h));
      break;
    case PrefLoss::Discopop: {
      const Acc z = c.beta * h;
      const Acc zt = z / c.tau;
      const Acc one_m_q = sigmoid(-zt);
      const Acc E = m_exp(-z + log_sigmoid(zt));
      o.loss = softplus(-z) * one_m_q + E;
      break;
    }
    case PrefLoss::Orpo: {
      const OrpoTerms<Acc> t = orpo_terms(a, b);
      const Acc r = log_sigmoid(t.lo);
      o.loss = -c.beta * r;
      o.orpo_ls = r;
      o.orpo_lo = t.lo;
      break;
    }
    case PrefLoss::KtoChosen:  // w (1 - s(beta (a - kl))) = w s(-beta (a - kl))
      o.loss = c.weight * sigmoid(-(c.beta * (a - c.kl)));
      break;
    case PrefLoss::KtoRejected:  // w (1 - s(beta (kl - b))) = w s(-beta (kl - b))
      o.loss = c.weight * sigmoid(-(c.beta * (c.kl - b)));
      break;
  }
  return o;
}

// ---------------------------------------------------------------------------
// Backward: dL/da, dL/db of one pair (0 for an absent side)
// ---------------------------------------------------------------------------
template <typename Acc>
struct Grad {
  Acc da, db;
};

template <typename Acc>
RLHF_HD Grad<Acc> backward(const Consts<Acc>& c, Acc a, Acc b, Acc m) {
  Grad<Acc> g;
  g.da = Acc(0);
  g.db = Acc(0);
  const Acc h = a - b;
  Acc D = Acc(0);          // dL/dz for the losses of z = beta h - ...
  bool via_z = false;      // then da = beta D, db = -beta D
  switch (c.loss) {
    case PrefLoss::Sigmoid: {
      const Acc z = pair_z(c, h, m);
      const SigmoidPair<Acc> sz = sigmoid_pair(z);
      const Acc Dz = -c.one_m_ls * sz.neg + c.ls * sz.pos;
      const Acc t = c.two_center != Acc(0) ? c.two_center * (a + b) : Acc(0);  // (as the forward)
      g.da = c.beta * Dz + t;
      g.db = -c.beta * Dz + t;
      break;
    }
    case PrefLoss::Robust: {
      const Acc z = pair_z(c, h, m);
      const SigmoidPair<Acc> sz = sigmoid_pair(z);
      D = (-c.one_m_ls * sz.neg - c.ls * sz.pos) / c.robust_den;
      via_z = true;
      break;
    }
    case PrefLoss::ExoPair: {
      const Acc z = pair_z(c, h, m);
      D = dsigmoid(z) * (z - c.exo_logit);
      via_z = true;
      break;
    }
    case PrefLoss::Hinge:
      D = pair_z(c, h, m) < Acc(1) ? Acc(-1) : Acc(0);
      via_z = true;
      break;
    case PrefLoss::Ipo: {
      const Acc t = Acc(2) * (h - c.half_inv_beta);
      g.da = t;
      g.db = -t;
      break;
    }
    case PrefLoss::BcoPair:
      g.da = -c.beta * sigmoid(c.delta - c.beta * a);
      g.db = c.beta * sigmoid(c.beta * b - c.delta);
      break;
    case PrefLoss::SppoHard:
      g.da = Acc(2) * (a - c.half_inv_beta);
      g.db = Acc(2) * (b + c.half_inv_beta);
      break;
    case PrefLoss::NcaPair: {
      const Acc ca = c.beta * a;
      g.da = c.beta * (-sigmoid(-ca) + Acc(0.5) * sigmoid(ca));
      g.db = Acc(0.5) * c.beta * sigmoid(c.beta * b);
      break;
    }
    case PrefLoss::ApoZero:
      g.da = -c.beta * dsigmoid(c.beta * a);
      g.db = c.beta * dsigmoid(c.beta * b);
      break;
    case PrefLoss::ApoDown: {
      const Acc dh = c.beta * dsigmoid(c.beta * h);
      g.da = c.beta * dsigmoid(c.beta * a) - dh;
      g.db = dh;
      break;
    }
    case PrefLoss::Discopop: {
      const Acc z = c.beta * h;
      const Acc zt = z / c.tau;
      const Acc one_m_q = sigmoid(-zt);
      const Acc E = m_exp(-z + log_sigmoid(zt));
      D = -sigmoid(-z) * one_m_q - softplus(-z) * dsigmoid(zt) / c.tau +
          E * (Acc(-1) + one_m_q / c.tau);
      via_z = true;
      break;
    }
    case PrefLoss::Orpo: {
      const OrpoTerms<Acc> t = orpo_terms(a, b);
      const Acc bs = c.beta * sigmoid(-t.lo);
      const Acc k = Acc(kOrpoMax);
      const Acc one_m_ex = -m_expm1(t.x);  // 1 - e^x > 0
      const Acc one_m_ey = -m_expm1(t.y);
      g.da = a < k ? -bs / one_m_ex : Acc(0);
      g.db = b < k ? bs / one_m_ey : Acc(0);
      break;
    }
    case PrefLoss::KtoChosen:
      g.da = -c.weight * c.beta * dsigmoid(c.beta * (a - c.kl));
      break;
    case PrefLoss::KtoRejected:
      g.db = c.weight * c.beta * dsigmoid(c.beta * (c.kl - b));
      break;
  }
  if (via_z) {
    g.da = c.beta * D;
    g.db = -c.beta * D;
  }
  return g;
}

// ---------------------------------------------------------------------------
// Metric sums (metrics[0 .. kSums) before the division by n)
// ---------------------------------------------------------------------------
// Sum is the type the caller accumulates in (double on the CPU, Acc on the
// GPU). Entries that do not apply to the loss are left untouched (0).
template <typename Acc, typename Sum>
RLHF_HD void accumulate_metrics(const Consts<Acc>& c, Acc a, Acc b, const FwdOut<Acc>& f,
                                Sum* s) {
  const bool has_a = c.loss != PrefLoss::KtoRejected;
  const bool has_b = c.loss != PrefLoss::KtoChosen;
  const Acc ra = c.beta * a;
  const Acc rb = c.beta * b;
  s[0] += static_cast<Sum>(f.loss);
  if (has_a && has_b) {
    s[1] += ra > rb ? Sum(1) : Sum(0);
    s[2] += static_cast<Sum>(c.beta * (a - b));
  }
  if (has_a) s[3] += static_cast<Sum>(ra);
  if (has_b) s[4] += static_cast<Sum>(rb);
  if (c.loss == PrefLoss::Orpo) {
    s[5] += static_cast<Sum>(f.orpo_ls);
    s[6] += static_cast<Sum>(f.orpo_lo);
  }
}

// ---------------------------------------------------------------------------
// Host-side argument checks (shared by the CPU and CUDA entry points)
// ---------------------------------------------------------------------------
[[noreturn]] inline void fail(const char* who, const char* what) {
  throw std::runtime_error(std::string("rlhf_kernels: ") + who + ": " + what);
}

inline void check_common(ScalarKind dtype, PrefLoss loss, int64_t n, const char* who) {
  if (dtype != ScalarKind::Float32 && dtype != ScalarKind::Float64) {
    fail(who, "unsupported dtype (float32 or float64 expected)");
  }
  const int id = static_cast<int>(loss);
  if (id < static_cast<int>(PrefLoss::Sigmoid) || id > static_cast<int>(PrefLoss::KtoRejected)) {
    fail(who, "unknown loss id");
  }
  if (n < 0) fail(who, "negative n");
}

inline void check_inputs(PrefLoss loss, int64_t n, const void* chosen, const void* rejected,
                         const void* kl, const char* who) {
  if (n == 0) return;
  if (loss != PrefLoss::KtoRejected && chosen == nullptr) fail(who, "chosen is required");
  if (loss != PrefLoss::KtoChosen && rejected == nullptr) fail(who, "rejected is required");
  if (is_kto(loss) && kl == nullptr) fail(who, "kl is required for KTO losses");
}

inline void check_fwd(const PrefFwdParams& p, const char* who) {
  check_common(p.dtype, p.loss, p.n, who);
  check_inputs(p.loss, p.n, p.chosen, p.rejected, p.kl, who);
  if (p.metrics == nullptr) fail(who, "metrics is required");
  if (p.n > 0 && p.losses == nullptr) fail(who, "losses is required");
}

// Returns whether there is any work (n > 0 and a gradient requested).
inline bool check_bwd(const PrefBwdParams& p, const char* who) {
  check_common(p.dtype, p.loss, p.n, who);
  if (p.n == 0 || (p.grad_a == nullptr && p.grad_b == nullptr)) return false;
  check_inputs(p.loss, p.n, p.chosen, p.rejected, p.kl, who);
  if (p.grad_losses == nullptr) fail(who, "grad_losses is required");
  if (p.loss == PrefLoss::BcoPair && p.metrics == nullptr && p.s.bco_batch_mean) {
    fail(who, "bco_pair with a batch-mean delta needs the forward's metrics");
  }
  return true;
}

}  // namespace pref
}  // namespace rlhf
