// CUDA kernels for token log-probs (+ optional entropy) and their backward.
// The math and the treatment of ignored / out-of-range labels are stated in
// logprobs.h; the device helpers (online log-sum-exp state, 16-byte vectors)
// are in common.cuh.
//
// Design:
//   * One 256-thread block per row (the backward: per part of a row, parts of
//     kDefaultPartCols columns by default, see bwd_parts; the forward with
//     RLHF_KERNELS_FWD_PART_COLS set too, see fwd_parts), grid-stride over
//     rows. 256 rather than
//     512: the row loop is bandwidth bound and gets its memory parallelism
//     from several resident blocks per SM plus two 16-byte loads in flight
//     per thread; smaller blocks give finer occupancy granularity, a shorter
//     reduction tail and less idle time on the ragged last iteration of a row
//     (V = 32k bf16 rows are only 4k vectors, 16 per thread at 256).
//   * Row starts can have any alignment (odd V, sliced or transposed leading
//     dims): each row is cut into a scalar head up to the first 16-byte
//     boundary, an aligned body of 16-byte vectors and a scalar tail
//     (split_row in common.cuh).
//   * Row offsets are int64 (rows * V may exceed 2^31), computed as
//     RowLayout::offset does but with host-precomputed multiply-high
//     divisions (FastRowLayout in common.cuh): a device int64 division is a
//     subroutine call. Offsets inside a row are int, which the launchers
//     guarantee by requiring V <= 2^30 (so that index + 4 * blockDim never
//     overflows).
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "common.cuh"
#include "logprobs.h"

