// CPU kernel of GAE (generalized advantage estimation) with response-mask
// skip semantics; ppo.h states the math.
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

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "ppo.h"

namespace rlhf {
namespace {

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

}  // namespace

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
