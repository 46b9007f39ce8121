// CPU kernels of GAE (generalized advantage estimation) with response-mask
// skip semantics, masked whitening and GRPO group advantages; ppo.h states
// the math.
//
// Rows run in parallel with at::parallel_for (OpenMP in standard torch
// builds); each row is the header's pseudo-code as a plain reverse loop in
// the input type (float or double), so the result does not depend on the
// thread count. gamma * next_value is formed in the input type and
// gamma * lam in double before rounding to it, as verl's torch code does
// with Python-float gamma / lam.
// Bytes: reads each row of rewards, values (and mask) once, writes each row
// of advantages and returns once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "ppo.h"

namespace rlhf {
namespace {

using simd::vf8;
using simd::vi8;

template <typename A>
void gae_rows(const GaeParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t time = p.time;
  const A gamma = static_cast<A>(p.gamma);
  const A gamma_lam = static_cast<A>(p.gamma * p.lam);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const A* const rew = static_cast<const A*>(p.rewards) + row * p.rewards_row_stride;
    const A* const val = static_cast<const A*>(p.values) + row * p.values_row_stride;
    const uint8_t* const mask = p.mask != nullptr ? p.mask + row * p.mask_row_stride : nullptr;
    A* const adv = static_cast<A*>(p.advantages) + row * time;
    A* const ret = static_cast<A*>(p.returns) + row * time;
    A next_value = A(0);
    A last_gae = A(0);
    for (int64_t t = time - 1; t >= 0; --t) {
      const A v = val[t];
      if (mask == nullptr || mask[t] != 0) {
        const A delta = rew[t] + gamma * next_value - v;
        last_gae = delta + gamma_lam * last_gae;
        next_value = v;
      }
      adv[t] = last_gae;
      ret[t] = last_gae + v;
    }
  }
}

// About 32k positions per task: rows are independent and cheap.
int64_t grain_size(int64_t time) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, time));
}

// --- masked whitening ---------------------------------------------------------------
// Tasks of whole kWhitenChunk-element chunks (at::parallel_for, OpenMP): the
// partials, their merge order and hence the result do not depend on the
// thread count. Reads x twice (once per pass) and the mask once, writes out
// once. Both passes are instantiated per ISA (cpu_simd.h: RLHF_ISA_ENTRIES).

template <typename A>
struct Moments {
  int64_t n = 0;
  A mean = A(0);
  A m2 = A(0);
};

template <typename A>
Moments<A> chan_merge(const Moments<A>& a, const Moments<A>& b) {
  Moments<A> r;
  r.n = a.n + b.n;
  if (r.n == 0) return r;
  const A w = static_cast<A>(b.n) / static_cast<A>(r.n);
  const A d = b.mean - a.mean;
  r.mean = a.mean + d * w;
  r.m2 = a.m2 + b.m2 + d * d * static_cast<A>(a.n) * w;
  return r;
}

// Two-pass (count, mean, M2) of the valid elements of one chunk, over 8
// interleaved partial sums (element i into lane i % 8; simd::vf8 lanes for
// float32), then the lanes in order.
template <typename T, typename A>
RLHF_INLINE Moments<A> chunk_moments(const T* x, const uint8_t* mask, int64_t len) {
  constexpr int kLanes = simd::kLanes8;
  Moments<A> r;
  if constexpr (std::is_same_v<T, float>) {
    const vf8 zero{}, one = simd::splat8(1.0f);
    vf8 sum{}, count{};
    for (int64_t i = 0; i < len; i += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, len - i);
      const vi8 keep = simd::mask8(mask + i, n);
      sum += keep ? simd::load8(x + i, n) : zero;
      count += keep ? one : zero;
    }
    r.n = static_cast<int64_t>(simd::hsum(count));  // exact: at most kWhitenChunk
    r.mean = simd::hsum(sum) / static_cast<float>(std::max<int64_t>(r.n, 1));
    const vf8 mean = simd::splat8(r.mean);
    vf8 m2{};
    for (int64_t i = 0; i < len; i += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, len - i);
      const vf8 d = simd::mask8(mask + i, n) ? simd::load8(x + i, n) - mean : zero;
      m2 += d * d;
    }
    r.m2 = simd::hsum(m2);
  } else {
    A sum[kLanes] = {}, m2[kLanes] = {};
    int64_t count = 0;
    for (int64_t i = 0; i < len; ++i) {
      const bool valid = mask[i] != 0;
      count += valid;
      sum[i % kLanes] += valid ? static_cast<A>(x[i]) : A(0);
    }
    A total = A(0);
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    r.n = count;
    r.mean = total / static_cast<A>(std::max<int64_t>(count, 1));
    for (int64_t i = 0; i < len; ++i) {
      const A d = mask[i] != 0 ? static_cast<A>(x[i]) - r.mean : A(0);
      m2[i % kLanes] += d * d;
    }
    for (int l = 0; l < kLanes; ++l) r.m2 += m2[l];
  }
  return r;
}