namespace rlhf {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxVocab = int64_t(1) << 30;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

// Left to itself ptxas packs the forward kernels into <= 32 registers (full
// occupancy) without spilling, except for double, whose exp() polynomial then
// spills a few bytes; asking for 4 resident blocks lets it use up to 64.
// 0 means "no minimum" (no .minnctapersm is emitted).
template <typename T>
constexpr int kFwdMinBlocks = sizeof(T) == 8 ? 4 : 0;
// The sequence kernel keeps its item's bounds, sum and count live across the
// row loop: 64 registers are a few short for double, so ask for 2 blocks (128).
template <typename T>
constexpr int kSeqMinBlocks = sizeof(T) == 8 ? 2 : 0;
// The backward with column parts keeps the part's bounds and the item's
// division live as well: for double sm_90 then settles on 48 registers and
// spills (at 64 too); 2 resident blocks allow 128. (Without parts: no hint.)
template <typename T>
constexpr int kBwdMinBlocks = sizeof(T) == 8 ? 2 : 0;

template <typename T>
struct FwdArgs {
  const T* logits;
  FastRowLayout layout;
  int64_t rows;
  int vocab;
  const int64_t* labels;
  int64_t ignore_index;
  acc_t<T> scale;  // row_scale(1 / T): logits to base-2 units
  acc_t<T>* logprobs;
  acc_t<T>* lse;
  acc_t<T>* entropy;  // used only when the kernel's kEntropy is true
  // logprobs_fwd_parts_kernel only:
  int parts;              // column parts per row (> 1)
  int part_vecs;          // RowPart::pv
  FastDivU64 div_parts;   // item / parts
  acc_t<T>* part_states;  // [rows * parts * 3]: (m, s, w) of each part
  unsigned* part_arrived; // [rows]: parts done, zeroed before the launch
};

template <typename T>
struct BwdArgs {
  const T* logits;  // not __restrict__: may alias grad (in-place backward)
  FastRowLayout logits_layout;
  T* grad;
  FastRowLayout grad_layout;
  int64_t rows;
  int vocab;
  const int64_t* labels;
  int64_t ignore_index;
  acc_t<T> inv_t;
  acc_t<T> scale;  // row_scale(1 / T)
  const acc_t<T>* lse;
  const acc_t<T>* entropy;       // used only when kEntropy
  const acc_t<T>* grad_logprobs;
  const acc_t<T>* grad_entropy;  // used only when kEntropy
  int parts;                     // column parts per row (1: a block per row)
  int part_vecs;                 // RowPart::pv
  FastDivU64 div_parts;          // item / parts
};

template <typename T>
struct SeqFwdArgs {
  const T* logits;
  FastRowLayout layout;
  int64_t items;     // batch * n_chunks
  int64_t time;      // tokens per sequence
  int64_t chunk;     // tokens per item
  int64_t n_chunks;  // items per sequence
  int vocab;
  const int64_t* labels;
  int64_t ignore_index;
  acc_t<T> scale;  // row_scale(1 / T)
  acc_t<T>* lse;
  acc_t<T>* partial;  // [items]
  int32_t* count;     // [items]
};

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// A row's outputs, written by one thread.
template <bool kEntropy, typename T>
__device__ __forceinline__ void write_row(const FwdArgs<T>& a, int64_t row, acc_t<T> logprob, acc_t<T> lse,
                                          acc_t<T> entropy) {
  a.logprobs[row] = logprob;
  a.lse[row] = lse;
  if (kEntropy) a.entropy[row] = entropy;
}

// The outputs of a row the kernels skip: 0 for an ignored label, NaN for one outside [0, V).
template <bool kEntropy, typename T>
__device__ __forceinline__ void write_skipped_row(const FwdArgs<T>& a, int64_t row, int64_t y) {
  const acc_t<T> v = (y == a.ignore_index) ? acc_t<T>(0) : quiet_nan<acc_t<T>>();
  write_row<kEntropy>(a, row, v, v, v);
}

// Grid: min(rows, 2^31 - 1) blocks of kThreads threads; block b owns rows
// b, b + gridDim.x, ... and writes logprobs/lse/entropy[row].
// Per row: reads V * sizeof(T) bytes of logits (once, plus one scalar re-read
// of the label's logit, normally an L2 hit) and 8 bytes of label; writes 2 or
// 3 accumulation-type scalars. Ignored / out-of-range rows read no logits.
// Each thread streams its share of the row through an OnlineLSE state; the
// states are merged across the block; thread 0 writes the outputs. kStream: the
// logits are read with ld_stream16 (RLHF_KERNELS_LOAD_HINT=1; common.cuh).
template <typename T, bool kEntropy, bool kStream>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks<T>)
    logprobs_fwd_kernel(const FwdArgs<T> a) {
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, kEntropy>;
  __shared__ State smem[kThreads / kWarpSize];

  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc scale = a.scale;

  for (int64_t row = static_cast<int64_t>(blockIdx.x); row < a.rows; row += gridDim.x) {
    const int64_t y = a.labels[row];
    // The branch is uniform over the block (same row), so `continue` keeps
    // every thread in step for the barriers of block_reduce.
    if (y == a.ignore_index || y < 0 || y >= V) {
      if (tid == 0) write_skipped_row<kEntropy>(a, row, y);
      continue;
    }

    const T* x = a.logits + a.layout.offset(row);
    // Issued now so that its latency hides behind the streaming loop.
    Acc z_label = Acc(0);
    if (tid == 0) z_label = mul_rn(to_acc(x[static_cast<int>(y)]), scale);

    const State st = stream_row<kThreads, T, kEntropy, kStream>(x, V, scale, smem);

    if (tid == 0) {
      const RowStats<Acc> r = row_stats(st, z_label);
      write_row<kEntropy>(a, row, r.logprob, r.lse, r.entropy);
    }
  }
}

