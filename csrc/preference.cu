// CUDA kernels of the fused preference losses (DPO family, SimPO, ORPO, KTO,
// Bradley-Terry). preference.h states the math; the per-element formulas are
// in preference_math.h, shared with the CPU kernels (preference_cpu.cpp), so
// both devices evaluate the same expressions.
//
// Design:
//   * n is a batch of pairs (typically 8 .. 4096): the whole job is a few
//     KiB and a single launch's latency dominates. Up to kPrefFwdMultiMin
//     (16384) pairs the forward is therefore one block that computes every
//     loss and reduces the metrics itself (no second kernel, no atomics,
//     deterministic).
//   * Above (evaluation sets, reward-model scoring, the 1M-pair benchmark) one
//     block walking n pairs is latency-bound, so the forward runs on
//     cdiv(n, kPrefFwdChunk) blocks, each owning a fixed 2048-pair chunk and
//     writing its metric sums (double) to a workspace row; one block then sums
//     the rows in a fixed order: two launches (four for bco_pair's batch-mean
//     delta, which needs its own partial-sum pass first), no atomics, bits
//     that depend on n alone (not on the device's SM count).
//   * The backward is one element per thread.
//   * The loss id is a runtime switch inside the per-element functions: it
//     is uniform over the grid, so it costs a few predicated branches, and
//     two kernels per direction (float, double) instead of 28. The one-block
//     forward and the backward also have a sigmoid instantiation (kLoss =
//     kSigmoid, picked by pick_loss), where the switch folds away.
//   * Accumulation (and storage) type Acc is float for float32 and double
//     for float64; the metric sums are accumulated in double per thread
//     (either type) and reduced with warp shuffles and shared memory in a
//     fixed order.
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
// Up to kSmallFwdMax pairs (a training batch: 8 .. 256 pairs a device) the
// one-block forward runs on a 128-thread block instead: at most 4 pairs a
// thread, and its 7 double metric sums are reduced over 4 warps, not 16.
constexpr int kSmallFwdThreads = 128;
constexpr int64_t kSmallFwdMax = 512;
constexpr int kChunkThreads = 256;  // per-chunk forward blocks: 8 pairs per thread
constexpr int kChunkWarps = kChunkThreads / kWarp;
constexpr int kSumThreads = 256;  // the block that sums the workspace
constexpr int kSumWarps = kSumThreads / kWarp;
constexpr int kCols = kPrefMetrics;  // workspace row: sums of metrics 0..6, bco_pair's sum in 7
constexpr int kBwdThreads = 256;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

static_assert(kFwdThreads % kWarp == 0 && kFwdThreads / kWarp <= kWarp, "forward block size");
static_assert(kSmallFwdThreads % kWarp == 0 && kSmallFwdThreads <= kFwdThreads, "small forward block size");
static_assert(kChunkThreads % kWarp == 0 && kChunkWarps <= kWarp, "chunk block size");
static_assert(kSumThreads % kWarp == 0 && kSumWarps <= kWarp, "sum block size");
static_assert(kPrefFwdChunk % kChunkThreads == 0, "a chunk is whole rounds of the block");
static_assert(pref::kSums + 1 == kCols, "workspace row layout");

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
  double* partials;  // n > kPrefFwdMultiMin: [parts, kCols], else nullptr
  int64_t parts;     // pref_fwd_parts(n)
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

// The one-block forward and the backward are instantiated twice: kLoss = kAnyLoss
// reads the loss id at run time (every loss type), kLoss = Sigmoid (DPO's
// default, and what the aot variants run after their sort) fixes it, so that
// the switch in preference_math.h folds away. A one-block forward of a
// training batch is latency-bound: it runs its code once, mostly from a cold
// instruction cache, and the generic kernel's code is several times larger.
constexpr int kAnyLoss = -1;
constexpr int kSigmoid = static_cast<int>(PrefLoss::Sigmoid);

template <int kLoss, typename Acc>
__device__ __forceinline__ void specialize(pref::Consts<Acc>& c) {
  if constexpr (kLoss != kAnyLoss) c.loss = static_cast<PrefLoss>(kLoss);
}

