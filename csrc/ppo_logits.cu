// CUDA kernel of the fused PPO policy step from logits (ppo.h:
// PpoLogitsParams; the op is rlhf_kernels.ppo_loss_from_logits with
// grad_in_forward). The log-sum-exp state, vector loads and the row loops
// (stream_row, grad_row) are the log-prob family's (common.cuh); the per-token
// PPO / KL math is ppo_loss_math.h's fused_token, shared with the CPU kernel.
//
// Grid: G blocks of kThreads threads, block b owning token rows b, b + G, ...
// Per row:
//   pass 1: the block streams the V logits once through an OnlineLSE state
//           (max, sum exp, entropy sum), merged over the block;
//   thread 0: logp = z_y - lse, H, then fused_token: the clipped surrogate,
//           KL, the weighted loss term, dL/dlogp and dL/dH; writes the 7
//           per-token stats and broadcasts (lse, H, g, gH) through shared
//           memory;
//   pass 2 (kWriteGrad): the block reads the row again and writes
//           grad_j = (g (1[j == y] - p_j) - gH p_j (z_j - lse + H)) / T.
// Bytes per row: V * sizeof(T) read from HBM, V * sizeof(T) written with the
// gradient, ~60 bytes of per-token scalars. Pass 2's read is meant to hit L2:
// with the gradient the launcher caps G so that the rows in flight
// (G * V * sizeof(T)) fill at most half of L2 (but G >= #SMs, one block per
// SM, so that small L2s or huge rows still use the whole GPU). That cap is a
// heuristic to be tuned on hardware. Ignored rows read no logits; their
// stats and gradient row are 0 (labels outside [0, V): NaN, never an address).
// grad may be the logits themselves (in place): grad_row reads each element
// before the same thread overwrites it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ppo.h"
#include "ppo_loss_math.h"

