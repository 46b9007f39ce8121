// The one place where the native ops meet torch: op schemas (TORCH_LIBRARY),
// argument checks with messages naming the argument, tensor -> params
// translation, and the CPU / CUDA registrations.
#include <ATen/Config.h>
#include <ATen/MemoryOverlap.h>
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "logprobs.h"
#include "ppo.h"
#include "ppo_loss_math.h"
#include "preference.h"

#ifdef RLHF_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that pulls in cusparse.h
#endif

#ifndef RLHF_CUDA_ARCHS
#define RLHF_CUDA_ARCHS ""
#endif

namespace rlhf {
namespace {

ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kDouble: return ScalarKind::Float64;
    default: TORCH_CHECK_TYPE(false, name, ": unsupported dtype ", t.scalar_type());
  }
}

// Merge mergeable leading dims of a [..., V] tensor into at most three.
RowLayout row_layout(const at::Tensor& t, const char* name) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == stride * size) {
      dims.back() = {dims.back().first * size, stride};
    } else {
      dims.emplace_back(size, stride);
    }
  }
  TORCH_CHECK_VALUE(dims.size() <= 3, name, ": more than three non-mergeable leading dims; pass .contiguous()");
  while (dims.size() < 3) dims.insert(dims.begin(), {1, 0});
  RowLayout l;
  l.size1 = dims[1].first;
  l.size2 = dims[2].first;
  l.stride0 = dims[0].second;
  l.stride1 = dims[1].second;
  l.stride2 = dims[2].second;
  return l;
}

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() >= 1, "logits: expected shape [..., V]");
  TORCH_CHECK_VALUE(logits.size(-1) > 0, "logits: the vocab (last) dim is empty");
  TORCH_CHECK_VALUE(logits.size(-1) == 1 || logits.stride(-1) == 1, "logits: the last dim must have stride 1");
  scalar_kind(logits, "logits");
}

void check_row_tensor(const at::Tensor& t, const at::Tensor& logits, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": on ", t.device(), " but logits are on ",
                    logits.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == logits.sizes().slice(0, logits.dim() - 1), name, ": expected shape ",
                    logits.sizes().slice(0, logits.dim() - 1), ", got ", t.sizes());
}

#ifdef RLHF_WITH_CUDA
#define RLHF_CUDA_FN(fn) (&fn)
#else
#define RLHF_CUDA_FN(fn) nullptr
#endif

// std::type_identity_t is C++20, and older torch (2.11) builds extensions as C++17.
// Keeps the CUDA launcher's argument out of template deduction (it may be nullptr).
template <typename T>
struct NonDeduced {
  using type = T;
};

// Runs the CUDA launcher on the device's current stream (under a device
// guard), or the CPU kernel: the one place that maps a device to a kernel.
template <typename Params>
void run_kernel(const at::Device& device, const Params& p,
                typename NonDeduced<void (*)(const Params&, void*)>::type cuda,  // nullptr without CUDA
                void (*cpu)(const Params&)) {
  if (device.is_cuda()) {
#ifdef RLHF_WITH_CUDA
    const c10::cuda::CUDAGuard guard(device);
    cuda(p, c10::cuda::getCurrentCUDAStream().stream());
#else
    (void)cuda;
    TORCH_CHECK(false, "rlhf_kernels._C was built without CUDA");
#endif
  } else {
    cpu(p);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double temperature, int64_t ignore_index,
                                                                  bool return_entropy, bool inplace_backward) {
  (void)inplace_backward;  // used by autograd (Python side) only
  check_logits(logits);
  check_row_tensor(labels, logits, "labels", at::kLong);
  TORCH_CHECK_VALUE(temperature > 0, "temperature: must be positive, got ", temperature);
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  const auto opts = logits.options().dtype(acc_type(logits));
  at::Tensor labels_c = labels.contiguous();
  at::Tensor logprobs = at::empty(lead, opts);
  at::Tensor lse = at::empty(lead, opts);
  at::Tensor entropy = return_entropy ? at::empty(lead, opts) : at::empty({0}, opts);

  LogprobsFwdParams p;
  p.logits = logits.data_ptr();
  p.logits_layout = row_layout(logits, "logits");
  p.dtype = scalar_kind(logits, "logits");
  p.rows = logprobs.numel();
  p.vocab = logits.size(-1);
  p.labels = labels_c.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.logprobs = logprobs.data_ptr();
  p.lse = lse.data_ptr();
  p.entropy = return_entropy ? entropy.data_ptr() : nullptr;
  if (p.rows == 0) return {logprobs, lse, entropy};
  at::Tensor part_states, part_arrived;  // the CUDA forward's column parts (RLHF_KERNELS_FWD_PART_COLS)
#ifdef RLHF_WITH_CUDA
  if (logits.is_cuda()) {
    logprobs_fwd_parts_cuda(p.rows, p.vocab, static_cast<int>(logits.element_size()), &p.parts, &p.part_vecs);
    if (p.parts > 1) {
      part_states = at::empty({p.rows * p.parts * 3}, opts);
      part_arrived = at::empty({p.rows}, logits.options().dtype(at::kInt));
      p.part_states = part_states.data_ptr();
      p.part_arrived = reinterpret_cast<unsigned*>(part_arrived.data_ptr<int32_t>());
    }
  }
#endif
  run_kernel(logits.device(), p, RLHF_CUDA_FN(logprobs_fwd_cuda), &logprobs_fwd_cpu);
  return {logprobs, lse, entropy};
}

void run_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& logits,
             const at::Tensor& grad_logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& entropy,
             double temperature, int64_t ignore_index) {
  check_logits(logits);
  const auto acc = acc_type(logits);
  check_row_tensor(labels, logits, "labels", at::kLong);
  check_row_tensor(lse, logits, "lse", acc);
  check_row_tensor(grad_logprobs, logits, "grad_logprobs", grad_logprobs.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0, "temperature: must be positive, got ", temperature);
  const bool has_entropy = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor labels_c = labels.contiguous();
  at::Tensor lse_c = lse.contiguous();
  at::Tensor g_c = grad_logprobs.to(acc).contiguous();
  at::Tensor gh_c, entropy_c;
  if (has_entropy) {
    check_row_tensor(*grad_entropy, logits, "grad_entropy", grad_entropy->scalar_type());
    check_row_tensor(entropy, logits, "entropy", acc);
    gh_c = grad_entropy->to(acc).contiguous();
    entropy_c = entropy.contiguous();
  }
  LogprobsBwdParams p;
  p.logits = logits.data_ptr();
  p.logits_layout = row_layout(logits, "logits");
  p.grad_logits = grad_logits.data_ptr();
  p.grad_layout = row_layout(grad_logits, "grad_logits");
  p.dtype = scalar_kind(logits, "logits");
  p.rows = lse.numel();
  p.vocab = logits.size(-1);
  p.labels = labels_c.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.lse = lse_c.data_ptr();
  p.entropy = has_entropy ? entropy_c.data_ptr() : nullptr;
  p.grad_logprobs = g_c.data_ptr();
  p.grad_entropy = has_entropy ? gh_c.data_ptr() : nullptr;
  if (p.rows == 0) return;
  run_kernel(logits.device(), p, RLHF_CUDA_FN(logprobs_bwd_cuda), &logprobs_bwd_cpu);
}