// The instantiation for `loss`: kernel<kSigmoid> or kernel<kAnyLoss>.
template <typename Kernel>
Kernel pick_loss(PrefLoss loss, Kernel sigmoid, Kernel any) {
  return loss == PrefLoss::Sigmoid ? sigmoid : any;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// Per-thread sum of beta a_i + beta b_i over i = begin + t, begin + t + kThreads,
// ... < end (t = threadIdx.x), in double.
template <int kThreads, typename Acc>
__device__ __forceinline__ double bco_span(const pref::Inputs<Acc>& in, Acc beta, int64_t begin,
                                           int64_t end) {
  double t = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    t += static_cast<double>(beta * in.a(i));
    t += static_cast<double>(beta * in.b(i));
  }
  return t;
}

// Losses and rewards of the pairs i = begin + t, begin + t + kThreads, ... < end
// (t = threadIdx.x); adds their metric terms to the thread's double sums.
template <int kThreads, typename Acc>
__device__ __forceinline__ void fwd_span(const FwdArgs<Acc>& p, const pref::Consts<Acc>& c,
                                         int64_t begin, int64_t end, double (&sums)[pref::kSums]) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const Acc a = p.in.a(i);
    const Acc b = p.in.b(i);
    const pref::FwdOut<Acc> f = pref::forward(c, a, b, p.in.m(i));
    p.losses[i] = f.loss;
    if (p.chosen_rewards != nullptr) p.chosen_rewards[i] = c.beta * a;
    if (p.rejected_rewards != nullptr) p.rejected_rewards[i] = c.beta * b;
    pref::accumulate_metrics(c, a, b, f, sums);
  }
}

// Grid: 1 block of kThreads threads (kSmallFwdThreads up to kSmallFwdMax
// pairs, else kFwdThreads), for n <= kPrefFwdMultiMin; thread t owns
// i = t, t + kThreads, ... and writes losses[i], chosen_rewards[i],
// rejected_rewards[i]; thread 0 writes metrics[0 .. 8).
// Bytes: reads the 2..5 inputs of n values once (twice for bco_pair with a
// batch-mean delta: the first pass computes d = sum_j (beta a_j + beta b_j)
// / 2n, broadcast through shared memory), writes n losses, up to 2n rewards
// and 8 metrics. n == 0 writes metrics zeros.
template <typename Acc, int kThreads, int kLoss>
__global__ void __launch_bounds__(kThreads, 1) preference_fwd_kernel(const FwdArgs<Acc> p) {
  // Sums in double for every input type, as the CPU kernel: n can be large and
  // the batch-mean delta of bco_pair feeds every loss.
  constexpr int kWarps = kThreads / kWarp;
  __shared__ double sum_smem[kWarps][pref::kSums];
  __shared__ double bco_smem[kWarps][1];
  __shared__ Acc bco_delta;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t n = p.n;
  pref::Consts<Acc> c = p.c;
  specialize<kLoss>(c);
  if (p.kl != nullptr) c.kl = *p.kl;

  // Uniform over the block (kernel arguments), so every thread reaches the
  // barriers inside.
  if (c.loss == PrefLoss::BcoPair && p.bco_batch_mean) {
    double t[1] = {bco_span<kThreads>(p.in, c.beta, 0, n)};
    block_sum<kThreads, 1>(t, bco_smem);
    if (tid == 0) bco_delta = n > 0 ? static_cast<Acc>(t[0] / static_cast<double>(2 * n)) : Acc(0);
    __syncthreads();
    c.delta = bco_delta;
  }

  double sums[pref::kSums];
#pragma unroll
  for (int k = 0; k < pref::kSums; ++k) sums[k] = 0.0;
  fwd_span<kThreads>(p, c, 0, n, sums);

  block_sum<kThreads, pref::kSums>(sums, sum_smem);
  if (tid == 0) {
#pragma unroll
    for (int k = 0; k < pref::kSums; ++k) {
      p.metrics[k] = n > 0 ? static_cast<Acc>(sums[k] / static_cast<double>(n)) : Acc(0);
    }
    p.metrics[pref::kSums] = (c.loss == PrefLoss::BcoPair && n > 0) ? c.delta : Acc(0);
  }
}

