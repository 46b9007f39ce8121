// Scan pieces of the GAE kernel (ppo.h states the math): the two segment
// summaries, their combine / apply rules, and the per-lane passes of the warp
// algorithm in ppo.cu. Shared by ppo.cu and host-side emulations of that warp
// algorithm, so that an emulation runs literally the same arithmetic.
// No CUDA or torch headers.
//
// Direction: GAE walks a row from t = T-1 down to 0, so "right" (higher t) is
// applied first. A segment [t0, t1] is summarised by what it does to the
// state arriving from its right (from t1 + 1):
//   * NextSum: the next-value state. If the segment holds a valid position,
//     the next value seen left of it is the value at its LEFTMOST valid
//     position, whatever arrived; else the arriving value passes through.
//     delta_t uses the next value arriving at t from its right, i.e. the
//     value of the nearest valid position strictly right of t (or the row's
//     initial 0).
//   * Affine: the running advantage x -> d + c x, composed right-to-left:
//     [t0, t1] = f_t0 o f_(t0+1) o ... o f_t1. Valid t: (c, d) =
//     (gamma * lam, delta_t); masked t: the identity (1, 0).
// combine(l, r) is the summary of l's segment directly followed (at higher t)
// by r's: r is applied first. Both are associative with the identities below.
//
// Lane data: K consecutive positions, index k = 0 .. K-1 in increasing t;
// `bits` has bit k set when position k is valid (positions past the row end
// are never valid: the identity, and never written).
#pragma once

#include "logprobs.h"  // RLHF_HD

// Loops over a lane's K positions are fully unrolled on the device (K is a
// compile-time constant, the arrays stay in registers); host compilation
// passes get no pragma (g++ -Wall warns about "#pragma unroll").
#if defined(__CUDA_ARCH__)
#define RLHF_GAE_UNROLL _Pragma("unroll")
#else
#define RLHF_GAE_UNROLL
#endif

namespace rlhf {
namespace gae {

template <typename A>
struct NextSum {
  int has;  // 1: the segment holds a valid position
  A v;      // value at its leftmost valid position (0 when !has)
};

template <typename A>
RLHF_HD NextSum<A> next_identity() {
  return NextSum<A>{0, A(0)};
}

template <typename A>
RLHF_HD NextSum<A> next_combine(const NextSum<A>& l, const NextSum<A>& r) {
  return l.has ? l : r;
}

// The NextSum scan over the 32 lanes of a warp in one step: given the ballot
// of the lanes' `has` flags, the lane whose NextSum supplies the next value
// arriving at `lane` (the nearest lane above it holding a valid position;
// combining the lanes above with next_combine gives exactly its summary), or
// -1 when no lane above holds one (then the chunk's carry arrives).
RLHF_HD int next_source_lane(unsigned has_ballot, int lane) {
  const unsigned above = lane >= 31 ? 0u : has_ballot & (~0u << (lane + 1));
  if (above == 0u) return -1;
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(above)) - 1;
#else
  return __builtin_ctz(above);
#endif
}

// Next value seen just left of the segment, given `from_right` arriving.
template <typename A>
RLHF_HD A next_apply(const NextSum<A>& s, A from_right) {
  return s.has ? s.v : from_right;
}

template <typename A>
struct Affine {
  A c, d;  // x -> d + c x
};

template <typename A>
RLHF_HD Affine<A> affine_identity() {
  return Affine<A>{A(1), A(0)};
}

// l o r: apply r (higher t) first, then l.
template <typename A>
RLHF_HD Affine<A> affine_combine(const Affine<A>& l, const Affine<A>& r) {
  return Affine<A>{l.c * r.c, l.d + l.c * r.d};
}

template <typename A>
RLHF_HD A affine_apply(const Affine<A>& f, A x) {
  return f.d + f.c * x;
}

// Pass 1: the lane's NextSum.
template <int K, typename A>
RLHF_HD NextSum<A> lane_next(unsigned bits, const A (&val)[K]) {
  NextSum<A> s = next_identity<A>();
RLHF_GAE_UNROLL
  for (int k = K - 1; k >= 0; --k) {
    if ((bits >> k) & 1u) s = NextSum<A>{1, val[k]};
  }
  return s;
}

// Pass 2: given the next value `nv` arriving from the lane's right, turns
// rd[k] from the reward into delta_k at each valid position (masked entries
// are left as they are and never used) and returns the lane's Affine.
template <int K, typename A>
RLHF_HD Affine<A> lane_deltas(unsigned bits, const A (&val)[K], A (&rd)[K], A nv, A gamma,
                              A gamma_lam) {
  Affine<A> f = affine_identity<A>();
RLHF_GAE_UNROLL
  for (int k = K - 1; k >= 0; --k) {
    if ((bits >> k) & 1u) {
      const A delta = rd[k] + gamma * nv - val[k];
      rd[k] = delta;
      nv = val[k];
      f = affine_combine(Affine<A>{gamma_lam, delta}, f);
    }
  }
  return f;
}

// Pass 3: given the advantage `g` arriving from the lane's right, replays the
// recursion exactly as ppo.h's pseudo-code: adv[k] = last_gae,
// ret[k] = last_gae + values. Returns the advantage leaving on the left
// (= adv[0]).
template <int K, typename A>
RLHF_HD A lane_replay(unsigned bits, const A (&val)[K], const A (&delta)[K], A g, A gamma_lam,
                      A (&adv)[K], A (&ret)[K]) {
RLHF_GAE_UNROLL
  for (int k = K - 1; k >= 0; --k) {
    if ((bits >> k) & 1u) g = affine_apply(Affine<A>{gamma_lam, delta[k]}, g);
    adv[k] = g;
    ret[k] = g + val[k];
  }
  return g;
}

}  // namespace gae
}  // namespace rlhf