at::Tensor token_logprobs_bwd(const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
                              const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, double temperature, int64_t ignore_index) {
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  run_bwd(grad_logprobs, grad_entropy, logits, grad, labels, lse, entropy, temperature, ignore_index);
  return grad;
}

// An in-place gradient needs rows that share no memory (each row is read, then overwritten,
// by its own block). The Python ops fall back to a fresh gradient for such logits; this
// guards the registered ops called directly. (A view ATen cannot judge, such as a slice,
// passes: its rows are checked on the Python side.)
void check_distinct_rows(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(logits) != at::MemOverlap::Yes,
                    "logits: rows share memory (an expand or overlapping windows); the in-place ops need distinct rows");
}

void token_logprobs_bwd_inplace(const at::Tensor& logits, const at::Tensor& grad_logprobs,
                                const std::optional<at::Tensor>& grad_entropy, const at::Tensor& labels,
                                const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                                int64_t ignore_index) {
  check_distinct_rows(logits);
  run_bwd(grad_logprobs, grad_entropy, logits, logits, labels, lse, entropy, temperature, ignore_index);
}

// Per-sequence sums (or means) of token log-probs, reduced in the kernels:
// returns (sequence_logprobs [B], kept-token counts [B], lse [leading dims]),
// the last two in the accumulation type. The kernels write one partial sum per
// (sequence, token chunk); the [B, n_chunks] partials are summed here in a
// fixed order (a plain reduction, no atomics), so reruns are bitwise equal.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_logprobs_fwd(const at::Tensor& logits,
                                                                     const at::Tensor& labels, double temperature,
                                                                     int64_t ignore_index, bool average,
                                                                     bool inplace_backward) {
  (void)inplace_backward;  // used by autograd (Python side) only
  check_logits(logits);
  TORCH_CHECK_VALUE(logits.dim() >= 2, "logits: expected shape [B, T, V] or [B, V], got ", logits.sizes());
  check_row_tensor(labels, logits, "labels", at::kLong);
  TORCH_CHECK_VALUE(temperature > 0, "temperature: must be positive, got ", temperature);
  const auto lead = logits.sizes().slice(0, logits.dim() - 1);
  const auto opts = logits.options().dtype(acc_type(logits));
  const int64_t batch = logits.size(0);
  int64_t rows = 1;
  for (const int64_t d : lead) rows *= d;
  const int64_t time = batch > 0 ? rows / batch : 0;
  const int64_t chunk = seq_chunk(batch, time);
  const int64_t n_chunks = (time + chunk - 1) / chunk;
  at::Tensor labels_c = labels.contiguous();
  at::Tensor lse = at::empty(lead, opts);
  at::Tensor partial = at::zeros({batch, n_chunks}, opts);
  at::Tensor count = at::zeros({batch, n_chunks}, logits.options().dtype(at::kInt));
  if (rows > 0) {
    SeqLogprobsFwdParams p;
    p.tok.logits = logits.data_ptr();
    p.tok.logits_layout = row_layout(logits, "logits");
    p.tok.dtype = scalar_kind(logits, "logits");
    p.tok.rows = rows;
    p.tok.vocab = logits.size(-1);
    p.tok.labels = labels_c.data_ptr<int64_t>();
    p.tok.ignore_index = ignore_index;
    p.tok.inv_temperature = 1.0 / temperature;
    p.tok.lse = lse.data_ptr();
    p.batch = batch;
    p.time = time;
    p.chunk = chunk;
    p.n_chunks = n_chunks;
    p.partial = partial.data_ptr();
    p.count = count.data_ptr<int32_t>();
    run_kernel(logits.device(), p, RLHF_CUDA_FN(seq_logprobs_fwd_cuda), &seq_logprobs_fwd_cpu);
  }
  at::Tensor n_valid = count.sum(-1).to(opts.dtype());
  at::Tensor seq = partial.sum(-1);
  if (average) seq = seq / n_valid.clamp_min(1);
  return {seq, n_valid, lse};
}

// --- preference losses --------------------------------------------------------

PrefLoss pref_loss_id(const std::string& name) {
  static const std::pair<const char*, PrefLoss> table[] = {
      {"sigmoid", PrefLoss::Sigmoid},    {"robust", PrefLoss::Robust},     {"exo_pair", PrefLoss::ExoPair},
      {"hinge", PrefLoss::Hinge},        {"ipo", PrefLoss::Ipo},           {"bco_pair", PrefLoss::BcoPair},
      {"sppo_hard", PrefLoss::SppoHard}, {"nca_pair", PrefLoss::NcaPair},  {"apo_zero", PrefLoss::ApoZero},
      {"apo_down", PrefLoss::ApoDown},   {"discopop", PrefLoss::Discopop}, {"orpo", PrefLoss::Orpo},
      {"kto_chosen", PrefLoss::KtoChosen}, {"kto_rejected", PrefLoss::KtoRejected},
  };
  for (const auto& [key, id] : table) {
    if (name == key) return id;
  }
  TORCH_CHECK_VALUE(false, "loss: unknown preference loss '", name, "'");
}

// All present inputs: 1-D, n elements, one device, float32 or float64 (all the same).
struct PrefInputs {
  int64_t n = 0;
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
};

