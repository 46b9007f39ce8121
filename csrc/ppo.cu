// CUDA kernel of GAE (generalized advantage estimation) with response-mask
// skip semantics. ppo.h states the math; the segment summaries, their combine
// rules and the per-lane passes are in ppo_scan.h, shared with host-side
// emulations of the warp algorithm below.
//
// Design:
//   * One warp per row, kWarps rows per block, grid-stride over rows. The
//     row is cut into chunks of kChunk = 32 * K positions aligned to the row
//     start (chunk j = [j * kChunk, (j + 1) * kChunk), the last one partial)
//     and walked from the last chunk to the first, carrying the recursion's
//     state (next value, advantage) from each chunk into the one on its left.
//     Lane l owns the K consecutive positions j * kChunk + l * K + [0, K):
//     16 bytes of each floating input per lane (K = 4 float, 2 double), one
//     fully coalesced 16-byte load per array per chunk.
//   * Per chunk: (1) each lane summarises its K positions' "nearest valid
//     value" (NextSum: has a valid position, value at the leftmost one); the
//     next value arriving at lane l is that of the nearest lane above l with
//     a valid position, else the carry: one ballot plus one shuffle (the
//     reverse scan of NextSum collapses to "find the nearest set bit");
//     (2) each lane turns its rewards into TD errors and composes its K
//     affine maps x -> delta + gamma * lam * x (masked: identity), higher t
//     first; a reverse inclusive Hillis-Steele scan (__shfl_down_sync: lane
//     l composes its map after those of lanes l + 1 .. 31, i.e. applies
//     theirs first) applied to the advantage carry gives the advantage
//     leaving each lane on its left, shifted down one lane to give the one
//     arriving at each lane; (3) each lane replays its K positions
//     sequentially (the header's pseudo-code) and writes advantages and
//     returns. Lane 0's final state (next value, advantage at the chunk's
//     first position) is broadcast as the carry for the next chunk.
//   * The next chunk's inputs are loaded before the current one is scanned
//     (software pipelining), so each warp keeps one chunk of loads in flight
//     while it computes. 16 rather than 32 bytes per lane keeps the kernel
//     within 64 registers (4 resident blocks per SM) with that prefetch.
//   * Vector (16-byte) loads / stores are used per array when its row start
//     is 16-byte aligned (the mask: K-byte aligned) and the lane's K
//     positions are inside the row; otherwise scalar accesses (sliced inputs
//     with odd row strides, the row's last partial chunk).
//   * Row offsets and positions are int64.
// Numerics: the recursion runs in the input type (float or double). Within a
// lane the advantage is computed exactly as the sequential pseudo-code; the
// value arriving at a lane comes from the scan, i.e. a reassociated (and
// FMA-contracted) evaluation of the same sums, so results match the
// sequential CPU kernel to rounding, not bitwise. Masked positions copy the
// advantage arriving from the right exactly.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ppo.h"
#include "ppo_scan.h"

namespace rlhf {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kMask = 0xffffffffu;
constexpr int kWarps = 8;  // rows per block
constexpr int kThreads = kWarps * kWarp;
// 4 resident blocks (32 warps, <= 64 registers) per SM: B = 4096 rows fit in
// a single wave on an H100 (132 SMs x 32 warps = 4224 rows at once).
constexpr int kMinBlocks = 4;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

// Positions per lane: 16 bytes of each floating input.
template <typename T>
constexpr int kPerLane = 16 / static_cast<int>(sizeof(T));

template <typename T>
struct GaeArgs {
  const T* rewards;
  int64_t rewards_stride;
  const T* values;
  int64_t values_stride;
  const uint8_t* mask;  // or nullptr: all valid
  int64_t mask_stride;
  int64_t batch;
  int64_t time;
  T gamma;
  T gamma_lam;
  T* advantages;  // contiguous [batch, time]
  T* returns;     // contiguous [batch, time]
};

// One lane's K positions of one chunk.
template <typename T>
struct LaneIn {
  T rew[kPerLane<T>];
  T val[kPerLane<T>];
  unsigned bits;  // bit k: position k valid
};

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// 16 bytes at p (16-byte aligned).
__device__ __forceinline__ void load16(const float* p, float (&out)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
}
__device__ __forceinline__ void load16(const double* p, double (&out)[2]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  out[0] = a.x; out[1] = a.y;
}
__device__ __forceinline__ void store16(float* p, const float (&in)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
}
__device__ __forceinline__ void store16(double* p, const double (&in)[2]) {
  *reinterpret_cast<double2*>(p) = make_double2(in[0], in[1]);
}

// K mask bytes at p (K-byte aligned) -> validity bits (nonzero byte: valid).
template <int K>
__device__ __forceinline__ unsigned mask_bits(const uint8_t* p) {
  static_assert(K == 4 || K == 2, "mask_bits: K must be 4 or 2");
  const unsigned w = K == 4 ? *reinterpret_cast<const unsigned*>(p)
                            : static_cast<unsigned>(*reinterpret_cast<const unsigned short*>(p));
  unsigned bits = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) bits |= ((w >> (8 * k)) & 0xffu) ? (1u << k) : 0u;
  return bits;
}