// The forward with column parts (RLHF_KERNELS_FWD_PART_COLS; fwd_parts). Grid:
// min(rows * parts, 2^31 - 1) blocks; item i is part i % parts of row i / parts,
// so consecutive blocks stream consecutive pieces of one row, as the backward's
// parts do (which took the H100's backward from 2.61 to 2.77 TB/s). Each part
// streams its columns into an OnlineLSE state; thread 0 stores it, makes it
// visible (__threadfence) and counts the part in part_arrived[row]; the block
// that counts the row's last part merges the row's states in part order (so
// the bits do not depend on which part finished last), reads the label's
// logit and writes the row's outputs (the launcher zeroes the counts before
// each launch). Ignored and
// out-of-range rows: part 0 writes the outputs, nothing is counted.
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks<T>)
    logprobs_fwd_parts_kernel(const FwdArgs<T> a) {
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, kEntropy>;
  __shared__ State smem[kThreads / kWarpSize];

  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc scale = a.scale;
  const int64_t items = a.rows * a.parts;

  for (int64_t item = static_cast<int64_t>(blockIdx.x); item < items; item += gridDim.x) {
    const int64_t row = static_cast<int64_t>(a.div_parts.div(static_cast<uint64_t>(item)));
    RowPart rp;
    rp.part = static_cast<int>(item - row * a.parts);
    rp.parts = a.parts;
    rp.pv = a.part_vecs;
    const int64_t y = a.labels[row];
    if (y == a.ignore_index || y < 0 || y >= V) {  // uniform over the block
      if (tid == 0 && rp.first()) write_skipped_row<kEntropy>(a, row, y);
      continue;
    }
    const T* x = a.logits + a.layout.offset(row);
    const State st = stream_row<kThreads, T, kEntropy, false, true>(x, V, scale, smem, rp);
    if (tid == 0) {
      Acc* mine = a.part_states + item * 3;
      mine[0] = st.m;
      mine[1] = st.s;
      mine[2] = kEntropy ? st.w : Acc(0);
      __threadfence();  // the state before the count that announces it
      if (atomicAdd(a.part_arrived + row, 1u) == static_cast<unsigned>(a.parts - 1)) {
        __threadfence();  // every part's state after the count that saw them all
        const Acc* states = a.part_states + row * a.parts * 3;
        State merged;
        merged.reset();
        for (int q = 0; q < a.parts; ++q) {  // (L2 loads: other SMs wrote them)
          merged.merge(__ldcg(states + 3 * q), __ldcg(states + 3 * q + 1), __ldcg(states + 3 * q + 2));
        }
        const Acc z_label = mul_rn(to_acc(x[static_cast<int>(y)]), scale);
        const RowStats<Acc> r = row_stats(merged, z_label);
        write_row<kEntropy>(a, row, r.logprob, r.lse, r.entropy);
      }
    }
  }
}

