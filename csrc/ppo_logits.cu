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
//   thread 0: logp = z_y - lse, H (row_stats), then fused_token: the clipped surrogate,
//           KL, the weighted loss term, dL/dlogp and dL/dH; writes the 7
//           per-token stats and broadcasts (lse2, H, g, gH) through shared
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
//
// On sm_90 the gradient-writing sweep has a second kernel that reads the
// logits from HBM exactly once (ppo_logits_cluster_kernel): a thread-block
// cluster of C <= 8 blocks owns one row at a time, each block copying its
// slice (at most cluster_slice_bytes(), 64 KiB by default) into shared memory
// with cp.async, so the row is held on chip between the log-sum-exp and the
// gradient. The blocks' partial (max, sum, entropy) states are merged through
// distributed shared memory in rank order (every block gets the same bits),
// then each block writes its slice of the gradient from shared memory. Bytes:
// V * sizeof(T) read and V * sizeof(T) written per row, the floor for this
// step; several slices in flight per SM (three 64 KiB blocks fit an SM's
// shared memory, all of a slice's copies issued at once) keep HBM busy. A
// pipelined variant (the default; RLHF_KERNELS_CLUSTER_PIPELINE=0 turns it
// off) copies the next row while writing this one's gradient; a double-buffered
// one (RLHF_KERNELS_CLUSTER_PIPELINE=2; on an H200 3.70 - 3.94 ms at 32 - 44 KiB
// slices against the pipelined one's 3.00) holds two
// slices a block and issues the next row's copy when it starts a row; a staged
// one (=3; not yet measured either) pipelines as the default does but starts a
// row's log-sum-exp on the first part of its slice to land; =4 double-buffers
// with one bulk (TMA) copy a slice instead of every thread's 16-byte copies (not
// yet measured either). Taken when the
// rows (logits and grad) start on 16-byte boundaries, T is not double, and
// C <= 8; else the kernel above runs. Measured (8 x 2048 x 128256 bf16, whole
// step with backward): on an H200, 5.70 ms with the streaming kernel (its
// second read missing L2), 4.52 ms with the plain cluster kernel at 64 KiB
// slices, against a read + write floor of 2.03 ms; on an H100, 5.37 / 3.77 /
// 3.60 ms (streaming / plain / pipelined) against 2.82 ms, 1.28x the floor.
// A later H100 run (benchmarks/results/gpu-session-NVIDIA_H100-20261126-1402,
// bwd_sweep.py) found the 64 KiB default best among slice budgets of 32 to 86
// KiB (C = 8 .. 3: 3.69 ms, 1.30x its 2.84 ms floor, against 3.70 - 4.06), and
// slower when the blocks of a cluster take turns along the row in 1 or 4 KiB
// chunks (one stream a row: 3.72 - 3.75 ms; 52 KiB: 3.99), so that layout was
// dropped. Nsight Compute there (2048 rows): 2.61 TB/s of DRAM traffic (78%
// of peak), issue slots 44% busy, 24 warps an SM (shared memory: 3 blocks),
// 92 clusters resident of the 99 the SMs' shared memory would hold.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

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
  acc_t<T> scale;  // row_scale(1 / T): logits to base-2 units (common.cuh)
  const acc_t<T>* old;
  const acc_t<T>* adv;
  const acc_t<T>* ref;  // nullptr: no KL term
  const acc_t<T>* weights;
  ppo_loss::FusedConsts<acc_t<T>> c;
  bool has_dual;
  int kl_kind;  // -1 without ref
  acc_t<T>* stats;
};

// A token's per-row inputs besides its logits. Loaded where the kernel can
// wait for them least: the cluster kernels' thread 0 loads them before the
// row's log-sum-exp, so that their latency hides behind it.
template <typename Acc>
struct RowScalars {
  Acc old, adv, ref, weight;
};

template <typename T>
__device__ __forceinline__ RowScalars<acc_t<T>> load_row_scalars(const FusedArgs<T>& a, int64_t row) {
  using Acc = acc_t<T>;
  return {a.old[row], a.adv[row], a.ref != nullptr ? a.ref[row] : Acc(0), a.weights[row]};
}