PrefInputs check_pref_inputs(const std::vector<std::pair<const char*, const std::optional<at::Tensor>*>>& named) {
  PrefInputs in;
  const char* first = nullptr;
  for (const auto& [name, opt] : named) {
    if (!opt->has_value() || !(*opt)->defined()) continue;
    const at::Tensor& t = **opt;
    if (first == nullptr) {
      first = name;
      in.n = t.dim() == 1 ? t.size(0) : -1;
      in.device = t.device();
      in.dtype = t.scalar_type();
      TORCH_CHECK_TYPE(in.dtype == at::kFloat || in.dtype == at::kDouble, name, ": expected float32 or float64, got ",
                       in.dtype);
    }
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == in.n, name, ": expected shape [", in.n, "], got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == in.device, name, ": on ", t.device(), " but ", first, " is on ", in.device);
    TORCH_CHECK_TYPE(t.scalar_type() == in.dtype, name, ": dtype ", t.scalar_type(), " differs from ", first, "'s ",
                     in.dtype);
    TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
  }
  TORCH_CHECK_VALUE(first != nullptr, "chosen / rejected: at least one must be given");
  return in;
}

const void* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

PrefScalars pref_scalars(double beta, double gamma, double label_smoothing, double center, double tau,
                         double bco_delta, bool bco_batch_mean, double weight) {
  PrefScalars s;
  s.beta = beta;
  s.gamma = gamma;
  s.label_smoothing = label_smoothing;
  s.center = center;
  s.tau = tau;
  s.bco_delta = bco_delta;
  s.bco_batch_mean = bco_batch_mean;
  s.weight = weight;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> preference_fwd(
    const std::string& loss, const std::optional<at::Tensor>& chosen, const std::optional<at::Tensor>& rejected,
    const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected,
    const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& kl, double beta, double gamma,
    double label_smoothing, double center, double tau, double bco_delta, bool bco_batch_mean, double weight,
    bool write_rewards) {
  const PrefInputs in = check_pref_inputs({{"chosen", &chosen},
                                           {"rejected", &rejected},
                                           {"ref_chosen", &ref_chosen},
                                           {"ref_rejected", &ref_rejected},
                                           {"margin", &margin}});
  TORCH_CHECK_VALUE(beta > 0, "beta: must be positive, got ", beta);
  if (kl.has_value() && kl->defined()) {
    TORCH_CHECK_VALUE(kl->numel() == 1 && kl->device() == in.device && kl->scalar_type() == in.dtype,
                      "kl: expected one value of dtype ", in.dtype, " on ", in.device);
  }
  const auto opts = at::TensorOptions().dtype(in.dtype).device(in.device);
  const bool has_a = opt_ptr(chosen) != nullptr, has_b = opt_ptr(rejected) != nullptr;
  at::Tensor losses = at::empty({in.n}, opts);
  at::Tensor cr = at::empty({write_rewards && has_a ? in.n : 0}, opts);
  at::Tensor rr = at::empty({write_rewards && has_b ? in.n : 0}, opts);
  at::Tensor metrics = at::empty({kPrefMetrics}, opts);
  // The CUDA forward's per-chunk sums above kPrefFwdMultiMin pairs (the CPU kernel keeps its own).
  const int64_t parts = in.device.is_cuda() ? pref_fwd_parts(in.n) : 0;
  at::Tensor partials = parts > 0 ? at::empty({parts, kPrefMetrics}, opts.dtype(at::kDouble)) : at::Tensor();
  PrefFwdParams p;
  p.dtype = in.dtype == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.loss = pref_loss_id(loss);
  p.n = in.n;
  p.chosen = opt_ptr(chosen);
  p.rejected = opt_ptr(rejected);
  p.ref_chosen = opt_ptr(ref_chosen);
  p.ref_rejected = opt_ptr(ref_rejected);
  p.margin = opt_ptr(margin);
  p.kl = opt_ptr(kl);
  p.s = pref_scalars(beta, gamma, label_smoothing, center, tau, bco_delta, bco_batch_mean, weight);
  p.losses = losses.data_ptr();
  p.chosen_rewards = cr.numel() ? cr.data_ptr() : nullptr;
  p.rejected_rewards = rr.numel() ? rr.data_ptr() : nullptr;
  p.metrics = metrics.data_ptr();
  p.partials = partials.defined() ? partials.data_ptr() : nullptr;
  run_kernel(in.device, p, RLHF_CUDA_FN(preference_fwd_cuda), &preference_fwd_cpu);
  return {losses, cr, rr, metrics};
}

std::tuple<at::Tensor, at::Tensor> preference_bwd(
    const std::string& loss, const std::optional<at::Tensor>& chosen, const std::optional<at::Tensor>& rejected,
    const std::optional<at::Tensor>& ref_chosen, const std::optional<at::Tensor>& ref_rejected,
    const std::optional<at::Tensor>& margin, const std::optional<at::Tensor>& kl,
    const std::optional<at::Tensor>& metrics, double beta, double gamma, double label_smoothing, double center,
    double tau, double weight,
    const at::Tensor& grad_losses, int64_t grad_stride, double grad_scale, bool need_a, bool need_b) {
  const PrefInputs in = check_pref_inputs({{"chosen", &chosen},
                                           {"rejected", &rejected},
                                           {"ref_chosen", &ref_chosen},
                                           {"ref_rejected", &ref_rejected},
                                           {"margin", &margin}});
  // The forward's metrics: read by bco_pair's backward (its delta) only, None for the others.
  const bool has_metrics = metrics.has_value() && metrics->defined();
  if (has_metrics) {
    TORCH_CHECK_VALUE(metrics->numel() == kPrefMetrics && metrics->scalar_type() == in.dtype &&
                          metrics->device() == in.device && metrics->is_contiguous(),
                      "metrics: expected the forward's ", kPrefMetrics, " metrics");
  }
  TORCH_CHECK_VALUE(has_metrics || pref_loss_id(loss) != PrefLoss::BcoPair,
                    "metrics: bco_pair's backward needs the forward's metrics (its delta)");
  TORCH_CHECK_VALUE(grad_stride >= 0, "grad_stride: must be >= 0");
  at::Tensor g = grad_losses.to(in.dtype).contiguous();
  TORCH_CHECK_VALUE(g.device() == in.device, "grad_losses: on ", g.device(), " but inputs are on ", in.device);
  TORCH_CHECK_VALUE(in.n == 0 || (in.n - 1) * grad_stride < g.numel(), "grad_losses: too few elements");
  const auto opts = at::TensorOptions().dtype(in.dtype).device(in.device);
  at::Tensor ga = at::empty({need_a ? in.n : 0}, opts);
  at::Tensor gb = at::empty({need_b ? in.n : 0}, opts);
  PrefBwdParams p;
  p.dtype = in.dtype == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.loss = pref_loss_id(loss);
  p.n = in.n;
  p.chosen = opt_ptr(chosen);
  p.rejected = opt_ptr(rejected);
  p.ref_chosen = opt_ptr(ref_chosen);
  p.ref_rejected = opt_ptr(ref_rejected);
  p.margin = opt_ptr(margin);
  p.kl = opt_ptr(kl);
  p.metrics = opt_ptr(metrics);
  p.s = pref_scalars(beta, gamma, label_smoothing, center, tau, 0.0, false, weight);
  p.grad_losses = g.data_ptr();
  p.grad_stride = grad_stride;
  p.grad_scale = grad_scale;
  p.grad_a = need_a ? ga.data_ptr() : nullptr;
  p.grad_b = need_b ? gb.data_ptr() : nullptr;
  if (in.n == 0) return {ga, gb};
  run_kernel(in.device, p, RLHF_CUDA_FN(preference_bwd_cuda), &preference_bwd_cpu);
  return {ga, gb};
}

// --- PPO ------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> gae(const at::Tensor& rewards, const at::Tensor& values,
                                       const std::optional<at::Tensor>& mask, double gamma, double lam) {
  TORCH_CHECK_VALUE(rewards.dim() == 2, "rewards: expected shape [B, T], got ", rewards.sizes());
  TORCH_CHECK_VALUE(values.sizes() == rewards.sizes(), "values: expected shape ", rewards.sizes(), ", got ",
                    values.sizes());
  TORCH_CHECK_TYPE(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
                   "rewards: expected float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == rewards.scalar_type(), "values: dtype ", values.scalar_type(),
                   " differs from rewards' ", rewards.scalar_type());
  TORCH_CHECK_VALUE(values.device() == rewards.device(), "values: on ", values.device(), " but rewards are on ",
                    rewards.device());
  TORCH_CHECK_VALUE(gamma >= 0 && gamma <= 1, "gamma: must be in [0, 1], got ", gamma);
  TORCH_CHECK_VALUE(lam >= 0 && lam <= 1, "lam: must be in [0, 1], got ", lam);
  const int64_t B = rewards.size(0), T = rewards.size(1);
  auto unit_t = [](const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); };
  const at::Tensor r = unit_t(rewards), v = unit_t(values);
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK_VALUE(mask->sizes() == rewards.sizes(), "mask: expected shape ", rewards.sizes(), ", got ",
                      mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == rewards.device(), "mask: on ", mask->device(), " but rewards are on ",
                      rewards.device());
    m = unit_t(mask->to(at::kByte));
  }
  at::Tensor adv = at::empty({B, T}, rewards.options());
  at::Tensor ret = at::empty({B, T}, rewards.options());
  if (B == 0 || T == 0) return {adv, ret};
  GaeParams p;
  p.dtype = rewards.scalar_type() == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.batch = B;
  p.time = T;
  p.rewards = r.data_ptr();
  p.rewards_row_stride = r.stride(0);
  p.values = v.data_ptr();
  p.values_row_stride = v.stride(0);
  p.mask = m.defined() ? m.data_ptr<uint8_t>() : nullptr;
  p.mask_row_stride = m.defined() ? m.stride(0) : 0;
  p.gamma = gamma;
  p.lam = lam;
  p.advantages = adv.data_ptr();
  p.returns = ret.data_ptr();
  run_kernel(rewards.device(), p, RLHF_CUDA_FN(gae_cuda), &gae_cpu);
  return {adv, ret};
}