// sequence_logprobs (logprobs.h, SeqLogprobsFwdParams).
// Grid: min(items, 2^31 - 1) blocks of kThreads threads, items = B * n_chunks;
// block b owns items b, b + gridDim.x, ...: item i covers the tokens
// [c * chunk, min(T, (c + 1) * chunk)) of sequence i / n_chunks (c = i % n_chunks),
// visited in order. Per kept token it reads V * sizeof(T) bytes of logits and
// writes lse (as the token forward); per item it writes one partial sum and
// one count, so the only per-sequence traffic besides the logits is
// n_chunks * (sizeof(Acc) + 4) bytes, summed afterwards in a fixed order.
// Thread 0 accumulates the item's sum in the accumulation type, token by
// token: the order is fixed, so the result is bitwise reproducible.
template <typename T>
__global__ void __launch_bounds__(kThreads, kSeqMinBlocks<T>) seq_logprobs_fwd_kernel(const SeqFwdArgs<T> a) {
  using Acc = acc_t<T>;
  using State = OnlineLSE<Acc, false>;
  __shared__ State smem[kThreads / kWarpSize];

  const int tid = static_cast<int>(threadIdx.x);
  const int V = a.vocab;
  const Acc scale = a.scale;

  for (int64_t item = static_cast<int64_t>(blockIdx.x); item < a.items; item += gridDim.x) {
    const int64_t seq = item / a.n_chunks;
    const int64_t t0 = (item - seq * a.n_chunks) * a.chunk;
    const int64_t t1 = t0 + a.chunk < a.time ? t0 + a.chunk : a.time;
    Acc sum = Acc(0);  // meaningful in thread 0
    int count = 0;
    for (int64_t row = seq * a.time + t0, end = seq * a.time + t1; row < end; ++row) {
      const int64_t y = a.labels[row];
      // Uniform over the block (same row): `continue` keeps the barriers in step.
      if (y == a.ignore_index) {
        if (tid == 0) a.lse[row] = Acc(0);
        continue;
      }
      ++count;
      if (y < 0 || y >= V) {
        if (tid == 0) {
          a.lse[row] = quiet_nan<Acc>();
          sum = quiet_nan<Acc>();
        }
        continue;
      }
      const T* x = a.logits + a.layout.offset(row);
      Acc z_label = Acc(0);
      if (tid == 0) z_label = mul_rn(to_acc(x[static_cast<int>(y)]), scale);

      const State st = stream_row<kThreads>(x, V, scale, smem);

      if (tid == 0) {
        const RowStats<Acc> r = row_stats(st, z_label);
        a.lse[row] = r.lse;
        sum += r.logprob;
      }
    }
    if (tid == 0) {
      a.partial[item] = sum;
      a.count[item] = count;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// Grid: min(rows * parts, 2^31 - 1) blocks of kThreads threads; block b owns
// the items b, b + gridDim.x, ...; item i is part i % parts (RowPart) of row
// i / parts, so consecutive blocks stream consecutive pieces of one row, as a
// copy does (parts = 1: a block per row; see bwd_parts). Per row: reads V *
// sizeof(T) bytes of logits and writes V * sizeof(T) bytes of gradient, plus
// a few scalars per item (label, lse, g, and H, gH with the entropy term).
// Ignored / out-of-range rows only write (zeros / NaN). Every element is read
// and then written by the same thread with no other thread touching it, so
// grad == logits (in place, same layout) is safe.
// kParts: a.parts > 1 (without it, the block-per-row kernel as it was before
// parts: 32 registers for bf16 on sm_90, where kParts takes 38-40).
template <typename T, bool kEntropy, bool kParts>
__global__ void __launch_bounds__(kThreads, kParts ? kBwdMinBlocks<T> : 0)
    logprobs_bwd_kernel(const BwdArgs<T> a) {
  using Acc = acc_t<T>;
  const int V = a.vocab;
  const int64_t items = kParts ? a.rows * a.parts : a.rows;

  for (int64_t item = static_cast<int64_t>(blockIdx.x); item < items; item += gridDim.x) {
    const int64_t row = kParts ? static_cast<int64_t>(a.div_parts.div(static_cast<uint64_t>(item))) : item;
    RowPart rp;
    if (kParts) {
      rp.part = static_cast<int>(item - row * a.parts);
      rp.parts = a.parts;
      rp.pv = a.part_vecs;
    }
    const int64_t y = a.labels[row];
    T* out = a.grad + a.grad_layout.offset(row);
    if (y == a.ignore_index || y < 0 || y >= V) {
      fill_row<kThreads, kParts>(out, V, (y == a.ignore_index) ? Acc(0) : quiet_nan<Acc>(), rp);
      continue;
    }

    const T* x = a.logits + a.logits_layout.offset(row);
    const GradOp<Acc, kEntropy> op = GradOp<Acc, kEntropy>::make(
        lse2_from_nats(a.lse[row]), a.grad_logprobs[row], kEntropy ? a.grad_entropy[row] : Acc(0),
        kEntropy ? a.entropy[row] : Acc(0), a.inv_t, a.scale, static_cast<int>(y));
    grad_row<kThreads, kParts>(x, out, V, op, rp);
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

void check_shape(int64_t rows, int64_t vocab, const char* what) {
  if (rows < 0 || vocab < 0) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + ": negative rows or vocab");
  }
  if (vocab > kMaxVocab) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what +
                             ": vocab size above 2^30 is not supported");
  }
}

void check_layout(const RowLayout& l, const char* what) {
  if (l.size1 < 1 || l.size2 < 1) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what +
                             ": row layout sizes must be >= 1");
  }
}

unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGrid ? rows : kMaxGrid);
}

