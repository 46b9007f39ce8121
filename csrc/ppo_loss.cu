// CUDA kernels of the PPO token losses (forward: per-row loss sums and
// statistics, then one block folds them into the aggregated loss and metrics;
// backward: per-token gradient) and of the KL estimators.
// ppo.h states the math; the per-token formulas are in ppo_loss_math.h,
// shared with the CPU kernels (ppo_loss_cpu.cpp), so both devices evaluate
// the same expressions.
//
// Design:
//   * Compute (and storage) type A is float for float32 and double for
//     float64. The loss kind and dual clip are template parameters (policy,
//     policy + dual clip, value), the KL kind and direction likewise: every
//     kernel is branch-free in its per-token math.
//   * Forward: one block per row (grid-stride over rows past 2^31 - 1).
//     Threads stride over the row kFwdThreads tokens apart, so a warp's
//     accesses to each array are contiguous; kUnroll tokens per thread are
//     loaded before any is used, to keep several loads in flight per thread.
//     Each thread accumulates its tokens in a fixed order, then the five sums
//     (three for VALUE: kl and lower are 0) are reduced with warp shuffles and
//     shared memory in a fixed tree: deterministic, run to run. A second
//     launch of one block folds the [B, 5] row sums into the loss and metrics
//     (ppo_loss_math.h: AggSums, in double; threads stride over rows, then a
//     fixed tree): two launches where eager PyTorch needs a dozen.
//   * Backward and KL: one element per thread over the flattened [B * T]
//     (resp. n) elements, grid-stride past the grid limit. The backward finds
//     the row of element i as i / T with a multiply-high (FastDivU64,
//     common.cuh), not a 64-bit division, and the row's weight in the
//     aggregate from its count (ppo_loss_math.h: row_weight).
//   * All token indices and row offsets are int64.
// Numerics: each token's loss and gradient are the same expressions as on the
// CPU; the forward's sums are reassociated (per-thread partial sums, then a
// tree), so row_loss and the kl sum match the serial CPU sums to rounding,
// not bitwise; the count and the clip / lower sums are integers, exact.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ppo.h"
#include "ppo_loss_math.h"

