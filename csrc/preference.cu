// CUDA kernels of the fused preference losses (DPO family, SimPO, ORPO, KTO,
// Bradley-Terry). preference.h states the math; the per-element formulas are
// in preference_math.h, shared with the CPU kernels (preference_cpu.cpp), so
// both devices evaluate the same expressions.
//
// Design:
//   * n is a batch of pairs (typically 8 .. 4096): the whole job is a few
//     KiB and a single launch's latency dominates. The forward is therefore
//     one block that computes every loss and reduces the metrics itself
//     (no second kernel, no atomics, deterministic), and the backward is
//     one element per thread.
//   * The loss id is a runtime switch inside the per-element functions: it
//     is uniform over the grid, so it costs a few predicated branches, and
//     two kernels per direction (float, double) instead of 28.
//   * Accumulation (and storage) type Acc is float for float32 and double
//     for float64; the metric sums are accumulated in Acc per thread and
//     reduced with warp shuffles and shared memory in a fixed order.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "preference.h"
#include "preference_math.h"

namespace rlhf {
namespace gpu {
namespace {

constexpr int kWarp = kWarpSize;
constexpr int kFwdThreads = 512;
constexpr int kFwdWarps = kFwdThreads / kWarp;
constexpr int kBwdThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

static_assert(kFwdThreads % kWarp == 0 && kFwdWarps <= kWarp, "forward block size");

template <typename Acc>
struct FwdArgs {
  pref::Consts<Acc> c;  // kl, delta filled in by the kernel
  pref::Inputs<Acc> in;
  int64_t n;
  const Acc* kl;  // KTO with n > 0, else nullptr
  bool bco_batch_mean;
  Acc* losses;
  Acc* chosen_rewards;    // or nullptr
  Acc* rejected_rewards;  // or nullptr
  Acc* metrics;
};

template <typename Acc>
struct BwdArgs {
  pref::Consts<Acc> c;  // kl, delta filled in by the kernel
  pref::Inputs<Acc> in;
  int64_t n;
  const Acc* kl;     // KTO, else nullptr
  const Acc* delta;  // BcoPair: &metrics[7] of the forward (or nullptr: c.delta), else nullptr
  const Acc* grad_losses;
  int64_t grad_stride;
  Acc grad_scale;
  Acc* grad_a;  // or nullptr
  Acc* grad_b;  // or nullptr
};

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
// Grid: 1 block of kFwdThreads threads; thread t owns i = t, t + kFwdThreads,
// ... and writes losses[i], chosen_rewards[i], rejected_rewards[i]; thread 0
// writes metrics[0 .. 8).
// Bytes: reads the 2..5 inputs of n values once (twice for bco_pair with a
// batch-mean delta: the first pass computes d = sum_j (beta a_j + beta b_j)
// / 2n, broadcast through shared memory), writes n losses, up to 2n rewards
// and 8 metrics. n == 0 writes metrics zeros.
template <typename Acc>
__global__ void __launch_bounds__(kFwdThreads, 1) preference_fwd_kernel(const FwdArgs<Acc> p) {
  // Sums in double for every input type, as the CPU kernel: n can be large and
  // the batch-mean delta of bco_pair feeds every loss.
  __shared__ double sum_smem[kFwdWarps][pref::kSums];
  __shared__ double bco_smem[kFwdWarps][1];
  __shared__ Acc bco_delta;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t n = p.n;
  pref::Consts<Acc> c = p.c;
  if (p.kl != nullptr) c.kl = *p.kl;

  // Uniform over the block (kernel arguments), so every thread reaches the
  // barriers inside.
  if (c.loss == PrefLoss::BcoPair && p.bco_batch_mean) {
    double t[1] = {0.0};
    for (int64_t i = tid; i < n; i += kFwdThreads) {
      t[0] += static_cast<double>(c.beta * p.in.a(i));
      t[0] += static_cast<double>(c.beta * p.in.b(i));
    }
    block_sum<kFwdThreads, 1>(t, bco_smem);
    if (tid == 0) bco_delta = n > 0 ? static_cast<Acc>(t[0] / static_cast<double>(2 * n)) : Acc(0);
    __syncthreads();
    c.delta = bco_delta;
  }

  double sums[pref::kSums];
#pragma unroll
  for (int k = 0; k < pref::kSums; ++k) sums[k] = 0.0;

  for (int64_t i = tid; i < n; i += kFwdThreads) {
    const Acc a = p.in.a(i);
    const Acc b = p.in.b(i);
    const pref::FwdOut<Acc> f = pref::forward(c, a, b, p.in.m(i));
    p.losses[i] = f.loss;
    if (p.chosen_rewards != nullptr) p.chosen_rewards[i] = c.beta * a;
    if (p.rejected_rewards != nullptr) p.rejected_rewards[i] = c.beta * b;
    pref::accumulate_metrics(c, a, b, f, sums);
  }

  block_sum<kFwdThreads, pref::kSums>(sums, sum_smem);
  if (tid == 0) {
#pragma unroll
    for (int k = 0; k < pref::kSums; ++k) {
      p.metrics[k] = n > 0 ? static_cast<Acc>(sums[k] / static_cast<double>(n)) : Acc(0);
    }
    p.metrics[pref::kSums] = (c.loss == PrefLoss::BcoPair && n > 0) ? c.delta : Acc(0);
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// Grid: ceil(n / kBwdThreads) blocks (capped at 2^31 - 1, then grid-stride)
// of kBwdThreads threads; thread j owns i = j, j + total threads, ... and
// writes grad_a[i], grad_b[i] (those requested).
// Bytes: reads the 2..5 inputs and grad_losses[i * grad_stride] (one value,
// broadcast, when grad_stride is 0) once, plus the kl / delta scalar; writes
// up to 2n gradients. Each element is read and written by the same thread.
template <typename Acc>
__global__ void __launch_bounds__(kBwdThreads) preference_bwd_kernel(const BwdArgs<Acc> p) {
  pref::Consts<Acc> c = p.c;
  if (p.kl != nullptr) c.kl = *p.kl;
  if (p.delta != nullptr) c.delta = *p.delta;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x; i < p.n;
       i += stride) {
    const Acc g = p.grad_scale * p.grad_losses[i * p.grad_stride];
    const pref::Grad<Acc> d = pref::backward(c, p.in.a(i), p.in.b(i), p.in.m(i));
    if (p.grad_a != nullptr) p.grad_a[i] = g * d.da;
    if (p.grad_b != nullptr) p.grad_b[i] = g * d.db;
  }
}

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

template <typename Acc>
void launch_fwd(const PrefFwdParams& p, cudaStream_t stream) {
  FwdArgs<Acc> a;
  a.c = pref::make_consts<Acc>(p.loss, p.s);
  a.in = pref::make_inputs<Acc>(p.loss, p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
                                p.margin);
  a.n = p.n;
  a.kl = (pref::is_kto(p.loss) && p.n > 0) ? static_cast<const Acc*>(p.kl) : nullptr;
  a.bco_batch_mean = p.s.bco_batch_mean;
  a.losses = static_cast<Acc*>(p.losses);
  a.chosen_rewards = static_cast<Acc*>(p.chosen_rewards);
  a.rejected_rewards = static_cast<Acc*>(p.rejected_rewards);
  a.metrics = static_cast<Acc*>(p.metrics);
  preference_fwd_kernel<Acc><<<1, kFwdThreads, 0, stream>>>(a);
  check_launch("preference forward kernel launch");
}

template <typename Acc>
void launch_bwd(const PrefBwdParams& p, cudaStream_t stream) {
  BwdArgs<Acc> a;
  a.c = pref::make_consts<Acc>(p.loss, p.s);
  a.in = pref::make_inputs<Acc>(p.loss, p.chosen, p.rejected, p.ref_chosen, p.ref_rejected,
                                p.margin);
  a.n = p.n;
  a.kl = pref::is_kto(p.loss) ? static_cast<const Acc*>(p.kl) : nullptr;
  a.delta = (p.loss == PrefLoss::BcoPair && p.metrics != nullptr)
                ? static_cast<const Acc*>(p.metrics) + pref::kSums
                : nullptr;
  a.grad_losses = static_cast<const Acc*>(p.grad_losses);
  a.grad_stride = p.grad_stride;
  a.grad_scale = static_cast<Acc>(p.grad_scale);
  a.grad_a = static_cast<Acc*>(p.grad_a);
  a.grad_b = static_cast<Acc*>(p.grad_b);
  const int64_t blocks = (p.n + kBwdThreads - 1) / kBwdThreads;
  const dim3 grid(static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid));
  preference_bwd_kernel<Acc><<<grid, kBwdThreads, 0, stream>>>(a);
  check_launch("preference backward kernel launch");
}

}  // namespace
}  // namespace gpu

void preference_fwd_cuda(const PrefFwdParams& p, void* stream) {
  pref::check_fwd(p, "preference_fwd_cuda");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ScalarKind::Float64) {
    gpu::launch_fwd<double>(p, s);
  } else {
    gpu::launch_fwd<float>(p, s);
  }
}

void preference_bwd_cuda(const PrefBwdParams& p, void* stream) {
  if (!pref::check_bwd(p, "preference_bwd_cuda")) return;  // n == 0 or no gradient wanted
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ScalarKind::Float64) {
    gpu::launch_bwd<double>(p, s);
  } else {
    gpu::launch_bwd<float>(p, s);
  }
}

}  // namespace rlhf