// Column parts per row of the backward: RLHF_KERNELS_BWD_PART_COLS columns a
// part (rounded up to whole rounds of the block's 16-byte vectors, two per
// thread), 0 for a block per row, unset for kDefaultPartCols
// (rlhf_kernels/triton/logprobs.py: bwd_part_cols has the Triton kernel's knob
// of the same name). Returns {parts, vectors per part}; one part when the row
// fits in one or rows * parts would pass the grid limit.
// The default is the H100's best (benchmarks/bwd_sweep.py, 16384 x 128256
// bf16, gpu-session-NVIDIA_H100-20261126-1402): 3.04 ms (2.77 TB/s) at 8192
// columns against 3.22 ms (2.61 TB/s) for a block per row; 16K and 32K within
// 1%, 4K and 64K slower.
constexpr long long kDefaultPartCols = 8192;
struct ColumnParts {
  int parts;
  int pv;
};

// Parts of `default_cols` columns, or of the number the environment variable `knob` gives.
ColumnParts column_parts(const char* knob, long long default_cols, int64_t rows, int vocab, int vec_elems) {
  const ColumnParts whole{1, RowPart{}.pv};
  const char* env = std::getenv(knob);
  long long want = default_cols;
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    want = std::strtoll(env, &end, 10);
    while (*end == ' ') ++end;
    if (*end != '\0') {
      throw std::runtime_error(std::string("rlhf_kernels: ") + knob + ": expected a number of columns, got '" +
                               env + "'");
    }
  }
  if (want <= 0 || want >= vocab) return whole;
  const long long round = 2LL * kThreads * vec_elems;  // one step of grad_row's loop
  const long long cols = (want + round - 1) / round * round;
  const long long pv = cols / vec_elems;
  const long long nvec = (static_cast<long long>(vocab) + vec_elems - 1) / vec_elems;
  const long long parts = (nvec + pv - 1) / pv;
  if (parts <= 1 || rows > kMaxGrid / parts) return whole;
  return ColumnParts{static_cast<int>(parts), static_cast<int>(pv)};
}

ColumnParts bwd_parts(int64_t rows, int vocab, int vec_elems) {
  return column_parts("RLHF_KERNELS_BWD_PART_COLS", kDefaultPartCols, rows, vocab, vec_elems);
}

// The forward's column parts (logprobs_fwd_parts_kernel): RLHF_KERNELS_FWD_PART_COLS
// columns a part, rounded as the backward's (stream_row's loop takes the same step);
// unset or 0: a block per row, the default until a GPU has timed the parts. Not for
// double (gradcheck's dtype).
ColumnParts fwd_parts(int64_t rows, int vocab, int vec_elems) {
  if (vec_elems < 4) return ColumnParts{1, RowPart{}.pv};
  return column_parts("RLHF_KERNELS_FWD_PART_COLS", 0, rows, vocab, vec_elems);
}

// RLHF_KERNELS_LOAD_HINT=1: the forward reads the logits with ld_stream16 (common.cuh).
// Off by default: not yet measured on a GPU.
bool load_hint() {
  const char* env = std::getenv("RLHF_KERNELS_LOAD_HINT");
  return env != nullptr && env[0] == '1';
}

