// Parameters of the token log-prob kernels, shared by the CUDA launchers
// (logprobs.cu), the CPU kernels (logprobs_cpu.cpp) and the bindings.
// No torch headers here, so that nvcc compiles the .cu files quickly.
//
// Math (the docstring of rlhf_kernels.token_logprobs is the full statement):
//   z_j      = logits_j / T
//   lse      = log sum_j exp(z_j)
//   logprob  = z_y - lse                                  (y = label)
//   entropy  = lse - sum_j p_j z_j,   p_j = exp(z_j - lse)
//   dlogits_j = ( g_lp * (1[j == y] - p_j) - g_H * p_j * (z_j - lse + H) ) / T
// Rows whose label equals ignore_index: outputs 0 (lse 0, entropy 0), nothing
// read in forward, zero gradient written in backward.
// Rows whose label is outside [0, V) and not ignore_index: outputs NaN and a
// NaN gradient row; the label is never used as an address.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
// always_inline: GCC inlines a function without target attributes into the
// CPU kernels' per-ISA entry points (target("avx512f", ...)) only when forced,
// and a call left in a token loop keeps it from vectorising.
#define RLHF_HD __attribute__((always_inline)) inline
#endif

namespace rlhf {

enum class ScalarKind : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Where row n of a [..., V] tensor starts, for up to three leading dims left
// after merging the mergeable ones (sizes d0 x d1 x d2, d0 implied by rows).
// All arithmetic is int64: rows * V may exceed 2^31.
struct RowLayout {
  int64_t size1 = 1, size2 = 1;
  int64_t stride0 = 0, stride1 = 0, stride2 = 0;  // in elements

  RLHF_HD int64_t offset(int64_t n) const {
    const int64_t i2 = n % size2;
    n /= size2;
    const int64_t i1 = n % size1;
    const int64_t i0 = n / size1;
    return i0 * stride0 + i1 * stride1 + i2 * stride2;
  }
};

// logprobs / lse / entropy are contiguous [rows] in the accumulation type:
// double when dtype is Float64, else float.
struct LogprobsFwdParams {
  const void* logits = nullptr;
  RowLayout logits_layout;
  ScalarKind dtype = ScalarKind::Float32;
  int64_t rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;  // contiguous [rows]
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  void* logprobs = nullptr;
  void* lse = nullptr;
  void* entropy = nullptr;  // nullptr: entropy not requested
  // CUDA only: column parts per row (logprobs_fwd_parts_cuda) and, with parts > 1, their
  // workspace: 3 accumulation-type partial states per (row, part) and one 32-bit arrival
  // count per row (zeroed by the launcher).
  int parts = 1;
  int part_vecs = 0;
  void* part_states = nullptr;
  unsigned* part_arrived = nullptr;
};

// grad_logits may equal logits (in-place backward, same layout). grad_entropy
// nullptr means the entropy term is absent (then entropy may be nullptr too).
struct LogprobsBwdParams {
  const void* logits = nullptr;
  RowLayout logits_layout;
  void* grad_logits = nullptr;
  RowLayout grad_layout;
  ScalarKind dtype = ScalarKind::Float32;
  int64_t rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  const void* lse = nullptr;
  const void* entropy = nullptr;
  const void* grad_logprobs = nullptr;  // contiguous [rows], accumulation type
  const void* grad_entropy = nullptr;   // contiguous [rows] or nullptr
};

// Per-sequence sums of token log-probs (sequence_logprobs), reduced inside the
// kernels. The rows of sequence b are rows [b * time, (b + 1) * time) of the
// flattened leading dims (logits [B, T, V] or [B, V], any row layout).
// Work item i = b * n_chunks + c owns the tokens [c * chunk, min(time, (c + 1) * chunk))
// of sequence b; it writes lse[row] for each of them (0 for ignored rows, NaN
// for out-of-range labels, as the token forward) and one partial sum and one
// kept-token count:
//   partial[i] = sum over its kept tokens of log p(y_t)   (accumulation type)
//   count[i]   = number of its tokens whose label is not ignore_index (int32)
// The caller sums the [B, n_chunks] partials over c in a fixed order, so the
// result does not depend on scheduling (no atomics). chunk depends only on
// (B, T): see seq_chunk.
struct SeqLogprobsFwdParams {
  LogprobsFwdParams tok;  // logits, layout, labels, lse, ...; tok.logprobs and tok.entropy unused
  int64_t batch = 0;
  int64_t time = 0;       // tokens per sequence; tok.rows == batch * time
  int64_t chunk = 1;      // tokens per work item
  int64_t n_chunks = 0;   // ceil(time / chunk)
  void* partial = nullptr;     // contiguous [batch, n_chunks], accumulation type
  int32_t* count = nullptr;    // contiguous [batch, n_chunks]
};

// Tokens per work item: enough items (about kSeqTargetItems) to fill a GPU or
// the CPU threads, and otherwise as few partial sums as possible. A function
// of (batch, time) only, so every backend cuts sequences the same way.
constexpr int64_t kSeqTargetItems = 2048;
inline int64_t seq_chunk(int64_t batch, int64_t time) {
  if (time <= 1) return 1;
  const int64_t c = (batch * time + kSeqTargetItems - 1) / kSeqTargetItems;
  return c < 1 ? 1 : (c > time ? time : c);
}

// CUDA launchers (logprobs.cu). `stream` is a cudaStream_t.
void logprobs_fwd_cuda(const LogprobsFwdParams& p, void* stream);
void logprobs_bwd_cuda(const LogprobsBwdParams& p, void* stream);
void seq_logprobs_fwd_cuda(const SeqLogprobsFwdParams& p, void* stream);
// How logprobs_bwd_cuda cuts rows x vocab of itemsize-byte logits into column parts
// (RLHF_KERNELS_BWD_PART_COLS): *parts per row (1: a block per row) and *part_vecs,
// the 16-byte vectors of a part. Host code only; for tests.
void logprobs_bwd_parts_cuda(int64_t rows, int64_t vocab, int itemsize, int* parts, int* part_vecs);
// The same for the forward (RLHF_KERNELS_FWD_PART_COLS; unset or 0: a block per row).
// The caller allocates LogprobsFwdParams' workspace for the parts it returns.
void logprobs_fwd_parts_cuda(int64_t rows, int64_t vocab, int itemsize, int* parts, int* part_vecs);

// CPU kernels (logprobs_cpu.cpp), parallel over rows with OpenMP.
void logprobs_fwd_cpu(const LogprobsFwdParams& p);
void logprobs_bwd_cpu(const LogprobsBwdParams& p);
void seq_logprobs_fwd_cpu(const SeqLogprobsFwdParams& p);

}  // namespace rlhf