// Thread 0's step of a row in all kernels: from the row's merged log-sum-exp
// state and the label's base-2 logit, the label's log-prob, the entropy and
// fused_token's PPO / KL terms;
// writes the 7 per-token stats (when write_stats) and broadcasts
// (lse2, H, g, gH) through bcast, lse2 in base 2 (RowStats).
template <typename T>
__device__ __forceinline__ void finish_row(const FusedArgs<T>& a, int64_t row, const OnlineLSE<acc_t<T>, true>& st,
                                           acc_t<T> z_label, const RowScalars<acc_t<T>>& in, bool write_stats,
                                           acc_t<T>* bcast) {
  using Acc = acc_t<T>;
  const RowStats<Acc> r = row_stats(st, z_label);
  const Acc entropy = r.entropy;
  const ppo_loss::FusedTokenOut<Acc> o = ppo_loss::fused_token<Acc>(
      r.logprob, entropy, in.old, in.adv, in.ref, in.weight, a.c, a.has_dual, a.kl_kind);
  if (write_stats) {
    Acc* s = a.stats + row * kFusedStats;
    s[0] = o.weighted;
    s[1] = o.pg;
    s[2] = entropy;
    s[3] = o.kl;
    s[4] = o.clip;
    s[5] = o.lower;
    s[6] = o.neg_log_ratio;
  }
  bcast[0] = r.lse2;  // (base 2: the gradient sweeps build GradOp from it)
  bcast[1] = entropy;
  bcast[2] = o.g;
  bcast[3] = o.gh;
}

template <typename T, bool kWriteGrad>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) ppo_logits_kernel(const FusedArgs<T> a) {
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, true>;
  __shared__ State smem[kThreads / kWarpSize];
  __shared__ Acc bcast[4];  // lse2, H, g, gH of the current row

  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc scale = a.scale;

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
    if (tid == 0) z_label = mul_rn(to_acc(x[static_cast<int>(y)]), scale);

    // Pass 1, as logprobs_fwd_kernel (stream_row in common.cuh).
    const State st = stream_row<kThreads>(x, V, scale, smem);

    if (tid == 0) finish_row(a, row, st, z_label, load_row_scalars(a, row), true, bcast);

    if (kWriteGrad) {
      // bcast is read here and rewritten by thread 0 only after the next
      // row's block_reduce barriers, which every thread reaches after this read.
      __syncthreads();
      T* out = a.grad + a.grad_layout.offset(row);
      const Acc gh = bcast[3];
      if (gh != Acc(0)) {
        grad_row<kThreads>(x, out, V, GradOp<Acc, true>::make(bcast[0], bcast[2], gh, bcast[1], a.inv_t, scale,
                                                               static_cast<int>(y)));
      } else {
        grad_row<kThreads>(x, out, V, GradOp<Acc, false>::make(bcast[0], bcast[2], Acc(0), Acc(0), a.inv_t, scale,
                                                                static_cast<int>(y)));
      }
    }
  }
}

// --- the one-read sweep: a cluster holds the row in shared memory (sm_90) ---

constexpr int kClusterThreads = 256;
constexpr int kMaxCluster = 8;  // the portable cluster size

[[maybe_unused]] __device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's committed cp.async groups are in flight.
template <int kPending>
[[maybe_unused]] __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait<0>();
}

// The staged mode's copies of a row: at most kStages groups of vectors, then one more,
// possibly empty (so that a thread waits with at most kStages groups allowed in flight).
constexpr int kStages = 4;

// Waits until at most `pending` (0 .. kStages) of this thread's cp.async groups are in flight.
[[maybe_unused]] __device__ __forceinline__ void cp_async_wait_upto(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    default: cp_async_wait<kStages>(); break;
  }
}

// Bulk copies (the Tensor Memory Accelerator's 1-D form) into this block's shared memory,
// completed on an mbarrier: one thread issues a whole slice's copy, and the block waits on
// the barrier's phase (kBulk below). A wait that has not completed within about 4 s
// (%globaltimer, read every 1024 tries) traps (a launch error), so that a lost copy fails
// the kernel instead of hanging the GPU.
[[maybe_unused]] __device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

[[maybe_unused]] __device__ __forceinline__ void mbar_init(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(bar)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from global src to
// shared dst, the barrier's current phase completing when they have landed.
[[maybe_unused]] __device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes,
                                                           uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // (The block barrier before the call orders the other threads' reads of dst before the
  // copy; this fence adds the issuing thread's own generic-proxy accesses, at no cost.)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
#endif
}

// Waits until the barrier's phase of the given parity has completed.
[[maybe_unused]] __device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t start = 0;
  for (unsigned tries = 1;; ++tries) {
    unsigned done = 0;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (tries % 1024 == 0) {
      uint64_t now;
      asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(now));
      if (start == 0) {
        start = now;
      } else if (now - start > 4000000000ull) {
        __trap();
      }
    }
  }
#endif
}

