r"""PPO / GRPO ops: GAE as one chunked scan, the clipped policy and value losses, KL penalties.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation"), per sequence, walking time backwards from
:math:`V_{T} = 0`:

.. math::

    \delta_t = r_t + \gamma V_{\text{next}(t)} - V_t, \qquad
    A_t = \delta_t + \gamma\lambda A_{\text{next}(t)}, \qquad R_t = A_t + V_t,

where :math:`\text{next}(t)` is the next position with ``mask`` set: masked
positions (tool / observation tokens of a multi-turn response) are skipped,
not zeroed. They keep the running advantage of the next valid position, as in
verl's ``compute_gae_advantage_return``.

PPO clipped surrogate (Schulman et al. 2017), with
:math:`\rho = \exp(\operatorname{clamp}(\log\pi - \log\pi_{old}, \pm 20))`, clip-higher
(DAPO, Yu et al. 2025) bounds :math:`[1-\epsilon_l, 1+\epsilon_h]` and the dual clip
(Ye et al. 2020) constant :math:`c > 1` for negative advantages:

.. math::

    \ell_t = \max(-A_t\rho_t, -A_t\operatorname{clip}(\rho_t, 1-\epsilon_l, 1+\epsilon_h)),
    \qquad \ell_t \leftarrow \min(\ell_t, -cA_t) \text{ where } A_t < 0 .

Value loss: :math:`\tfrac12\max((v - R)^2, (\operatorname{clip}(v, v_{old} \pm \epsilon_v) - R)^2)`.
Both are aggregated over the response mask by ``loss_agg_mode``:
``token-mean`` (mean over all valid tokens), ``seq-mean-token-sum`` (mean over
sequences of their token sums), ``seq-mean-token-mean`` (mean over sequences of
their token means) and ``seq-mean-token-sum-norm`` (sum over sequences of token
sums, divided by the padded length T, as in Dr. GRPO). Sequences without a valid
token drop out of the sequence means.

KL penalties of the policy to the reference, per token, with
:math:`d = \log\pi - \log\pi_{ref}`: ``k1`` :math:`d`, ``abs`` :math:`|d|`, ``k2``
:math:`d^2/2`, ``k3`` :math:`e^{-d} + d - 1` (Schulman's low-variance estimator;
:math:`-d` clamped to :math:`\pm 20` and the result to :math:`[-10, 10]`, as PPO
frameworks do).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from rlhf_kernels import _dispatch, native
from rlhf_kernels.reference import ppo as reference

try:
    from torch.library import triton_op, wrap_triton

    from rlhf_kernels.triton import ppo as triton_impl
except ImportError:
    triton_impl = None

LOSS_AGG_MODES = reference.LOSS_AGG_MODES
KL_KINDS = reference.KL_KINDS


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac_lower: torch.Tensor


class ValueLossOutput(NamedTuple):
    loss: torch.Tensor
    clipfrac: torch.Tensor


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over ``[B, T]`` rewards and values (see the module docstring).

    One launch for the whole batch (a chunked scan per sequence), never a launch
    per time step. Returns ``(advantages, returns)`` in float32 (float64 for
    float64 inputs). Not differentiated: PPO computes advantages without gradient.
    """
    _check_rows(rewards=rewards, values=values, mask=mask)
    for name, value in (("gamma", gamma), ("lam", lam)):
        _check_real(name, value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {value}")
    impl = _dispatch.resolve(backend, rewards.device, "gae_native")
    acc = _acc_dtype(rewards, values)
    rewards, values = rewards.detach().to(acc), values.detach().to(acc)
    if impl == "torch":
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    rewards, values = _unit_time_stride(rewards), _unit_time_stride(values)
    m = None if mask is None else _unit_time_stride((mask.detach() != 0).to(torch.uint8))
    return _OPS[impl]["gae"](rewards, values, m, float(gamma), float(lam))


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
) -> PolicyLossOutput:
    """The clipped PPO surrogate, aggregated (see the module docstring).

    Returns ``(loss, clipfrac, approx_kl, clipfrac_lower)``: the scalar loss, the
    fraction of valid tokens where clipping bound, the mean of
    :math:`\\log\\pi_{old} - \\log\\pi`, and the fraction where the dual clip bound
    (0 without ``clip_ratio_c``). Gradients flow to ``logprobs``; old log-probs,
    advantages and mask are data.
    """
    _check_rows(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, need_mask=True)
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    for name, value in (("clip_ratio", clip_ratio), ("clip_ratio_low", low), ("clip_ratio_high", high)):
        _check_real(name, value)
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")
    if clip_ratio_c is not None:
        _check_real("clip_ratio_c", clip_ratio_c)
        if not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c: the dual-clip constant must be > 1, got {clip_ratio_c}")
    _check_agg(loss_agg_mode)
    impl = _dispatch.resolve(backend, logprobs.device, "ppo_loss_fwd_native")
    if impl == "torch":
        return PolicyLossOutput(
            *reference.ppo_policy_loss(
                logprobs, old_logprobs, advantages, mask, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
                clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
            )
        )  # fmt: skip
    acc = _acc_dtype(logprobs, old_logprobs, advantages)
    x, old, adv, m = _rows(logprobs, acc), _rows(old_logprobs.detach(), acc), _rows(advantages.detach(), acc), mask
    m = _rows(m.detach() != 0, torch.uint8)
    row_loss, stats = _OPS[impl]["ppo_loss_fwd"](
        _POLICY, x, old, adv, m, float(low), float(high), float(clip_ratio_c or 0.0), clip_ratio_c is not None
    )
    loss, count = _aggregate(row_loss, stats, x.shape[-1], loss_agg_mode)
    return PolicyLossOutput(loss, stats[:, 1].sum() / count, stats[:, 2].sum() / count, stats[:, 3].sum() / count)


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float = 0.2,
    loss_agg_mode: str = "token-mean",
    backend: str = "auto",
) -> ValueLossOutput:
    """The clipped value loss (see the module docstring). Returns ``(loss, clipfrac)``;
    gradients flow to ``values``."""
    _check_rows(values=values, old_values=old_values, returns=returns, mask=mask, need_mask=True)
    _check_real("clip_range_value", clip_range_value)
    if clip_range_value < 0:
        raise ValueError(f"clip_range_value: must be >= 0, got {clip_range_value}")
    _check_agg(loss_agg_mode)
    impl = _dispatch.resolve(backend, values.device, "ppo_loss_fwd_native")
    if impl == "torch":
        return ValueLossOutput(
            *reference.ppo_value_loss(
                values, old_values, returns, mask, clip_range_value=clip_range_value, loss_agg_mode=loss_agg_mode
            )  # fmt: skip
        )
    acc = _acc_dtype(values, old_values, returns)
    v, old, ret = _rows(values, acc), _rows(old_values.detach(), acc), _rows(returns.detach(), acc)
    m = _rows(mask.detach() != 0, torch.uint8)
    row_loss, stats = _OPS[impl]["ppo_loss_fwd"](_VALUE, v, old, ret, m, float(clip_range_value), 0.0, 0.0, False)
    loss, count = _aggregate(row_loss, stats, v.shape[-1], loss_agg_mode)
    return ValueLossOutput(loss, stats[:, 1].sum() / count)


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1", *, backend: str = "auto"
) -> torch.Tensor:
    """Per-token KL estimator of the policy to the reference (see the module docstring).

    Differentiable in both inputs; float32 (float64 for float64 inputs).
    """
    _check_rows(logprobs=logprobs, ref_logprobs=ref_logprobs, any_rank=True)
    if kind not in KL_KINDS:
        raise ValueError(f"kind: unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    impl = _dispatch.resolve(backend, logprobs.device, "kl_penalty_fwd_native")
    if impl == "torch":
        return reference.kl_penalty(logprobs, ref_logprobs, kind)
    acc = _acc_dtype(logprobs, ref_logprobs)
    return _OPS[impl]["kl_fwd"](logprobs.to(acc).contiguous(), ref_logprobs.to(acc).contiguous(), kind)


class PPOLossMetrics(NamedTuple):
    loss: torch.Tensor
    pg_loss: torch.Tensor
    clipfrac: torch.Tensor
    clipfrac_lower: torch.Tensor
    approx_kl: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor


def ppo_loss_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
    ignore_index: int = -100,
    check_labels: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, PPOLossMetrics]:
    r"""The PPO policy step from ``[B, T, V]`` logits to the scalar loss.

    .. math::

        L = \operatorname{agg}(\ell^{PPO}) - c_H \operatorname{agg}(H) + c_{KL} \operatorname{agg}(\mathrm{KL})

    with the clipped surrogate :math:`\ell^{PPO}` of :func:`ppo_policy_loss` on
    :math:`\log\pi = ` ``token_logprobs(logits / T)``, the entropy :math:`H` of
    ``softmax(logits / T)`` and the ``kl_kind`` estimator to ``ref_logprobs``,
    all aggregated by ``loss_agg_mode`` over ``mask`` (as verl's actor does).

    The logits are read once in forward (online log-sum-exp, label log-prob
    and entropy in one pass, keeping two floats per token) and once more in
    backward, which writes their gradient in the same pass: no ``[B, T, V]``
    float32 temporary. The per-token PPO, KL and aggregation arithmetic runs in
    fused ``O(B T)`` kernels between the two. Returns ``(loss, metrics)``.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, T, V], got {getattr(logits, 'shape', None)}")
    _check_rows(old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs,
                need_mask=True)  # fmt: skip
    if tuple(old_logprobs.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"old_logprobs: expected shape {tuple(logits.shape[:2])}, got {tuple(old_logprobs.shape)}")
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        _check_real(name, value)
    if kl_coef and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef != 0")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind: unknown KL estimator {kl_kind!r}; expected one of {', '.join(KL_KINDS)}")
    _check_agg(loss_agg_mode)
    from rlhf_kernels.ops.logprobs import token_logprobs

    mask = mask != 0  # bool, integer or float: nonzero means valid
    logprobs, entropy = token_logprobs(
        logits, labels, mask, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
        check_labels=check_labels, backend=backend,
    )  # fmt: skip
    pg = ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
        backend=_elementwise_backend(backend, logits.device, "ppo_loss_fwd_native"),
    )  # fmt: skip
    entropy_agg = reference.agg_loss(entropy, mask, loss_agg_mode)
    loss = pg.loss - entropy_coef * entropy_agg if entropy_coef else pg.loss
    zero = torch.zeros((), dtype=pg.loss.dtype, device=pg.loss.device)
    kl_agg = zero
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_kind,
                        backend=_elementwise_backend(backend, logits.device, "kl_penalty_fwd_native"))  # fmt: skip
        kl_agg = reference.agg_loss(kl, mask, loss_agg_mode)
        if kl_coef:
            loss = loss + kl_coef * kl_agg
    metrics = PPOLossMetrics(loss.detach(), pg.loss.detach(), pg.clipfrac, pg.clipfrac_lower, pg.approx_kl,
                             entropy_agg.detach(), kl_agg.detach())  # fmt: skip
    return loss, metrics


def _elementwise_backend(backend: str, device: torch.device, native_op: str) -> str:
    """The backend for the O(B T) pieces: the requested one where it exists, else auto."""
    if backend != "auto" and _dispatch.unavailable_reason(backend, device, native_op) is None:
        return backend
    return "auto"


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and the unbiased variance over
    ``mask`` (as PPO implementations whiten advantages); ``shift_mean=False`` adds
    the mean back. Two reductions and one elementwise pass, in PyTorch on every device."""
    _check_rows(x=x, mask=mask, any_rank=True)
    return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