// --- n > kPrefFwdMultiMin: per-chunk blocks, then one block sums their rows ----------------

// Grid: p.parts blocks of kChunkThreads threads (bco_pair with a batch-mean
// delta only). Block q owns the pairs [q kPrefFwdChunk, min(n, (q + 1) kPrefFwdChunk))
// and writes partials[q][7] = their sum of beta a_i + beta b_i (double).
// Bytes: reads 8..16 bytes per pair (sizeof(Acc) per input), writes 8 per block.
template <typename Acc>
__global__ void __launch_bounds__(kChunkThreads) preference_bco_chunk_kernel(const FwdArgs<Acc> p) {
  __shared__ double smem[kChunkWarps][1];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPrefFwdChunk;
  const int64_t end = begin + kPrefFwdChunk < p.n ? begin + kPrefFwdChunk : p.n;
  double t[1] = {bco_span<kChunkThreads>(p.in, p.c.beta, begin, end)};
  block_sum<kChunkThreads, 1>(t, smem);
  if (threadIdx.x == 0) p.partials[static_cast<int64_t>(blockIdx.x) * kCols + pref::kSums] = t[0];
}

// Grid: p.parts blocks of kChunkThreads threads. Block q owns the pairs
// [q kPrefFwdChunk, min(n, (q + 1) kPrefFwdChunk)) (thread t: begin + t, begin
// + t + kChunkThreads, ...), writes their losses and rewards, and writes
// partials[q][0 .. 7) = the chunk's metric sums (double). bco_pair's
// batch-mean delta is read from metrics[7], written by the sum kernel's
// delta pass before.
// Bytes: reads the 2..5 inputs once, writes the losses and up to 2n rewards,
// plus 56 bytes per block.
// (The min-blocks hint of 2 lets ptxas use up to 128 registers: without it,
// sm_90's heuristic settles on 64 for double and spills.)
template <typename Acc>
__global__ void __launch_bounds__(kChunkThreads, 2) preference_fwd_chunk_kernel(const FwdArgs<Acc> p) {
  __shared__ double sum_smem[kChunkWarps][pref::kSums];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPrefFwdChunk;
  const int64_t end = begin + kPrefFwdChunk < p.n ? begin + kPrefFwdChunk : p.n;
  pref::Consts<Acc> c = p.c;
  if (p.kl != nullptr) c.kl = *p.kl;
  if (c.loss == PrefLoss::BcoPair && p.bco_batch_mean) c.delta = p.metrics[pref::kSums];

  double sums[pref::kSums];
#pragma unroll
  for (int k = 0; k < pref::kSums; ++k) sums[k] = 0.0;
  fwd_span<kChunkThreads>(p, c, begin, end, sums);

  block_sum<kChunkThreads, pref::kSums>(sums, sum_smem);
  if (threadIdx.x == 0) {
    double* const row = p.partials + static_cast<int64_t>(blockIdx.x) * kCols;
#pragma unroll
    for (int k = 0; k < pref::kSums; ++k) row[k] = sums[k];
  }
}