// Grid: clusters of C blocks (C = cluster size, 1 <= C <= 8), cluster k owning
// rows k, k + #clusters, ... Block r of a cluster owns the row's elements
// [r S, min(V, (r + 1) S)); S (a multiple of the 16-byte vector) is the
// `slice` argument and the dynamic shared memory holds S elements. Per row:
//   1. copy the slice into shared memory (cp.async, all at once; the scalar
//      tail of the last slice with plain loads), thread 0 reads z_label;
//   2. the block's OnlineLSE over the slice (from shared memory) into
//      part[parity], then cluster barrier;
//   3. warp 0 reads the C partial states in parallel (lane r from rank r) and
//      merges them in rank order through shuffles (the same bits in every
//      block); thread 0 runs finish_row (rank 0 writes the stats) with the
//      row's scalars, which it loaded before the log-sum-exp, and broadcasts;
//   4. the block writes its slice of the gradient from shared memory.
// part[] alternates between two slots by row parity: a block can only write a
// slot again two rows later, after a cluster barrier that every block of the
// cluster reaches only when done reading it. Each block loads the next row's
// label one row ahead. A row's label is the same for
// the whole cluster, so skipped rows are skipped by all its blocks together.
// In place (grad == logits) is safe: the slice is in shared memory before any
// block writes, and z_label is read before the barrier that precedes them.
//
// The pipelined modes (kMode = kPipelined, the default, or kDoubleBuffered;
// RLHF_KERNELS_CLUSTER_PIPELINE=0 / 1 / 2 picks plain / pipelined / double
// buffered): every element of buf is private to one thread (the copy, the
// log-sum-exp and the gradient loops give vector i and tail element j to the
// same thread), so
//   * no block barrier guards buf: a thread waits for its own copies only;
//   * kPipelined: while writing row k's gradient each thread copies row
//     k + #clusters's vector i into slot i right after it has used slot i (its
//     registers are consumed before the copy is issued), so the next row's read
//     overlaps this row's writes and the next row's serial tail;
//   * kDoubleBuffered: the block holds two slices (2 x slice elements of shared
//     memory; row j of the cluster's walk in half j % 2), and each thread issues
//     its copies of the next row into the other half when it starts a row (that
//     half's previous row was written out by the same thread), so the next
//     row's read is in flight during this row's log-sum-exp, cluster merge and
//     gradient writes, the phases in which the other modes have no read in
//     flight. Each row's copies are one cp.async group: waiting for all but the
//     newest group waits for this row's;
//   * kStaged (RLHF_KERNELS_CLUSTER_PIPELINE=3; not yet measured on a GPU): as
//     kPipelined, but a thread's copies of a row are committed in up to kStages
//     groups (its vectors in order, `group` a group) and the log-sum-exp waits for
//     each group just before it reads that group's first vector, instead of for
//     the whole slice before it starts: the pipelined mode's last copies of the
//     next row go out at the end of this row's gradient writes, and their HBM
//     latency is then waited out with nothing to do; here the log-sum-exp of the
//     earlier groups runs while they land;
//   * kBulk (=4; not yet measured on a GPU): double buffered as kDoubleBuffered, but
//     each slice arrives as one bulk copy that thread 0 issues (full[h] completes
//     when the bytes of half h have landed; every thread waits on it), not as 16-byte
//     cp.async copies from every thread: no copy instructions in the threads' loops,
//     and the copy engine keeps the slice's bytes in flight. Since one thread now
//     writes every thread's slots, a block barrier at each row's start orders the
//     other half's last reads (the previous row's gradient) before its next copy;
//     each copy is waited for exactly once, so full[h]'s parity flips at each wait.
//     The scalar tail is still copied by its threads with plain loads;
//   * bcast needs no end-of-row barrier: thread 0 rewrites it only after the
//     next row's cluster barrier, which each thread reaches after reading it.
constexpr int kPlain = 0, kPipelined = 1, kDoubleBuffered = 2, kStaged = 3, kBulk = 4;