// Per-row access plan: row pointers and which arrays take vector accesses.
template <typename T>
struct RowPtrs {
  const T* rew;
  const T* val;
  const uint8_t* mask;  // or nullptr
  T* adv;
  T* ret;
  bool vec_rew, vec_val, vec_mask, vec_out;
};

// Loads the K positions t0 .. t0 + K - 1 (t0 a multiple of K); positions at
// or past `time` read nothing and are invalid.
template <typename T>
__device__ __forceinline__ void load_lane(const RowPtrs<T>& r, int64_t t0, int64_t time,
                                          LaneIn<T>& in) {
  constexpr int K = kPerLane<T>;
  if (t0 + K <= time) {
    if (r.vec_rew) {
      load16(r.rew + t0, in.rew);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) in.rew[k] = r.rew[t0 + k];
    }
    if (r.vec_val) {
      load16(r.val + t0, in.val);
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) in.val[k] = r.val[t0 + k];
    }
    if (r.mask == nullptr) {
      in.bits = (1u << K) - 1u;
    } else if (r.vec_mask) {
      in.bits = mask_bits<K>(r.mask + t0);
    } else {
      unsigned bits = 0;
#pragma unroll
      for (int k = 0; k < K; ++k) bits |= r.mask[t0 + k] ? (1u << k) : 0u;
      in.bits = bits;
    }
  } else {
    unsigned bits = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t t = t0 + k;
      const bool inside = t < time;
      in.rew[k] = inside ? r.rew[t] : T(0);
      in.val[k] = inside ? r.val[t] : T(0);
      if (inside && (r.mask == nullptr || r.mask[t])) bits |= 1u << k;
    }
    in.bits = bits;
  }
}

template <typename T>
__device__ __forceinline__ void store_lane(const RowPtrs<T>& r, int64_t t0, int64_t time,
                                           const T (&adv)[kPerLane<T>],
                                           const T (&ret)[kPerLane<T>]) {
  constexpr int K = kPerLane<T>;
  if (t0 + K <= time && r.vec_out) {
    store16(r.adv + t0, adv);
    store16(r.ret + t0, ret);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (t0 + k < time) {
        r.adv[t0 + k] = adv[k];
        r.ret[t0 + k] = ret[k];
      }
    }
  }
}