namespace rlhf {
namespace gpu {
namespace {

// 512 threads: with the L2 cap, a large-vocab problem runs about one block
// per SM, which then needs 512 threads x 32 bytes in flight to approach HBM
// bandwidth; __launch_bounds__ leaves ptxas up to 128 registers.
constexpr int kThreads = 512;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit
// Left to itself ptxas holds the double (gradcheck) variant to 64 registers
// and spills a few bytes around the exp/log calls; asking for one resident
// block lets it use up to 128. 0: no .minnctapersm for the others.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : 0;

template <typename T>
struct FusedArgs {
  const T* logits;
  FastRowLayout layout;
  T* grad;  // used only when kWriteGrad
  FastRowLayout grad_layout;
  int64_t rows;
  int vocab;
  const int64_t* labels;
  int64_t ignore_index;
  acc_t<T> inv_t;
  const acc_t<T>* old;
  const acc_t<T>* adv;
  const acc_t<T>* ref;  // nullptr: no KL term
  const acc_t<T>* weights;
  ppo_loss::FusedConsts<acc_t<T>> c;
  bool has_dual;
  int kl_kind;  // -1 without ref
  acc_t<T>* stats;
};

template <typename T, bool kWriteGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) ppo_logits_kernel(const FusedArgs<T> a) {
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, true>;
  __shared__ State smem[kThreads / kWarpSize];
  __shared__ Acc bcast[4];  // lse, H, g, gH of the current row

  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc inv_t = a.inv_t;

  for (int64_t row = static_cast<int64_t>(blockIdx.x); row < a.rows; row += gridDim.x) {
    const int64_t y = a.labels[row];
    // Uniform over the block (same row): `continue` keeps the barriers in step.
    if (y == a.ignore_index || y < 0 || y >= V) {
      const Acc v = (y == a.ignore_index) ? Acc(0) : quiet_nan<Acc>();
      if (tid < kFusedStats) a.stats[row * kFusedStats + tid] = v;
      if (kWriteGrad) fill_row<kThreads>(a.grad + a.grad_layout.offset(row), V, v);
      continue;
    }

    const T* x = a.logits + a.layout.offset(row);
    Acc z_label = Acc(0);
    if (tid == 0) z_label = mul_rn(to_acc(x[static_cast<int>(y)]), inv_t);

    // Pass 1, as logprobs_fwd_kernel (stream_row in common.cuh).
    const State st = stream_row<kThreads>(x, V, inv_t, smem);

    if (tid == 0) {
      const Acc log_s = log_acc(st.s);
      const Acc lse = st.m + log_s;
      const Acc entropy = log_s - st.w / st.s;
      const Acc ref = a.ref != nullptr ? a.ref[row] : Acc(0);
      const ppo_loss::FusedTokenOut<Acc> o = ppo_loss::fused_token<Acc>(
          z_label - lse, entropy, a.old[row], a.adv[row], ref, a.weights[row], a.c, a.has_dual, a.kl_kind);
      Acc* s = a.stats + row * kFusedStats;
      s[0] = o.weighted;
      s[1] = o.pg;
      s[2] = entropy;
      s[3] = o.kl;
      s[4] = o.clip;
      s[5] = o.lower;
      s[6] = o.neg_log_ratio;
      bcast[0] = lse;
      bcast[1] = entropy;
      bcast[2] = o.g;
      bcast[3] = o.gh;
    }

    if (kWriteGrad) {
      // bcast is read here and rewritten by thread 0 only after the next
      // row's block_reduce barriers, which every thread reaches after this read.
      __syncthreads();
      T* out = a.grad + a.grad_layout.offset(row);
      const Acc gh = bcast[3];
      const Acc row_t = row_inv_t(bcast[0], inv_t);
      if (gh != Acc(0)) {
        GradOp<Acc, true> op{bcast[0], bcast[2], gh, bcast[1], row_t, static_cast<int>(y)};
        grad_row<kThreads>(x, out, V, op);
      } else {
        GradOp<Acc, false> op{bcast[0], bcast[2], Acc(0), Acc(0), row_t, static_cast<int>(y)};
        grad_row<kThreads>(x, out, V, op);
      }
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// Blocks for the gradient-writing sweep: rows in flight within half of L2, at least one block per SM.
int64_t grad_grid(int64_t rows, int64_t row_bytes) {
  int dev = 0, sms = 1, l2 = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess) {
    check_launch("ppo_logits_fused_cuda: device query");
  }
  const int64_t resident = std::max<int64_t>(sms, (int64_t(l2) / 2) / std::max<int64_t>(1, row_bytes));
  return std::min(rows, resident);
}

template <typename T>
void launch(const PpoLogitsParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  FusedArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.layout = FastRowLayout::make(p.logits_layout);
  a.grad = static_cast<T*>(p.grad);
  a.grad_layout = FastRowLayout::make(p.grad_layout);
  a.rows = p.rows;
  a.vocab = static_cast<int>(p.vocab);
  a.labels = p.labels;
  a.ignore_index = p.ignore_index;
  a.inv_t = static_cast<Acc>(p.inv_temperature);
  a.old = static_cast<const Acc*>(p.old);
  a.adv = static_cast<const Acc*>(p.adv);
  a.ref = static_cast<const Acc*>(p.ref);
  a.weights = static_cast<const Acc*>(p.weights);
  a.c = ppo_loss::make_fused_consts<Acc>(p);
  a.has_dual = p.has_dual;
  a.kl_kind = p.ref != nullptr ? p.kl_kind : -1;
  a.stats = static_cast<Acc*>(p.stats);
  if (p.grad != nullptr) {
    const int64_t grid = std::min(grad_grid(p.rows, p.vocab * int64_t(sizeof(T))), kMaxGrid);
    ppo_logits_kernel<T, true><<<dim3(static_cast<unsigned>(grid)), kThreads, 0, stream>>>(a);
  } else {
    const int64_t grid = std::min(p.rows, kMaxGrid);
    ppo_logits_kernel<T, false><<<dim3(static_cast<unsigned>(grid)), kThreads, 0, stream>>>(a);
  }
  check_launch("ppo_logits_fused kernel launch");
}

}  // namespace
}  // namespace gpu

void ppo_logits_fused_cuda(const PpoLogitsParams& p, void* stream) {
  if (!ppo_loss::check_fused(p, "ppo_logits_fused_cuda")) return;  // (a 0-block launch is an error)
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: gpu::launch<float>(p, s); break;
    case ScalarKind::Float16: gpu::launch<__half>(p, s); break;
    case ScalarKind::BFloat16: gpu::launch<__nv_bfloat16>(p, s); break;
    case ScalarKind::Float64: gpu::launch<double>(p, s); break;
    default: throw std::runtime_error("rlhf_kernels: ppo_logits_fused_cuda: unsupported dtype");
  }
}

}  // namespace rlhf