// One whitening call's state, shared by its two parallel passes.
template <typename A>
struct WhitenTask {
  const WhitenParams* p;
  Moments<A>* parts;  // [n_parts]
  A mean = A(0), rstd = A(1), back = A(0);
};

// Pass 1 over chunks [b, e): their moments.
template <typename T, typename A>
RLHF_INLINE void whiten_moments(const WhitenTask<A>& t, int64_t b, int64_t e) {
  const WhitenParams& p = *t.p;
  for (int64_t c = b; c < e; ++c) {
    const int64_t begin = c * kWhitenChunk;
    t.parts[c] = chunk_moments<T, A>(static_cast<const T*>(p.x) + begin, p.mask + begin,
                                     std::min(kWhitenChunk, p.n - begin));
  }
}

// Pass 2 over chunks [b, e): out = (x - mean) * rstd + back.
template <typename T, typename A>
RLHF_INLINE void whiten_apply(const WhitenTask<A>& t, int64_t b, int64_t e) {
  const WhitenParams& p = *t.p;
  const T* const x = static_cast<const T*>(p.x);
  A* const out = static_cast<A*>(p.out);
  const int64_t end = std::min(e * kWhitenChunk, p.n);
  if constexpr (std::is_same_v<T, float>) {
    const vf8 mean = simd::splat8(t.mean), rstd = simd::splat8(t.rstd), back = simd::splat8(t.back);
    for (int64_t i = b * kWhitenChunk; i < end; i += simd::kLanes8) {
      const int64_t n = std::min<int64_t>(simd::kLanes8, end - i);
      simd::store8(out + i, (simd::load8(x + i, n) - mean) * rstd + back, n);
    }
  } else {
    for (int64_t i = b * kWhitenChunk; i < end; ++i) out[i] = (static_cast<A>(x[i]) - t.mean) * t.rstd + t.back;
  }
}

RLHF_ISA_ENTRIES(whiten_moments_entry, whiten_moments, WhitenTask<A>, typename T RLHF_COMMA typename A,
                 T RLHF_COMMA A)
RLHF_ISA_ENTRIES(whiten_apply_entry, whiten_apply, WhitenTask<A>, typename T RLHF_COMMA typename A, T RLHF_COMMA A)

template <typename T, typename A>
void whiten_impl(const WhitenParams& p) {
  const int64_t n_parts = (p.n + kWhitenChunk - 1) / kWhitenChunk;
  std::vector<Moments<A>> parts(static_cast<size_t>(n_parts));
  WhitenTask<A> task;
  task.p = &p;
  task.parts = parts.data();
  const auto moments = RLHF_ISA_PICK(whiten_moments_entry, T RLHF_COMMA A);
  at::parallel_for(0, n_parts, 1, [&](int64_t b, int64_t e) { moments(task, b, e); });
  Moments<A> total;
  for (const Moments<A>& part : parts) total = chan_merge(total, part);  // fixed order
  const A var = total.m2 / static_cast<A>(std::max<int64_t>(total.n - 1, 1));
  const A rstd = A(1) / std::sqrt(var + static_cast<A>(p.eps));
  A* const stats = static_cast<A*>(p.stats);
  stats[0] = static_cast<A>(total.n);
  stats[1] = total.mean;
  stats[2] = var;
  stats[3] = rstd;
  task.mean = total.mean;
  task.rstd = rstd;
  task.back = p.shift_mean ? A(0) : total.mean;
  const auto apply = RLHF_ISA_PICK(whiten_apply_entry, T RLHF_COMMA A);
  at::parallel_for(0, n_parts, 1, [&](int64_t b, int64_t e) { apply(task, b, e); });
}