// Contiguous [B, T] float inputs of one dtype/device and a 0/1 mask as uint8.
void check_ppo_rows(const std::vector<std::pair<const char*, const at::Tensor*>>& named, const at::Tensor& mask) {
  const at::Tensor& first = *named.front().second;
  TORCH_CHECK_VALUE(first.dim() == 2, named.front().first, ": expected shape [B, T], got ", first.sizes());
  TORCH_CHECK_TYPE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble, named.front().first,
                   ": expected float32 or float64, got ", first.scalar_type());
  for (const auto& [name, t] : named) {
    TORCH_CHECK_VALUE(t->sizes() == first.sizes(), name, ": expected shape ", first.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == first.scalar_type(), name, ": dtype ", t->scalar_type(), " differs from ",
                     first.scalar_type());
    TORCH_CHECK_VALUE(t->device() == first.device(), name, ": on ", t->device(), " but ", named.front().first,
                      " is on ", first.device());
    TORCH_CHECK_VALUE(t->is_contiguous(), name, ": must be contiguous");
  }
  TORCH_CHECK_VALUE(mask.sizes() == first.sizes() && mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                        mask.device() == first.device(),
                    "mask: expected a contiguous uint8 tensor of shape ", first.sizes(), " on ", first.device());
}

PpoLossParams ppo_loss_params(int64_t kind, const at::Tensor& x, const at::Tensor& old, const at::Tensor& third,
                              const at::Tensor& mask, double p0, double p1, double p2, bool has_dual, int64_t agg) {
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, "kind: expected 0 (policy) or 1 (value), got ", kind);
  TORCH_CHECK_VALUE(agg >= 0 && agg <= 4, "agg: expected a loss_agg_mode id in 0..4, got ", agg);
  check_ppo_rows({{"x", &x}, {"old", &old}, {"third", &third}}, mask);
  PpoLossParams p;
  p.dtype = x.scalar_type() == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.kind = static_cast<int>(kind);
  p.agg = static_cast<int>(agg);
  p.batch = x.size(0);
  p.time = x.size(1);
  p.x = x.data_ptr();
  p.old = old.data_ptr();
  p.third = third.data_ptr();
  p.mask = mask.data_ptr<uint8_t>();
  p.p0 = p0;
  p.p1 = p1;
  p.p2 = p2;
  p.has_dual = has_dual;
  return p;
}

// (loss [], metrics [5], rows [B, 5]); ppo.h states the math.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_loss_fwd(int64_t kind, const at::Tensor& x, const at::Tensor& old,
                                                            const at::Tensor& third, const at::Tensor& mask,
                                                            double p0, double p1, double p2, bool has_dual,
                                                            int64_t agg) {
  PpoLossParams p = ppo_loss_params(kind, x, old, third, mask, p0, p1, p2, has_dual, agg);
  at::Tensor loss = at::empty({}, x.options());
  at::Tensor metrics = at::empty({5}, x.options());
  at::Tensor rows = at::empty({p.batch, 5}, x.options());
  p.loss = loss.data_ptr();
  p.metrics = metrics.data_ptr();
  p.rows = rows.data_ptr();
  run_kernel(x.device(), p, RLHF_CUDA_FN(ppo_loss_fwd_cuda), &ppo_loss_fwd_cpu);
  return {loss, metrics, rows};
}

