// Host driver for tests/test_cuda_math.py: runs the row math of the CUDA
// log-prob kernels (common.cuh: OnlineLSE, row_stats, GradOp, grad_vec) on the
// CPU, in float or double, so that CI (nvcc, no GPU) checks the formulas the
// kernels use. The threads of a block are simulated: each of kSimThreads
// threads pushes the 16-byte vectors i = tid, tid + kSimThreads, ... in chunks
// of two vectors (as stream_row does), the scalar tail element by element, and
// the states are merged in a butterfly order. The gradient goes through
// grad_vec for whole vectors and the two-argument form for the tail, as
// grad_row does, from the base-2 lse of the same pass (fused = 1, as the
// fused PPO kernels) or from the saved lse in nats (fused = 0, as the
// token_logprobs backward). What runs differently on the GPU: exp2_ftz,
// max_keep_nan and mul_rn are single PTX instructions there (ex2.approx.ftz,
// max.NaN, mul.rn) and libm calls / plain arithmetic here.
//
// stdin, little endian: int64 rows, vocab, entropy (0 / 1), fused (0 / 1),
// double_acc (0: float, 1: double); double inv_temperature; double
// logits[rows * vocab] (converted to the accumulation type), int64
// labels[rows] (in [0, vocab)), double g[rows], double gH[rows].
// stdout: double lse[rows], logprob[rows], entropy[rows], grad[rows * vocab].
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common.cuh"

namespace {

using rlhf::gpu::GradOp;
using rlhf::gpu::OnlineLSE;

constexpr int kSimThreads = 256;  // as the log-prob kernels' blocks

template <typename V>
bool read(V* p, size_t n) {
  return std::fread(p, sizeof(V), n, stdin) == n;
}

void write(const std::vector<double>& v) { std::fwrite(v.data(), sizeof(double), v.size(), stdout); }

// kN: elements of a 16-byte vector of the storage type the row stands for
// (8 for bf16 / fp16 rows in float, 2 for double).
template <typename Acc, bool kW, int kN>
OnlineLSE<Acc, kW> row_state(const Acc* x, int V, Acc scale) {
  const int nvec = V / kN;
  std::vector<OnlineLSE<Acc, kW>> states(kSimThreads);
  for (int t = 0; t < kSimThreads; ++t) {
    OnlineLSE<Acc, kW>& st = states[t];
    st.reset();
    int i = t;
    for (; i + kSimThreads < nvec; i += 2 * kSimThreads) {
      Acc z[2 * kN];
      for (int k = 0; k < kN; ++k) {
        z[k] = rlhf::gpu::mul_rn(x[i * kN + k], scale);
        z[kN + k] = rlhf::gpu::mul_rn(x[(i + kSimThreads) * kN + k], scale);
      }
      st.template push<2 * kN>(z);
    }
    if (i < nvec) {
      Acc z[kN];
      for (int k = 0; k < kN; ++k) z[k] = rlhf::gpu::mul_rn(x[i * kN + k], scale);
      st.template push<kN>(z);
    }
    for (int j = nvec * kN + t; j < V; j += kSimThreads) {
      const Acc z[1] = {rlhf::gpu::mul_rn(x[j], scale)};
      st.template push<1>(z);
    }
  }
  for (int off = kSimThreads / 2; off > 0; off /= 2) {
    for (int t = 0; t < off; ++t) states[t].merge(states[t + off].m, states[t + off].s, states[t + off].w);
  }
  return states[0];
}

template <typename Acc, bool kW, int kN>
void row_grad(const Acc* x, double* out, int V, const GradOp<Acc, kW>& op) {
  const int nvec = V / kN;
  for (int i = 0; i < nvec; ++i) {
    Acc u[kN];
    for (int k = 0; k < kN; ++k) u[k] = x[i * kN + k];
    rlhf::gpu::grad_vec<kN>(op, u, i * kN);
    for (int k = 0; k < kN; ++k) out[i * kN + k] = u[k];
  }
  for (int j = nvec * kN; j < V; ++j) out[j] = op(x[j], j);
}

template <typename Acc, bool kW>
void run(int64_t rows, int V, bool fused, double inv_temperature, const std::vector<double>& logits,
         const std::vector<int64_t>& labels, const std::vector<double>& g, const std::vector<double>& gh) {
  constexpr int kN = sizeof(Acc) == 8 ? 2 : 8;
  const Acc scale = rlhf::gpu::row_scale<Acc>(inv_temperature);
  const Acc inv_t = static_cast<Acc>(inv_temperature);
  std::vector<double> lse(rows), logprob(rows), entropy(rows), grad(rows * V);
  std::vector<Acc> x(V);
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < V; ++j) x[j] = static_cast<Acc>(logits[r * V + j]);
    const int y = static_cast<int>(labels[r]);
    const OnlineLSE<Acc, kW> st = row_state<Acc, kW, kN>(x.data(), V, scale);
    const rlhf::gpu::RowStats<Acc> s = rlhf::gpu::row_stats(st, rlhf::gpu::mul_rn(x[y], scale));
    lse[r] = s.lse;
    logprob[r] = s.logprob;
    entropy[r] = s.entropy;
    const Acc lse2 = fused ? s.lse2 : rlhf::gpu::lse2_from_nats(s.lse);
    const GradOp<Acc, kW> op = GradOp<Acc, kW>::make(lse2, static_cast<Acc>(g[r]), kW ? static_cast<Acc>(gh[r]) : Acc(0),
                                                     s.entropy, inv_t, scale, y);
    row_grad<Acc, kW, kN>(x.data(), grad.data() + r * V, V, op);
  }
  write(lse);
  write(logprob);
  write(entropy);
  write(grad);
}

template <typename Acc>
void run_acc(int64_t rows, int V, bool entropy, bool fused, double inv_temperature, const std::vector<double>& logits,
             const std::vector<int64_t>& labels, const std::vector<double>& g, const std::vector<double>& gh) {
  if (entropy) {
    run<Acc, true>(rows, V, fused, inv_temperature, logits, labels, g, gh);
  } else {
    run<Acc, false>(rows, V, fused, inv_temperature, logits, labels, g, gh);
  }
}

}  // namespace

int main() {
  int64_t head[5];
  double inv_temperature = 1.0;
  if (!read(head, 5) || !read(&inv_temperature, 1)) return 2;
  const int64_t rows = head[0], vocab = head[1];
  if (rows < 0 || vocab < 1 || vocab > (int64_t(1) << 30)) return 2;
  std::vector<double> logits(rows * vocab), g(rows), gh(rows);
  std::vector<int64_t> labels(rows);
  if (!read(logits.data(), logits.size()) || !read(labels.data(), labels.size()) || !read(g.data(), g.size()) ||
      !read(gh.data(), gh.size())) {
    return 2;
  }
  for (const int64_t y : labels) {
    if (y < 0 || y >= vocab) return 2;
  }
  const bool entropy = head[2] != 0, fused = head[3] != 0;
  if (head[4] != 0) {
    run_acc<double>(rows, static_cast<int>(vocab), entropy, fused, inv_temperature, logits, labels, g, gh);
  } else {
    run_acc<float>(rows, static_cast<int>(vocab), entropy, fused, inv_temperature, logits, labels, g, gh);
  }
  return 0;
}
