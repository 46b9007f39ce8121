"""Plain PyTorch preference losses: the oracles of rlhf_kernels.ops.preference.

Each function is its loss written as directly as the formula in the op's
docstring, computing in the inputs' precision promoted to at least float32
(float64 inputs give the float64 oracle). Rewards are detached, as trainers
log them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EXO_EPS = 1e-3


def _acc(*tensors):
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


def _sigmoid_form(z, label_smoothing):
    # without smoothing the second term is absent, not 0 * logsigmoid(-z): NaN for z = +inf
    loss = -F.logsigmoid(z) * (1 - label_smoothing)
    return loss - F.logsigmoid(-z) * label_smoothing if label_smoothing else loss


def pairwise_losses(a, b, *, loss_type, beta, label_smoothing=0.0, tau=0.05, bco_delta=None, gamma=0.0):
    """Per-pair losses from chosen / rejected log-ratios ``a``, ``b`` (policy minus reference)."""
    h = a - b
    z = beta * h - gamma
    if loss_type == "sigmoid":
        return _sigmoid_form(z, label_smoothing)
    if loss_type == "robust":
        loss = -F.logsigmoid(z) * (1 - label_smoothing)
        if label_smoothing:  # (a term with coefficient 0 is left out: 0 * inf is NaN)
            loss = loss + F.logsigmoid(-z) * label_smoothing
        return loss / (1 - 2 * label_smoothing)
    if loss_type == "exo_pair":
        eps = label_smoothing or EXO_EPS  # its logs in double on the host: a float32 eps of 1e-300 is 0
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "bco_pair":
        delta = torch.cat([beta * a, beta * b]).mean().detach() if bco_delta is None else bco_delta
        return -F.logsigmoid(beta * a - delta) - F.logsigmoid(-(beta * b - delta))
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "nca_pair":
        c, r = beta * a, beta * b
        return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * a)) + torch.sigmoid(beta * b)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * a) + (1 - torch.sigmoid(beta * (a - b)))
    if loss_type == "discopop":
        modulation = torch.sigmoid(z / tau)
        # exp(-z) * modulation, as exp(-z + log sigmoid(z / tau)) so that it cannot overflow
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp(-z + F.logsigmoid(z / tau))
    raise ValueError(f"unknown loss_type {loss_type!r}")


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    reference_free=False,
    discopop_tau=0.05,
    bco_delta=None,
):
    pc, pr, rc, rr = _acc(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    a, b = pc - rc, pr - rr
    if loss_type == "aot_pair":
        delta = torch.sort(a)[0] - torch.sort(b)[0]
        losses = _sigmoid_form(beta * delta, label_smoothing)
    elif loss_type == "aot":
        delta = torch.sort(pc - pr)[0] - torch.sort(rc - rr)[0]
        losses = _sigmoid_form(beta * delta, label_smoothing)
    else:
        losses = pairwise_losses(
            a, b, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, tau=discopop_tau, bco_delta=bco_delta
        )
    return losses, (beta * a).detach(), (beta * b).detach()


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0):
    c, r = _acc(policy_chosen_logps, policy_rejected_logps)
    losses = _sigmoid_form(beta * (c - r) - gamma, label_smoothing)
    return losses, (beta * c).detach(), (beta * r).detach()


def batch_mean(x):
    """The mean over a batch, 0 for an empty one (as the kernels' metrics): no NaN from 0 / 0."""
    return x.sum() / max(x.numel(), 1)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1):
    c, r = _acc(policy_chosen_logps, policy_rejected_logps)
    x, y = c.clamp(max=-1e-6), r.clamp(max=-1e-6)  # keeps the odds finite
    log_odds = (x - y) - (_log1mexp(x) - _log1mexp(y))
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio
    return losses, (beta * c).detach(), (beta * r).detach(), batch_mean(ratio).detach(), batch_mean(log_odds).detach()


def kto_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    policy_kl_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    ref_kl_logps,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    pc, pr, pk, rc, rr, rk = _acc(
        policy_chosen_logps, policy_rejected_logps, policy_kl_logps, ref_chosen_logps, ref_rejected_logps, ref_kl_logps
    )
    kl = (pk - rk).mean().clamp(min=0).detach() if pk.numel() else pc.new_zeros(())
    a, b = pc - rc, pr - rr
    chosen_losses = 1 - torch.sigmoid(beta * (a - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - b))
    losses = torch.cat([desirable_weight * chosen_losses, undesirable_weight * rejected_losses])
    return losses, (beta * a).detach(), (beta * b).detach(), kl


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=0.0):
    c, r, m = _acc(chosen_rewards, rejected_rewards, margin)
    z = c - r if m is None else c - r - m
    loss = batch_mean(-F.logsigmoid(z))
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * batch_mean((c + r) ** 2)
    accuracy = batch_mean((c > r).to(c.dtype)).detach()
    return loss, accuracy


def sequence_logprobs(logits, labels, mask=None, *, temperature=1.0, ignore_index=-100, average=False):
    """Sum (or mean over kept tokens; 0 for a sequence with none) of the token log-probs of each sequence."""
    from rlhf_kernels.reference.logprobs import kept_labels, token_logprobs

    def per_sequence(x):  # [B, ...] -> [B, tokens] (B = 0 included)
        return x.reshape(x.shape[0], -1) if x.shape[0] else x.reshape(0, 1)

    lp = token_logprobs(logits, labels, mask, temperature=temperature, ignore_index=ignore_index)
    total = per_sequence(lp).sum(-1)
    if not average:
        return total
    valid = kept_labels(labels, ignore_index)
    if mask is not None:
        valid = valid & mask.bool()
    return total / per_sequence(valid).sum(-1).clamp(min=1).to(lp.dtype)