at::Tensor ppo_loss_bwd(int64_t kind, const at::Tensor& x, const at::Tensor& old, const at::Tensor& third,
                        const at::Tensor& mask, const at::Tensor& rows, const at::Tensor& metrics,
                        const at::Tensor& grad_loss, double p0, double p1, double p2, bool has_dual, int64_t agg) {
  PpoLossParams p = ppo_loss_params(kind, x, old, third, mask, p0, p1, p2, has_dual, agg);
  const auto check_aux = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == x.scalar_type() && t.is_contiguous() &&
                          t.device() == x.device(),
                      name, ": expected a contiguous ", x.scalar_type(), " tensor of shape ", shape, " on ",
                      x.device(), " (the forward's output)");
  };
  check_aux("rows", rows, {p.batch, 5});
  check_aux("metrics", metrics, {5});
  at::Tensor g = grad_loss.to(x.scalar_type()).contiguous();
  TORCH_CHECK_VALUE(g.numel() == 1 && g.device() == x.device(), "grad_loss: expected one value on ", x.device());
  at::Tensor grad = at::empty_like(x);
  p.rows = rows.data_ptr();
  p.metrics = metrics.data_ptr();
  p.grad_loss = g.data_ptr();
  p.grad_x = grad.data_ptr();
  if (p.batch == 0 || p.time == 0) return grad;
  run_kernel(x.device(), p, RLHF_CUDA_FN(ppo_loss_bwd_cuda), &ppo_loss_bwd_cpu);
  return grad;
}

at::Tensor kl_penalty_run(const at::Tensor& logp, const at::Tensor& ref, const std::string& kind,
                          const std::optional<at::Tensor>& grad_out) {
  static const std::pair<const char*, int> kinds[] = {{"k1", 0}, {"abs", 1}, {"k2", 2}, {"k3", 3}};
  int id = -1;
  for (const auto& [name, value] : kinds) {
    if (kind == name) id = value;
  }
  TORCH_CHECK_VALUE(id >= 0, "kind: unknown KL estimator '", kind, "'; expected k1, abs, k2 or k3");
  TORCH_CHECK_TYPE(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kDouble,
                   "logprobs: expected float32 or float64, got ", logp.scalar_type());
  TORCH_CHECK_VALUE(ref.sizes() == logp.sizes() && ref.scalar_type() == logp.scalar_type() &&
                        ref.device() == logp.device(),
                    "ref_logprobs: expected the shape, dtype and device of logprobs");
  const at::Tensor l = logp.contiguous(), r = ref.contiguous();
  at::Tensor g;
  if (grad_out.has_value()) {
    g = grad_out->to(logp.scalar_type()).contiguous();
    TORCH_CHECK_VALUE(g.sizes() == logp.sizes() && g.device() == logp.device(), "grad: expected shape ",
                      logp.sizes());
  }
  at::Tensor out = at::empty_like(l);
  KlParams p;
  p.dtype = logp.scalar_type() == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.kind = id;
  p.n = l.numel();
  p.logp = l.data_ptr();
  p.ref = r.data_ptr();
  p.grad_out = g.defined() ? g.data_ptr() : nullptr;
  p.out = out.data_ptr();
  if (p.n == 0) return out;
  run_kernel(logp.device(), p, RLHF_CUDA_FN(kl_penalty_cuda), &kl_penalty_cpu);
  return out;
}

at::Tensor kl_penalty_fwd(const at::Tensor& logp, const at::Tensor& ref, const std::string& kind) {
  return kl_penalty_run(logp, ref, kind, std::nullopt);
}

at::Tensor kl_penalty_bwd(const at::Tensor& logp, const at::Tensor& ref, const std::string& kind,
                          const at::Tensor& grad) {
  return kl_penalty_run(logp, ref, kind, grad);
}

// --- masked whitening and GRPO advantages -----------------------------------------------

std::tuple<at::Tensor, at::Tensor> masked_whiten(const at::Tensor& x, const at::Tensor& mask, bool shift_mean,
                                                 double eps) {
  const ScalarKind kind = scalar_kind(x, "x");
  TORCH_CHECK_VALUE(x.is_contiguous(), "x: must be contiguous");
  TORCH_CHECK_VALUE(mask.sizes() == x.sizes() && mask.scalar_type() == at::kByte && mask.is_contiguous() &&
                        mask.device() == x.device(),
                    "mask: expected a contiguous uint8 tensor of shape ", x.sizes(), " on ", x.device());
  TORCH_CHECK_VALUE(eps >= 0, "eps: must be >= 0, got ", eps);
  const auto acc = x.options().dtype(acc_type(x));
  at::Tensor out = at::empty(x.sizes(), acc);
  at::Tensor stats = at::empty({4}, acc);
  const int64_t n_parts = (x.numel() + kWhitenChunk - 1) / kWhitenChunk;
  at::Tensor partials = x.is_cuda() ? at::empty({3, n_parts}, acc) : at::Tensor();
  WhitenParams p;
  p.dtype = kind;
  p.n = x.numel();
  p.x = x.data_ptr();
  p.mask = mask.data_ptr<uint8_t>();
  p.eps = eps;
  p.shift_mean = shift_mean;
  p.out = out.data_ptr();
  p.stats = stats.data_ptr();
  p.partials = partials.defined() ? partials.data_ptr() : nullptr;
  run_kernel(x.device(), p, RLHF_CUDA_FN(masked_whiten_cuda), &masked_whiten_cpu);
  return {out, stats};
}