template <typename T, int kMode>
__global__ void __launch_bounds__(kClusterThreads, 2) ppo_logits_cluster_kernel(const FusedArgs<T> a, int slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, true>;
  constexpr int kN = Vec<T>::kN;
  constexpr bool kPipe = kMode == kPipelined || kMode == kStaged;
  constexpr bool kStage = kMode == kStaged;
  constexpr bool kBulkCopy = kMode == kBulk;
  constexpr bool kDouble = kMode == kDoubleBuffered || kBulkCopy;  // two halves
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  T* const halves = reinterpret_cast<T*>(dyn_smem);
  __shared__ State warp_states[kClusterThreads / kWarpSize];
  __shared__ State part[2];
  __shared__ Acc bcast[4];
  __shared__ __align__(8) uint64_t full[2];  // kBulk: half h's copy has landed

  const cg::cluster_group cluster = cg::this_cluster();
  const int n_blocks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t n_clusters = gridDim.x / n_blocks;
  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc scale = a.scale;
  const int begin = min(V, rank * slice);
  const int len = min(V, begin + slice) - begin;
  const int nvec = len / kN;
  // kStaged: this thread's k-th vector of the slice is in copy group k / group; it owns
  // `owned` vectors, so it commits owned / group + 1 <= kStages + 1 groups a row (the last
  // one possibly empty).
  const int group = max(1, ((nvec + kClusterThreads - 1) / kClusterThreads + kStages - 1) / kStages);
  const int owned = tid < nvec ? (nvec - 1 - tid) / kClusterThreads + 1 : 0;
  const int n_groups = owned / group + 1;
  const auto kept = [&](int64_t y) { return y != a.ignore_index && y >= 0 && y < V; };
  int parity = 0;  // of part[], flipped by the rows that use it (kept rows)
  int half = 0;  // kDouble: the half of buf that holds this row, flipped by every row
  unsigned phases = 0;  // kBulk: bit h, the parity of full[h]'s next phase to wait for
  if (kBulkCopy) {
    if (tid == 0) {
      mbar_init(&full[0]);
      mbar_init(&full[1]);
    }
    __syncthreads();
  }
  bool in_flight = false;  // this row's slice was copied during the previous row (pipelined modes)
  const int64_t first = blockIdx.x / n_blocks;
  int64_t y_ahead = first < a.rows ? a.labels[first] : 0;
  // This thread's copies of one row's slice into dst (the scalar tail with plain loads).
  // (kStaged: committed in its groups.)
  const auto copy_row = [&](T* dst, int64_t r) {
    const T* src = a.logits + a.layout.offset(r) + begin;
    int k = 0;
    for (int i = tid; i < nvec; i += kClusterThreads) {
      cp_async16(dst + i * kN, src + i * kN);
      if (kStage && ++k == group) {
        cp_async_commit();
        k = 0;
      }
    }
    for (int j = nvec * kN + tid; j < len; j += kClusterThreads) dst[j] = src[j];
    if (kStage) cp_async_commit();
  };
  // kBulk: row r's slice into half h: one bulk copy from thread 0, the tail as copy_row's.
  const auto bulk_row = [&](int h, int64_t r) {
    T* const dst = halves + h * slice;
    const T* src = a.logits + a.layout.offset(r) + begin;
    if (tid == 0 && nvec > 0) bulk_copy(dst, src, static_cast<unsigned>(nvec) * 16u, &full[h]);
    for (int j = nvec * kN + tid; j < len; j += kClusterThreads) dst[j] = src[j];
  };

  for (int64_t row = first; row < a.rows; row += n_clusters) {
    const int64_t y = y_ahead;
    const int64_t next = row + n_clusters;
    // The next row's label, loaded a whole row ahead: its latency is not on the row's path.
    y_ahead = next < a.rows ? a.labels[next] : 0;
    T* const buf = kDouble ? halves + half * slice : halves;
    T* out = a.grad + a.grad_layout.offset(row) + begin;
    // kBulk: the other half's last reader (the previous row's gradient loop) is done before
    // thread 0 overwrites it (the other modes' threads overwrite only their own slots).
    if (kBulkCopy) __syncthreads();
    if (kDouble && kept(y) && !in_flight) {
      if (kBulkCopy) {
        bulk_row(half, row);
      } else {
        copy_row(buf, row);
        cp_async_commit();
      }
    }
    // kDouble: the next row's copies go out before this row's work (or its skip).
    const bool next_copied = kDouble && next < a.rows && kept(y_ahead);
    if (next_copied) {
      if (kBulkCopy) {
        bulk_row(half ^ 1, next);
      } else {
        copy_row(halves + (half ^ 1) * slice, next);
        cp_async_commit();
      }
    }
    if (!kept(y)) {  // (never in flight: only kept rows are copied ahead)
      const Acc v = (y == a.ignore_index) ? Acc(0) : quiet_nan<Acc>();
      if (rank == 0 && tid < kFusedStats) a.stats[row * kFusedStats + tid] = v;
      fill_row<kClusterThreads>(out, len, v);
      if (kDouble) {
        in_flight = next_copied;
        half ^= 1;
      }
      continue;
    }
    if (!kDouble && !in_flight) copy_row(buf, row);
    Acc z_label = Acc(0);
    RowScalars<Acc> scalars{};
    if (tid == 0) {
      z_label = mul_rn(to_acc(a.logits[a.layout.offset(row) + y]), scale);
      scalars = load_row_scalars(a, row);
    }
    if (kStage) {
      // (waited for group by group in the log-sum-exp below)
    } else if (kBulkCopy) {
      if (nvec > 0) {  // (uniform over the block: a copy was issued for this row exactly when nvec > 0)
        mbar_wait(&full[half], (phases >> half) & 1u);
        phases ^= 1u << half;
      }
    } else if (!kDouble) {
      cp_async_wait_all();
    } else if (next_copied) {
      cp_async_wait<1>();  // all but the next row's group: this row's slice is in
    } else {
      cp_async_wait<0>();
    }
    if (kMode == kPlain) __syncthreads();

    State st;
    st.reset();
    int pending = n_groups - 1;  // kStaged: groups allowed in flight when the next one is waited for
    int left = 0;  // kStaged: vectors of the current group still to read
    for (int i = tid; i < nvec; i += kClusterThreads) {
      if (kStage) {
        if (left == 0) {
          cp_async_wait_upto(pending--);
          left = group;
        }
        --left;
      }
      Acc z[kN];
      Vec<T>::load(buf + i * kN, z);
#pragma unroll
      for (int k = 0; k < kN; ++k) z[k] = mul_rn(z[k], scale);
      st.template push<kN>(z);
    }
    for (int j = nvec * kN + tid; j < len; j += kClusterThreads) {
      const Acc z[1] = {mul_rn(to_acc(buf[j]), scale)};
      st.template push<1>(z);
    }
    block_reduce<kClusterThreads>(st, warp_states);
    if (tid == 0) part[parity] = st;
    cluster.sync();

    if (tid < kWarpSize) {
      State mine;
      mine.reset();
      if (tid < n_blocks) mine = *cluster.map_shared_rank(&part[parity], tid);
      State merged;
      merged.reset();
      for (int r = 0; r < n_blocks; ++r) {
        merged.merge(__shfl_sync(kFullMask, mine.m, r), __shfl_sync(kFullMask, mine.s, r),
                     __shfl_sync(kFullMask, mine.w, r));
      }
      if (tid == 0) finish_row(a, row, merged, z_label, scalars, rank == 0, bcast);
    }
    __syncthreads();

    const bool copy_next = kPipe && next < a.rows && kept(y_ahead);
    const T* src_next = copy_next ? a.logits + a.layout.offset(next) + begin : nullptr;
    const auto write = [&](const auto& op) {
      int k = 0;  // kStaged: copies in the current group (the groups of copy_row)
      for (int i = tid; i < nvec; i += kClusterThreads) {
        Acc u[kN];
        Vec<T>::load(buf + i * kN, u);
        grad_vec<kN>(op, u, begin + i * kN);
        Vec<T>::store(out + i * kN, u);
        if (copy_next) {
          cp_async16(buf + i * kN, src_next + i * kN);  // slot i is used: u was consumed above
          if (kStage && ++k == group) {
            cp_async_commit();
            k = 0;
          }
        }
      }
      for (int j = nvec * kN + tid; j < len; j += kClusterThreads) {
        out[j] = from_acc<T>(op(to_acc(buf[j]), begin + j));
        if (copy_next) buf[j] = src_next[j];
      }
      if (kStage && copy_next) cp_async_commit();
    };
    if (bcast[3] != Acc(0)) {
      write(GradOp<Acc, true>::make(bcast[0], bcast[2], bcast[3], bcast[1], a.inv_t, scale, static_cast<int>(y)));
    } else {
      write(GradOp<Acc, false>::make(bcast[0], bcast[2], Acc(0), Acc(0), a.inv_t, scale, static_cast<int>(y)));
    }
    in_flight = kDouble ? next_copied : copy_next;
    parity ^= 1;
    half ^= 1;
    if (kMode == kPlain) __syncthreads();  // buf and bcast are rewritten by the next row
  }
  cp_async_wait_all();  // (nothing in flight here: the last row of a cluster copies no successor)
  cluster.sync();  // no block leaves while another may still read its part[]
#endif
}