namespace rlhf {
namespace gpu {
namespace {

constexpr int kWarp = kWarpSize;
constexpr int kFwdThreads = 256;
constexpr int kFwdWarps = kFwdThreads / kWarp;
constexpr int kUnroll = 4;  // tokens per thread per forward step
constexpr int kBwdThreads = 256;
constexpr int kKlThreads = 256;
constexpr int kMaxSums = 5;  // loss, count, clip, kl, lower
constexpr int kAggThreads = 256;
constexpr int kAggSums = 7;  // AggSums' fields
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

static_assert(kFwdThreads % kWarp == 0 && kFwdWarps <= kWarp, "forward block size");

template <typename A>
struct FwdArgs {
  const A* x;
  const A* old;
  const A* third;
  const uint8_t* mask;
  int64_t batch;
  int64_t time;
  ppo_loss::LossConsts<A> k;
  A* rows;  // [batch, 5]
};

template <typename A>
struct AggArgs {
  const A* rows;  // [batch, 5]
  int64_t batch;
  int64_t time;
  int agg;
  A* loss;     // []
  A* metrics;  // [5]
};

template <typename A>
struct BwdArgs {
  const A* x;
  const A* old;
  const A* third;
  const uint8_t* mask;
  int64_t n;  // batch * time
  FastDivU64 div_time;
  ppo_loss::LossConsts<A> k;
  int64_t time;
  int agg;
  const A* rows;       // [batch, 5]: the counts
  const A* metrics;    // [5]: total, seqs
  const A* grad_loss;  // []
  A* grad_x;           // [batch, time]
};

template <typename A>
struct KlArgs {
  const A* logp;
  const A* ref;
  const A* grad_out;  // backward only
  A* out;
  int64_t n;
};

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
// Grid: min(batch, 2^31 - 1) blocks of kFwdThreads threads; block b owns rows
// b, b + gridDim.x, ... and writes rows[row, 0..5).
// Thread j reads tokens j, j + kFwdThreads, ... of the row.
// Bytes per row: reads T * (3 * sizeof(A) + 1) (x, old, third, mask; 13 per
// token for float), each once, and writes 5 * sizeof(A). T == 0 writes zeros.
template <typename A, int kKind, bool kDual>
__global__ void __launch_bounds__(kFwdThreads) ppo_loss_fwd_kernel(const FwdArgs<A> a) {
  constexpr int kSums = kKind == ppo_loss::kPolicy ? 5 : 3;  // reduced; VALUE: no kl, lower
  constexpr int64_t kStep = int64_t(kFwdThreads) * kUnroll;
  __shared__ A smem[kFwdWarps][kMaxSums];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t time = a.time;
  const ppo_loss::LossConsts<A> k = a.k;

  for (int64_t row = blockIdx.x; row < a.batch; row += gridDim.x) {
    const int64_t base = row * time;
    const A* const x = a.x + base;
    const A* const old = a.old + base;
    const A* const third = a.third + base;
    const uint8_t* const mask = a.mask + base;

    // loss, count, clip, kl, lower (the last two stay 0 for VALUE)
    A sums[kMaxSums];
#pragma unroll
    for (int s = 0; s < kMaxSums; ++s) sums[s] = A(0);

    for (int64_t t0 = tid; t0 < time; t0 += kStep) {
      A xv[kUnroll], ov[kUnroll], tv[kUnroll];
      bool keep[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t t = t0 + int64_t(u) * kFwdThreads;
        const bool inb = t < time;
        keep[u] = inb ? mask[t] != 0 : false;
        xv[u] = inb ? x[t] : A(0);
        ov[u] = inb ? old[t] : A(0);
        tv[u] = inb ? third[t] : A(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!keep[u]) continue;
        const ppo_loss::TokenOut<A> o =
            ppo_loss::loss_token<A, kKind, kDual>(xv[u], ov[u], tv[u], k);
        sums[0] += o.loss;
        sums[1] += A(1);
        sums[2] += o.clip;
        if (kKind == ppo_loss::kPolicy) {
          sums[3] += o.kl;
          sums[4] += o.lower;
        }
      }
    }

    block_sum<kFwdThreads, kSums>(sums, smem);
    if (tid == 0) {
      A* const r = a.rows + row * ppo_loss::kRowSums;
#pragma unroll
      for (int s = 0; s < kMaxSums; ++s) r[s] = sums[s];
    }
  }
}

// One block: thread j folds rows j, j + kAggThreads, ... into an AggSums, then
// the block sums them in a fixed tree and thread 0 writes the loss and metrics.
// Reads 5 values per row once (B = 4096: 80 KiB for float).
template <typename A>
__global__ void __launch_bounds__(kAggThreads) ppo_loss_agg_kernel(const AggArgs<A> a) {
  __shared__ double smem[kAggThreads / kWarp][kAggSums];
  ppo_loss::AggSums s;
  for (int64_t row = threadIdx.x; row < a.batch; row += kAggThreads) s.add_row(a.rows + row * ppo_loss::kRowSums);
  double v[kAggSums] = {s.loss, s.loss_per_token, s.count, s.clip, s.kl, s.lower, s.seqs};
  block_sum<kAggThreads, kAggSums>(v, smem);
  if (threadIdx.x == 0) {
    s.loss = v[0];
    s.loss_per_token = v[1];
    s.count = v[2];
    s.clip = v[3];
    s.kl = v[4];
    s.lower = v[5];
    s.seqs = v[6];
    ppo_loss::finish_agg<A>(s, a.agg, a.time, a.loss, a.metrics);
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------
// Grid: min(ceil(B * T / kBwdThreads), 2^31 - 1) blocks of kBwdThreads
// threads; thread j owns flat elements i = j, j + total threads, ... and
// writes grad_x[i] = mask[i] ? grad_loss * w(i / T) * dl(i) : 0, w the row's
// weight in the aggregate (ppo_loss_math.h: row_weight).
// Bytes: reads x, old, third, mask once (13 bytes per token for float) and
// row i / T's count (a cache hit after the first token of each row), writes
// grad_x once (4 bytes per token for float).
template <typename A, int kKind, bool kDual>
__global__ void __launch_bounds__(kBwdThreads) ppo_loss_bwd_kernel(const BwdArgs<A> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdThreads;
  const A grad_loss = *a.grad_loss;
  // Only seq-mean-token-mean weighs rows by their own count; every other mode's weight is
  // one number, formed once.
  const bool per_row = a.agg == ppo_loss::kSeqMeanTokenMean;
  const A g_all = grad_loss * ppo_loss::row_weight<A>(a.agg, A(1), a.metrics, a.time);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x; i < a.n;
       i += stride) {
    const bool keep = a.mask[i] != 0;
    const A xv = a.x[i];
    const A ov = a.old[i];
    const A tv = a.third[i];
    A g = g_all;
    if (per_row) {
      const int64_t row = static_cast<int64_t>(a.div_time.div(static_cast<uint64_t>(i)));
      const A count = a.rows[row * ppo_loss::kRowSums + 1];
      g = grad_loss * ppo_loss::row_weight<A>(a.agg, count, a.metrics, a.time);
    }
    const ppo_loss::TokenOut<A> o = ppo_loss::loss_token<A, kKind, kDual>(xv, ov, tv, a.k);
    a.grad_x[i] = keep ? g * o.dloss : A(0);
  }
}

// ---------------------------------------------------------------------------
// KL estimators
// ---------------------------------------------------------------------------
// Grid: min(ceil(n / kKlThreads), 2^31 - 1) blocks of kKlThreads threads;
// thread j owns i = j, j + total threads, ... and writes out[i] (forward: the
// estimator; backward: grad_out[i] * its derivative).
// Bytes: reads logp, ref (and grad_out) once, writes out once: 12 (16) bytes
// per element for float.
template <typename A, int kKind, bool kBackward>
__global__ void __launch_bounds__(kKlThreads) kl_kernel(const KlArgs<A> a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kKlThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kKlThreads + threadIdx.x; i < a.n;
       i += stride) {
    const ppo_loss::KlOut<A> o = ppo_loss::kl_token<A, kKind>(a.logp[i], a.ref[i]);
    if (kBackward) {
      a.out[i] = a.grad_out[i] * o.d;
    } else {
      a.out[i] = o.value;
    }
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

dim3 grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return dim3(static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid));
}

template <typename A>
void launch_fwd(const PpoLossParams& p, cudaStream_t stream) {
  FwdArgs<A> a;
  a.x = static_cast<const A*>(p.x);
  a.old = static_cast<const A*>(p.old);
  a.third = static_cast<const A*>(p.third);
  a.mask = p.mask;
  a.batch = p.batch;
  a.time = p.time;
  a.k = ppo_loss::make_consts<A>(p);
  a.rows = static_cast<A*>(p.rows);
  if (p.batch > 0) {  // (a 0-block launch is an error)
    const dim3 grid(static_cast<unsigned>(p.batch < kMaxGrid ? p.batch : kMaxGrid));
    if (p.kind == ppo_loss::kValue) {
      ppo_loss_fwd_kernel<A, ppo_loss::kValue, false><<<grid, kFwdThreads, 0, stream>>>(a);
    } else if (p.has_dual) {
      ppo_loss_fwd_kernel<A, ppo_loss::kPolicy, true><<<grid, kFwdThreads, 0, stream>>>(a);
    } else {
      ppo_loss_fwd_kernel<A, ppo_loss::kPolicy, false><<<grid, kFwdThreads, 0, stream>>>(a);
    }
    check_launch("ppo loss forward kernel launch");
  }
  AggArgs<A> g;
  g.rows = a.rows;
  g.batch = p.batch;
  g.time = p.time;
  g.agg = p.agg;
  g.loss = static_cast<A*>(p.loss);
  g.metrics = static_cast<A*>(p.metrics);
  ppo_loss_agg_kernel<A><<<1, kAggThreads, 0, stream>>>(g);
  check_launch("ppo loss aggregation kernel launch");
}

template <typename A>
void launch_bwd(const PpoLossParams& p, cudaStream_t stream) {
  BwdArgs<A> a;
  a.x = static_cast<const A*>(p.x);
  a.old = static_cast<const A*>(p.old);
  a.third = static_cast<const A*>(p.third);
  a.mask = p.mask;
  a.n = p.batch * p.time;
  a.div_time = FastDivU64::make(static_cast<uint64_t>(p.time));
  a.k = ppo_loss::make_consts<A>(p);
  a.time = p.time;
  a.agg = p.agg;
  a.rows = static_cast<const A*>(p.rows);
  a.metrics = static_cast<const A*>(p.metrics);
  a.grad_loss = static_cast<const A*>(p.grad_loss);
  a.grad_x = static_cast<A*>(p.grad_x);
  const dim3 grid = grid_for(a.n, kBwdThreads);
  if (p.kind == ppo_loss::kValue) {
    ppo_loss_bwd_kernel<A, ppo_loss::kValue, false><<<grid, kBwdThreads, 0, stream>>>(a);
  } else if (p.has_dual) {
    ppo_loss_bwd_kernel<A, ppo_loss::kPolicy, true><<<grid, kBwdThreads, 0, stream>>>(a);
  } else {
    ppo_loss_bwd_kernel<A, ppo_loss::kPolicy, false><<<grid, kBwdThreads, 0, stream>>>(a);
  }
  check_launch("ppo loss backward kernel launch");
}

template <typename A, bool kBackward>
void launch_kl_dir(const KlParams& p, cudaStream_t stream) {
  KlArgs<A> a;
  a.logp = static_cast<const A*>(p.logp);
  a.ref = static_cast<const A*>(p.ref);
  a.grad_out = static_cast<const A*>(p.grad_out);
  a.out = static_cast<A*>(p.out);
  a.n = p.n;
  const dim3 grid = grid_for(p.n, kKlThreads);
  switch (p.kind) {
    case ppo_loss::kKlK1:
      kl_kernel<A, ppo_loss::kKlK1, kBackward><<<grid, kKlThreads, 0, stream>>>(a);
      break;
    case ppo_loss::kKlAbs:
      kl_kernel<A, ppo_loss::kKlAbs, kBackward><<<grid, kKlThreads, 0, stream>>>(a);
      break;
    case ppo_loss::kKlK2:
      kl_kernel<A, ppo_loss::kKlK2, kBackward><<<grid, kKlThreads, 0, stream>>>(a);
      break;
    default:
      kl_kernel<A, ppo_loss::kKlK3, kBackward><<<grid, kKlThreads, 0, stream>>>(a);
      break;
  }
  check_launch("kl penalty kernel launch");
}

template <typename A>
void launch_kl(const KlParams& p, cudaStream_t stream) {
  if (p.grad_out != nullptr) {
    launch_kl_dir<A, true>(p, stream);
  } else {
    launch_kl_dir<A, false>(p, stream);
  }
}

}  // namespace
}  // namespace gpu

void ppo_loss_fwd_cuda(const PpoLossParams& p, void* stream) {
  if (!ppo_loss::check_loss(p, "ppo_loss_fwd_cuda", true)) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ScalarKind::Float64) {
    gpu::launch_fwd<double>(p, s);
  } else {
    gpu::launch_fwd<float>(p, s);
  }
}

void ppo_loss_bwd_cuda(const PpoLossParams& p, void* stream) {
  if (!ppo_loss::check_loss(p, "ppo_loss_bwd_cuda", false)) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ScalarKind::Float64) {
    gpu::launch_bwd<double>(p, s);
  } else {
    gpu::launch_bwd<float>(p, s);
  }
}

void kl_penalty_cuda(const KlParams& p, void* stream) {
  if (!ppo_loss::check_kl(p, "kl_penalty_cuda")) return;  // (a 0-block launch is an error)
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == ScalarKind::Float64) {
    gpu::launch_kl<double>(p, s);
  } else {
    gpu::launch_kl<float>(p, s);
  }
}

}  // namespace rlhf
