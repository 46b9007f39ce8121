// Parameters of the PPO kernels, shared by ppo.cu, ppo_cpu.cpp and the
// bindings. No torch headers.
//
// GAE (Schulman et al. 2016) over [B, T] rows, with response-mask "skip"
// semantics (multi-turn PPO: masked tool/observation tokens neither produce a
// TD error nor break the recursion). Per row, walking t = T-1 .. 0 with
// next_value = 0 and last_gae = 0:
//     if mask[t]:
//         delta     = rewards[t] + gamma * next_value - values[t]
//         last_gae  = delta + gamma * lam * last_gae
//         next_value = values[t]
//     advantages[t] = last_gae            (masked positions carry it unchanged)
//     returns[t]    = last_gae + values[t]
// (mask == nullptr: every position is valid.) This is verl's
// compute_gae_advantage_return before whitening.
//
// As a scan: each position is the affine map x -> d_t + c_t x on the running
// advantage (valid: c = gamma*lam, d = delta_t; masked: c = 1, d = 0), and
// delta_t needs the value at the next valid position, itself a "nearest valid
// to the right" scan. Both compose associatively, so a row can be processed
// in chunks (carrying the state from the chunk to its right) or by a parallel
// scan.
#pragma once
#include <cstdint>

#include "logprobs.h"  // ScalarKind

