// CUDA kernels of masked whitening and GRPO group advantages; ppo.h states
// the math.
//
// masked_whiten, three launches on the caller's stream (no host sync):
//   1. whiten_partial_kernel, grid cdiv(n, kWhitenChunk), 256 threads: block c
//      owns the chunk [c kWhitenChunk, (c + 1) kWhitenChunk); thread t holds
//      the 16 elements c kWhitenChunk + i 256 + t (coalesced) in registers,
//      the block reduces (count, sum), then the squared deviations from the
//      chunk mean (two-pass), and writes (count, mean, M2). Reads
//      n (itemsize + 1) bytes.
//   2. whiten_merge_kernel, one block of 256 threads: thread t merges the
//      partials t, t + 256, ... in order (Chan's pairwise update, int64
//      counts), then a fixed shared-memory tree merges the 256 states; writes
//      stats = (count, mean, var, rstd). Reads 3 values per partial.
//   3. whiten_apply_kernel, grid-stride elementwise: out = (x - mean) rstd
//      (+ mean). Reads n itemsize bytes, writes n sizeof(A).
// Every reduction order is fixed by n alone: the result is deterministic.
//
// grpo_advantages: one warp per group (8 per block, grid-stride over groups);
// the lanes stride over the group's scores for the sum, then the squared
// deviations (xor-butterfly reductions: every lane gets the same bits), then
// write. Offsets are clamped to [0, n]; all indices int64.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "ppo.h"