// --- the sweep's mask-dependent inputs (ppo.h: PpoInputsParams) in one launch ---

// One block. With at least 32 rows, warp w owns rows w, w + 32, ... (a lane positions
// l, l + 32, ... of each); with fewer, the whole block takes the rows one at a time (a
// thread positions tid, tid + 1024, ...), so that a short batch of long rows still spreads
// over every thread. Either way a thread reads back only what it wrote itself. Pass 1
// writes the labels and 0 / 1 weights and counts each row; the block's totals go through
// shared memory; pass 2 (not for token-sum) writes 1 / d_b over the 1s, with a row's count
// from shared memory (block mode) or recounted from the 1s (warp mode). The label and mask
// loads of a position are independent (no short-circuit) and the pointers restrict, so
// that the unrolled loop has several loads in flight. Small: the bindings take it up to
// kMaxInputsTokens tokens, a few microseconds of one SM; the ATen composition it replaces
// is ~8 launches.
constexpr int kInputsThreads = 1024;
constexpr int kInputsWarps = kInputsThreads / kWarpSize;

// Pass 1 over positions first, first + stride, ... of row b; returns this thread's count.
template <typename L, typename M, typename A>
__device__ __forceinline__ int64_t inputs_row_pass(const PpoInputsParams& p, int64_t b, int first, int stride,
                                                   const L* __restrict__ labels, const M* __restrict__ mask,
                                                   int64_t* __restrict__ out, A* __restrict__ w) {
  int64_t count = 0;
#pragma unroll 4
  for (int64_t t = first; t < p.time; t += stride) {
    count += ppo_loss::input_token<L, M, A>(p, labels, mask, out, w, b, t);
  }
  return count;
}

