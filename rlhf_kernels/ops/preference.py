r"""Preference losses as fused autograd ops: the DPO family, SimPO, ORPO, KTO, Bradley-Terry.

Notation: :math:`\pi_c, \pi_r` policy log-probs of the chosen / rejected
response (summed over tokens unless stated), :math:`\rho_c, \rho_r` the
reference model's (0 with ``reference_free``), :math:`\sigma` the sigmoid,
:math:`\beta > 0`, :math:`\epsilon` the label smoothing, and

.. math::

    a = \pi_c - \rho_c, \quad b = \pi_r - \rho_r, \quad h = a - b, \quad z = \beta h .

Rewards are :math:`\beta a` (chosen) and :math:`\beta b` (rejected), detached, with
the meaning TRL's ``DPOTrainer`` gives them. Per-pair losses by ``loss_type``:

* ``sigmoid`` (DPO, Rafailov et al. 2023; with :math:`\epsilon`: conservative
  cDPO, Mitchell 2023): :math:`-(1-\epsilon)\log\sigma(z) - \epsilon\log\sigma(-z)`
* ``robust`` (rDPO, Chowdhury et al. 2024):
  :math:`\big(-(1-\epsilon)\log\sigma(z) + \epsilon\log\sigma(-z)\big) / (1 - 2\epsilon)`
* ``exo_pair`` (EXO, Ji et al. 2024), :math:`e = \epsilon` or :math:`10^{-3}`:
  :math:`\sigma(z)(\log\sigma(z) - \log(1-e)) + \sigma(-z)(\log\sigma(-z) - \log e)`
* ``hinge`` (SLiC, Zhao et al. 2023): :math:`\max(0, 1 - z)`
* ``ipo`` (Azar et al. 2023): :math:`(h - 1/(2\beta))^2`. IPO is defined on
  length-averaged log-probs: pass ``sequence_logprobs(..., average=True)``.
* ``bco_pair`` (BCO, Jung et al. 2024): :math:`-\log\sigma(\beta a - \delta) - \log\sigma(\delta - \beta b)`,
  :math:`\delta` the running mean of the rewards: ``bco_delta`` if given (a
  trainer keeps the running mean), else the batch mean of all rewards (TRL's
  first step), constant for the gradient.
* ``sppo_hard`` (SPPO, Wu et al. 2024): :math:`(a - 1/(2\beta))^2 + (b + 1/(2\beta))^2`
* ``nca_pair`` (NCA, Chen et al. 2024):
  :math:`-\log\sigma(\beta a) - \tfrac12\log\sigma(-\beta a) - \tfrac12\log\sigma(-\beta b)`
* ``aot_pair`` / ``aot`` (AOT, Melnyk et al. 2024): the sigmoid loss on
  :math:`\operatorname{sort}(a) - \operatorname{sort}(b)` (``aot_pair``), or on
  :math:`\operatorname{sort}(\pi_c - \pi_r) - \operatorname{sort}(\rho_c - \rho_r)` (``aot``), position by position.
* ``apo_zero`` / ``apo_down`` (APO, D'Oosterlinck et al. 2024):
  :math:`1 - \sigma(\beta a) + \sigma(\beta b)` / :math:`\sigma(\beta a) + 1 - \sigma(z)`
* ``discopop`` (DiscoPOP, Lu et al. 2024), :math:`q = \sigma(z/\tau)`:
  :math:`-\log\sigma(z)(1 - q) + e^{-z} q`

Relatives: :func:`simpo_loss` (Meng et al. 2024), :func:`orpo_loss` (Hong et al.
2024), :func:`kto_loss` (Ethayarajh et al. 2024), :func:`bradley_terry_loss`
(reward models, Ouyang et al. 2022). Each is one forward and one backward kernel
on the triton and native backends (csrc/preference.h has the table with the
derivatives); the ``torch`` backend (rlhf_kernels.reference.preference) writes
each formula as above. On a GPU the forward is one program up to 16384 pairs;
above, fixed 2048-pair chunks run in parallel and one more program sums their
metric partials in a fixed order (no atomics: the same bits on every run for a
given batch size and device, though not the same bits as the one-program sums; the
Triton and CUDA kernels round their partials differently).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_kernels import _dispatch, native
from rlhf_kernels._checks import check_flags, check_real
from rlhf_kernels.reference import preference as reference

try:
    from torch.library import triton_op

    from rlhf_kernels.triton import preference as triton_impl
    from rlhf_kernels.triton._common import wrap_triton
except ImportError:
    triton_impl = None

DPO_LOSS_TYPES = (
    "sigmoid", "robust", "exo_pair", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair",
    "aot_pair", "aot", "apo_zero", "apo_down", "discopop",
)  # fmt: skip
# Valid label_smoothing per loss type (lo, hi, hi inclusive); others must use 0.
_SMOOTHING = {
    "sigmoid": (0.0, 0.5, True),
    "robust": (0.0, 0.5, False),
    "exo_pair": (0.0, 0.5, False),
    "aot_pair": (0.0, 0.5, True),
    "aot": (0.0, 0.5, True),
}
_NATIVE_OP = "preference_fwd_native"
METRIC_NAMES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


class DPOLossOutput(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class DPOLossWithMetrics(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]


class ORPOLossOutput(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    log_odds_ratio: torch.Tensor
    log_odds_chosen: torch.Tensor


class KTOLossOutput(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    kl: torch.Tensor


class BradleyTerryOutput(NamedTuple):
    loss: torch.Tensor
    accuracy: torch.Tensor


# --- public ops -------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    discopop_tau: float = 0.05,
    bco_delta: float | None = None,
    return_metrics: bool = False,
    backend: str = "auto",
) -> DPOLossOutput | DPOLossWithMetrics:
    """Per-pair DPO-family losses and rewards (see the module docstring for each ``loss_type``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` sequence log-probs
            under the policy (e.g. from :func:`rlhf_kernels.sequence_logprobs`).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` under the frozen
            reference; required unless ``reference_free``.
        beta: the KL-regularisation strength, > 0.
        loss_type: one of ``DPO_LOSS_TYPES``.
        label_smoothing: :math:`\\epsilon`, for ``sigmoid`` (cDPO) and ``aot*`` in
            [0, 0.5], ``robust`` and ``exo_pair`` in [0, 0.5); 0 for the others.
        reference_free: treat the reference log-probs as 0.
        discopop_tau: DiscoPOP's temperature, > 0.
        bco_delta: ``bco_pair``'s reward offset; ``None`` uses the batch mean.
        return_metrics: also return a dict with the mean loss, reward accuracy,
            margin, chosen and rejected rewards (TRL's names), computed by the
            forward kernel itself.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)`` (float32, ``[B]``), plus
        ``metrics`` with ``return_metrics``. Gradients flow to all four inputs.
    """
    pc, pr, rc, rr = _check_pairs(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=None if reference_free else ref_chosen_logps,
        ref_rejected_logps=None if reference_free else ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: unknown {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not reference_free and (rc is None or rr is None):
        missing = "ref_chosen_logps" if rc is None else "ref_rejected_logps"
        raise ValueError(f"{missing}: required unless reference_free=True")
    _check_positive("beta", beta)
    _check_positive("discopop_tau", discopop_tau)
    _check_smoothing(loss_type, label_smoothing)
    check_flags(reference_free=reference_free, return_metrics=return_metrics)
    if bco_delta is not None:
        _check_real("bco_delta", bco_delta)
        if loss_type != "bco_pair":  # as label_smoothing for the losses without it: not silently unused
            raise ValueError(f"bco_delta: only loss_type='bco_pair' uses it, got loss_type={loss_type!r}")
    impl = _dispatch.resolve(backend, pc.device, _NATIVE_OP)

    if impl == "torch":
        losses, cr, rj = reference.dpo_loss(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
            reference_free=reference_free, discopop_tau=discopop_tau, bco_delta=bco_delta,
        )  # fmt: skip
        metrics = _metrics_from(losses, cr, rj) if return_metrics else None
    elif loss_type in ("aot", "aot_pair"):
        # Sort in torch (autograd routes the gradient through the permutation),
        # then the fused sigmoid loss on the sorted differences.
        acc = _acc_dtype(pc, pr, rc, rr)
        pc, pr = pc.to(acc), pr.to(acc)
        rc = torch.zeros_like(pc) if rc is None else rc.to(acc)
        rr = torch.zeros_like(pr) if rr is None else rr.to(acc)
        if loss_type == "aot_pair":
            x, y = torch.sort(pc - rc)[0], torch.sort(pr - rr)[0]
        else:
            x, y = torch.sort(pc - pr)[0], torch.sort(rc - rr)[0]
        losses, _, _, _ = _run(impl, "sigmoid", x, y, beta=beta, label_smoothing=label_smoothing, rewards=False)
        cr, rj = (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()
        metrics = _metrics_from(losses, cr, rj) if return_metrics else None
    else:
        losses, cr, rj, m = _run(
            impl, loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, tau=discopop_tau,
            bco_delta=0.0 if bco_delta is None else float(bco_delta), bco_batch_mean=bco_delta is None,
        )  # fmt: skip
        metrics = (
            dict(zip(METRIC_NAMES, _user_view(m[:5], losses, loss_type).unbind(), strict=True))
            if return_metrics
            else None
        )
    if return_metrics:
        return DPOLossWithMetrics(losses, cr, rj, metrics)
    return DPOLossOutput(losses, cr, rj)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    backend: str = "auto",
) -> DPOLossOutput:
    r"""SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin.

    :math:`-(1-\epsilon)\log\sigma(\beta(\pi_c - \pi_r) - \gamma) - \epsilon\log\sigma(\gamma - \beta(\pi_c - \pi_r))`,
    where :math:`\pi` are *average* per-token log-probs
    (``sequence_logprobs(..., average=True)``). Rewards are :math:`\beta\pi_c, \beta\pi_r`.
    """
    pc, pr = _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_positive("beta", beta)
    _check_real("gamma", gamma)
    _check_smoothing("sigmoid", label_smoothing)
    impl = _dispatch.resolve(backend, pc.device, _NATIVE_OP)
    if impl == "torch":
        return DPOLossOutput(*reference.simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing))
    losses, cr, rj, _ = _run(impl, "sigmoid", pc, pr, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    return DPOLossOutput(losses, cr, rj)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    backend: str = "auto",
) -> ORPOLossOutput:
    r"""ORPO's odds-ratio term (Hong et al. 2024), to be added to the chosen NLL loss.

    With average per-token log-probs :math:`\pi_c, \pi_r` (clamped to at most
    :math:`-10^{-6}` so the odds stay finite),
    :math:`\ell = (\pi_c - \pi_r) - (\log(1 - e^{\pi_c}) - \log(1 - e^{\pi_r}))` and the
    per-pair loss is :math:`-\beta\log\sigma(\ell)`. Also returns the batch means of
    :math:`\log\sigma(\ell)` and :math:`\ell` (TRL's ``log_odds_ratio``, ``log_odds_chosen``).
    """
    pc, pr = _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    _check_positive("beta", beta)
    impl = _dispatch.resolve(backend, pc.device, _NATIVE_OP)
    if impl == "torch":
        return ORPOLossOutput(*reference.orpo_loss(pc, pr, beta=beta))
    losses, cr, rj, m = _run(impl, "orpo", pc, pr, beta=beta)
    m = _user_view(m, losses, "orpo")
    return ORPOLossOutput(losses, cr, rj, m[5], m[6])


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    backend: str = "auto",
) -> KTOLossOutput:
    r"""KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable examples.

    The reference point is :math:`z_0 = \max(0, \operatorname{mean}(\pi_{KL} - \rho_{KL}))`
    over mismatched (prompt, completion) pairs, constant for the gradient. With
    :math:`a = \pi_c - \rho_c` for desirable and :math:`b = \pi_r - \rho_r` for
    undesirable examples, the losses are
    :math:`w_d(1 - \sigma(\beta(a - z_0)))` and :math:`w_u(1 - \sigma(\beta(z_0 - b)))`,
    concatenated (desirable first). Returns ``(losses, chosen_rewards, rejected_rewards, kl)``.
    """
    pc, rc = _check_pairs(policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    pr, rr = _check_pairs(policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    pk, rk = _check_pairs(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    for name, t in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr), ("ref_kl_logps", rk)):
        if t is None:
            raise ValueError(f"{name}: required (KTO needs the reference model's log-probs)")
    if len({t.device for t in (pc, pr, pk)}) != 1:
        raise ValueError("policy_rejected_logps / policy_kl_logps: all inputs must be on one device")
    _check_positive("beta", beta)
    for name, w in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        _check_real(name, w)
        if w < 0:
            raise ValueError(f"{name}: must be >= 0, got {w}")
    impl = _dispatch.resolve(backend, pc.device, _NATIVE_OP)
    if impl == "torch":
        return KTOLossOutput(
            *reference.kto_loss(
                pc,
                pr,
                pk,
                rc,
                rr,
                rk,
                beta=beta,
                desirable_weight=desirable_weight,
                undesirable_weight=undesirable_weight,
            )  # fmt: skip
        )
    acc = _acc_dtype(pc, pr, pk, rc, rr, rk)
    pc, pr, rc, rr = (t.to(acc) for t in (pc, pr, rc, rr))  # one type for both halves' losses and rewards
    with torch.no_grad():
        kl = (
            (pk.to(acc) - rk.to(acc)).mean().clamp(min=0)
            if pk.numel()
            else torch.zeros((), dtype=acc, device=pc.device)
        )
    chosen_losses, cr, _, _ = _run(impl, "kto_chosen", pc, None, rc, None, kl=kl, beta=beta, weight=desirable_weight)
    rejected_losses, _, rj, _ = _run(
        impl, "kto_rejected", None, pr, None, rr, kl=kl, beta=beta, weight=undesirable_weight
    )
    return KTOLossOutput(torch.cat([chosen_losses, rejected_losses]), cr, rj, kl)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
    backend: str = "auto",
) -> BradleyTerryOutput:
    r"""Reward-model loss on preference pairs (Bradley & Terry 1952; InstructGPT).

    :math:`\operatorname{mean}(-\log\sigma(r_c - r_r - m)) + c\,\operatorname{mean}((r_c + r_r)^2)`
    with an optional per-pair ``margin`` :math:`m` (data, not differentiated)
    and centring coefficient :math:`c` (Eisenstein et al. 2023). Returns
    ``(loss, accuracy)``, accuracy being the fraction with :math:`r_c > r_r`.
    """
    c, r = _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if margin is not None:
        _check_pairs(chosen_rewards=c, margin=margin)
    _check_real("center_rewards_coefficient", center_rewards_coefficient)
    impl = _dispatch.resolve(backend, c.device, _NATIVE_OP)
    if impl == "torch":
        return BradleyTerryOutput(
            *reference.bradley_terry_loss(c, r, margin=None if margin is None else margin.detach(),
                                          center_rewards_coefficient=center_rewards_coefficient)  # fmt: skip
        )
    m = None if margin is None else margin.detach()
    losses, _, _, metrics = _run(
        impl, "sigmoid", c, r, margin=m, beta=1.0, center=float(center_rewards_coefficient), rewards=False
    )
    return BradleyTerryOutput(reference.batch_mean(losses), _user_view(metrics[1], losses, "sigmoid"))


# --- argument checks ----------------------------------------------------------------------


def _check_pairs(**named: torch.Tensor | None) -> list[torch.Tensor | None]:
    """1-D float tensors of one shape on one device; returns them in order."""
    first = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of per-sequence values, got shape {tuple(t.shape)}")
        if first is None:
            first = (name, t)
            continue
        if t.shape != first[1].shape:
            raise ValueError(f"{name}: batch size {t.shape[0]} does not match {first[0]}'s {first[1].shape[0]}")
        if t.device != first[1].device:
            raise ValueError(f"{name}: on device {t.device}, but {first[0]} is on {first[1].device}")
    return list(named.values())


def _check_real(name, value):
    check_real(name, value, finite=True)


def _check_positive(name, value):
    _check_real(name, value)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}: must be positive and finite, got {value}")


def _check_smoothing(loss_type, label_smoothing):
    _check_real("label_smoothing", label_smoothing)
    if loss_type not in _SMOOTHING:
        if label_smoothing != 0:
            raise ValueError(f"label_smoothing: loss_type={loss_type!r} does not use label smoothing; pass 0")
        return
    lo, hi, inclusive = _SMOOTHING[loss_type]
    ok = lo <= label_smoothing <= hi if inclusive else lo <= label_smoothing < hi
    if not ok:
        bound = "]" if inclusive else ")"
        raise ValueError(
            f"label_smoothing: {label_smoothing} is outside [{lo}, {hi}{bound} for loss_type={loss_type!r}"
        )


# Losses whose backward reads the forward's metrics tensor (bco_pair: its delta, metrics[7]);
# the others' backward gets None, so their graph holds no reference to the metrics.
_METRICS_IN_BACKWARD = ("bco_pair",)


def _user_view(metrics: torch.Tensor, losses: torch.Tensor, loss: str) -> torch.Tensor:
    """Metrics handed to the caller: a copy when the forward recorded a graph (``losses`` requires
    grad) that saved the metrics tensor for backward, so that changing them in place cannot
    break the backward. Other losses hand out the kernel's tensor itself (no copy kernel on a
    latency-bound step)."""
    return metrics.clone() if losses.requires_grad and loss in _METRICS_IN_BACKWARD else metrics


def _acc_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any input is float64 (as the reference's type promotion), else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _metrics_from(losses, chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        mean = reference.batch_mean  # 0 for an empty batch, as the kernels' metrics
        values = (
            mean(losses),
            mean((chosen_rewards > rejected_rewards).to(losses.dtype)),
            mean(chosen_rewards - rejected_rewards),
            mean(chosen_rewards),
            mean(rejected_rewards),
        )
    return dict(zip(METRIC_NAMES, values, strict=True))


# --- the fused kernels as torch.library ops ---------------------------------------------------
# One forward and one backward op per kernel backend, generic over the loss id.
# Forward returns (losses, chosen_rewards, rejected_rewards, metrics); autograd
# is registered on it and sends dL/da to chosen and -dL/da to ref_chosen (and
# likewise b), so torch.compile sees one differentiable op.


def _run(
    impl, loss, chosen, rejected, ref_chosen=None, ref_rejected=None, *, margin=None, kl=None, beta=0.1,
    gamma=0.0, label_smoothing=0.0, center=0.0, tau=0.05, bco_delta=0.0, bco_batch_mean=False, weight=1.0,
    rewards=True,
):  # fmt: skip
    """Call the backend's fused forward op on inputs converted to the accumulation type."""
    acc = _acc_dtype(chosen, rejected, ref_chosen, ref_rejected, margin, kl)

    def prep(t):
        if t is None or (t.dtype == acc and t.is_contiguous()):  # the common case, without two calls into torch
            return t
        return t.to(acc).contiguous()

    return _dispatch.call(
        _FWD_OPS[impl], loss, prep(chosen), prep(rejected), prep(ref_chosen), prep(ref_rejected), prep(margin),
        prep(kl), float(beta), float(gamma), float(label_smoothing), float(center), float(tau), float(bco_delta),
        bool(bco_batch_mean), float(weight), bool(rewards),
    )  # fmt: skip


def _fake_fwd(loss, chosen, rejected, ref_chosen, ref_rejected, margin, kl, beta, gamma, label_smoothing, center,
              tau, bco_delta, bco_batch_mean, weight, write_rewards):  # fmt: skip
    like = chosen if chosen is not None else rejected
    n = like.shape[0]
    return (
        like.new_empty(n),
        like.new_empty(n if (write_rewards and chosen is not None) else 0),
        like.new_empty(n if (write_rewards and rejected is not None) else 0),
        like.new_empty(8),
    )


def _fake_bwd(loss, chosen, rejected, ref_chosen, ref_rejected, margin, kl, metrics, beta, gamma, label_smoothing,
              center, tau, weight, grad_losses, grad_stride, grad_scale, need_a, need_b):  # fmt: skip
    like = chosen if chosen is not None else rejected
    n = like.shape[0]
    return like.new_empty(n if need_a else 0), like.new_empty(n if need_b else 0)


if triton_impl is not None:

    @triton_op("rlhf_kernels::preference_fwd_triton", mutates_args=())
    def _fwd_triton(
        loss: str, chosen: torch.Tensor | None, rejected: torch.Tensor | None, ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None, margin: torch.Tensor | None, kl: torch.Tensor | None, beta: float,
        gamma: float, label_smoothing: float, center: float, tau: float, bco_delta: float, bco_batch_mean: bool,
        weight: float, write_rewards: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        n = (chosen if chosen is not None else rejected).shape[0]
        scalars = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, center=center, tau=tau,
                       bco_delta=bco_delta, bco_batch_mean=bco_batch_mean, weight=weight)  # fmt: skip
        return triton_impl.preference_fwd(loss, n, chosen, rejected, ref_chosen, ref_rejected, margin, kl, scalars,
                                          write_rewards, launch=wrap_triton)  # fmt: skip

    @triton_op("rlhf_kernels::preference_bwd_triton", mutates_args=())
    def _bwd_triton(
        loss: str, chosen: torch.Tensor | None, rejected: torch.Tensor | None, ref_chosen: torch.Tensor | None,
        ref_rejected: torch.Tensor | None, margin: torch.Tensor | None, kl: torch.Tensor | None,
        metrics: torch.Tensor | None, beta: float, gamma: float, label_smoothing: float, center: float, tau: float,
        weight: float, grad_losses: torch.Tensor, grad_stride: int, grad_scale: float, need_a: bool, need_b: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        n = (chosen if chosen is not None else rejected).shape[0]
        scalars = dict(beta=beta, gamma=gamma, label_smoothing=label_smoothing, center=center, tau=tau,
                       weight=weight)  # fmt: skip
        ga, gb = triton_impl.preference_bwd(loss, n, chosen, rejected, ref_chosen, ref_rejected, margin, kl, metrics,
                                            scalars, grad_losses, grad_stride, grad_scale, need_a, need_b,
                                            launch=wrap_triton)  # fmt: skip
        empty = (chosen if chosen is not None else rejected).new_empty(0)
        return (empty if ga is None else ga), (empty if gb is None else gb)

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)

if native.available() and hasattr(torch.ops.rlhf_kernels, "preference_fwd_native"):
    torch.library.register_fake("rlhf_kernels::preference_fwd_native")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::preference_bwd_native")(_fake_bwd)

_OPS = _dispatch.kernel_ops("preference_fwd", "preference_bwd")
_FWD_OPS = {name: ops[0] for name, ops in _OPS.items()}


def _setup_context(ctx, inputs, output):
    (loss, chosen, rejected, ref_chosen, ref_rejected, margin, kl, beta, gamma, label_smoothing, center, tau,
     _bco_delta, _bco_batch_mean, weight, _write_rewards) = inputs  # fmt: skip
    _, chosen_rewards, rejected_rewards, metrics = output
    ctx.save_for_backward(chosen, rejected, ref_chosen, ref_rejected, margin, kl,
                          metrics if loss in _METRICS_IN_BACKWARD else None)  # fmt: skip
    ctx.args = (loss, beta, gamma, label_smoothing, center, tau, weight)
    ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, metrics)
    ctx.set_materialize_grads(False)  # no zero tensors for them; backward takes a None grad_losses too