def grpo_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    r"""GRPO's outcome advantages (Shao et al. 2024): each score minus its group's mean,
    divided by the group's (unbiased) standard deviation plus ``eps`` with
    ``norm_by_std`` (Dr. GRPO drops the division). Groups are consecutive runs of
    ``group_size`` or given by ``group_ids``; a group of one gets its score minus
    itself, 0. Vectorised PyTorch (``[N]`` scores are tiny) on every device.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.dtype.is_floating_point:
        raise ValueError("scores: expected a 1-D floating-point tensor of per-response scores")
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size / group_ids: give exactly one")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        if scores.numel() % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the {scores.numel()} scores")
        group_ids = torch.arange(scores.numel(), device=scores.device) // group_size
    elif group_ids.shape != scores.shape:
        raise ValueError(f"group_ids: expected shape {tuple(scores.shape)}, got {tuple(group_ids.shape)}")
    acc = _acc_dtype(scores)
    s = scores.to(acc)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(acc)
    mean = torch.zeros(len(counts), dtype=acc, device=s.device).index_add_(0, inverse, s) / n
    centred = s - mean[inverse]
    if not norm_by_std:
        return centred
    var = torch.zeros_like(mean).index_add_(0, inverse, centred * centred) / (n - 1).clamp(min=1)
    std = torch.where(counts > 1, var.sqrt(), torch.ones_like(var))
    return centred / (std[inverse] + eps)


# --- checks and helpers -------------------------------------------------------------------


def _check_real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise TypeError(f"{name}: expected a number, got {value!r}")


def _check_agg(mode):
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")


def _check_rows(*, need_mask=False, any_rank=False, **named):
    first = None
    for name, t in named.items():
        if t is None:
            if need_mask and name == "mask":
                raise ValueError("mask: required (the response mask)")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if name == "mask":
            pass  # bool, integer or float: nonzero means valid
        elif not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
        if not any_rank and t.dim() != 2:
            raise ValueError(f"{name}: expected shape [B, T], got {tuple(t.shape)}")
        if first is None:
            first = (name, t)
            continue
        if t.shape != first[1].shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {first[0]}'s {tuple(first[1].shape)}")
        if t.device != first[1].device:
            raise ValueError(f"{name}: on device {t.device}, but {first[0]} is on {first[1].device}")


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit_time_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(t, dtype):
    return t.to(dtype).contiguous()


def _aggregate(row_loss, stats, T, mode):
    """The scalar loss from per-row sums (differentiable through row_loss), and the token count."""
    count = stats[:, 0]
    total = count.sum().clamp(min=1)
    if mode == "token-mean":
        return row_loss.sum() / total, total
    n_seqs = (count > 0).to(row_loss.dtype).sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return row_loss.sum() / n_seqs, total
    if mode == "seq-mean-token-mean":
        return (row_loss / count.clamp(min=1)).sum() / n_seqs, total
    return row_loss.sum() / T, total


# --- torch.library registration -------------------------------------------------------------

_POLICY, _VALUE = 0, 1


def _fake_gae(rewards, values, mask, gamma, lam):
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


def _fake_loss_fwd(kind, x, old, third, mask, p0, p1, p2, has_dual):
    return x.new_empty(x.shape[0]), x.new_empty(x.shape[0], 4)


def _fake_loss_bwd(kind, x, old, third, mask, grad_row, p0, p1, p2, has_dual):
    return x.new_empty(x.shape)


def _fake_kl_fwd(logp, ref, kind):
    return logp.new_empty(logp.shape)


def _fake_kl_bwd(logp, ref, kind, grad):
    return logp.new_empty(logp.shape)


if triton_impl is not None:

    @triton_op("rlhf_kernels::gae_triton", mutates_args=())
    def _gae_triton(
        rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_impl.gae(rewards, values, mask, gamma, lam, launch=wrap_triton)

    @triton_op("rlhf_kernels::ppo_loss_fwd_triton", mutates_args=())
    def _loss_fwd_triton(
        kind: int, x: torch.Tensor, old: torch.Tensor, third: torch.Tensor, mask: torch.Tensor, p0: float,
        p1: float, p2: float, has_dual: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return triton_impl.ppo_loss_fwd(kind, x, old, third, mask, p0, p1, p2, has_dual, launch=wrap_triton)

    @triton_op("rlhf_kernels::ppo_loss_bwd_triton", mutates_args=())
    def _loss_bwd_triton(
        kind: int, x: torch.Tensor, old: torch.Tensor, third: torch.Tensor, mask: torch.Tensor,
        grad_row: torch.Tensor, p0: float, p1: float, p2: float, has_dual: bool,
    ) -> torch.Tensor:  # fmt: skip
        return triton_impl.ppo_loss_bwd(kind, x, old, third, mask, grad_row, p0, p1, p2, has_dual, launch=wrap_triton)

    @triton_op("rlhf_kernels::kl_penalty_fwd_triton", mutates_args=())
    def _kl_fwd_triton(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
        return triton_impl.kl_penalty(logp, ref, kind, launch=wrap_triton)

    @triton_op("rlhf_kernels::kl_penalty_bwd_triton", mutates_args=())
    def _kl_bwd_triton(logp: torch.Tensor, ref: torch.Tensor, kind: str, grad: torch.Tensor) -> torch.Tensor:
        return triton_impl.kl_penalty(logp, ref, kind, grad_out=grad.contiguous(), launch=wrap_triton)

    for _op, _fake in ((_gae_triton, _fake_gae), (_loss_fwd_triton, _fake_loss_fwd),
                       (_loss_bwd_triton, _fake_loss_bwd), (_kl_fwd_triton, _fake_kl_fwd),
                       (_kl_bwd_triton, _fake_kl_bwd)):  # fmt: skip
        _op.register_fake(_fake)

if native.available():
    for _name, _fake in (("gae", _fake_gae), ("ppo_loss_fwd", _fake_loss_fwd), ("ppo_loss_bwd", _fake_loss_bwd),
                         ("kl_penalty_fwd", _fake_kl_fwd), ("kl_penalty_bwd", _fake_kl_bwd)):  # fmt: skip
        if hasattr(torch.ops.rlhf_kernels, f"{_name}_native"):
            torch.library.register_fake(f"rlhf_kernels::{_name}_native")(_fake)

_OPS: dict[str, dict] = {}
for _backend, (_g,) in _dispatch.kernel_ops("gae").items():
    _OPS.setdefault(_backend, {})["gae"] = _g
for _backend, (_fwd, _bwd) in _dispatch.kernel_ops("ppo_loss_fwd", "ppo_loss_bwd").items():
    _OPS.setdefault(_backend, {})["ppo_loss_fwd"] = _fwd

    def _loss_setup(ctx, inputs, output):
        kind, x, old, third, mask, p0, p1, p2, has_dual = inputs
        ctx.save_for_backward(x, old, third, mask)
        ctx.args = (kind, p0, p1, p2, has_dual)
        ctx.mark_non_differentiable(output[1])

    def _loss_backward(ctx, grad_row, _grad_stats, bwd=_bwd):
        x, old, third, mask = ctx.saved_tensors
        kind, p0, p1, p2, has_dual = ctx.args
        grad_x = bwd(kind, x, old, third, mask, grad_row, p0, p1, p2, has_dual) if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None, None, None, None, None, None

    torch.library.register_autograd(_fwd, _loss_backward, setup_context=_loss_setup)
for _backend, (_fwd, _bwd) in _dispatch.kernel_ops("kl_penalty_fwd", "kl_penalty_bwd").items():
    _OPS.setdefault(_backend, {})["kl_fwd"] = _fwd

    def _kl_setup(ctx, inputs, output):
        logp, ref, kind = inputs
        ctx.save_for_backward(logp, ref)
        ctx.kind = kind

    def _kl_backward(ctx, grad, bwd=_bwd):
        logp, ref = ctx.saved_tensors
        d = bwd(logp, ref, ctx.kind, grad)
        return (d if ctx.needs_input_grad[0] else None), (-d if ctx.needs_input_grad[1] else None), None

    torch.library.register_autograd(_fwd, _kl_backward, setup_context=_kl_setup)