namespace rlhf {

// rewards, values: [B, T] with row stride (elements) given, unit stride in T;
// float32 or float64 (dtype; both the same). mask: [B, T] uint8/bool (0/1)
// with its own row stride, or nullptr. advantages, returns: contiguous [B, T]
// of the same dtype.
struct GaeParams {
  ScalarKind dtype = ScalarKind::Float32;  // Float32 or Float64
  int64_t batch = 0;
  int64_t time = 0;
  const void* rewards = nullptr;
  int64_t rewards_row_stride = 0;
  const void* values = nullptr;
  int64_t values_row_stride = 0;
  const uint8_t* mask = nullptr;
  int64_t mask_row_stride = 0;
  double gamma = 1.0;
  double lam = 0.95;
  void* advantages = nullptr;
  void* returns = nullptr;
};

void gae_cuda(const GaeParams& p, void* stream);
void gae_cpu(const GaeParams& p);

// PPO token losses over contiguous [B, T] inputs x, old, third and a uint8
// mask (nonzero = valid), float32 or float64 (all the same).
// kind 0, POLICY (verl's compute_policy_loss): x = logp, old = old logp,
//   third = advantages A, p0 = clip low, p1 = clip high, p2 = dual-clip c
//   (has_dual). Per token:
//     lr = clamp(logp - old, -20, 20), r = exp(lr),
//     dr = r if |logp - old| < 20 else 0            (d r / d logp)
//     l1 = -A r, l2 = -A clamp(r, 1 - p0, 1 + p1), l = max(l1, l2)
//     dl = l2 > l1 ? (1 - p0 < r < 1 + p1 ? -A dr : 0) : -A dr
//     clip = (l2 > l1)
//     if has_dual: l3 = -A p2; use3 = A < 0 && l3 < l; lower = (A < 0 && l > l3)
//                  l = use3 ? l3 : l; dl = use3 ? 0 : dl      (else lower = 0)
//     kl = -lr
// kind 1, VALUE: x = v, old = old v, third = returns R, p0 = clip range e:
//     diff = v - old, vc = old + clamp(diff, -e, e), e1 = v - R, e2 = vc - R,
//     l = 0.5 max(e1^2, e2^2), use2 = e2^2 > e1^2, clip = use2,
//     dl = use2 ? (-e < diff < e ? e2 : 0) : e1,  kl = lower = 0
// Forward: per row b, rows[b, 0..4] = (sum over valid t of l, number of
//   valid t, sum of clip, sum of kl, sum of lower); then, in double, over
//   rows: L = sum loss_b, Lm = sum loss_b / max(count_b, 1), N = sum count_b,
//   S = number of rows with count_b > 0, total = max(N, 1), seqs = max(S, 1),
//   and the aggregated loss (agg, the loss_agg_mode)
//     0 token-mean: L / total          1 seq-mean-token-sum: L / seqs
//     2 seq-mean-token-mean: Lm / seqs 3 seq-mean-token-sum-norm: L / (seqs T)
//     4 token-sum: L
//   with metrics[0..4] = (sum clip / total, sum kl / total, sum lower / total,
//   total, seqs).
// Backward: grad_x[b, t] = valid ? grad_loss * w_b * dl : 0, w_b the weight
//   of row b's loss sum in the aggregate: 1 / total, 1 / seqs,
//   1 / (max(count_b, 1) seqs), 1 / (seqs T), 1 for agg 0..4 (count_b from rows,
//   total and seqs from metrics).
struct PpoLossParams {
  ScalarKind dtype = ScalarKind::Float32;
  int kind = 0;
  int agg = 0;
  int64_t batch = 0;
  int64_t time = 0;
  const void* x = nullptr;
  const void* old = nullptr;
  const void* third = nullptr;
  const uint8_t* mask = nullptr;
  double p0 = 0.2, p1 = 0.2, p2 = 3.0;
  bool has_dual = false;
  void* rows = nullptr;             // [B, 5]: written by the forward, read by the backward
  void* metrics = nullptr;          // [5]: written by the forward, read by the backward
  void* loss = nullptr;             // forward: [] (the aggregated loss)
  const void* grad_loss = nullptr;  // backward: [] (d out / d loss)
  void* grad_x = nullptr;           // backward: [B, T]
};

// KL estimators, elementwise over n contiguous values, d = logp - ref:
//   kind 0 k1: d, d' = 1;  1 abs: |d|, d' = sign(d) (0 at 0);  2 k2: d^2/2, d' = d;
//   3 k3: k = clamp(-d, -20, 20), raw = e^k - k - 1, value = clamp(raw, -10, 10),
//         d' = (|d| < 20 && -10 < raw < 10) ? 1 - e^k : 0.
// Forward writes value; backward (grad_out != nullptr) writes grad_out * d'.
struct KlParams {
  ScalarKind dtype = ScalarKind::Float32;
  int kind = 0;
  int64_t n = 0;
  const void* logp = nullptr;
  const void* ref = nullptr;
  const void* grad_out = nullptr;
  void* out = nullptr;
};

// The fused PPO policy step from logits (ppo_loss_from_logits with
// grad_in_forward): per token row r of the [rows, V] logits (any RowLayout,
// unit stride in V), with z = logits / T, label y, and the per-token inputs
// old, adv, ref (optional) and the aggregation weight w (contiguous [rows],
// accumulation type: double for Float64 logits, else float):
//   logp = z_y - lse, H = lse - sum_j p_j z_j                 (logprobs.h)
//   (pg, dpg, clip, lower, -lr) = POLICY token of (logp, old, adv) above
//   kl, dkl = KL estimator kl_kind of (logp, ref), or 0 without ref
//   stats[r] = (w (pg - c_H H + c_KL kl), pg, H, kl, clip, lower, -lr)
//   g = w (dpg + c_KL dkl), gH = -c_H w
//   grad[r, j] = ( g (1[j == y] - p_j) - gH p_j (z_j - lse + H) ) / T
// The gradient is written only when grad != nullptr; grad may be the logits
// themselves (same layout). Rows whose label is ignore_index get zero stats
// and a zero gradient row, labels outside [0, V) NaN (never an address).
struct PpoLogitsParams {
  const void* logits = nullptr;
  RowLayout logits_layout;
  void* grad = nullptr;  // nullptr: forward only
  RowLayout grad_layout;
  ScalarKind dtype = ScalarKind::Float32;  // of logits and grad
  int64_t rows = 0;
  int64_t vocab = 0;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  const void* old = nullptr;
  const void* adv = nullptr;
  const void* ref = nullptr;  // nullptr: no KL term
  const void* weights = nullptr;
  double clip_low = 0.2, clip_high = 0.2, clip_c = 3.0;
  bool has_dual = false;
  int kl_kind = 3;
  double kl_coef = 0.0;
  double entropy_coef = 0.0;
  void* stats = nullptr;  // [rows, kFusedStats]
};
constexpr int kFusedStats = 7;

void ppo_logits_fused_cuda(const PpoLogitsParams& p, void* stream);
// Host code of the sm_90 cluster kernel's launcher, for tests without a GPU: how a row of
// `vocab` elements of `itemsize` bytes is cut for blocks of at most max_smem bytes of
// dynamic shared memory, each holding `buffers` slices (2: the double-buffered mode), under
// RLHF_KERNELS_CLUSTER_SLICE_BYTES. out: {C (0: the kernel does not apply), slice
// (elements a block), dynamic shared memory a block}.
void ppo_cluster_layout_cuda(int64_t vocab, int itemsize, int64_t max_smem, int buffers, int64_t* out);
// How many launches of the cluster kernel this process has made, for tests (a case meant for
// it must not pass by falling back to the streaming kernel).
int64_t ppo_cluster_launches_cuda();
void ppo_logits_fused_cpu(const PpoLogitsParams& p);

// The fused step's per-token inputs that depend on the mask (rlhf_kernels/ops/ppo.py:
// _fused_inputs; bindings.cpp: ppo_fused_inputs), over [B, T] labels and mask of any
// strides (in elements). With valid = (mask != 0 and label != ignore_index, compared in
// int64), per row b:
//   labels_out[b T + t] = valid ? label : ignore_index          (int64, contiguous)
//   n_b = #valid t of row b, N = sum n_b, S = #rows with n_b > 0, n = max(N, 1), s = max(S, 1)
//   weights[b T + t] = valid ? 1 / d_b : 0 (contiguous), d_b = n, s, max(n_b, 1) s,
//                      s max(T, 1), 1 for agg 0..4 (ppo_loss_math.h: input_denominator)
//   n_valid[0] = n
// in the accumulation type A (double when double_acc, else float), formed as the ATen
// composition forms them, so the bits are the same (its counts are sums of 0 / 1 in A:
// exact up to 2^24 tokens in float). One launch; the CUDA kernel is one block, so the
// bindings take the ATen composition past kMaxInputsTokens tokens (a one-block pass over
// 2^16 tokens moves ~1.4 MB, a few microseconds; the sweep after a larger batch is long
// enough to hide the composition's host time) and for empty inputs.
enum class MaskKind : int { Byte = 0, Int32 = 1, Int64 = 2, Float32 = 3, Float64 = 4, Bits16 = 5 };
struct PpoInputsParams {
  int64_t batch = 0;
  int64_t time = 0;
  const void* labels = nullptr;
  bool labels_int32 = false;  // else int64
  int64_t labels_stride0 = 0, labels_stride1 = 0;
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::Byte;  // Bits16: float16 / bfloat16 as raw bits
  int64_t mask_stride0 = 0, mask_stride1 = 0;
  int64_t ignore_index = -100;
  int agg = 0;
  bool double_acc = false;
  int64_t* labels_out = nullptr;
  void* weights = nullptr;
  void* n_valid = nullptr;  // one value of A
};
constexpr int64_t kMaxInputsTokens = int64_t(1) << 16;
void ppo_fused_inputs_cuda(const PpoInputsParams& p, void* stream);
void ppo_fused_inputs_cpu(const PpoInputsParams& p);

// Masked whitening (rlhf_kernels.ops.ppo.masked_whiten) over n contiguous
// values x (Float32 / Float16 / BFloat16 / Float64) and a uint8 mask
// (nonzero = valid), with A the accumulation type (double for Float64, else
// float):
//   count = #valid, mean = sum_valid x / max(count, 1),
//   var = sum_valid (x - mean)^2 / max(count - 1, 1), rstd = 1 / sqrt(var + eps)
//   out[i] = (x[i] - mean) * rstd (+ mean unless shift_mean), for every i
// stats = (count, mean, var, rstd) as 4 values of A. The reduction is
// deterministic: x is cut into chunks of kWhitenChunk elements, each chunk
// reduced to (count, mean, M2) with the two-pass formula, and the partials
// merged in a fixed order with Chan et al.'s parallel update
// (n = na + nb, d = mb - ma, mean = ma + d nb / n, M2 = M2a + M2b + d^2 na nb / n).
constexpr int64_t kWhitenChunk = 4096;
struct WhitenParams {
  ScalarKind dtype = ScalarKind::Float32;  // of x
  int64_t n = 0;
  const void* x = nullptr;
  const uint8_t* mask = nullptr;
  double eps = 1e-8;
  bool shift_mean = true;
  void* out = nullptr;       // [n] of A
  void* stats = nullptr;     // [4] of A
  void* partials = nullptr;  // CUDA only: [3, cdiv(n, kWhitenChunk)] of A (count, mean, M2)
};

// GRPO group advantages over contiguous scores (Float32 or Float64; out the
// same) and G groups [offsets[g], offsets[g + 1]) (int64, clamped to [0, n]):
//   A_i = (s_i - mean_g) / (std_g + eps)   (norm_by_std; std unbiased, 1 for a
//   group of one), else s_i - mean_g.
struct GrpoParams {
  ScalarKind dtype = ScalarKind::Float32;
  int64_t n = 0;
  int64_t groups = 0;
  const void* scores = nullptr;
  const int64_t* offsets = nullptr;  // [groups + 1]
  bool norm_by_std = true;
  double eps = 1e-6;
  void* out = nullptr;
};

void masked_whiten_cuda(const WhitenParams& p, void* stream);
void masked_whiten_cpu(const WhitenParams& p);
void grpo_advantages_cuda(const GrpoParams& p, void* stream);
void grpo_advantages_cpu(const GrpoParams& p);

void ppo_loss_fwd_cuda(const PpoLossParams& p, void* stream);
void ppo_loss_bwd_cuda(const PpoLossParams& p, void* stream);
void kl_penalty_cuda(const KlParams& p, void* stream);
void ppo_loss_fwd_cpu(const PpoLossParams& p);
void ppo_loss_bwd_cpu(const PpoLossParams& p);
void kl_penalty_cpu(const KlParams& p);

}  // namespace rlhf