template <typename T>
void launch_fwd(const LogprobsFwdParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  FwdArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.layout = FastRowLayout::make(p.logits_layout);
  a.rows = p.rows;
  a.vocab = static_cast<int>(p.vocab);
  a.labels = p.labels;
  a.ignore_index = p.ignore_index;
  a.scale = row_scale<Acc>(p.inv_temperature);
  a.logprobs = static_cast<Acc*>(p.logprobs);
  a.lse = static_cast<Acc*>(p.lse);
  a.entropy = static_cast<Acc*>(p.entropy);
  const bool entropy = p.entropy != nullptr;
  if constexpr (sizeof(T) == 8) {
    if (p.parts > 1) throw std::runtime_error("rlhf_kernels: logprobs_fwd_cuda: no column parts for float64");
  } else if (p.parts > 1) {
    if (p.part_states == nullptr || p.part_arrived == nullptr) {
      throw std::runtime_error("rlhf_kernels: logprobs_fwd_cuda: column parts without their workspace");
    }
    a.parts = p.parts;
    a.part_vecs = p.part_vecs;
    a.div_parts = FastDivU64::make(static_cast<uint64_t>(p.parts));
    a.part_states = static_cast<Acc*>(p.part_states);
    a.part_arrived = p.part_arrived;
    if (cudaMemsetAsync(p.part_arrived, 0, static_cast<size_t>(p.rows) * sizeof(unsigned), stream) != cudaSuccess) {
      check_launch("logprobs forward: zeroing the part counts");
    }
    const dim3 grid(grid_for(p.rows * p.parts));
    if (entropy) {
      logprobs_fwd_parts_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      logprobs_fwd_parts_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
    }
    check_launch("logprobs forward (column parts) kernel launch");
    return;
  }
  const dim3 grid(grid_for(p.rows));
  if constexpr (sizeof(T) < 8) {  // (double keeps plain loads: gradcheck's dtype, not a bandwidth case)
    if (load_hint()) {
      if (entropy) {
        logprobs_fwd_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
      } else {
        logprobs_fwd_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
      }
      check_launch("logprobs forward kernel launch");
      return;
    }
  }
  if (entropy) {
    logprobs_fwd_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    logprobs_fwd_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
  check_launch("logprobs forward kernel launch");
}

template <typename T>
void launch_bwd(const LogprobsBwdParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  BwdArgs<T> a;
  a.logits = static_cast<const T*>(p.logits);
  a.logits_layout = FastRowLayout::make(p.logits_layout);
  a.grad = static_cast<T*>(p.grad_logits);
  a.grad_layout = FastRowLayout::make(p.grad_layout);
  a.rows = p.rows;
  a.vocab = static_cast<int>(p.vocab);
  a.labels = p.labels;
  a.ignore_index = p.ignore_index;
  a.inv_t = static_cast<Acc>(p.inv_temperature);
  a.scale = row_scale<Acc>(p.inv_temperature);
  a.lse = static_cast<const Acc*>(p.lse);
  a.entropy = static_cast<const Acc*>(p.entropy);
  a.grad_logprobs = static_cast<const Acc*>(p.grad_logprobs);
  a.grad_entropy = static_cast<const Acc*>(p.grad_entropy);
  const ColumnParts parts = bwd_parts(p.rows, a.vocab, Vec<T>::kN);
  a.parts = parts.parts;
  a.part_vecs = parts.pv;
  a.div_parts = FastDivU64::make(static_cast<uint64_t>(parts.parts));
  const dim3 grid(grid_for(p.rows * parts.parts));
  const bool entropy = p.grad_entropy != nullptr;
  if (parts.parts > 1) {
    if (entropy) {
      logprobs_bwd_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      logprobs_bwd_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
    }
  } else if (entropy) {
    logprobs_bwd_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    logprobs_bwd_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
  check_launch("logprobs backward kernel launch");
}

template <typename T>
void launch_seq_fwd(const SeqLogprobsFwdParams& p, cudaStream_t stream) {
  using Acc = acc_t<T>;
  SeqFwdArgs<T> a;
  a.logits = static_cast<const T*>(p.tok.logits);
  a.layout = FastRowLayout::make(p.tok.logits_layout);
  a.items = p.batch * p.n_chunks;
  a.time = p.time;
  a.chunk = p.chunk;
  a.n_chunks = p.n_chunks;
  a.vocab = static_cast<int>(p.tok.vocab);
  a.labels = p.tok.labels;
  a.ignore_index = p.tok.ignore_index;
  a.scale = row_scale<Acc>(p.tok.inv_temperature);
  a.lse = static_cast<Acc*>(p.tok.lse);
  a.partial = static_cast<Acc*>(p.partial);
  a.count = p.count;
  seq_logprobs_fwd_kernel<T><<<dim3(grid_for(a.items)), kThreads, 0, stream>>>(a);
  check_launch("sequence_logprobs forward kernel launch");
}

}  // namespace
}  // namespace gpu

void logprobs_fwd_cuda(const LogprobsFwdParams& p, void* stream) {
  if (p.rows == 0) return;  // nothing to do (and a 0-block launch is an error)
  gpu::check_shape(p.rows, p.vocab, "logprobs_fwd_cuda");
  gpu::check_layout(p.logits_layout, "logprobs_fwd_cuda");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: gpu::launch_fwd<float>(p, s); break;
    case ScalarKind::Float16: gpu::launch_fwd<__half>(p, s); break;
    case ScalarKind::BFloat16: gpu::launch_fwd<__nv_bfloat16>(p, s); break;
    case ScalarKind::Float64: gpu::launch_fwd<double>(p, s); break;
    default: throw std::runtime_error("rlhf_kernels: logprobs_fwd_cuda: unsupported dtype");
  }
}