namespace rlhf {
namespace gpu {
namespace {

constexpr int kWhitenThreads = 256;
constexpr int kWhitenItems = static_cast<int>(kWhitenChunk) / kWhitenThreads;
constexpr int kGrpoWarps = 8;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride beyond this

template <typename A>
struct Moments {
  long long n;
  A mean;
  A m2;
};

template <typename A>
__device__ __forceinline__ Moments<A> chan_merge(const Moments<A>& a, const Moments<A>& b) {
  Moments<A> r{a.n + b.n, A(0), A(0)};
  if (r.n == 0) return r;
  const A w = static_cast<A>(b.n) / static_cast<A>(r.n);
  const A d = b.mean - a.mean;
  r.mean = a.mean + d * w;
  r.m2 = a.m2 + b.m2 + d * d * static_cast<A>(a.n) * w;
  return r;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum over the block in a fixed order (butterfly per warp, then warp 0 over
// the per-warp sums); every thread gets the result.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* shared) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  V total = lane < kWhitenThreads / kWarpSize ? shared[lane] : V(0);
  total = warp_sum(total);
  __syncthreads();  // shared is reused by the next call
  return total;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kWhitenThreads) whiten_partial_kernel(const T* __restrict__ x,
                                                                        const uint8_t* __restrict__ mask,
                                                                        int64_t n, A* __restrict__ partials,
                                                                        int64_t n_parts) {
  __shared__ A shared_a[kWhitenThreads / kWarpSize];
  __shared__ int shared_i[kWhitenThreads / kWarpSize];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kWhitenChunk + threadIdx.x;
  A v[kWhitenItems];
  int count = 0;
  A sum = A(0);
#pragma unroll
  for (int i = 0; i < kWhitenItems; ++i) {
    const int64_t idx = base + static_cast<int64_t>(i) * kWhitenThreads;
    const bool valid = idx < n && mask[idx] != 0;
    v[i] = valid ? to_acc(x[idx]) : A(0);
    count += valid;
    sum += v[i];
  }
  count = block_sum(count, shared_i);
  sum = block_sum(sum, shared_a);
  const A mean = sum / static_cast<A>(count > 1 ? count : 1);
  A m2 = A(0);
#pragma unroll
  for (int i = 0; i < kWhitenItems; ++i) {
    const int64_t idx = base + static_cast<int64_t>(i) * kWhitenThreads;
    const A d = idx < n && mask[idx] != 0 ? v[i] - mean : A(0);
    m2 += d * d;
  }
  m2 = block_sum(m2, shared_a);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = static_cast<A>(count);
    partials[n_parts + blockIdx.x] = mean;
    partials[2 * n_parts + blockIdx.x] = m2;
  }
}

template <typename A>
__global__ void __launch_bounds__(kWhitenThreads) whiten_merge_kernel(const A* __restrict__ partials,
                                                                      int64_t n_parts, double eps,
                                                                      A* __restrict__ stats) {
  __shared__ Moments<A> shared[kWhitenThreads];
  Moments<A> m{0, A(0), A(0)};
  for (int64_t i = threadIdx.x; i < n_parts; i += kWhitenThreads) {
    const Moments<A> part{static_cast<long long>(partials[i]), partials[n_parts + i], partials[2 * n_parts + i]};
    m = chan_merge(m, part);
  }
  shared[threadIdx.x] = m;
  __syncthreads();
  for (int stride = kWhitenThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] = chan_merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const Moments<A> total = shared[0];
    const A var = total.m2 / static_cast<A>(total.n > 1 ? total.n - 1 : 1);
    stats[0] = static_cast<A>(total.n);
    stats[1] = total.mean;
    stats[2] = var;
    stats[3] = A(1) / sqrt(var + static_cast<A>(eps));
  }
}

template <typename T, typename A>
__global__ void whiten_apply_kernel(const T* __restrict__ x, const A* __restrict__ stats, int64_t n,
                                    bool shift_mean, A* __restrict__ out) {
  const A mean = stats[1], rstd = stats[3];
  const A back = shift_mean ? A(0) : mean;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    out[i] = (to_acc(x[i]) - mean) * rstd + back;
  }
}

template <typename A>
__global__ void __launch_bounds__(kGrpoWarps * kWarpSize) grpo_kernel(const A* __restrict__ s,
                                                                       const int64_t* __restrict__ offsets,
                                                                       int64_t n, int64_t groups, bool norm_by_std,
                                                                       double eps, A* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGrpoWarps + threadIdx.x / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kGrpoWarps;
  for (int64_t g = first; g < groups; g += step) {
    const int64_t lo = offsets[g], hi = offsets[g + 1];
    const int64_t begin = lo < 0 ? 0 : (lo > n ? n : lo);
    const int64_t end = hi < begin ? begin : (hi > n ? n : hi);
    const int64_t size = end - begin;
    A sum = A(0);
    for (int64_t i = begin + lane; i < end; i += kWarpSize) sum += s[i];
    const A mean = warp_sum(sum) / static_cast<A>(size > 1 ? size : 1);
    A scale = A(1);  // one division per group (a double division is a called slow path)
    if (norm_by_std) {
      A m2 = A(0);
      for (int64_t i = begin + lane; i < end; i += kWarpSize) m2 += (s[i] - mean) * (s[i] - mean);
      m2 = warp_sum(m2);
      scale = A(1) / ((size > 1 ? sqrt(m2 / static_cast<A>(size - 1)) : A(1)) + static_cast<A>(eps));
    }
    for (int64_t i = begin + lane; i < end; i += kWarpSize) out[i] = (s[i] - mean) * scale;
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : (b < kMaxBlocks ? b : kMaxBlocks));
}

template <typename T>
void launch_whiten(const WhitenParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t n_parts = (p.n + kWhitenChunk - 1) / kWhitenChunk;
  const T* x = static_cast<const T*>(p.x);
  A* partials = static_cast<A*>(p.partials);
  A* stats = static_cast<A*>(p.stats);
  if (n_parts > 2147483647) throw std::runtime_error("rlhf_kernels: masked_whiten_cuda: x too large");
  if (n_parts > 0) {
    whiten_partial_kernel<T, A>
        <<<static_cast<unsigned>(n_parts), kWhitenThreads, 0, stream>>>(x, p.mask, p.n, partials, n_parts);
    check_launch("masked_whiten partial kernel launch");
  }
  whiten_merge_kernel<A><<<1, kWhitenThreads, 0, stream>>>(partials, n_parts, p.eps, stats);
  check_launch("masked_whiten merge kernel launch");
  if (p.n > 0) {
    whiten_apply_kernel<T, A><<<blocks_for(p.n, 4 * kWhitenThreads), kWhitenThreads, 0, stream>>>(
        x, stats, p.n, p.shift_mean, static_cast<A*>(p.out));
    check_launch("masked_whiten apply kernel launch");
  }
}

template <typename A>
void launch_grpo(const GrpoParams& p, cudaStream_t stream) {
  grpo_kernel<A><<<blocks_for(p.groups, kGrpoWarps), kGrpoWarps * kWarpSize, 0, stream>>>(
      static_cast<const A*>(p.scores), p.offsets, p.n, p.groups, p.norm_by_std, p.eps, static_cast<A*>(p.out));
  check_launch("grpo_advantages kernel launch");
}

}  // namespace
}  // namespace gpu

void masked_whiten_cuda(const WhitenParams& p, void* stream) {
  if (p.n < 0) throw std::runtime_error("rlhf_kernels: masked_whiten_cuda: negative n");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: return gpu::launch_whiten<float>(p, s);
    case ScalarKind::Float16: return gpu::launch_whiten<__half>(p, s);
    case ScalarKind::BFloat16: return gpu::launch_whiten<__nv_bfloat16>(p, s);
    case ScalarKind::Float64: return gpu::launch_whiten<double>(p, s);
  }
  throw std::runtime_error("rlhf_kernels: masked_whiten_cuda: unsupported dtype");
}

void grpo_advantages_cuda(const GrpoParams& p, void* stream) {
  if (p.n < 0 || p.groups < 0) throw std::runtime_error("rlhf_kernels: grpo_advantages_cuda: negative size");
  if (p.n == 0 || p.groups == 0) return;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: return gpu::launch_grpo<float>(p, s);
    case ScalarKind::Float64: return gpu::launch_grpo<double>(p, s);
    default: throw std::runtime_error("rlhf_kernels: grpo_advantages_cuda: dtype must be float32 or float64");
  }
}

}  // namespace rlhf