// Grid: 1 block of kSumThreads threads. Thread t adds the rows t, t +
// kSumThreads, ... of the workspace in order, then a fixed tree adds the
// threads' sums: the bits depend on n alone. kDelta: column 7, writes
// metrics[7] = d = sum / 2n (bco_pair's batch-mean delta). Otherwise columns
// [0, 7): writes metrics[k] = sum_k / n and metrics[7] (d, or 0) as the
// one-block kernel does. Called with n > kPrefFwdMultiMin > 0 only.
// Bytes: reads 8 (kDelta) or 56 bytes per row, writes 1 or 8 values.
template <typename Acc, bool kDelta>
__global__ void __launch_bounds__(kSumThreads)
    preference_sum_partials_kernel(const FwdArgs<Acc> p) {
  constexpr int kK = kDelta ? 1 : pref::kSums;
  constexpr int kCol0 = kDelta ? pref::kSums : 0;
  __shared__ double smem[kSumWarps][kK];
  double s[kK];
#pragma unroll
  for (int k = 0; k < kK; ++k) s[k] = 0.0;
  for (int64_t r = threadIdx.x; r < p.parts; r += kSumThreads) {
    const double* const row = p.partials + r * kCols + kCol0;
#pragma unroll
    for (int k = 0; k < kK; ++k) s[k] += row[k];
  }
  block_sum<kSumThreads, kK>(s, smem);
  if (threadIdx.x == 0) {
    const double n = static_cast<double>(p.n);
    if (kDelta) {
      p.metrics[pref::kSums] = static_cast<Acc>(s[0] / (2.0 * n));
    } else {
#pragma unroll
      for (int k = 0; k < kK; ++k) p.metrics[k] = static_cast<Acc>(s[k] / n);
      // A batch-mean delta is already in metrics[7] (the delta pass).
      if (p.c.loss != PrefLoss::BcoPair) {
        p.metrics[pref::kSums] = Acc(0);
      } else if (!p.bco_batch_mean) {
        p.metrics[pref::kSums] = p.c.delta;
      }
    }
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
template <typename Acc, int kLoss>
__global__ void __launch_bounds__(kBwdThreads) preference_bwd_kernel(const BwdArgs<Acc> p) {
  pref::Consts<Acc> c = p.c;
  specialize<kLoss>(c);
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
  a.partials = static_cast<double*>(p.partials);
  a.parts = pref_fwd_parts(p.n);
  if (a.parts == 0 && p.n <= kSmallFwdMax) {
    const auto kernel = pick_loss(p.loss, preference_fwd_kernel<Acc, kSmallFwdThreads, kSigmoid>,
                                  preference_fwd_kernel<Acc, kSmallFwdThreads, kAnyLoss>);
    kernel<<<1, kSmallFwdThreads, 0, stream>>>(a);
    check_launch("preference forward kernel launch");
    return;
  }
  if (a.parts == 0) {
    const auto kernel = pick_loss(p.loss, preference_fwd_kernel<Acc, kFwdThreads, kSigmoid>,
                                  preference_fwd_kernel<Acc, kFwdThreads, kAnyLoss>);
    kernel<<<1, kFwdThreads, 0, stream>>>(a);
    check_launch("preference forward kernel launch");
    return;
  }
  if (a.partials == nullptr) {
    throw std::runtime_error(
        "rlhf_kernels: preference_fwd_cuda: n > kPrefFwdMultiMin needs the partials workspace");
  }
  if (a.parts > kMaxGrid) {
    throw std::runtime_error("rlhf_kernels: preference_fwd_cuda: n too large for the grid");
  }
  const dim3 grid(static_cast<unsigned>(a.parts));
  if (p.loss == PrefLoss::BcoPair && p.s.bco_batch_mean) {
    preference_bco_chunk_kernel<Acc><<<grid, kChunkThreads, 0, stream>>>(a);
    check_launch("preference bco_pair delta chunk kernel launch");
    preference_sum_partials_kernel<Acc, true><<<1, kSumThreads, 0, stream>>>(a);
    check_launch("preference bco_pair delta sum kernel launch");
  }
  preference_fwd_chunk_kernel<Acc><<<grid, kChunkThreads, 0, stream>>>(a);
  check_launch("preference forward chunk kernel launch");
  preference_sum_partials_kernel<Acc, false><<<1, kSumThreads, 0, stream>>>(a);
  check_launch("preference forward sum kernel launch");
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
  const auto kernel = pick_loss(p.loss, preference_bwd_kernel<Acc, kSigmoid>, preference_bwd_kernel<Acc, kAnyLoss>);
  kernel<<<grid, kBwdThreads, 0, stream>>>(a);
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
