"""Plain PyTorch PPO / GRPO pieces: the oracles of rlhf_kernels.ops.ppo.

Written as the PPO implementations people use write them (the GAE reference is
the Python reverse loop over time steps); each computes in the inputs'
precision promoted to at least float32.
"""

from __future__ import annotations

import torch

# The order gives the kernels' mode ids (csrc/ppo_loss_math.h: kTokenMean ... kTokenSum).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
KL_KINDS = ("k1", "abs", "k2", "k3")
IS_LEVELS = ("token", "sequence")  # importance_sampling_level: PPO's per-token ratio, GSPO's per-sequence one


def _acc(*tensors):
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


def gae(rewards, values, mask=None, *, gamma=1.0, lam=0.95):
    rewards, values = _acc(rewards, values)
    B, T = rewards.shape
    valid = torch.ones(B, T, dtype=torch.bool, device=rewards.device) if mask is None else mask.bool()
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    last_gae = torch.zeros_like(next_value)
    advantages = torch.empty_like(rewards)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        keep = valid[:, t]
        last_gae = torch.where(keep, delta + gamma * lam * last_gae, last_gae)
        next_value = torch.where(keep, values[:, t], next_value)
        advantages[:, t] = last_gae
    return advantages, advantages + values


def _kept(x, mask):
    """``x`` where ``mask`` is set, else 0: selected rather than multiplied, so that a NaN or
    inf at a masked (padding) position drops out, as the kernels never read it."""
    # mask != 0 is a new tensor (mask.bool() of a bool mask is the caller's own, which where
    # would save for backward: changing it in place afterwards would break the backward)
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x, mask, dim=None):
    total = _kept(x, mask).sum() if dim is None else _kept(x, mask).sum(dim)
    m = mask.bool().to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    (x,) = _acc(x)
    count = mask.bool().to(x.dtype).sum()
    mean = _kept(x, mask).sum() / count.clamp(min=1)
    var = _kept((x - mean) ** 2, mask).sum() / (count - 1).clamp(min=1)  # unbiased, as PPO implementations use
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def grpo_advantages(scores, group_ids, *, norm_by_std=True, eps=1e-6):
    (scores,) = _acc(scores)
    out = torch.empty_like(scores)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        s = scores[idx]
        mean = s.mean()
        std = s.std() if s.numel() > 1 else torch.ones((), dtype=s.dtype, device=s.device)
        out[idx] = (s - mean) / (std + eps) if norm_by_std else s - mean
    return out


def agg_loss(loss_mat, mask, mode):
    m = mask.bool().to(loss_mat.dtype)
    kept = _kept(loss_mat, mask)
    if mode == "token-mean":
        return kept.sum() / m.sum().clamp(min=1)
    if mode == "token-sum":
        return kept.sum()
    seq_sum = kept.sum(-1)
    seq_count = m.sum(-1)
    has_tokens = (seq_count > 0).to(loss_mat.dtype)
    n_seqs = has_tokens.sum().clamp(min=1)  # sequences without tokens drop out of the averages
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seqs
    if mode == "seq-mean-token-mean":
        return (seq_sum / seq_count.clamp(min=1)).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        return seq_sum.sum() / n_seqs / max(loss_mat.shape[-1], 1)  # T = 0: no token, loss 0
    raise ValueError(f"unknown loss_agg_mode {mode!r}")


def ppo_policy_loss(
    logprobs, old_logprobs, advantages, mask, *, clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None,
    clip_ratio_c=None, loss_agg_mode="token-mean", importance_sampling_level="token",
):  # fmt: skip
    # masked positions selected away first: a NaN or inf there must reach neither the loss nor a gradient
    logprobs, old_logprobs, advantages = (_kept(t, mask) for t in _acc(logprobs, old_logprobs, advantages))
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    log_ratio = logprobs - old_logprobs
    if importance_sampling_level == "sequence":
        # GSPO-token (Zheng et al. 2025; verl's "gspo" loss): every token of sequence i has the ratio
        # s_i = exp(mean of its valid tokens' log-ratios), and its own log-prob's gradient, s_i
        m = (mask != 0).to(log_ratio.dtype)
        seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = logprobs - logprobs.detach() + seq.detach()
    log_ratio = torch.clamp(log_ratio, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    approx_kl = masked_mean(-log_ratio, mask)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(losses1, losses2)
    clipfrac = masked_mean((losses2 > losses1).to(ratio.dtype), mask)
    if clip_ratio_c is None:
        losses = clipped
        clipfrac_lower = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    else:
        losses3 = -advantages * clip_ratio_c
        dual = torch.minimum(losses3, clipped)
        clipfrac_lower = masked_mean(((clipped > losses3) & (advantages < 0)).to(ratio.dtype), mask)
        losses = torch.where(advantages < 0, dual, clipped)
    loss = agg_loss(losses, mask, loss_agg_mode)
    return loss, clipfrac.detach(), approx_kl.detach(), clipfrac_lower.detach()


def ppo_value_loss(values, old_values, returns, mask, *, clip_range_value=0.2, loss_agg_mode="token-mean"):
    values, old_values, returns = (_kept(t, mask) for t in _acc(values, old_values, returns))
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    losses1 = (values - returns) ** 2
    losses2 = (clipped_values - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(losses1, losses2), mask, loss_agg_mode)
    clipfrac = masked_mean((losses2 > losses1).to(values.dtype), mask)
    return loss, clipfrac.detach()


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    logprobs, ref_logprobs = _acc(logprobs, ref_logprobs)
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "k3":  # Schulman's low-variance estimator, clamped as PPO frameworks do
        kl = torch.clamp(-diff, -20.0, 20.0)
        return torch.clamp(torch.exp(kl) - kl - 1, -10.0, 10.0)
    raise ValueError(f"unknown kl kind {kind!r}")