template <typename L, typename M, typename A>
__global__ void __launch_bounds__(kInputsThreads) ppo_fused_inputs_kernel(const PpoInputsParams p) {
  __shared__ int64_t warp_totals[kInputsWarps][2];
  __shared__ int64_t reduce[kInputsWarps][1];
  __shared__ int64_t row_counts[kInputsWarps];  // block mode: B < kInputsWarps rows
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const L* __restrict__ labels = static_cast<const L*>(p.labels);
  const M* __restrict__ mask = static_cast<const M*>(p.mask);
  int64_t* __restrict__ out = p.labels_out;
  A* __restrict__ w = static_cast<A*>(p.weights);
  const bool block_rows = p.batch < kInputsWarps;  // uniform over the block
  int64_t total = 0, seqs = 0;  // warp mode: this warp's (every lane); block mode: thread 0's
  if (block_rows) {
    for (int64_t b = 0; b < p.batch; ++b) {
      int64_t count[1] = {inputs_row_pass<L, M, A>(p, b, tid, kInputsThreads, labels, mask, out, w)};
      block_sum<kInputsThreads, 1>(count, reduce);  // (ends with a barrier)
      if (tid == 0) {
        row_counts[b] = count[0];
        total += count[0];
        seqs += count[0] > 0;
      }
    }
  } else {
    for (int64_t b = warp; b < p.batch; b += kInputsWarps) {
      const int64_t count = warp_sum(inputs_row_pass<L, M, A>(p, b, lane, kWarpSize, labels, mask, out, w));
      total += count;
      seqs += count > 0;
    }
  }
  if (lane == 0) {
    warp_totals[warp][0] = total;  // block mode: only warp 0's is nonzero
    warp_totals[warp][1] = seqs;
  }
  __syncthreads();
  total = seqs = 0;
  for (int i = 0; i < kInputsWarps; ++i) {
    total += warp_totals[i][0];
    seqs += warp_totals[i][1];
  }
  const int64_t n = total > 1 ? total : 1, s = seqs > 1 ? seqs : 1;
  if (tid == 0) *static_cast<A*>(p.n_valid) = static_cast<A>(n);
  if (p.agg == ppo_loss::kTokenSum) return;
  const bool per_row = p.agg == ppo_loss::kSeqMeanTokenMean;
  const A shared_inv = A(1) / ppo_loss::input_denominator<A>(p.agg, n, s, 0, p.time);
  const int64_t first_row = block_rows ? 0 : warp, row_step = block_rows ? 1 : kInputsWarps;
  const int first = block_rows ? tid : lane, stride = block_rows ? kInputsThreads : kWarpSize;
  for (int64_t b = first_row; b < p.batch; b += row_step) {
    A* row = w + b * p.time;
    A inv = shared_inv;
    if (per_row) {
      int64_t count = 0;
      if (block_rows) {
        count = row_counts[b];
      } else {
        for (int64_t t = lane; t < p.time; t += kWarpSize) count += row[t] != A(0);
        count = warp_sum(count);
      }
      inv = A(1) / ppo_loss::input_denominator<A>(p.agg, n, s, count, p.time);
    }
#pragma unroll 4
    for (int64_t t = first; t < p.time; t += stride) row[t] = row[t] != A(0) ? inv : A(0);
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

// Largest slice of a row a cluster block holds in shared memory, in bytes
// (RLHF_KERNELS_CLUSTER_SLICE_BYTES; 0 turns the one-read sweep off).
int64_t cluster_slice_bytes() {
  const char* env = std::getenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES");
  return env != nullptr ? std::atoll(env) : 64 * 1024;
}

// At most this many clusters (RLHF_KERNELS_CLUSTER_MAX; unset or 0: as many
// as fit the GPU). A testing and tuning knob: few clusters walk many rows each.
int64_t cluster_cap() {
  const char* env = std::getenv("RLHF_KERNELS_CLUSTER_MAX");
  const int64_t cap = env != nullptr ? std::atoll(env) : 0;
  return cap > 0 ? cap : std::numeric_limits<int64_t>::max();
}

// The cluster kernel's mode: pipelined unless RLHF_KERNELS_CLUSTER_PIPELINE is
// 0 (plain), 2 (double buffered), 3 (staged) or 4 (double buffered, bulk copies).
// On an H100 (8 x 2048 x 128256 bf16, whole step with backward) the pipelined one
// took 3.60 ms against 3.77 for the plain one (the read + write floor: 2.82 ms); on an
// H200 the double-buffered one lost at 32 - 44 KiB slices (3.70 - 3.94 ms against 3.00);
// the staged and bulk ones are not yet measured on a GPU.
int cluster_mode() {
  const char* env = std::getenv("RLHF_KERNELS_CLUSTER_PIPELINE");
  if (env != nullptr && env[0] == '0') return kPlain;
  if (env != nullptr && env[0] == '2') return kDoubleBuffered;
  if (env != nullptr && env[0] == '3') return kStaged;
  if (env != nullptr && env[0] == '4') return kBulk;
  return kPipelined;
}

// How the cluster kernel cuts a row of `vocab` elements of `item` bytes, for blocks
// of at most max_smem bytes of dynamic shared memory that hold `buffers` (1, or 2
// when double buffered) slices each: C blocks (0: the kernel does not apply: the
// budget is 0 or C would pass kMaxCluster or the block's memory), each owning a
// contiguous slice of `slice` elements of the row (a multiple of the 16-byte
// vector; the last ones may be short or empty), in smem bytes of shared memory.
// The slice budget (RLHF_KERNELS_CLUSTER_SLICE_BYTES) is per buffer.
struct ClusterLayout {
  int64_t C = 0, slice = 0, smem = 0;
};

ClusterLayout cluster_layout(int64_t vocab, int64_t item, int64_t max_smem, int64_t buffers) {
  ClusterLayout l;
  const int64_t kN = 16 / item;
  // a block holds at most this much of a row
  const int64_t budget = std::min(cluster_slice_bytes(), max_smem / buffers) / 16 * 16;
  if (budget < 16) return l;
  const int64_t C = std::max<int64_t>(1, (vocab * item + budget - 1) / budget);
  if (C > kMaxCluster) return l;
  l.slice = ((vocab + C - 1) / C + kN - 1) / kN * kN;
  l.smem = buffers * l.slice * item;
  if (l.smem <= max_smem) l.C = C;
  return l;
}

bool rows_aligned16(const void* base, const RowLayout& l, int64_t rows, int64_t itemsize) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const bool many0 = rows > l.size1 * l.size2;
  return (!many0 || (l.stride0 * itemsize) % 16 == 0) && (l.size1 <= 1 || (l.stride1 * itemsize) % 16 == 0) &&
         (l.size2 <= 1 || (l.stride2 * itemsize) % 16 == 0);
}

// What launch_cluster needs to know about one cluster kernel on one device,
// queried once: whether it holds sm_90 code, and the most dynamic shared
// memory a block may take. The kernel's attribute is raised to that maximum
// once and never lowered, so concurrent launches with different slices (host
// threads, captured graphs) never see an attribute below their own need.
struct ClusterKernelInfo {
  bool usable = false;
  int64_t max_dynamic_smem = 0;
};

constexpr int kMaxDevices = 64;

// (The caches below are keyed by the kernel's address: the cluster kernel's modes
// have one signature, so they share one instantiation of each cache.)
template <typename Kernel>
ClusterKernelInfo cluster_kernel_info(Kernel kernel, int dev) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, ClusterKernelInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  ClusterKernelInfo info;
  int major = 0, optin = 0;
  cudaFuncAttributes attr{};
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9 &&
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
      cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.binaryVersion >= 90 && attr.ptxVersion >= 90) {
    const int64_t max_dynamic = int64_t(optin) - int64_t(attr.sharedSizeBytes);
    if (max_dynamic >= 16 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(max_dynamic)) == cudaSuccess) {
      info.usable = true;
      info.max_dynamic_smem = max_dynamic;
    }
  }
  (void)cudaGetLastError();  // a failed query is an answer (the streaming kernel runs), not an error to report
  cache[key] = info;
  return info;
}

