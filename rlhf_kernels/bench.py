"""Microbenchmarks: every backend of every op next to the baselines people use today.

``rlhf-kernels bench`` runs them and writes a table, JSON and a PNG plot.
Times are medians over repeated runs with the 25th-75th percentile spread;
memory is the peak extra memory of the measured step (CUDA: the rise of
``max_memory_allocated``; CPU: the peak of the allocations the profiler sees)
and the bytes a forward leaves allocated for its backward; on CUDA the achieved
bandwidth (or, for matmul-bound ops, TFLOP/s over a whole forward + backward) is
reported against the card's peak.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rlhf_kernels
from rlhf_kernels import _dispatch
from rlhf_kernels.ops import linear as linear_ops

# Peak HBM bandwidth by device name fragment, in TB/s (vendor data sheets).
PEAK_TBPS = {
    "H200": 4.8,
    "H100 SXM": 3.35,
    "H100 80GB HBM3": 3.35,
    "H100 PCIe": 2.0,
    "H100 NVL": 3.9,
    "H100": 3.35,
    "A100-SXM4-80GB": 2.039,
    "A100 80GB PCIe": 1.935,
    "A100": 1.555,
    "L40S": 0.864,
    "L40": 0.864,
    "L4": 0.3,
    "RTX 4090": 1.008,
}


# Peak dense bf16 / fp16 tensor-core throughput, in TFLOP/s (vendor data sheets).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
}


def peak_tbps(device_name: str | None) -> float | None:
    return _lookup(PEAK_TBPS, device_name)


def peak_tflops(device_name: str | None) -> float | None:
    return _lookup(PEAK_TFLOPS, device_name)


def _lookup(table: dict[str, float], device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in table.items():
        if key in device_name:
            return value
    return None


@dataclasses.dataclass
class Result:
    op: str
    provider: str
    mode: str  # fwd | bwd | fwd+bwd
    shape: str
    dtype: str
    device: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    runs: int
    peak_mem_mb: float | None
    saved_mb: float | None  # held from forward to backward (see _held_bytes)
    bytes_moved: int
    tbps: float | None = None
    frac_peak: float | None = None  # of the card's peak bandwidth, or of its peak TFLOP/s for matmul-bound ops
    error: str | None = None
    tflops: float | None = None
    baseline: str = "eager"
    graph_us: float | None = None  # device time per call, from a CUDA graph replay (small ops, see _graph_us)
    queued_ms: float | None = None  # median with the host's enqueueing hidden (large ops on CUDA, see _queued_ms)


# --- the providers: how people compute per-token log-probs today, and ours ---------


def eager_logprobs(logits, labels, temperature=1.0):
    """What most RLHF code writes: a float32 log_softmax of the whole [N, V], then gather."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def rowloop_logprobs(logits, labels, temperature=1.0):
    """A row-by-row loop in the style of TRL's selective_log_softmax (bounds the
    float32 temporary to one row at a time, at the price of a Python loop)."""
    out = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)
        out.append(row_logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def eager_dpo_loss(pc, pr, rc, rr, beta=0.1):
    """TRL's sigmoid DPO loss and the metrics its trainer logs, as eager ops."""
    logits = (pc - pr) - (rc - rr)
    losses = -torch.nn.functional.logsigmoid(beta * logits)
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    metrics = (
        (chosen_rewards > rejected_rewards).float().mean(),
        (chosen_rewards - rejected_rewards).mean(),
        chosen_rewards.mean(),
        rejected_rewards.mean(),
    )
    return losses.mean(), metrics


def eager_sequence_logprobs(logits, labels, mask):
    """Sequence log-probs as usually written: float32 log_softmax of [B, T, V], gather, mask, sum."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def eager_dpo_step(logits, labels, mask, ref_logps, beta=0.1):
    """The unfused DPO step from logits: log_softmax, gather, mask, sum, then the loss."""
    seq = eager_sequence_logprobs(logits, labels, mask)
    half = seq.shape[0] // 2
    return eager_dpo_loss(seq[:half], seq[half:], ref_logps[:half], ref_logps[half:], beta)[0]


_COMPILED: dict[str, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """torch.compile of an eager baseline; every shape / grad mode recompiles, so the
    recompile limit is raised to keep the baseline compiled rather than silently eager."""

    def call(*args):
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        if fn.__name__ not in _COMPILED:
            _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
        return _COMPILED[fn.__name__](*args)

    return call


def _kernel_backends(device: torch.device, native_op: str | None = None) -> list[str]:
    """Backends worth timing: the interpreter is a test vehicle, not something to time."""
    return [
        b for b in _dispatch.BACKENDS
        if _dispatch.unavailable_reason(b, device, native_op) is None and not (b == "triton" and device.type != "cuda")
    ]  # fmt: skip


@dataclasses.dataclass
class Problem:
    """One benchmarked op on one input: its providers and its memory traffic model."""

    op: str
    shape: str
    dtype: torch.dtype
    inputs: dict[str, torch.Tensor]
    grad_inputs: tuple[str, ...]
    providers: dict[str, Callable[[dict[str, torch.Tensor]], object]]
    bytes_moved: dict[str, int]
    modes: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
    baseline: str = "eager"  # the provider the table's speedup column divides by
    flops: dict[str, int] | None = None  # matmul-bound ops: useful FLOPs per mode, reported as TFLOP/s


def _liger_cross_entropy():
    """Liger-Kernel's fused cross entropy (reduction='none' gives -log p per token),
    when installed and a GPU is present: the strongest published baseline. It
    writes its gradient into the logits during forward (so its "bwd" is nearly
    free and its "fwd" includes the gradient); only values change, so the other
    providers' timings are unaffected."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss(reduction="none")


@functools.cache
def _trl_kernel(name: str):
    """One of TRL's kernels (``trl.kernels``), when TRL is installed: what its trainers run
    today (trl 1.16: ``selective_log_softmax`` is a fused Triton log-prob + entropy kernel on
    GPUs, and the DPO / GRPO / RLOO / KTO trainers score tokens with its chunked fused LM head,
    ``ChunkedLogProbFunction``). Importing ``trl.kernels`` needs only torch, transformers and
    (for the Triton one) triton."""
    try:
        import trl.kernels as kernels
    except Exception:  # not installed, or an incompatible install: no baseline
        return None
    return getattr(kernels, name, None)


def token_logprobs_problem(n_tokens, vocab, dtype, device, temperature=1.0) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n_tokens, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.token_logprobs(
            i["logits"], i["labels"], temperature=temperature, check_labels=False, backend=b
        )
    if device.type == "cuda" and "triton" in _kernel_backends(device):  # one tile ahead (triton/logprobs.py)
        provs["rlhf_kernels[triton,prefetch]"] = lambda i: _with_env(
            {"RLHF_KERNELS_LOGPROBS_PREFETCH": "1"},
            lambda: rlhf_kernels.token_logprobs(i["logits"], i["labels"], temperature=temperature,
                                                check_labels=False, backend="triton"),
        )  # fmt: skip
    # the forward's untimed knobs on CUDA: column parts (both backends) and the CUDA kernel's
    # streaming-load hints (common.cuh)
    knobs = {("native", "L2 256B"): {"RLHF_KERNELS_LOAD_HINT": "1"}}
    for b in ("native", "triton"):
        for cols in (8192, 16384):
            knobs[(b, f"fwd parts {cols // 1024}K")] = {"RLHF_KERNELS_FWD_PART_COLS": str(cols)}
    for (b, label), env in knobs.items():
        if device.type == "cuda" and b in _kernel_backends(device):
            provs[f"rlhf_kernels[{b},{label}]"] = lambda i, b=b, env=env: _with_env(
                env, lambda: rlhf_kernels.token_logprobs(i["logits"], i["labels"], temperature=temperature,
                                                         check_labels=False, backend=b),
            )  # fmt: skip
    provs["eager"] = lambda i: eager_logprobs(i["logits"], i["labels"], temperature)
    provs["torch.compile"] = lambda i: _compiled(eager_logprobs)(i["logits"], i["labels"], temperature)
    liger = _liger_cross_entropy() if device.type == "cuda" else None
    if liger is not None and temperature == 1.0:
        provs["liger_kernel"] = lambda i: -liger(i["logits"], i["labels"])
    trl_fused = _trl_kernel("selective_log_softmax_and_entropy") if device.type == "cuda" else None
    if trl_fused is not None:  # TRL's selective_log_softmax on a GPU (its CPU path is a row loop, as row_loop)
        provs["trl"] = lambda i: trl_fused(i["logits"], i["labels"], temperature=temperature)[0]
    if n_tokens <= 4096:
        provs["row_loop"] = lambda i: rowloop_logprobs(i["logits"], i["labels"], temperature)
    size = n_tokens * vocab * logits.element_size()
    return Problem("token_logprobs", f"{n_tokens}x{vocab}", dtype, {"logits": logits, "labels": labels}, ("logits",),
                   provs, {"fwd": size, "bwd": 2 * size, "fwd+bwd": 3 * size})  # fmt: skip


def eager_linear_logprobs(hidden, weight, labels):
    """Per-token log-probs from hidden states as usually written: the LM head's [N, V]
    logits, a float32 log_softmax of them, then gather."""
    return eager_logprobs(hidden @ weight.t(), labels)


def _fused_linear_baselines(device: torch.device) -> dict[str, Callable]:
    """Liger-Kernel's fused linear cross entropy and Apple's Cut Cross-Entropy (per-token
    -log p with reduction='none'), when installed and a GPU is present."""
    provs: dict[str, Callable] = {}
    if device.type != "cuda":
        return provs
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        provs["liger_kernel"] = lambda i: -liger(i["weight"], i["hidden"], i["labels"])
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        # its default filters small gradient entries (an approximation); filter_eps=None is exact
        def cce(i, **kw):
            return -linear_cross_entropy(i["hidden"], i["weight"], i["labels"], reduction="none", **kw)

        provs["cut_cross_entropy"] = cce
        provs["cut_cross_entropy[exact]"] = functools.partial(cce, filter_eps=None)
    except ImportError:
        pass
    return provs


def linear_logprobs_problem(n_tokens, hidden_size, vocab, dtype, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, generator=g).to(dtype=dtype, device=device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * (2 / hidden_size**0.5)).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.linear_token_logprobs(
            i["hidden"], i["weight"], i["labels"], check_labels=False, backend=b
        )
    if "native" in _kernel_backends(device):  # backward by the cut "auto" does not take (ops/linear.py: _by_vocab)
        chunk = linear_ops.DEFAULT_CHUNK_BYTES // (vocab * dtype.itemsize)
        auto_vocab = linear_ops._by_vocab(n_tokens, vocab, True, True, max(1, chunk))
        cut = "rows" if auto_vocab else "vocab"
        provs[f"rlhf_kernels[native,{'token chunks' if auto_vocab else 'vocab slices'}]"] = lambda i: _with_env(
            {"RLHF_KERNELS_LINEAR_BWD_CUT": cut}, lambda: provs["rlhf_kernels[native]"](i))
    provs["eager"] = lambda i: eager_linear_logprobs(i["hidden"], i["weight"], i["labels"])
    provs["torch.compile"] = lambda i: _compiled(eager_linear_logprobs)(i["hidden"], i["weight"], i["labels"])
    provs.update(_fused_linear_baselines(device))
    trl_head = _trl_kernel("ChunkedLogProbFunction")
    if trl_head is not None:  # TRL's fused LM head (its default 32768-column tiles; log-probs only)
        provs["trl[fused_lm_head]"] = lambda i: trl_head.apply(i["hidden"], i["weight"], None, i["labels"], 1.0,
                                                               32768, None, 1.0, ())[0]  # fmt: skip
    mm = 2 * n_tokens * hidden_size * vocab  # one [N, H] x [H, V] product
    inputs = {"hidden": hidden, "weight": weight, "labels": labels}
    return Problem("linear_logprobs", f"{n_tokens}x{hidden_size}x{vocab}", dtype, inputs, ("hidden", "weight"),
                   provs, {"fwd": 0, "bwd": 0, "fwd+bwd": 0},
                   flops={"fwd": mm, "bwd": 2 * mm, "fwd+bwd": 3 * mm})  # fmt: skip


def sequence_logprobs_problem(batch, seq, vocab, dtype, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    mask = (torch.arange(seq) >= seq // 4).expand(batch, seq).to(device)  # the first quarter is the prompt
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "sequence_logprobs_fwd_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.sequence_logprobs(
            i["logits"], i["labels"], i["mask"], check_labels=False, backend=b
        )
    provs["eager"] = lambda i: eager_sequence_logprobs(i["logits"], i["labels"], i["mask"])
    provs["torch.compile"] = lambda i: _compiled(eager_sequence_logprobs)(i["logits"], i["labels"], i["mask"])
    size = logits.numel() * logits.element_size()
    inputs = {"logits": logits, "labels": labels, "mask": mask}
    return Problem("sequence_logprobs", f"{batch}x{seq}x{vocab}", dtype, inputs, ("logits",), provs,
                   {"fwd": size, "bwd": 2 * size, "fwd+bwd": 3 * size})  # fmt: skip


def dpo_step_problem(pairs, seq, vocab, dtype, device, beta=0.1) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(2 * pairs, seq, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (2 * pairs, seq), generator=g).to(device)
    mask = (torch.arange(seq) >= seq // 4).expand(2 * pairs, seq).to(device)  # the first quarter is the prompt
    ref_logps = (torch.randn(2 * pairs, generator=g) - seq).to(device)
    inputs = {"logits": logits, "labels": labels, "mask": mask, "ref": ref_logps}

    def fused(i, b):
        lp = rlhf_kernels.sequence_logprobs(i["logits"], i["labels"], i["mask"], check_labels=False, backend=b)
        r = i["ref"]
        return rlhf_kernels.dpo_loss(lp[:pairs], lp[pairs:], r[:pairs], r[pairs:], beta=beta, backend=b).losses.mean()

    provs: dict[str, Callable] = {f"rlhf_kernels[{b}]": (lambda i, b=b: fused(i, b)) for b in _kernel_backends(device)}
    provs["eager"] = lambda i: eager_dpo_step(i["logits"], i["labels"], i["mask"], i["ref"], beta)
    provs["torch.compile"] = lambda i: _compiled(eager_dpo_step)(i["logits"], i["labels"], i["mask"], i["ref"], beta)
    size = logits.numel() * logits.element_size()
    return Problem("dpo_step", f"2x{pairs}x{seq}x{vocab}", dtype, inputs, ("logits",), provs,
                   {"fwd": size, "bwd": 2 * size, "fwd+bwd": 3 * size})  # fmt: skip


def dpo_loss_problem(pairs, device, beta=0.1) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    pc, pr, rc, rr = [(torch.randn(pairs, generator=g) - 50).to(device) for _ in range(4)]
    inputs = {"pc": pc, "pr": pr, "rc": rc, "rr": rr}
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "preference_fwd_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: (
            rlhf_kernels.dpo_loss(i["pc"], i["pr"], i["rc"], i["rr"], beta=beta, return_metrics=True, backend=b).losses
        )
    provs["eager"] = lambda i: eager_dpo_loss(i["pc"], i["pr"], i["rc"], i["rr"], beta)[0]
    provs["torch.compile"] = lambda i: _compiled(eager_dpo_loss)(i["pc"], i["pr"], i["rc"], i["rr"], beta)[0]
    return Problem("dpo_loss", f"{pairs}", torch.float32, inputs, ("pc", "pr"), provs,
                   {"fwd": 28 * pairs, "bwd": 24 * pairs, "fwd+bwd": 52 * pairs})  # fmt: skip


def gae_python_loop(rewards, values, mask, gamma=1.0, lam=0.95):
    """The usual implementation: a Python loop over time steps, vectorised over the batch."""
    from rlhf_kernels.reference.ppo import gae

    return gae(rewards, values, mask, gamma=gamma, lam=lam)


def gae_vectorized(rewards, values, gamma=1.0, lam=0.95):
    """GAE without a loop (no mask): deltas, then a discounted reverse cumsum as a
    [T, T] matrix product. O(T^2) memory and flops: how people avoid the loop."""
    T = rewards.shape[-1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    idx = torch.arange(T, device=rewards.device)
    power = (idx[None, :] - idx[:, None]).clamp(min=0).to(rewards.dtype)  # [t, s] = s - t
    discount = torch.where(idx[None, :] >= idx[:, None], (gamma * lam) ** power, torch.zeros_like(power))
    advantages = deltas @ discount.T
    return advantages, advantages + values


def gae_problem(batch, time_steps, device, gamma=1.0, lam=0.95) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    rewards = torch.randn(batch, time_steps, generator=g).to(device)
    values = torch.randn(batch, time_steps, generator=g).to(device)
    lengths = torch.randint(time_steps // 2, time_steps + 1, (batch,), generator=g)
    mask = (torch.arange(time_steps)[None, :] < lengths[:, None]).to(device)
    inputs = {"rewards": rewards, "values": values, "mask": mask}
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "gae_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.gae(
            i["rewards"], i["values"], i["mask"], gamma=gamma, lam=lam, backend=b
        )[0]
    provs["python_loop"] = lambda i: gae_python_loop(i["rewards"], i["values"], i["mask"], gamma, lam)[0]
    if time_steps <= 2048:
        provs["vectorized (no mask)"] = lambda i: gae_vectorized(i["rewards"], i["values"], gamma, lam)[0]
    n = batch * time_steps
    return Problem("gae", f"{batch}x{time_steps}", torch.float32, inputs, (), provs, {"fwd": 17 * n}, ("fwd",),
                   baseline="python_loop")  # fmt: skip


def eager_masked_whiten(x, mask, eps=1e-8):
    """verl / TRL's masked_whiten: masked mean, unbiased masked variance, whiten."""
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count
    var = ((x - mean) ** 2 * m).sum() / (count - 1)
    return (x - mean) * torch.rsqrt(var + eps)


def masked_whiten_problem(batch, time_steps, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, time_steps, generator=g).to(device)
    lengths = torch.randint(time_steps // 2, time_steps + 1, (batch,), generator=g)
    mask = (torch.arange(time_steps)[None, :] < lengths[:, None]).to(device)
    inputs = {"x": x, "mask": mask}
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "masked_whiten_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.masked_whiten(i["x"], i["mask"], backend=b)
    provs["eager"] = lambda i: eager_masked_whiten(i["x"], i["mask"])
    provs["torch.compile"] = lambda i: _compiled(eager_masked_whiten)(i["x"], i["mask"])
    n = batch * time_steps
    # x read twice (statistics, then the elementwise pass), mask once, float32 output written once
    return Problem("masked_whiten", f"{batch}x{time_steps}", torch.float32, inputs, (), provs, {"fwd": 13 * n},
                   ("fwd",))  # fmt: skip


def eager_grpo_advantages(scores, group_size, eps=1e-6):
    """verl's GRPO outcome advantage for consecutive groups: view as [G, group_size], mean / std per row."""
    grouped = scores.view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def grpo_advantages_problem(n_groups, group_size, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = torch.randint(0, 2, (n_groups * group_size,), generator=g).float().to(device)
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "grpo_advantages_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.grpo_advantages(i["scores"], group_size, backend=b)
    provs["eager"] = lambda i: eager_grpo_advantages(i["scores"], group_size)
    provs["torch.compile"] = lambda i: _compiled(eager_grpo_advantages)(i["scores"], group_size)
    # scores read once (the group's second pass hits cache), advantages written once
    return Problem("grpo_advantages", f"{n_groups}x{group_size}", torch.float32, {"scores": scores}, (), provs,
                   {"fwd": 8 * n_groups * group_size}, ("fwd",))  # fmt: skip


def eager_policy_loss(logp, old, adv, mask, clip=0.2):
    """verl-style eager clipped surrogate with token-mean aggregation and its metrics."""
    m = mask.float()
    log_ratio = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    losses1 = -adv * ratio
    losses2 = -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    losses = torch.maximum(losses1, losses2)
    count = m.sum().clamp(min=1)
    loss = (losses * m).sum() / count
    clipfrac = ((losses2 > losses1).float() * m).sum() / count
    approx_kl = (-log_ratio * m).sum() / count
    return loss, clipfrac.detach(), approx_kl.detach()


def ppo_policy_problem(batch, time_steps, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    logp = (-torch.rand(batch, time_steps, generator=g) * 3).to(device)
    old = logp + (torch.randn(batch, time_steps, generator=g) * 0.2).to(device)
    adv = torch.randn(batch, time_steps, generator=g).to(device)
    mask = (torch.rand(batch, time_steps, generator=g) > 0.1).to(device)
    inputs = {"logp": logp, "old": old, "adv": adv, "mask": mask}
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "ppo_loss_fwd_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: (
            rlhf_kernels.ppo_policy_loss(i["logp"], i["old"], i["adv"], i["mask"], backend=b).loss
        )
    provs["eager"] = lambda i: eager_policy_loss(i["logp"], i["old"], i["adv"], i["mask"])[0]
    provs["torch.compile"] = lambda i: _compiled(eager_policy_loss)(i["logp"], i["old"], i["adv"], i["mask"])[0]
    n = batch * time_steps
    return Problem("ppo_policy_loss", f"{batch}x{time_steps}", torch.float32, inputs, ("logp",), provs,
                   {"fwd": 13 * n, "bwd": 17 * n, "fwd+bwd": 30 * n})  # fmt: skip


def eager_ppo_step(logits, labels, old, adv, mask, ref, entropy_coef=0.01, kl_coef=0.05):
    """The unfused PPO policy step as actors write it: float32 log_softmax, gather,
    entropy from the softmax, the clipped surrogate, k3 KL, token-mean."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    m = mask.float()
    count = m.sum().clamp(min=1)
    pg_loss = eager_policy_loss(logp, old, adv, mask)[0]
    kl = torch.clamp(ref - logp, -20.0, 20.0)
    kl = torch.clamp(torch.exp(kl) - kl - 1, -10.0, 10.0)
    return pg_loss - entropy_coef * (entropy * m).sum() / count + kl_coef * (kl * m).sum() / count


class _ReadWriteFloor(torch.autograd.Function):
    """The memory floor of a policy step: read the logits once and write a gradient of
    their size once (a copy, done in forward when a gradient is needed, handed back by
    backward). Without grad it only reads them (a max). No arithmetic to speak of, so its
    time is what the fused single sweep is measured against."""

    @staticmethod
    def forward(ctx, logits):
        if ctx.needs_input_grad[0]:
            ctx.grad = torch.empty_like(logits).copy_(logits)
            return logits.new_zeros((), dtype=torch.float32)
        return logits.amax().float()

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        return grad


def ppo_step_problem(batch, time_steps, vocab, dtype, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(batch, time_steps, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (batch, time_steps), generator=g).to(device)
    old = (-torch.rand(batch, time_steps, generator=g) * 3 - 9).to(device)
    ref = old + (torch.randn(batch, time_steps, generator=g) * 0.1).to(device)
    adv = torch.randn(batch, time_steps, generator=g).to(device)
    mask = (torch.arange(time_steps) < time_steps - 3).expand(batch, time_steps).to(device)
    inputs = {"logits": logits, "labels": labels, "old": old, "adv": adv, "mask": mask, "ref": ref}
    provs: dict[str, Callable] = {}

    def ours(backend, fused, env=None):
        # env: schedule knobs, read at launch, so the kernel launched inside sees them
        def step(i):
            return rlhf_kernels.ppo_loss_from_logits(
                i["logits"], i["labels"], i["old"], i["adv"], i["mask"], ref_logprobs=i["ref"], kl_coef=0.05,
                entropy_coef=0.01, check_labels=False, grad_in_forward=fused, backend=backend,
            )[0]  # fmt: skip

        return step if env is None else (lambda i: _with_env(env, lambda: step(i)))

    for b in _kernel_backends(device, "ppo_logits_fused_native"):
        # fused: one sweep from logits to loss, writing the gradient in forward (1 read + 1 write);
        # two-pass: forward reads the logits, backward reads them again and writes the gradient
        variants = ((",fused", True), (",two-pass", False)) if b != "torch" else (("", False),)
        for variant, fused in variants:
            provs[f"rlhf_kernels[{b}{variant}]"] = ours(b, fused)

    fused_backends = _kernel_backends(device, "ppo_logits_fused_native") if device.type == "cuda" else []
    if "triton" in fused_backends:  # the Triton sweep's row-cut variant (fused_parts) at three part sizes
        # (its tile-ahead first pass and persistent launches lost on an H100 and H200, and are no longer timed)
        for cols in ("4096", "8192", "16384"):
            provs[f"rlhf_kernels[triton,fused,parts {int(cols) // 1024}K]"] = ours(
                "triton", True, {"RLHF_KERNELS_FUSED_PART_COLS": cols})
        provs["rlhf_kernels[triton,fused,parts 8K,72 regs]"] = ours(  # the cap rows not known aligned get
            "triton", True, {"RLHF_KERNELS_FUSED_PART_COLS": "8192", "RLHF_KERNELS_FUSED_PARTS_MAXNREG": "72"})
        # the program-per-row kernel at 8 elements a thread (its layout until 16 a thread became the default)
        provs["rlhf_kernels[triton,fused,16 warps]"] = ours("triton", True, {"RLHF_KERNELS_FUSED_WARPS": "16"})
    if "native" in fused_backends:  # the streaming kernel instead of the cluster one (benchmarks/bwd_sweep.py
        # times the cluster kernel's slice sizes)
        provs["rlhf_kernels[native,fused,slice off]"] = ours("native", True, {"RLHF_KERNELS_CLUSTER_SLICE_BYTES": "0"})
        # the cluster kernel without its next-row copy (the default copies a row ahead), and two
        # candidate schedules: double buffered (two slices a block) and staged (waits in groups).
        # (The bulk-copy one, new and untried, is left to benchmarks/bwd_sweep.py, which runs it
        # last: a kernel fault there cannot cost this run's other problems.)
        for mode, pipe in (("plain", "0"), ("double", "2"), ("staged", "3")):
            provs[f"rlhf_kernels[native,fused,{mode}]"] = ours("native", True, {"RLHF_KERNELS_CLUSTER_PIPELINE": pipe})
    args = ("logits", "labels", "old", "adv", "mask", "ref")
    provs["eager"] = lambda i: eager_ppo_step(*(i[k] for k in args))
    provs["torch.compile"] = lambda i: _compiled(eager_ppo_step)(*(i[k] for k in args))
    provs["floor: read+write"] = lambda i: _ReadWriteFloor.apply(i["logits"])
    size = logits.numel() * logits.element_size()
    # Bytes of the minimal schedule: forward reads the logits once; a whole step reads them once and
    # writes their gradient once (what the fused sweep and the floor move; the two-pass path reads twice).
    return Problem("ppo_step", f"{batch}x{time_steps}x{vocab}", dtype, inputs, ("logits",), provs,
                   {"fwd": size, "bwd": 2 * size, "fwd+bwd": 2 * size})  # fmt: skip


def _with_env(env: dict[str, str], fn):
    """fn() with the environment variables ``env`` set, restored afterwards."""
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for key, value in old.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def eager_linear_ppo_step(hidden, weight, labels, old, adv, mask, ref):
    """The PPO policy step from hidden states as usually written: the LM head's logits, then the eager step."""
    return eager_ppo_step(hidden @ weight.t(), labels, old, adv, mask, ref)


def linear_ppo_step_problem(batch, time_steps, hidden_size, vocab, dtype, device) -> Problem:
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(batch, time_steps, hidden_size, generator=g).to(dtype=dtype, device=device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * (2 / hidden_size**0.5)).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (batch, time_steps), generator=g).to(device)
    old = (-torch.rand(batch, time_steps, generator=g) * 3 - 9).to(device)
    ref = old + (torch.randn(batch, time_steps, generator=g) * 0.1).to(device)
    adv = torch.randn(batch, time_steps, generator=g).to(device)
    mask = (torch.arange(time_steps) < time_steps - 3).expand(batch, time_steps).to(device)
    inputs = {"hidden": hidden, "weight": weight, "labels": labels, "old": old, "adv": adv, "mask": mask, "ref": ref}
    step = dict(kl_coef=0.05, entropy_coef=0.01, check_labels=False)
    provs: dict[str, Callable] = {}
    for b in _kernel_backends(device, "ppo_logits_fused_native"):
        provs[f"rlhf_kernels[{b}]"] = lambda i, b=b: rlhf_kernels.linear_ppo_loss(
            i["hidden"], i["weight"], i["labels"], i["old"], i["adv"], i["mask"], ref_logprobs=i["ref"], backend=b,
            **step,
        )[0]  # fmt: skip
        if b != "torch":  # the LM head's logits, then the fused sweep from logits
            provs[f"head + rlhf_kernels[{b}] from logits"] = lambda i, b=b: rlhf_kernels.ppo_loss_from_logits(
                i["hidden"] @ i["weight"].t(), i["labels"], i["old"], i["adv"], i["mask"], ref_logprobs=i["ref"],
                grad_in_forward=True, backend=b, **step,
            )[0]  # fmt: skip
    args = ("hidden", "weight", "labels", "old", "adv", "mask", "ref")
    provs["eager"] = lambda i: eager_linear_ppo_step(*(i[k] for k in args))
    provs["torch.compile"] = lambda i: _compiled(eager_linear_ppo_step)(*(i[k] for k in args))
    mm = 2 * batch * time_steps * hidden_size * vocab
    return Problem("linear_ppo_step", f"{batch}x{time_steps}x{hidden_size}x{vocab}", dtype, inputs,
                   ("hidden", "weight"), provs, {"fwd": 0, "bwd": 0, "fwd+bwd": 0},
                   flops={"fwd": mm, "bwd": 2 * mm, "fwd+bwd": 3 * mm})  # fmt: skip


def providers(device: torch.device) -> list[str]:
    """Names of the token_logprobs providers available on ``device``."""
    return list(token_logprobs_problem(2, 8, torch.float32, device).providers)


# --- measurement ------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: torch.Tensor | None = None


def _flush_l2(device) -> None:
    """Overwrite the GPU's L2 (50 MB on H100) so that small problems are timed from HBM."""
    global _L2_FLUSH
    if _L2_FLUSH is None or _L2_FLUSH.device != device:
        _L2_FLUSH = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    _L2_FLUSH.zero_()


def _time(fn: Callable[[], object], setup: Callable[[], object], device, *, warmup: int, repeat: int, budget_s: float,
          queue_ms: float = 0.0):
    """Per-run wall times in ms of fn(setup()); setup (and, on CUDA, an L2 flush) is excluded.
    queue_ms > 0 (CUDA): the GPU is first given that long a spin kernel, so that the host
    enqueues fn's work while it spins and the events time the device alone (``_queued_ms``)."""
    for _ in range(warmup):
        fn(setup())
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        state = setup()
        if device.type == "cuda":
            _flush_l2(device)
        _sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if queue_ms > 0:
                torch.cuda._sleep(int(queue_ms * _SPIN_CYCLES_PER_MS))
            begin.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return times


# torch.cuda._sleep spins for a number of SM cycles; at a clock below 2 GHz the spin lasts longer
# than asked, which only costs time.
_SPIN_CYCLES_PER_MS = 2_000_000
# Large ops (at least this much traffic) are also timed with the host's enqueueing hidden.
_QUEUED_MIN_BYTES = 256 * 2**20


def _queued_ms(case: Case, device, wall_ms: float, repeat: int = 3) -> float:
    """Median device time in ms of a large step: each run starts behind a spin kernel longer than
    the step's own wall time, so the host has enqueued all of the step's launches (Python, the
    autograd engine, the launchers) before the GPU reaches them, and the events time the
    kernels back to back, as they run inside a training step whose queue is never empty. The
    wall-time median stays the table's main figure; the gap between the two is host time. A
    step that waits for the device inside (a .item()) still times its host work after that."""
    return statistics.median(_time(case.step, case.setup, device, warmup=0, repeat=repeat, budget_s=60.0,
                                   queue_ms=wall_ms + 0.5))  # fmt: skip


# Ops whose small problems are bound by the host (launch and Python overhead): on CUDA their
# providers are also timed as CUDA graph replays, which leaves the device time alone.
GRAPH_OPS = ("dpo_loss", "ppo_policy_loss", "grpo_advantages", "masked_whiten", "gae")
_GRAPH_CALLS = 10  # calls captured in one graph: replay overhead is shared by them


def _graph_skip(problem: Problem, case: Case) -> bool:
    """Loops over time steps (the Python GAE loop, and the torch backend's, which is one) would
    capture thousands of launches a call, and the torch backend's GRPO groups with torch.unique,
    which waits for the host: they keep their eager timing only."""
    torch_backend = case.provider == "rlhf_kernels[torch]"
    return "loop" in case.provider or (torch_backend and problem.op in ("gae", "grpo_advantages"))


def _graph_us(case: Case, grad_inputs: tuple[str, ...], device, *, repeat: int = 10) -> float:
    """Median device time in us of one call of case.step, from replays (timed as _time does,
    L2 flushed before each) of a CUDA graph that captured _GRAPH_CALLS calls (the gradients
    of the inputs are dropped between calls, so each backward writes a fresh one as in the
    eager timing). A step that synchronises with the host (torch.unique, .item()) cannot be
    captured: the warm-up runs with torch's sync debug mode set to raise, so such a step
    raises there, before any capture starts."""
    with torch.cuda.device(device):  # torch.cuda.graph captures the current device's work
        state = case.setup()

        def calls():
            for _ in range(_GRAPH_CALLS):
                if isinstance(state, dict):
                    for key in grad_inputs:
                        state[key].grad = None
                case.step(state)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
                calls()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            calls()
        times = _time(lambda _: graph.replay(), lambda: None, device, warmup=1, repeat=repeat, budget_s=20.0)
        return statistics.median(times) * 1e3 / _GRAPH_CALLS


def _peak_bytes(fn: Callable[[], object], setup: Callable[[], object], device) -> int:
    """Peak bytes allocated by fn(setup()) beyond what existed before it ran.

    CUDA: the caching allocator's peak. CPU: the running sum of the
    profiler's allocation and free events (every allocation through torch's
    CPU allocator, the native ops' included), at its highest.
    """
    state = setup()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(state)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(state)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _held_bytes(fn: Callable, inputs: dict[str, torch.Tensor], device) -> int:
    """Bytes a forward leaves allocated for its backward: everything it allocated that is
    still alive when it returns (the output, the tensors autograd saved, and anything an op
    keeps on its own, such as the gradients a fused op computes in forward).

    CUDA: the rise of ``memory_allocated``. CPU: the net of the profiler's allocation
    and free events during the call.
    """
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        out = fn(inputs)
        _sync(device)
        held = torch.cuda.memory_allocated(device) - before
        del out
        return held
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(inputs)
    held = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    del out
    return held


@dataclasses.dataclass
class Case:
    """One measured step: a provider in one mode on one problem."""

    provider: str
    mode: str
    setup: Callable[[], object]
    step: Callable[[object], object]


def _backward(out):
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.backward(out, torch.ones_like(out))


def cases(problem: Problem, include: list[str] | None = None) -> list[Case]:
    result = []
    for name, fn in problem.providers.items():
        if include and not any(key in name for key in include):
            continue

        def with_grad(fn=fn):
            inputs = dict(problem.inputs)
            for key in problem.grad_inputs:
                inputs[key] = inputs[key].detach().requires_grad_(True)
            return inputs

        def fwd(inputs, fn=fn):
            with torch.no_grad():
                return fn(inputs)

        def bwd_setup(fn=fn, with_grad=with_grad):
            inputs = with_grad()
            return fn(inputs)

        def fwd_bwd(inputs, fn=fn):
            _backward(fn(inputs))

        result += [
            Case(name, "fwd", lambda: problem.inputs, fwd),
            Case(name, "bwd", bwd_setup, _backward),
            Case(name, "fwd+bwd", with_grad, fwd_bwd),
        ]
        result = [c for c in result if c.mode in problem.modes]
    return result


def bench_problem(problem: Problem, device: torch.device, *, include=None, warmup=2, repeat=10, budget_s=20.0,
                  log=print) -> list[Result]:  # fmt: skip
    """Time every provider and mode of one problem (memory comes in a second pass, see measure_memory)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tbps(device_name) if device.type == "cuda" else None
    half = problem.dtype in (torch.bfloat16, torch.float16)  # the tensor-core peak applies to 16-bit inputs
    peak_flops = peak_tflops(device_name) if device.type == "cuda" and half else None
    common = dict(op=problem.op, shape=problem.shape, dtype=str(problem.dtype).replace("torch.", ""),
                  device=device_name, baseline=problem.baseline)  # fmt: skip
    results = []
    for case in cases(problem, include):
        label = f"{case.provider:24s} {case.mode:8s}"
        nbytes = problem.bytes_moved[case.mode]
        try:
            times = _time(case.step, case.setup, device, warmup=warmup, repeat=repeat, budget_s=budget_s)
            saved = None
            if case.mode == "fwd+bwd":
                saved = _held_bytes(problem.providers[case.provider], case.setup(), device)
        except Exception as exc:  # report, keep benchmarking the others
            log(f"  {label} failed: {type(exc).__name__}: {exc}")
            results.append(Result(provider=case.provider, mode=case.mode, median_ms=math.nan, p25_ms=math.nan,
                                  p75_ms=math.nan, min_ms=math.nan, runs=0, peak_mem_mb=None, saved_mb=None,
                                  bytes_moved=nbytes, error=f"{type(exc).__name__}: {exc}", **common))  # fmt: skip
            continue
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        med = statistics.median(times)
        tbps = nbytes / (med * 1e-3) / 1e12 if device.type == "cuda" and nbytes else None
        frac = (tbps / peak) if (tbps and peak) else None
        tflops = None
        if problem.flops and case.mode == "fwd+bwd":
            # whole steps only: fused providers move the gradient matmuls into their forward
            tflops = problem.flops[case.mode] / (med * 1e-3) / 1e12
            frac = tflops / peak_flops if (device.type == "cuda" and peak_flops) else None
        graph_us = None
        if device.type == "cuda" and problem.op in GRAPH_OPS and case.mode != "bwd" and not _graph_skip(problem, case):
            try:
                graph_us = _graph_us(case, problem.grad_inputs, device)
            except Exception as exc:  # reported, not fatal: the eager timing stands
                log(f"  {label} no CUDA graph: {type(exc).__name__}: {str(exc)[:120]}")
        queued = None
        if device.type == "cuda" and nbytes >= _QUEUED_MIN_BYTES:
            try:
                queued = _queued_ms(case, device, med)
            except Exception as exc:  # reported, not fatal: the wall timing stands
                log(f"  {label} no queued timing: {type(exc).__name__}: {str(exc)[:120]}")
        results.append(Result(provider=case.provider, mode=case.mode, median_ms=med, p25_ms=q[0], p75_ms=q[2],
                              min_ms=min(times), runs=len(times), peak_mem_mb=None,
                              saved_mb=None if saved is None else saved / 2**20, bytes_moved=nbytes, tbps=tbps,
                              frac_peak=frac, tflops=tflops, graph_us=graph_us, queued_ms=queued,
                              **common))  # fmt: skip
        rate = f"  {tbps:5.2f} TB/s" if tbps else (f"  {tflops:6.1f} TFLOP/s" if tflops else "")
        graph = f"  graph {graph_us:8.1f} us/call" if graph_us is not None else ""
        queued_rate = f" ({nbytes / (queued * 1e-3) / 1e12:.2f} TB/s)" if queued and nbytes else ""
        queue = f"  queued {queued:.3f} ms" + queued_rate if queued is not None else ""
        log(f"  {label} {med:9.3f} ms  [{q[0]:.3f}, {q[2]:.3f}]" + rate + graph + queue)
    return results


def measure_memory(results: list[Result], problem: Problem, device: torch.device, *, include=None, log=print):
    """Fill in peak_mem_mb of the results for one problem."""
    by_key = {(r.provider, r.mode): r for r in results
              if (r.op, r.shape, r.dtype) == (problem.op, problem.shape, str(problem.dtype).replace("torch.", ""))
              and not r.error}  # fmt: skip
    for case in cases(problem, include):
        r = by_key.get((case.provider, case.mode))
        if r is None:
            continue
        case.step(case.setup())  # warm: compiled graphs, allocator pools
        mem = _peak_bytes(case.step, case.setup, device)
        r.peak_mem_mb = None if mem is None else mem / 2**20
        log(f"  {case.provider:24s} {case.mode:8s} peak +{_mib(r.peak_mem_mb)} MiB")


OPS = ("token_logprobs", "linear_logprobs", "sequence_logprobs", "dpo_step", "dpo_loss", "gae", "masked_whiten",
       "grpo_advantages", "ppo_policy_loss", "ppo_step", "linear_ppo_step")


def default_problems(device: torch.device, quick: bool, ops=OPS) -> list[Callable[[], Problem]]:
    """Problems as thunks, so that only one problem's inputs are alive at a time."""
    bf16 = torch.bfloat16
    if device.type == "cuda":
        table = {
            # the first shape of each op is its issue's target (what --quick times)
            "token_logprobs": [(16384, 128256, bf16), (8192, 151936, bf16), (16384, 32000, bf16),
                               (4096, 128256, torch.float32)],
            "linear_logprobs": [(8192, 4096, 128256, bf16)],
            "sequence_logprobs": [(8, 1024, 128256, bf16), (64, 512, 32000, bf16)],
            "dpo_step": [(4, 1024, 128256, bf16)],
            "dpo_loss": [(64,), (4096,), (1 << 20,)],
            "gae": [(4096, 2048), (512, 512), (4096, 8192)],
            "masked_whiten": [(512, 2048), (4096, 8192)],
            "grpo_advantages": [(512, 16), (8192, 64)],
            "ppo_policy_loss": [(512, 4096)],
            "ppo_step": [(8, 2048, 128256, bf16)],
            "linear_ppo_step": [(4, 2048, 4096, 128256, bf16)],
        }  # fmt: skip
    else:
        table = {
            "token_logprobs": [(1024, 32000, bf16), (256, 128256, bf16), (1024, 32000, torch.float32)],
            "linear_logprobs": [(512, 256, 32000, torch.float32)],
            "sequence_logprobs": [(4, 256, 32000, bf16)],
            "dpo_step": [(2, 256, 32000, bf16)],
            "dpo_loss": [(64,), (65536,)],
            "gae": [(512, 512), (512, 2048), (4096, 2048)],  # the last: the target shape
            "masked_whiten": [(64, 2048)],
            "grpo_advantages": [(512, 16)],
            "ppo_policy_loss": [(64, 2048)],
            "ppo_step": [(2, 256, 32000, bf16)],
            "linear_ppo_step": [(2, 256, 256, 32000, torch.float32)],
        }
    if quick:
        table = {k: v[:1] for k, v in table.items()}
        if device.type != "cuda":
            table["token_logprobs"] = [(256, 32000, bf16)]
            table["dpo_step"] = [(2, 64, 32000, bf16)]
            table["sequence_logprobs"] = [(4, 64, 32000, bf16)]
            table["linear_logprobs"] = [(128, 256, 32000, torch.float32)]
            table["linear_ppo_step"] = [(2, 64, 256, 32000, torch.float32)]
            table["ppo_step"] = [(2, 64, 32000, bf16)]
    makers = {"token_logprobs": token_logprobs_problem, "linear_logprobs": linear_logprobs_problem,
              "sequence_logprobs": sequence_logprobs_problem,
              "dpo_step": dpo_step_problem, "dpo_loss": dpo_loss_problem, "gae": gae_problem,
              "masked_whiten": masked_whiten_problem, "grpo_advantages": grpo_advantages_problem,
              "ppo_policy_loss": ppo_policy_problem, "ppo_step": ppo_step_problem,
              "linear_ppo_step": linear_ppo_step_problem}  # fmt: skip
    return [lambda op=op, args=args: makers[op](*args, device=device) for op in ops for args in table[op]]


def _mib(v: float | None) -> str:
    return f"{v:9.1f}" if v is not None else f"{'-':>9}"


def format_table(results: list[Result]) -> str:
    graphs = any(r.graph_us is not None for r in results)  # CUDA: device time of the small ops too
    queued = any(r.queued_ms is not None for r in results)  # CUDA: the large ops' device time
    head = (
        f"{'op':>15} {'shape':>18} {'dtype':>8} {'mode':>7} {'provider':>24} {'median ms':>10} {'p25-p75 ms':>17} "
        f"{'peak MiB':>9} {'held MiB':>9} {'TB/s':>6} {'TFLOP/s':>7} {'%peak':>6} {'vs base':>8}"
        + (f" {'graph us':>9} {'vs base':>8}" if graphs else "")
        + (f" {'queued ms':>9} {'TB/s':>6}" if queued else "")
    )
    lines = [head, "-" * len(head)]
    base_of = {(r.op, r.shape, r.dtype, r.mode): r for r in results if r.provider == r.baseline and not r.error}
    for r in results:
        if r.error:
            lines.append(f"{r.op:>15} {r.shape:>18} {r.dtype:>8} {r.mode:>7} {r.provider:>24}  failed: {r.error[:60]}")
            continue
        base = base_of.get((r.op, r.shape, r.dtype, r.mode))
        speedup = f"{base.median_ms / r.median_ms:7.2f}x" if base else ""
        line = (
            f"{r.op:>15} {r.shape:>18} {r.dtype:>8} {r.mode:>7} {r.provider:>24} {r.median_ms:10.3f} "
            f"{r.p25_ms:8.3f}-{r.p75_ms:<8.3f} {_mib(r.peak_mem_mb)} {_mib(r.saved_mb)} "
            f"{(f'{r.tbps:6.2f}' if r.tbps else ''):>6} {(f'{r.tflops:7.1f}' if r.tflops else ''):>7} "
            f"{(f'{100 * r.frac_peak:5.1f}%' if r.frac_peak else ''):>6} "
            f"{speedup:>8}"
        )
        if graphs:
            g = r.graph_us
            g_speedup = f"{base.graph_us / g:7.2f}x" if (g and base is not None and base.graph_us) else ""
            line += f" {(f'{g:9.1f}' if g is not None else ''):>9} {g_speedup:>8}"
        if queued:
            qm = r.queued_ms
            q_rate = f"{r.bytes_moved / (qm * 1e-3) / 1e12:6.2f}" if (qm and r.bytes_moved) else ""
            line += f" {(f'{qm:9.3f}' if qm is not None else ''):>9} {q_rate:>6}"
        lines.append(line)
    return "\n".join(lines)


# The issues' benchmark targets: (op, shape, dtype, device type (a result's device is "cpu" or
# the GPU's name), mode, target, measure, bound, provider filter). Measures: "tbps" (at least
# bound), "floor" (median over the read + write floor's in the same run, at most bound), "ms"
# (median, at most bound; the CUDA graph replay's device time shown too where there is one),
# "speedup" (over the row's baseline, at least bound). Shape None: every shape timed.
TARGETS = (
    ("token_logprobs", "16384x128256", "bfloat16", "cuda", "fwd", "forward >= 3.0 TB/s (H100)", "tbps", 3.0, ""),
    ("token_logprobs", "16384x128256", "bfloat16", "cuda", "bwd", "backward >= 2.8 TB/s (H100)", "tbps", 2.8, ""),
    ("ppo_step", "8x2048x128256", "bfloat16", "cuda", "fwd+bwd", "fused pass within 1.2x of reading the logits "
     "once and writing their gradient once (H100)", "floor", 1.2, "fused"),
    ("gae", "4096x2048", "float32", "cuda", "fwd", "under 0.1 ms in one launch (H100)", "ms", 0.1, ""),
    ("gae", "4096x2048", "float32", "cuda", "fwd", "over 1000x the Python loop", "speedup", 1000.0, ""),
    ("token_logprobs", None, "bfloat16", "cpu", "fwd+bwd", "native forward + backward >= 2x eager on CPU", "speedup",
     2.0, "native"),
)  # fmt: skip


def format_targets(results: list[Result]) -> str:
    """The timed rows that an issue's target names, each against it (our kernel backends only;
    the PyTorch one is the reference), or "" when none was timed."""
    ok = [r for r in results if not r.error]
    base_of = {(r.op, r.shape, r.dtype, r.mode): r for r in ok if r.provider == r.baseline}
    lines = []
    for op, shape, dtype, device, mode, what, measure, bound, only in TARGETS:
        rows = [r for r in ok if (r.op, r.dtype, r.mode) == (op, dtype, mode) and shape in (None, r.shape)
                and (r.device == "cpu") == (device == "cpu") and r.provider.startswith("rlhf_kernels[")
                and not r.provider.startswith("rlhf_kernels[torch") and only in r.provider]  # fmt: skip
        if not rows:
            continue
        lines.append(f"  {op} {mode} ({what}):")
        for r in rows:
            base = base_of.get((r.op, r.shape, r.dtype, r.mode))
            floor = next((f for f in ok if (f.op, f.shape, f.dtype, f.mode) == (r.op, r.shape, r.dtype, r.mode)
                          and f.provider.startswith("floor")), None)  # fmt: skip
            device_met = None  # the same measure on device time (queued: the host's enqueueing hidden)
            if measure == "tbps" and r.tbps:
                met, text = r.tbps >= bound, f"{r.tbps:.3f} TB/s"
                if r.queued_ms:
                    device_tbps = r.bytes_moved / (r.queued_ms * 1e-3) / 1e12
                    device_met = device_tbps >= bound
                    text += f" ({device_tbps:.3f} TB/s in device time, {r.queued_ms:.3f} ms queued)"
            elif measure == "floor" and floor:
                value = r.median_ms / floor.median_ms
                met, text = value <= bound, f"{r.median_ms:.3f} ms = {value:.2f}x the floor's {floor.median_ms:.3f} ms"
                if r.queued_ms and floor.queued_ms:
                    device_value = r.queued_ms / floor.queued_ms
                    device_met = device_value <= bound
                    text += (f" ({device_value:.2f}x in device time: {r.queued_ms:.3f} / {floor.queued_ms:.3f} ms"
                             " queued)")
            elif measure == "ms":
                met, text = r.median_ms <= bound, f"{r.median_ms:.3f} ms"
                if r.graph_us is not None:
                    text += f" ({r.graph_us / 1e3:.3f} ms of device time as a CUDA graph replay)"
            elif measure == "speedup" and base:
                value = base.median_ms / r.median_ms
                met, text = value >= bound, f"{value:.1f}x {base.provider}"
            else:
                continue
            verdict = "met" if met else "NOT met"
            if device_met is not None and device_met != met:
                verdict += f" (in device time: {'met' if device_met else 'NOT met'})"
            if "(H100)" in what and "H100" not in r.device:  # judged on another card: say which
                verdict += f" on the {r.device} (the target names an H100)"
            lines.append(f"    {r.provider:<40} {r.shape:>14}  {text}  {verdict}")
    return ("Against the issues' targets:\n" + "\n".join(lines)) if lines else ""


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r.op, r.shape, r.dtype) for r in results))
    modes = ["fwd", "bwd", "fwd+bwd"]
    provs = list(dict.fromkeys(r.provider for r in results))
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for row, (op, shape, dtype) in enumerate(groups):
        for col, metric in enumerate(("median_ms", "peak_mem_mb")):
            ax = axes[row][col]
            width = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                vals, errs = [], []
                for mode in modes:
                    r = next(
                        (
                            r
                            for r in results
                            if (r.op, r.shape, r.dtype, r.provider, r.mode) == (op, shape, dtype, prov, mode)
                            and not r.error
                        ),
                        None,
                    )
                    vals.append((getattr(r, metric) or 0.0) if r else 0.0)
                    errs.append(
                        (r.median_ms - r.p25_ms, r.p75_ms - r.median_ms) if (r and metric == "median_ms") else (0, 0)
                    )
                xs = [m + (i - (len(provs) - 1) / 2) * width for m in range(len(modes))]
                yerr = list(zip(*errs, strict=True)) if metric == "median_ms" else None
                ax.bar(xs, vals, width, label=prov, yerr=yerr, capsize=2)
            ax.set_xticks(range(len(modes)), modes)
            what = "time (ms, median, p25-p75)" if col == 0 else "peak extra memory (MiB)"
            ax.set_title(f"{op} {shape} {dtype}: {what}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def environment() -> dict:
    info = rlhf_kernels.build_info()
    info["platform"] = platform.platform()
    info["cpu"] = platform.processor()
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["gpu_peak_tbps"] = peak_tbps(props.name)
    return info


def run(
    device: str,
    out_dir: Path,
    *,
    quick: bool = False,
    include=None,
    repeat: int = 10,
    ops=OPS,
    shapes: list[tuple[int, int, torch.dtype]] | None = None,
    log=print,
) -> list[Result]:
    """Benchmark ``ops`` (token_logprobs ``shapes`` if given) and write JSON, table and PNG to ``out_dir``."""
    dev = torch.device(device)
    problems = default_problems(dev, quick, ops)
    if shapes:  # explicit token_logprobs shapes replace its defaults
        others = [o for o in ops if o != "token_logprobs"]
        problems = [lambda n=n, v=v, d=d: token_logprobs_problem(n, v, d, dev) for n, v, d in shapes]
        problems += default_problems(dev, quick, others)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tag = dev.type if dev.type != "cuda" else torch.cuda.get_device_name(dev).replace(" ", "_")
    base = out_dir / f"bench-{tag}-{stamp}"
    env = environment()

    def write(results: list[Result], complete: bool) -> str:
        # Rewritten after every problem, so a run cut short (a time limit on a lent
        # GPU) still leaves every timing it finished on disk.
        payload = {"environment": env, "complete": complete, "results": [dataclasses.asdict(r) for r in results]}
        table = format_table(results)
        targets = format_targets(results)
        table += ("\n\n" + targets) if targets else ""
        for suffix, text in ((".json", json.dumps(payload, indent=1, default=str)),
                             (".txt", table + "\n" + ("" if complete else "(incomplete run)\n"))):  # fmt: skip
            tmp = base.with_suffix(suffix + ".tmp")  # a kill mid-write leaves the last complete file
            tmp.write_text(text)
            os.replace(tmp, base.with_suffix(suffix))
        return table

    results: list[Result] = []
    # CPU: memory after all timings, since the profiler that counts CPU allocations must not
    # disturb them. CUDA reads the caching allocator's counters instead, so each problem is
    # timed and measured together: a run cut short (a time limit on a lent GPU) keeps both.
    phases = (("time", "memory"),) if dev.type == "cuda" else (("time",), ("memory",))
    for group in phases:
        for make in problems:
            problem = make()
            for phase in group:
                log(f"{problem.op} {problem.shape} {str(problem.dtype).replace('torch.', '')} on {device}: {phase}")
                if phase == "time":
                    results += bench_problem(problem, dev, include=include, repeat=repeat, log=log)
                else:
                    measure_memory(results, problem, dev, include=include, log=log)
            del problem
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            write(results, complete=False)
    table = write(results, complete=True)
    log("\n" + table)
    png = base.with_suffix(".png")
    log(f"\nwrote {base.with_suffix('.json')}" + (f" and {png}" if plot(results, png) else " (no matplotlib: no plot)"))
    return results