// Reverse inclusive scan of the lanes' maps: lane l ends with
// f_l o f_(l+1) o ... o f_31, i.e. the map of all positions from its own to
// the chunk's end (higher lanes applied first). Hillis-Steele over offsets
// 1 .. 16; shfl_down leaves lanes l + off > 31 their own value, unused.
template <typename T>
__device__ __forceinline__ gae::Affine<T> warp_suffix_scan(gae::Affine<T> f, int lane) {
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const gae::Affine<T> o{__shfl_down_sync(kMask, f.c, off), __shfl_down_sync(kMask, f.d, off)};
    if (lane + off < kWarp) f = gae::affine_combine(f, o);
  }
  return f;
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------
// Grid: min(ceil(batch / kWarps), 2^31 - 1) blocks of kWarps warps; warp w of
// block b owns rows b * kWarps + w, + gridDim.x * kWarps, ... and writes
// advantages[row, :] and returns[row, :].
// Bytes per row: reads T * (2 * sizeof(T) + 1) (rewards, values, mask; no
// mask byte when mask is absent), writes 2 * T * sizeof(T): 17 bytes per
// position for float with a mask. Each byte is read or written once (chunks
// do not overlap); a warp's 16-byte accesses to an array are one contiguous
// 512-byte span.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gae_kernel(const GaeArgs<T> a) {
  constexpr int K = kPerLane<T>;
  constexpr int64_t kChunk = int64_t(kWarp) * K;
  static_assert((kChunk & (kChunk - 1)) == 0, "kChunk must be a power of two");
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int64_t time = a.time;
  const T gamma = a.gamma;
  const T gamma_lam = a.gamma_lam;

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp; row < a.batch;
       row += static_cast<int64_t>(gridDim.x) * kWarps) {
    RowPtrs<T> r;
    r.rew = a.rewards + row * a.rewards_stride;
    r.val = a.values + row * a.values_stride;
    r.mask = a.mask != nullptr ? a.mask + row * a.mask_stride : nullptr;
    r.adv = a.advantages + row * time;
    r.ret = a.returns + row * time;
    r.vec_rew = aligned_to(r.rew, 16);
    r.vec_val = aligned_to(r.val, 16);
    r.vec_mask = r.mask != nullptr && aligned_to(r.mask, K);
    r.vec_out = aligned_to(r.adv, 16) && aligned_to(r.ret, 16);

    // Start of the last chunk (kChunk is a power of two: no int64 division).
    int64_t t0 = ((time - 1) & ~(kChunk - 1)) + static_cast<int64_t>(lane) * K;
    LaneIn<T> cur;
    load_lane(r, t0, time, cur);
    T nv = T(0);  // next value arriving from the right of the chunk
    T g = T(0);   // advantage arriving from the right of the chunk
    for (;;) {
      const bool more = t0 >= kChunk;  // warp-uniform: a chunk on the left
      LaneIn<T> nxt;
      if (more) load_lane(r, t0 - kChunk, time, nxt);

      // (1) next value arriving at this lane.
      const gae::NextSum<T> ns = gae::lane_next<K>(cur.bits, cur.val);
      const int src = gae::next_source_lane(__ballot_sync(kMask, ns.has), lane);
      const T v_src = __shfl_sync(kMask, ns.v, src < 0 ? lane : src);
      const T nv_in = src < 0 ? nv : v_src;
      // (2) TD errors and the advantage arriving at this lane.
      const gae::Affine<T> f = gae::lane_deltas<K>(cur.bits, cur.val, cur.rew, nv_in, gamma,
                                                    gamma_lam);
      const T g_left = gae::affine_apply(warp_suffix_scan(f, lane), g);
      const T g_above = __shfl_down_sync(kMask, g_left, 1);
      const T g_in = lane + 1 < kWarp ? g_above : g;
      // (3) replay and write.
      T adv[K], ret[K];
      const T g_out = gae::lane_replay<K>(cur.bits, cur.val, cur.rew, g_in, gamma_lam, adv, ret);
      store_lane(r, t0, time, adv, ret);

      if (!more) break;
      nv = __shfl_sync(kMask, gae::next_apply(ns, nv_in), 0);
      g = __shfl_sync(kMask, g_out, 0);
      cur = nxt;
      t0 -= kChunk;
    }
  }
}

// ---------------------------------------------------------------------------
// Launcher
// ---------------------------------------------------------------------------

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

template <typename T>
void launch_gae(const GaeParams& p, cudaStream_t stream) {
  GaeArgs<T> a;
  a.rewards = static_cast<const T*>(p.rewards);
  a.rewards_stride = p.rewards_row_stride;
  a.values = static_cast<const T*>(p.values);
  a.values_stride = p.values_row_stride;
  a.mask = p.mask;
  a.mask_stride = p.mask_row_stride;
  a.batch = p.batch;
  a.time = p.time;
  // As verl (torch): gamma * next_value in the tensor's type, and gamma * lam
  // formed in double (Python floats) before it meets the tensor.
  a.gamma = static_cast<T>(p.gamma);
  a.gamma_lam = static_cast<T>(p.gamma * p.lam);
  a.advantages = static_cast<T*>(p.advantages);
  a.returns = static_cast<T*>(p.returns);
  const int64_t blocks = (p.batch + kWarps - 1) / kWarps;
  const dim3 grid(static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid));
  gae_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  check_launch("gae kernel launch");
}

}  // namespace
}  // namespace gpu

void gae_cuda(const GaeParams& p, void* stream) {
  if (p.batch < 0 || p.time < 0) {
    throw std::runtime_error("rlhf_kernels: gae_cuda: negative batch or time");
  }
  if (p.batch == 0 || p.time == 0) return;  // nothing to do (a 0-block launch is an error)
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: gpu::launch_gae<float>(p, s); break;
    case ScalarKind::Float64: gpu::launch_gae<double>(p, s); break;
    default: throw std::runtime_error("rlhf_kernels: gae_cuda: dtype must be float32 or float64");
  }
}

}  // namespace rlhf