namespace {
// The host side of logprobs_{fwd,bwd}_parts_cuda: `cut` (fwd_parts or bwd_parts) for rows
// of vocab `itemsize`-byte elements.
void query_parts(gpu::ColumnParts (*cut)(int64_t, int, int), const char* what, int64_t rows, int64_t vocab,
                 int itemsize, int* parts, int* part_vecs) {
  if (itemsize != 2 && itemsize != 4 && itemsize != 8) {
    throw std::runtime_error(std::string("rlhf_kernels: ") + what + ": itemsize must be 2, 4 or 8");
  }
  gpu::check_shape(rows, vocab, what);
  const gpu::ColumnParts b = cut(rows, static_cast<int>(vocab), 16 / itemsize);
  *parts = b.parts;
  *part_vecs = b.pv;
}
}  // namespace

void logprobs_fwd_parts_cuda(int64_t rows, int64_t vocab, int itemsize, int* parts, int* part_vecs) {
  query_parts(&gpu::fwd_parts, "logprobs_fwd_parts_cuda", rows, vocab, itemsize, parts, part_vecs);
}

void logprobs_bwd_parts_cuda(int64_t rows, int64_t vocab, int itemsize, int* parts, int* part_vecs) {
  query_parts(&gpu::bwd_parts, "logprobs_bwd_parts_cuda", rows, vocab, itemsize, parts, part_vecs);
}

void logprobs_bwd_cuda(const LogprobsBwdParams& p, void* stream) {
  if (p.rows == 0) return;
  gpu::check_shape(p.rows, p.vocab, "logprobs_bwd_cuda");
  if (p.grad_entropy != nullptr && p.entropy == nullptr) {
    throw std::runtime_error(
        "rlhf_kernels: logprobs_bwd_cuda: grad_entropy given without entropy");
  }
  gpu::check_layout(p.logits_layout, "logprobs_bwd_cuda");
  gpu::check_layout(p.grad_layout, "logprobs_bwd_cuda");
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::Float32: gpu::launch_bwd<float>(p, s); break;
    case ScalarKind::Float16: gpu::launch_bwd<__half>(p, s); break;
    case ScalarKind::BFloat16: gpu::launch_bwd<__nv_bfloat16>(p, s); break;
    case ScalarKind::Float64: gpu::launch_bwd<double>(p, s); break;
    default: throw std::runtime_error("rlhf_kernels: logprobs_bwd_cuda: unsupported dtype");
  }
}

void seq_logprobs_fwd_cuda(const SeqLogprobsFwdParams& p, void* stream) {
  if (p.batch == 0 || p.n_chunks == 0) return;
  gpu::check_shape(p.tok.rows, p.tok.vocab, "seq_logprobs_fwd_cuda");
  gpu::check_layout(p.tok.logits_layout, "seq_logprobs_fwd_cuda");
  if (p.chunk < 1 || p.time < 1 || p.tok.rows != p.batch * p.time || p.n_chunks * p.chunk < p.time) {
    throw std::runtime_error("rlhf_kernels: seq_logprobs_fwd_cuda: inconsistent batch / time / chunk");
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.tok.dtype) {
    case ScalarKind::Float32: gpu::launch_seq_fwd<float>(p, s); break;
    case ScalarKind::Float16: gpu::launch_seq_fwd<__half>(p, s); break;
    case ScalarKind::BFloat16: gpu::launch_seq_fwd<__nv_bfloat16>(p, s); break;
    case ScalarKind::Float64: gpu::launch_seq_fwd<double>(p, s); break;
    default: throw std::runtime_error("rlhf_kernels: seq_logprobs_fwd_cuda: unsupported dtype");
  }
}

}  // namespace rlhf