// A launch of `blocks` blocks in clusters of C, `smem` dynamic bytes each;
// *attr (the cluster shape) must outlive the returned configuration.
cudaLaunchConfig_t cluster_config(int64_t C, int64_t blocks, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  *attr = cudaLaunchAttribute{};
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(C);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kClusterThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Co-resident clusters of C blocks with `smem` bytes each (0: none), queried once per shape.
template <typename Kernel>
int max_active_clusters(Kernel kernel, int dev, int64_t C, size_t smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int64_t, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, C, smem);
  const auto hit = cache.find(key);
  if (hit != cache.end()) return hit->second;
  cudaLaunchAttribute cluster_dim;
  const cudaLaunchConfig_t cfg = cluster_config(C, C, smem, nullptr, &cluster_dim);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) clusters = 0;
  (void)cudaGetLastError();
  cache[key] = clusters;
  return clusters;
}

std::atomic<int64_t> cluster_launches{0};  // ppo_cluster_launches_cuda

// Launches one of the cluster kernels when it applies (see the top of this
// file); false leaves the work to the caller.
template <typename T>
bool launch_cluster(const FusedArgs<T>& a, const PpoLogitsParams& p, cudaStream_t stream) {
  if constexpr (sizeof(T) == 8) {
    return false;  // double (gradcheck) keeps the streaming kernel
  } else {
    const int64_t item = sizeof(T);
    int dev = 0;
    // An error pending from earlier work stays for the caller's check to report.
    if (cluster_slice_bytes() < 16 || cudaPeekAtLastError() != cudaSuccess || cudaGetDevice(&dev) != cudaSuccess ||
        dev >= kMaxDevices || !rows_aligned16(p.logits, p.logits_layout, p.rows, item) ||
        !rows_aligned16(p.grad, p.grad_layout, p.rows, item)) {
      return false;
    }
    const int mode = cluster_mode();
    const auto kernel = mode == kPlain            ? ppo_logits_cluster_kernel<T, kPlain>
                        : mode == kPipelined     ? ppo_logits_cluster_kernel<T, kPipelined>
                        : mode == kDoubleBuffered ? ppo_logits_cluster_kernel<T, kDoubleBuffered>
                        : mode == kStaged        ? ppo_logits_cluster_kernel<T, kStaged>
                                                 : ppo_logits_cluster_kernel<T, kBulk>;
    const ClusterKernelInfo info = cluster_kernel_info(kernel, dev);
    if (!info.usable) return false;
    const int buffers = mode == kDoubleBuffered || mode == kBulk ? 2 : 1;
    const ClusterLayout l = cluster_layout(p.vocab, item, info.max_dynamic_smem, buffers);
    if (l.C == 0) return false;
    const int64_t C = l.C;
    const size_t smem = static_cast<size_t>(l.smem);
    const int clusters_max = max_active_clusters(kernel, dev, C, smem);
    if (clusters_max < 1) return false;
    const int64_t clusters = std::min({p.rows, static_cast<int64_t>(clusters_max), cluster_cap()});
    cudaLaunchAttribute cluster_dim;
    const cudaLaunchConfig_t cfg = cluster_config(C, clusters * C, smem, stream, &cluster_dim);
    const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, a, static_cast<int>(l.slice));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // reported here, not again by the next launch's check
      throw std::runtime_error(std::string("rlhf_kernels: ppo_logits cluster kernel launch failed: ") +
                               cudaGetErrorString(err));
    }
    cluster_launches.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
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
  a.scale = row_scale<Acc>(p.inv_temperature);
  a.old = static_cast<const Acc*>(p.old);
  a.adv = static_cast<const Acc*>(p.adv);
  a.ref = static_cast<const Acc*>(p.ref);
  a.weights = static_cast<const Acc*>(p.weights);
  a.c = ppo_loss::make_fused_consts<Acc>(p);
  a.has_dual = p.has_dual;
  a.kl_kind = p.ref != nullptr ? p.kl_kind : -1;
  a.stats = static_cast<Acc*>(p.stats);
  if (p.grad != nullptr) {
    if (launch_cluster(a, p, stream)) return;
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

void ppo_cluster_layout_cuda(int64_t vocab, int itemsize, int64_t max_smem, int buffers, int64_t* out) {
  if (itemsize != 2 && itemsize != 4) {
    throw std::runtime_error("rlhf_kernels: ppo_cluster_layout_cuda: itemsize must be 2 or 4");
  }
  if (vocab < 1 || vocab > std::numeric_limits<int>::max() || max_smem < 0) {
    throw std::runtime_error("rlhf_kernels: ppo_cluster_layout_cuda: vocab or max_smem out of range");
  }
  if (buffers != 1 && buffers != 2) {
    throw std::runtime_error("rlhf_kernels: ppo_cluster_layout_cuda: buffers must be 1 or 2");
  }
  const gpu::ClusterLayout l = gpu::cluster_layout(vocab, itemsize, max_smem, buffers);
  out[0] = l.C;
  out[1] = l.slice;
  out[2] = l.smem;
}

int64_t ppo_cluster_launches_cuda() { return gpu::cluster_launches.load(std::memory_order_relaxed); }

void ppo_fused_inputs_cuda(const PpoInputsParams& p, void* stream) {
  ppo_loss::check_inputs(p, "ppo_fused_inputs_cuda");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  ppo_loss::visit_inputs(p, [&](auto label_t, auto mask_t, auto acc_t) {
    gpu::ppo_fused_inputs_kernel<decltype(label_t), decltype(mask_t), decltype(acc_t)>
        <<<1, gpu::kInputsThreads, 0, s>>>(p);
  });
  gpu::check_launch("ppo_fused_inputs_kernel");
}

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