at::Tensor grpo_advantages(const at::Tensor& scores, const at::Tensor& offsets, bool norm_by_std, double eps) {
  TORCH_CHECK_VALUE(scores.dim() == 1 && scores.is_contiguous(), "scores: expected a contiguous 1-D tensor, got ",
                    scores.sizes());
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "scores: expected float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.scalar_type() == at::kLong &&
                        offsets.is_contiguous() && offsets.device() == scores.device(),
                    "offsets: expected a contiguous 1-D int64 tensor of G + 1 group offsets on ", scores.device());
  TORCH_CHECK_VALUE(eps >= 0, "eps: must be >= 0, got ", eps);
  at::Tensor out = at::empty_like(scores);
  GrpoParams p;
  p.dtype = scores.scalar_type() == at::kDouble ? ScalarKind::Float64 : ScalarKind::Float32;
  p.n = scores.numel();
  p.groups = offsets.numel() - 1;
  p.scores = scores.data_ptr();
  p.offsets = offsets.data_ptr<int64_t>();
  p.norm_by_std = norm_by_std;
  p.eps = eps;
  p.out = out.data_ptr();
  if (p.n == 0 || p.groups == 0) return out;
  run_kernel(scores.device(), p, RLHF_CUDA_FN(grpo_advantages_cuda), &grpo_advantages_cpu);
  return out;
}

// --- the fused PPO sweep from logits -------------------------------------------------

// Checks the per-token inputs and fills everything but the gradient.
PpoLogitsParams ppo_logits_params(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old,
                                  const at::Tensor& adv, const std::optional<at::Tensor>& ref,
                                  const at::Tensor& weights, double temperature, int64_t ignore_index, double low,
                                  double high, double clip_c, bool has_dual, int64_t kl_kind, double kl_coef,
                                  double entropy_coef, at::Tensor& stats) {
  check_logits(logits);
  TORCH_CHECK_VALUE(logits.dim() >= 2, "logits: expected shape [..., T, V]");
  TORCH_CHECK_VALUE(temperature > 0, "temperature: must be positive, got ", temperature);
  TORCH_CHECK_VALUE(kl_kind >= 0 && kl_kind <= 3, "kl_kind: expected 0 (k1), 1 (abs), 2 (k2) or 3 (k3), got ",
                    kl_kind);
  const int64_t rows = logits.numel() / logits.size(-1);
  const auto acc = acc_type(logits);
  auto check_flat = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), name, ": expected a contiguous [",
                      rows, "] tensor, got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == logits.device(), name, ": on ", t.device(), " but logits are on ",
                      logits.device());
  };
  check_flat(labels, "labels", at::kLong);
  check_flat(old, "old", acc);
  check_flat(adv, "adv", acc);
  check_flat(weights, "weights", acc);
  const bool has_ref = ref.has_value() && ref->defined();
  if (has_ref) check_flat(*ref, "ref", acc);
  stats = at::empty({rows, kFusedStats}, logits.options().dtype(acc));
  PpoLogitsParams p;
  p.logits = logits.data_ptr();
  p.logits_layout = row_layout(logits, "logits");
  p.grad_layout = p.logits_layout;
  p.dtype = scalar_kind(logits, "logits");
  p.rows = rows;
  p.vocab = logits.size(-1);
  p.labels = labels.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.old = old.data_ptr();
  p.adv = adv.data_ptr();
  p.ref = has_ref ? ref->data_ptr() : nullptr;
  p.weights = weights.data_ptr();
  p.clip_low = low;
  p.clip_high = high;
  p.clip_c = clip_c;
  p.has_dual = has_dual;
  p.kl_kind = static_cast<int>(kl_kind);
  p.kl_coef = kl_coef;
  p.entropy_coef = entropy_coef;
  p.stats = stats.data_ptr();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_logits_fused(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old, const at::Tensor& adv,
    const std::optional<at::Tensor>& ref, const at::Tensor& weights, double temperature, int64_t ignore_index,
    double low, double high, double clip_c, bool has_dual, int64_t kl_kind, double kl_coef, double entropy_coef,
    bool write_grad) {
  at::Tensor stats;
  PpoLogitsParams p = ppo_logits_params(logits, labels, old, adv, ref, weights, temperature, ignore_index, low, high,
                                        clip_c, has_dual, kl_kind, kl_coef, entropy_coef, stats);
  at::Tensor grad = write_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  if (write_grad) {
    p.grad = grad.data_ptr();
    p.grad_layout = row_layout(grad, "grad");
  }
  run_kernel(logits.device(), p, RLHF_CUDA_FN(ppo_logits_fused_cuda), &ppo_logits_fused_cpu);
  // the loss: a deterministic sum of the per-token weighted terms
  return {stats.select(1, 0).sum(), stats, grad};
}

std::tuple<at::Tensor, at::Tensor> ppo_logits_fused_inplace(
    const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& old, const at::Tensor& adv,
    const std::optional<at::Tensor>& ref, const at::Tensor& weights, double temperature, int64_t ignore_index,
    double low, double high, double clip_c, bool has_dual, int64_t kl_kind, double kl_coef, double entropy_coef) {
  check_distinct_rows(logits);
  at::Tensor stats;
  PpoLogitsParams p = ppo_logits_params(logits, labels, old, adv, ref, weights, temperature, ignore_index, low, high,
                                        clip_c, has_dual, kl_kind, kl_coef, entropy_coef, stats);
  p.grad = logits.data_ptr();  // same layout: each element is read before it is overwritten
  run_kernel(logits.device(), p, RLHF_CUDA_FN(ppo_logits_fused_cuda), &ppo_logits_fused_cpu);
  return {stats.select(1, 0).sum(), stats};
}