// --- GRPO advantages -------------------------------------------------------------------
// One task per group; each group is a two-pass mean / variance and a write.

template <typename A>
void grpo_impl(const GrpoParams& p) {
  const A* const s = static_cast<const A*>(p.scores);
  A* const out = static_cast<A*>(p.out);
  const A eps = static_cast<A>(p.eps);
  at::parallel_for(0, p.groups, 64, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t begin = std::clamp<int64_t>(p.offsets[g], 0, p.n);
      const int64_t end = std::clamp<int64_t>(p.offsets[g + 1], begin, p.n);
      const int64_t size = end - begin;
      A sum = A(0);
      for (int64_t i = begin; i < end; ++i) sum += s[i];
      const A mean = sum / static_cast<A>(std::max<int64_t>(size, 1));
      if (!p.norm_by_std) {
        for (int64_t i = begin; i < end; ++i) out[i] = s[i] - mean;
        continue;
      }
      A m2 = A(0);
      for (int64_t i = begin; i < end; ++i) m2 += (s[i] - mean) * (s[i] - mean);
      const A std_dev = size > 1 ? std::sqrt(m2 / static_cast<A>(size - 1)) : A(1);
      for (int64_t i = begin; i < end; ++i) out[i] = (s[i] - mean) / (std_dev + eps);
    }
  });
}

}  // namespace

void masked_whiten_cpu(const WhitenParams& p) {
  if (p.n < 0) throw std::runtime_error("rlhf_kernels: masked_whiten_cpu: negative n");
  switch (p.dtype) {
    case ScalarKind::Float32: return whiten_impl<float, float>(p);
    case ScalarKind::Float16: return whiten_impl<c10::Half, float>(p);
    case ScalarKind::BFloat16: return whiten_impl<c10::BFloat16, float>(p);
    case ScalarKind::Float64: return whiten_impl<double, double>(p);
  }
  throw std::runtime_error("rlhf_kernels: masked_whiten_cpu: unsupported dtype");
}

void grpo_advantages_cpu(const GrpoParams& p) {
  if (p.n < 0 || p.groups < 0) throw std::runtime_error("rlhf_kernels: grpo_advantages_cpu: negative size");
  switch (p.dtype) {
    case ScalarKind::Float32: return grpo_impl<float>(p);
    case ScalarKind::Float64: return grpo_impl<double>(p);
    default: throw std::runtime_error("rlhf_kernels: grpo_advantages_cpu: dtype must be float32 or float64");
  }
}

void gae_cpu(const GaeParams& p) {
  if (p.batch < 0 || p.time < 0) {
    throw std::runtime_error("rlhf_kernels: gae_cpu: negative batch or time");
  }
  if (p.batch == 0 || p.time == 0) return;
  switch (p.dtype) {
    case ScalarKind::Float32:
      at::parallel_for(0, p.batch, grain_size(p.time),
                       [&](int64_t b, int64_t e) { gae_rows<float>(p, b, e); });
      return;
    case ScalarKind::Float64:
      at::parallel_for(0, p.batch, grain_size(p.time),
                       [&](int64_t b, int64_t e) { gae_rows<double>(p, b, e); });
      return;
    default:
      throw std::runtime_error("rlhf_kernels: gae_cpu: dtype must be float32 or float64");
  }
}

}  // namespace rlhf