def _make_backward(bwd):
    def backward(ctx, grad_losses, _g_cr, _g_rr, _g_metrics):
        chosen, rejected, ref_chosen, ref_rejected, margin, kl, metrics = ctx.saved_tensors
        loss, beta, gamma, label_smoothing, center, tau, weight = ctx.args
        needs = ctx.needs_input_grad
        need_a = chosen is not None and (needs[1] or needs[3])
        need_b = rejected is not None and (needs[2] or needs[4])
        none = (None,) * 16
        if grad_losses is None or not (need_a or need_b):
            return none
        ga, gb = _dispatch.call_below_autograd(bwd, loss, chosen, rejected, ref_chosen, ref_rejected, margin, kl,
                                               metrics, beta, gamma, label_smoothing, center, tau, weight,
                                               grad_losses.contiguous(), 1, 1.0, need_a, need_b)  # fmt: skip
        grads = list(none)
        grads[1] = ga if needs[1] else None
        grads[3] = -ga if (needs[3] and ref_chosen is not None) else None
        grads[2] = gb if needs[2] else None
        grads[4] = -gb if (needs[4] and ref_rejected is not None) else None
        return tuple(grads)

    return backward


for _fwd, _bwd in _OPS.values():
    _dispatch.register_autograd(_fwd, _make_backward(_bwd), setup_context=_setup_context)