// The fused sweep's per-token inputs that depend on the mask (ops/ppo.py: _fused_inputs;
// its Python twin, _fused_inputs_torch, runs where this op cannot: traced, or without
// the extension): the labels as flat int64 with every masked token set to ignore_index,
// the aggregation weights (ops/ppo.py: token_weights; flat, in the accumulation dtype)
// and the count of valid tokens clamped to >= 1. One kernel (ppo.h: PpoInputsParams) for
// int32 / int64 labels and masks of the common dtypes, any strides, 1 to
// kMaxInputsTokens tokens: on a GPU the host time of each launch before the sweep's is
// time the device idles, and the ATen composition below (past that bound, or for other
// dtypes) is ~8 launches. Autocast is off: the weights keep the accumulation dtype
// whatever the surrounding region computes in.
std::optional<MaskKind> inputs_mask_kind(at::ScalarType t) {
  switch (t) {
    case at::kBool:
    case at::kByte:
    case at::kChar: return MaskKind::Byte;
    case at::kInt: return MaskKind::Int32;
    case at::kLong: return MaskKind::Int64;
    case at::kFloat: return MaskKind::Float32;
    case at::kDouble: return MaskKind::Float64;
    case at::kHalf:
    case at::kBFloat16: return MaskKind::Bits16;
    default: return std::nullopt;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ppo_fused_inputs(const at::Tensor& labels, const at::Tensor& mask,
                                                                int64_t agg, int64_t ignore_index, bool double_acc) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(labels.dim() == 2, "labels: expected shape [B, T], got ", labels.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels: expected an integer tensor, got dtype ", labels.scalar_type());
  TORCH_CHECK_VALUE(mask.sizes() == labels.sizes() && mask.device() == labels.device(), "mask: expected shape ",
                    labels.sizes(), " on ", labels.device(), ", got ", mask.sizes(), " on ", mask.device());
  TORCH_CHECK_VALUE(agg >= ppo_loss::kTokenMean && agg <= ppo_loss::kTokenSum, "agg: unknown loss_agg_mode id ", agg);
  const auto acc = double_acc ? at::kDouble : at::kFloat;
  const auto kind = inputs_mask_kind(mask.scalar_type());
  const bool narrow = labels.scalar_type() == at::kInt;
  if (labels.numel() > 0 && labels.numel() <= kMaxInputsTokens && kind &&
      (narrow || labels.scalar_type() == at::kLong) &&
      (labels.is_cpu() || labels.is_cuda())) {
    at::Tensor flat_labels = at::empty({labels.numel()}, labels.options().dtype(at::kLong));
    at::Tensor weights = at::empty({labels.numel()}, labels.options().dtype(acc));
    at::Tensor n_valid = at::empty({}, labels.options().dtype(acc));
    PpoInputsParams p;
    p.batch = labels.size(0);
    p.time = labels.size(1);
    p.labels = labels.data_ptr();
    p.labels_int32 = narrow;
    p.labels_stride0 = labels.stride(0);
    p.labels_stride1 = labels.stride(1);
    p.mask = mask.data_ptr();
    p.mask_kind = *kind;
    p.mask_stride0 = mask.stride(0);
    p.mask_stride1 = mask.stride(1);
    p.ignore_index = ignore_index;
    p.agg = static_cast<int>(agg);
    p.double_acc = double_acc;
    p.labels_out = flat_labels.data_ptr<int64_t>();
    p.weights = weights.data_ptr();
    p.n_valid = n_valid.data_ptr();
    run_kernel(labels.device(), p, RLHF_CUDA_FN(ppo_fused_inputs_cuda), &ppo_fused_inputs_cpu);
    return {flat_labels, weights, n_valid};
  }
  // int64 first: compared in a narrower dtype, ignore_index would wrap (uint8: -100 is 156)
  const at::Tensor wide = labels.to(at::kLong).contiguous();
  at::Tensor valid = wide.ne(ignore_index);
  valid.logical_and_(mask);  // any dtype: nonzero is valid
  at::Tensor flat_labels = at::where(valid, wide, ignore_index).reshape({-1});
  at::Tensor weights = valid.to(acc);
  at::Tensor n_valid = weights.sum().clamp_min_(1);
  if (agg == ppo_loss::kTokenMean) {
    weights.div_(n_valid);
  } else if (agg != ppo_loss::kTokenSum) {
    at::Tensor count = weights.sum(-1, /*keepdim=*/true);
    at::Tensor seqs = count.gt(0).to(acc).sum().clamp_min_(1);
    if (agg == ppo_loss::kSeqMeanTokenSumNorm) {
      weights.div_(seqs.mul(std::max<int64_t>(labels.size(-1), 1)));
    } else if (agg == ppo_loss::kSeqMeanTokenSum) {
      weights.div_(seqs);
    } else {
      weights.div_(count.clamp_min_(1).mul_(seqs));
    }
  }
  return {flat_labels, weights.reshape({-1}), n_valid};
}

// The fused sweep's metrics from its per-token stats ([tokens, 7]: weighted loss, pg loss,
// entropy, kl, clipped, clipped lower, -log ratio; ops/ppo.py: _fused_metrics), as
// [pg, entropy, kl, clipfrac, clipfrac_lower, approx_kl]: the first three aggregated with
// the weights, the last three means over the n_valid valid tokens (for token-mean, whose
// weights are 1 / n_valid, all six are one product). Without a reference the kl is 0 (a
// kept token with a label outside [0, V) has a NaN stats row, kl column included).
// Autocast off, as above.
at::Tensor ppo_fused_metrics(const at::Tensor& stats, const at::Tensor& weights, const at::Tensor& n_valid,
                             int64_t agg, bool has_ref) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(1) == kFusedStats, "stats: expected shape [tokens, ",
                    kFusedStats, "], got ", stats.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == stats.size(0), "weights: expected shape [",
                    stats.size(0), "], got ", weights.sizes());
  at::Tensor m = agg == ppo_loss::kTokenMean
                     ? at::mv(stats.narrow(1, 1, 6).t(), weights)
                     : at::cat({at::mv(stats.narrow(1, 1, 3).t(), weights), stats.narrow(1, 4, 3).sum(0).div_(n_valid)});
  if (!has_ref) m.select(0, 2).zero_();
  return m;
}

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef RLHF_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(RLHF_CUDA_ARCHS);
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
#endif
  d["cpu_parallel_backend"] = AT_PARALLEL_OPENMP ? "openmp" : (AT_PARALLEL_NATIVE ? "native thread pool" : "other");
  d["cpu_threads"] = at::get_num_threads();
  return d;
}

}  // namespace
}  // namespace rlhf

TORCH_LIBRARY(rlhf_kernels, m) {
  m.def(
      "token_logprobs_fwd_native(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool return_entropy, bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd_native(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, Tensor labels, "
      "Tensor lse, Tensor entropy, float temperature, int ignore_index) -> Tensor");
  m.def(
      "token_logprobs_bwd_inplace_native(Tensor(a!) logits, Tensor grad_logprobs, Tensor? grad_entropy, "
      "Tensor labels, Tensor lse, Tensor entropy, float temperature, int ignore_index) -> ()");
  m.def(
      "sequence_logprobs_fwd_native(Tensor logits, Tensor labels, float temperature, int ignore_index, "
      "bool average, bool inplace_backward) -> (Tensor, Tensor, Tensor)");
  m.def(
      "preference_fwd_native(str loss, Tensor? chosen, Tensor? rejected, Tensor? ref_chosen, Tensor? ref_rejected, "
      "Tensor? margin, Tensor? kl, float beta, float gamma, float label_smoothing, float center, float tau, "
      "float bco_delta, bool bco_batch_mean, float weight, bool write_rewards) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "preference_bwd_native(str loss, Tensor? chosen, Tensor? rejected, Tensor? ref_chosen, Tensor? ref_rejected, "
      "Tensor? margin, Tensor? kl, Tensor? metrics, float beta, float gamma, float label_smoothing, float center, "
      "float tau, float weight, Tensor grad_losses, int grad_stride, float grad_scale, bool need_a, bool need_b) "
      "-> (Tensor, Tensor)");
  m.def("gae_native(Tensor rewards, Tensor values, Tensor? mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def(
      "ppo_loss_fwd_native(int kind, Tensor x, Tensor old, Tensor third, Tensor mask, float p0, float p1, float p2, "
      "bool has_dual, int agg) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ppo_loss_bwd_native(int kind, Tensor x, Tensor old, Tensor third, Tensor mask, Tensor rows, Tensor metrics, "
      "Tensor grad_loss, float p0, float p1, float p2, bool has_dual, int agg) -> Tensor");
  m.def("kl_penalty_fwd_native(Tensor logp, Tensor ref, str kind) -> Tensor");
  m.def("masked_whiten_native(Tensor x, Tensor mask, bool shift_mean, float eps) -> (Tensor, Tensor)");
  m.def("grpo_advantages_native(Tensor scores, Tensor offsets, bool norm_by_std, float eps) -> Tensor");
  m.def("kl_penalty_bwd_native(Tensor logp, Tensor ref, str kind, Tensor grad) -> Tensor");
  m.def(
      "ppo_logits_fused_native(Tensor logits, Tensor labels, Tensor old, Tensor adv, Tensor? ref, Tensor weights, "
      "float temperature, int ignore_index, float low, float high, float clip_c, bool has_dual, int kl_kind, "
      "float kl_coef, float entropy_coef, bool write_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ppo_logits_fused_inplace_native(Tensor(a!) logits, Tensor labels, Tensor old, Tensor adv, Tensor? ref, "
      "Tensor weights, float temperature, int ignore_index, float low, float high, float clip_c, bool has_dual, "
      "int kl_kind, float kl_coef, float entropy_coef) -> (Tensor, Tensor)");
  m.def(
      "ppo_fused_inputs_native(Tensor labels, Tensor mask, int agg, int ignore_index, bool double_acc) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("ppo_fused_metrics_native(Tensor stats, Tensor weights, Tensor n_valid, int agg, bool has_ref) -> Tensor");
}

// One implementation per op for both dispatch keys: each entry point picks the CPU
// or CUDA kernel from its inputs' device (run_kernel).
static void impl_native_ops(torch::Library& m) {
  m.impl("ppo_logits_fused_native", &rlhf::ppo_logits_fused);
  m.impl("ppo_logits_fused_inplace_native", &rlhf::ppo_logits_fused_inplace);
  m.impl("ppo_fused_inputs_native", &rlhf::ppo_fused_inputs);
  m.impl("ppo_fused_metrics_native", &rlhf::ppo_fused_metrics);
  m.impl("token_logprobs_fwd_native", &rlhf::token_logprobs_fwd);
  m.impl("token_logprobs_bwd_native", &rlhf::token_logprobs_bwd);
  m.impl("token_logprobs_bwd_inplace_native", &rlhf::token_logprobs_bwd_inplace);
  m.impl("sequence_logprobs_fwd_native", &rlhf::sequence_logprobs_fwd);
  m.impl("preference_fwd_native", &rlhf::preference_fwd);
  m.impl("preference_bwd_native", &rlhf::preference_bwd);
  m.impl("gae_native", &rlhf::gae);
  m.impl("ppo_loss_fwd_native", &rlhf::ppo_loss_fwd);
  m.impl("ppo_loss_bwd_native", &rlhf::ppo_loss_bwd);
  m.impl("kl_penalty_fwd_native", &rlhf::kl_penalty_fwd);
  m.impl("kl_penalty_bwd_native", &rlhf::kl_penalty_bwd);
  m.impl("masked_whiten_native", &rlhf::masked_whiten);
  m.impl("grpo_advantages_native", &rlhf::grpo_advantages);
}

TORCH_LIBRARY_IMPL(rlhf_kernels, CPU, m) { impl_native_ops(m); }

#ifdef RLHF_WITH_CUDA
TORCH_LIBRARY_IMPL(rlhf_kernels, CUDA, m) { impl_native_ops(m); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlhf_kernels native ops (CPU and, when built with nvcc, CUDA)";
  m.def("build_info", &rlhf::build_info, "How this extension was built");
#ifdef RLHF_WITH_CUDA
  // (parts per row, vectors per part) of a CUDA log-prob kernel's column parts
  const auto parts_of = [](void (*query)(int64_t, int64_t, int, int*, int*)) {
    return [query](int64_t rows, int64_t vocab, int itemsize) {
      int parts = 0, part_vecs = 0;
      query(rows, vocab, itemsize, &parts, &part_vecs);
      return std::make_pair(parts, part_vecs);
    };
  };
  m.def("logprobs_bwd_parts", parts_of(&rlhf::logprobs_bwd_parts_cuda),
        "(parts per row, vectors per part) of the CUDA log-prob backward (RLHF_KERNELS_BWD_PART_COLS)");
  m.def("logprobs_fwd_parts", parts_of(&rlhf::logprobs_fwd_parts_cuda),
        "(parts per row, vectors per part) of the CUDA log-prob forward (RLHF_KERNELS_FWD_PART_COLS)");
  m.def(
      "ppo_cluster_layout",
      [](int64_t vocab, int itemsize, int64_t max_smem, int buffers) {
        int64_t out[3] = {0, 0, 0};
        rlhf::ppo_cluster_layout_cuda(vocab, itemsize, max_smem, buffers, out);
        return std::make_tuple(out[0], out[1], out[2]);
      },
      "(blocks a cluster, slice, shared memory a block) of the fused PPO step's sm_90 cluster kernel "
      "(RLHF_KERNELS_CLUSTER_SLICE_BYTES; buffers: 2 for the double-buffered mode)",
      pybind11::arg("vocab"), pybind11::arg("itemsize"), pybind11::arg("max_smem"), pybind11::arg("buffers") = 1);
  m.def("ppo_cluster_launches", &rlhf::ppo_cluster_launches_cuda,
        "Launches of the fused PPO step's sm_90 cluster kernel so far in this process (for tests)");
#endif
}
