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

With ``importance_sampling_level="sequence"`` (GSPO, Zheng et al. 2025, in its
GSPO-token form, verl's ``gspo`` policy loss) every token of a sequence :math:`i` takes
the sequence's ratio :math:`s_i = \exp(\frac{1}{n_i}\sum_{t \in i} (\log\pi_t -
\log\pi_{old,t}))` over its :math:`n_i` valid tokens (clamped as above), as a constant
times its own :math:`\pi_t / \operatorname{sg}(\pi_t)`: the value is :math:`s_i` and
:math:`\partial \rho_t / \partial \log\pi_t = s_i`, the same gradient as GSPO's
sequence-level objective when the advantage is constant along the sequence (GRPO's). The
kernels run unchanged on the log-prob :math:`\log\pi - \operatorname{sg}(\log\pi)` (0,
gradient 1) and the old log-prob :math:`-\ell_i` (:math:`\ell_i` the mean log-ratio), so that
every token of a sequence sees exactly :math:`\ell_i` and the clip binds for all of them or
none; the metrics' ``approx_kl`` is then the token mean of :math:`-\ell_i`, which equals the
token-level one. GSPO's paper aggregates by ``seq-mean-token-mean`` and clips with far
smaller :math:`\epsilon` (3e-4, 4e-4) than PPO: both are left to the caller. Against verl's
``compute_policy_loss_gspo``: the log-ratio is clamped to :math:`\pm 20` (verl: at most 10),
a dual clip applies when ``clip_ratio_c`` is given (verl has none), and a float mask counts
as valid where nonzero (verl multiplies by it).

Value loss: :math:`\tfrac12\max((v - R)^2, (\operatorname{clip}(v, v_{old} \pm \epsilon_v) - R)^2)`.
Both are aggregated over the response mask by ``loss_agg_mode``:
``token-mean`` (mean over all valid tokens), ``seq-mean-token-sum`` (mean over
sequences of their token sums), ``seq-mean-token-mean`` (mean over sequences of
their token means), ``seq-mean-token-sum-norm`` (mean over sequences of their
token sums divided by the padded length T, as in Dr. GRPO and verl 0.8 on; verl
0.7 and earlier summed over the sequences) and ``token-sum`` (the sum
over valid tokens, verl's mode for a caller that normalises across data-parallel
ranks itself). Sequences without a valid
token drop out of the sequence means; with no valid token at all the loss is 0.
On the kernel backends the aggregation happens on the device: one kernel writes
per-row sums, a second (one block) folds them into the loss and the metrics, and
the backward is one kernel that weights each token by its row's share of the
aggregate; no eager reductions between them.

KL penalties of the policy to the reference, per token, with
:math:`d = \log\pi - \log\pi_{ref}`: ``k1`` :math:`d`, ``abs`` :math:`|d|`, ``k2``
:math:`d^2/2`, ``k3`` :math:`e^{-d} + d - 1` (Schulman's low-variance estimator;
:math:`-d` clamped to :math:`\pm 20` and the result to :math:`[-10, 10]`, as PPO
frameworks do).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import NamedTuple

import torch

from rlhf_kernels import _dispatch, native
from rlhf_kernels._checks import check_flags, check_real
from rlhf_kernels._layout import row_layout, rows_may_overlap
from rlhf_kernels.ops import logprobs as logprobs_ops
from rlhf_kernels.reference import ppo as reference
from rlhf_kernels.reference.logprobs import kept_labels

try:
    from torch.library import triton_op

    from rlhf_kernels.triton import ppo as triton_impl
    from rlhf_kernels.triton._common import wrap_triton
except ImportError:
    triton_impl = None

LOSS_AGG_MODES = reference.LOSS_AGG_MODES
IS_LEVELS = reference.IS_LEVELS
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
    m = None if mask is None else _unit_time_stride(_mask_bytes(mask))
    return _dispatch.call_below_autograd(_OPS[impl]["gae"], rewards, values, m, float(gamma), float(lam))


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
    importance_sampling_level: str = "token",
    backend: str = "auto",
) -> PolicyLossOutput:
    """The clipped PPO surrogate, aggregated (see the module docstring).

    Returns ``(loss, clipfrac, approx_kl, clipfrac_lower)``: the scalar loss, the
    fraction of valid tokens where clipping bound, the mean of
    :math:`\\log\\pi_{old} - \\log\\pi`, and the fraction where the dual clip bound
    (0 without ``clip_ratio_c``). Gradients flow to ``logprobs``; old log-probs,
    advantages and mask are data. ``importance_sampling_level="sequence"``: GSPO's
    per-sequence ratio (module docstring) instead of PPO's per-token one.
    """
    _check_rows(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, need_mask=True)
    low, high = _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)
    _check_agg(loss_agg_mode)
    _check_is_level(importance_sampling_level)
    impl = _dispatch.resolve(backend, logprobs.device, "ppo_loss_fwd_native")
    if impl == "torch":
        return PolicyLossOutput(
            *reference.ppo_policy_loss(  # old log-probs and advantages are data, as in the kernels
                logprobs, old_logprobs.detach(), advantages.detach(), mask, clip_ratio=clip_ratio,
                clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
                loss_agg_mode=loss_agg_mode, importance_sampling_level=importance_sampling_level,
            )
        )  # fmt: skip
    acc = _acc_dtype(logprobs, old_logprobs, advantages)
    x, old = logprobs, old_logprobs.detach()
    if importance_sampling_level == "sequence":
        x, old = _sequence_inputs(logprobs, old, mask, acc)
    x, old, adv = _rows(x, acc), _rows(old, acc), _rows(advantages.detach(), acc)
    graph = _records_graph(x)
    loss, metrics, _ = _dispatch.call(
        _OPS[impl]["ppo_loss_fwd"], _POLICY, x, old, adv, _mask_rows(mask, graph), float(low), float(high),
        float(clip_ratio_c or 0.0), clip_ratio_c is not None, _AGG_IDS[loss_agg_mode],
    )  # fmt: skip
    # backward reads metrics[3:] (the normalisers): hand out a copy when it is saved
    clipfrac, approx_kl, clipfrac_lower = (metrics[:3].clone() if graph else metrics[:3]).unbind()
    return PolicyLossOutput(loss, clipfrac, approx_kl, clipfrac_lower)


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
            *reference.ppo_value_loss(  # old values and returns are data, as in the kernels
                values, old_values.detach(), returns.detach(), mask, clip_range_value=clip_range_value,
                loss_agg_mode=loss_agg_mode,
            )  # fmt: skip
        )
    acc = _acc_dtype(values, old_values, returns)
    v, old, ret = _rows(values, acc), _rows(old_values.detach(), acc), _rows(returns.detach(), acc)
    graph = _records_graph(v)
    loss, metrics, _ = _dispatch.call(_OPS[impl]["ppo_loss_fwd"], _VALUE, v, old, ret, _mask_rows(mask, graph),
                                      float(clip_range_value), 0.0, 0.0, False, _AGG_IDS[loss_agg_mode])  # fmt: skip
    return ValueLossOutput(loss, metrics[0].clone() if graph else metrics[0])  # (as in ppo_policy_loss)


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
    return _dispatch.call(_OPS[impl]["kl_fwd"], logprobs.to(acc).contiguous(), ref_logprobs.to(acc).contiguous(), kind)


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
    grad_in_forward: bool = False,
    inplace_backward: bool = False,
    importance_sampling_level: str = "token",
    backend: str = "auto",
) -> tuple[torch.Tensor, PPOLossMetrics]:
    r"""The PPO policy step from ``[B, T, V]`` logits to the scalar loss.

    .. math::

        L = \sum_t w_t \big(\ell^{PPO}_t - c_H H_t + c_{KL} \mathrm{KL}_t\big)
          = \operatorname{agg}(\ell^{PPO}) - c_H \operatorname{agg}(H) + c_{KL} \operatorname{agg}(\mathrm{KL})

    with the clipped surrogate :math:`\ell^{PPO}` of :func:`ppo_policy_loss` on
    :math:`\log\pi = ` ``token_logprobs(logits / T)``, the entropy :math:`H` of
    ``softmax(logits / T)`` and the ``kl_kind`` estimator to ``ref_logprobs``
    (computed for the ``kl`` metric whenever ``ref_logprobs`` is given), all
    aggregated by ``loss_agg_mode`` over ``mask`` (as verl's actor does). Every
    aggregation mode is a weighted token sum with weights that depend on the
    mask only: ``token-mean`` :math:`w_t = 1/n`, ``seq-mean-token-sum``
    :math:`1/S`, ``seq-mean-token-mean`` :math:`1/(S\,n_b)`,
    ``seq-mean-token-sum-norm`` :math:`1/(S\,T)`, ``token-sum`` :math:`1`
    (:math:`n` valid tokens, :math:`S` sequences with at least one, :math:`n_b` valid tokens of sequence :math:`b`;
    0 on masked tokens, so empty sequences drop out). Tokens whose label is
    ``ignore_index`` count as masked. The logits' gradient is, per token,

    .. math::

        \frac{\partial L}{\partial x_j} = \frac{1}{T}\Big(g_t(\mathbb{1}[j = y_t] - p_j)
            - g_{H,t}\, p_j (z_j - \operatorname{lse} + H_t)\Big),\quad
        g_t = w_t\Big(\frac{\partial \ell^{PPO}_t}{\partial \log\pi_t}
            + c_{KL} \frac{\partial \mathrm{KL}_t}{\partial \log\pi_t}\Big),\quad g_{H,t} = -c_H w_t .

    Two ways to run it (kernel backends; ``"torch"`` is the float64-capable
    reference composition and ignores both flags):

    * ``grad_in_forward=False`` (default): the composition of :func:`token_logprobs`
      (forward reads the logits once, keeping two floats per token; backward
      reads them again and writes their gradient, in place with
      ``inplace_backward``) and fused ``O(B T)`` kernels for the PPO, KL and
      aggregation arithmetic. Holds nothing logits-sized between the passes
      except the logits themselves, and differentiates ``ref_logprobs`` too.
      A whole step at 8 x 2048 x 128256 bf16: on an H200, 3.35 ms (CUDA C++) and
      4.30 ms (Triton) against 3.03 and 3.57 ms fused (read + write floor 1.98 ms,
      benchmarks/results/bench-NVIDIA_H200-20261127-115011.txt); on an H100, 4.74
      and 4.70 ms against 3.53 and 4.75 ms fused (floor 2.80 ms,
      benchmarks/results/bench-NVIDIA_H100_80GB_HBM3-20261126-095459.txt, with
      the sweeps' current defaults); on CPU the two are within 5%.
    * ``grad_in_forward=True``: one kernel sweeps the logits once in
      token chunks: online log-sum-exp, label log-prob, entropy, ratio,
      clipping, KL and weight in registers; since :math:`g_t, g_{H,t}` are then
      known, a second pass over the same row writes the gradient. Meant to read
      the logits from memory once and write the gradient once, the minimum for
      a policy step. The gradient (``logits``' dtype and shape)
      is held from forward to backward instead of the logits, and backward
      scales it in place by the upstream gradient. That scale is usually
      exactly 1 (``loss.backward()``): on CUDA a tiny kernel reads it on the
      device and skips the pass, so there is neither a host sync nor another
      ``[B, T, V]`` read and write (on CPU the value is just read); any other
      value costs that extra pass, and a bf16/fp16 gradient is rounded twice.
      Backward can therefore run only once (``retain_graph`` reuse raises).
      Under ``torch.no_grad`` or when ``logits`` do not require grad, no
      gradient is written: a single forward sweep. With
      ``inplace_backward=True`` the gradient overwrites ``logits`` in the
      forward itself (no ``[B, T, V]`` allocation at all; the logits must not be
      used afterwards). Gradients to ``ref_logprobs`` are not produced: it
      must not require grad. float16 logits that need a gradient take the
      two-pass path instead: a float16 gradient stored before the upstream
      (loss-scaled) gradient multiplies it would lose its small entries below
      float16's range (bfloat16 has float32's range and stays fused). On
      sm_90 the CUDA kernel holds each row in a thread-block cluster's shared
      memory, so the logits really are read once (csrc/ppo_logits.cu): on the
      H100 the fastest path (1.26x the floor); the Triton sweep re-reads each
      row (hoping for L2) and is on par with the two-pass path there.

    ``importance_sampling_level="sequence"`` (GSPO, see :func:`ppo_policy_loss`) takes the
    two-pass path: a sequence's ratio is known only once all its tokens' log-probs are.

    Neither creates a ``[B, T, V]`` float32 temporary. Returns ``(loss, metrics)``;
    the metrics are detached (``clipfrac``, ``clipfrac_lower`` and
    ``approx_kl`` are means over valid tokens, ``pg_loss``, ``entropy`` and
    ``kl`` aggregated like the loss).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits: expected shape [B, T, V], got {getattr(logits, 'shape', None)}")
    low, high = _check_step_args(logits, "logits", old_logprobs, advantages, mask, ref_logprobs, kl_coef,
                                 entropy_coef, kl_kind, loss_agg_mode, clip_ratio, clip_ratio_low, clip_ratio_high,
                                 clip_ratio_c)  # fmt: skip
    check_flags(grad_in_forward=grad_in_forward, inplace_backward=inplace_backward)
    _check_is_level(importance_sampling_level)
    # A float16 gradient written in the forward is rounded before the loss scale (a
    # GradScaler's) reaches it, and its small entries underflow: float16 takes the
    # two-pass path, which scales first, whenever a gradient is wanted.
    if logits.dtype == torch.float16 and torch.is_grad_enabled() and logits.requires_grad:
        grad_in_forward = False
    if importance_sampling_level == "sequence":  # the sequence's ratio is needed before any token's gradient
        grad_in_forward = False
    impl = _dispatch.resolve(backend, logits.device, "ppo_logits_fused_native" if grad_in_forward else None)
    if grad_in_forward and impl != "torch":
        # (the valid tokens only for the label check: the sweep's inputs are built in one call below)
        valid = _valid_tokens(mask, labels, ignore_index) if check_labels else None
        logprobs_ops._check_inputs(logits, labels, valid, temperature, ignore_index, check_labels)
        if ref_logprobs is not None and ref_logprobs.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "ref_logprobs: requires grad, but grad_in_forward=True computes only the logits' gradient; "
                "detach it or pass grad_in_forward=False"
            )
        return _fused_from_logits(
            impl, logits, labels, old_logprobs, advantages, mask, ref_logprobs, float(temperature), int(ignore_index),
            low, high, clip_ratio_c, kl_kind, float(kl_coef), float(entropy_coef), loss_agg_mode, inplace_backward,
        )  # fmt: skip

    mask = _valid_tokens(mask, labels, ignore_index)
    logprobs, entropy = logprobs_ops.token_logprobs(
        logits, labels, mask, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
        inplace_backward=inplace_backward, check_labels=check_labels, backend=backend,
    )  # fmt: skip
    return _loss_from_logprobs(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, clip_ratio,
                               clip_ratio_low, clip_ratio_high, clip_ratio_c, kl_kind, kl_coef, entropy_coef,
                               loss_agg_mode, backend, importance_sampling_level)  # fmt: skip


def _check_step_args(source, source_name, old_logprobs, advantages, mask, ref_logprobs, kl_coef, entropy_coef,
                     kl_kind, loss_agg_mode, clip_ratio, clip_ratio_low, clip_ratio_high,
                     clip_ratio_c) -> tuple[float, float]:  # fmt: skip
    """The checks of a policy step's per-token inputs (``[B, T]``, the leading dims of ``source``, the
    logits or hidden states) and options; returns the clip bounds. Each tensor is compared with
    ``source`` first, so that the message names the one that differs."""
    lead = tuple(source.shape[:2])
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask),
                    ("ref_logprobs", ref_logprobs)):  # fmt: skip
        if isinstance(t, torch.Tensor) and tuple(t.shape) != lead:
            raise ValueError(f"{name}: expected shape {lead} (the {source_name}' [B, T]), got {tuple(t.shape)}")
        if isinstance(t, torch.Tensor) and t.device != source.device:
            raise ValueError(f"{name}: on device {t.device}, but the {source_name} are on {source.device}")
    _check_rows(old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs,
                need_mask=True)  # fmt: skip
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        _check_real(name, value)
    if kl_coef and ref_logprobs is None:
        raise ValueError("ref_logprobs: required when kl_coef != 0")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind: unknown KL estimator {kl_kind!r}; expected one of {', '.join(KL_KINDS)}")
    _check_agg(loss_agg_mode)
    return _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c)


def _nonzero(mask):
    """A bool, integer or float mask as bool (nonzero: valid); a bool mask as it is, with no launch
    (every launch before the fused kernel is host time on the step's path)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _valid_tokens(mask, labels, ignore_index):
    """bool, integer or float mask: nonzero means valid; an ignored label has no log-prob, so it is masked too."""
    valid = _nonzero(mask)
    if isinstance(labels, torch.Tensor) and labels.shape == mask.shape and labels.device == mask.device:
        return valid & kept_labels(labels, ignore_index)
    return valid  # token_logprobs' checks report the bad labels


def _loss_from_logprobs(logprobs, entropy, old_logprobs, advantages, mask, ref_logprobs, clip_ratio, clip_ratio_low,
                        clip_ratio_high, clip_ratio_c, kl_kind, kl_coef, entropy_coef, loss_agg_mode, backend,
                        importance_sampling_level="token"):  # fmt: skip
    """The two-pass tail: the clipped surrogate, entropy bonus and KL term from per-token log-probs
    and entropies (fused O(B T) kernels and the aggregation)."""
    pg = ppo_policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
        importance_sampling_level=importance_sampling_level,
        backend=_elementwise_backend(backend, logprobs.device, "ppo_loss_fwd_native"),
    )  # fmt: skip
    # The entropy and KL terms aggregated as sums weighted by token_weights, computed once (on a
    # GPU each small launch here is device time between the two logits-sized kernels):
    # agg_loss(x, mask, mode) == (w * x).sum() with w = 0 off the valid tokens. The entropy is 0
    # there (token_logprobs got the valid tokens as its mask): a dot product. The KL of a
    # padding token may be NaN or inf (its reference log-prob): dropped by a select, not
    # multiplied (w is the select's 0).
    valid = _nonzero(mask)
    weights = token_weights(valid, loss_agg_mode, entropy.dtype)
    entropy_agg = torch.dot(entropy.reshape(-1), weights.reshape(-1))
    loss = pg.loss.add(entropy_agg, alpha=-entropy_coef) if entropy_coef else pg.loss
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_kind,
                        backend=_elementwise_backend(backend, logprobs.device, "kl_penalty_fwd_native"))  # fmt: skip
        kl_agg = torch.where(valid, kl * weights, weights).sum()
        if kl_coef:
            loss = loss.add(kl_agg, alpha=kl_coef)
    else:
        kl_agg = torch.zeros((), dtype=pg.loss.dtype, device=pg.loss.device)
    metrics = PPOLossMetrics(loss.detach(), pg.loss.detach(), pg.clipfrac, pg.clipfrac_lower, pg.approx_kl,
                             entropy_agg.detach(), kl_agg.detach())  # fmt: skip
    return loss, metrics


def token_weights(mask: torch.Tensor, loss_agg_mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights :math:`w` with ``agg(x) == (w * x).sum()`` for ``loss_agg_mode``
    (see :func:`ppo_loss_from_logits`); 0 on masked tokens and in empty sequences."""
    _check_agg(loss_agg_mode)
    m = _nonzero(mask).to(dtype)
    if loss_agg_mode == "token-mean":
        return m / m.sum().clamp(min=1)
    if loss_agg_mode == "token-sum":
        return m
    count = m.sum(-1, keepdim=True)
    n_seqs = (count > 0).to(dtype).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return m / (n_seqs * max(m.shape[-1], 1))
    if loss_agg_mode == "seq-mean-token-sum":
        return m / n_seqs
    return m / (count.clamp(min=1) * n_seqs)


def _fused_from_logits(impl, logits, labels, old, adv, mask, ref, temperature, ignore_index, low, high, clip_c,
                       kl_kind, kl_coef, entropy_coef, mode, inplace):  # fmt: skip
    """The single-sweep path of ppo_loss_from_logits (grad_in_forward=True) on a kernel backend."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if row_layout(logits) is None:
        logits = logits.contiguous()
    *inputs, weights, n_valid = _fused_inputs(labels, mask, old, adv, ref, mode, ignore_index, acc)
    args = (*inputs, weights) + _fused_consts(temperature, ignore_index, low, high, clip_c, kl_kind, kl_coef,
                                              entropy_coef)  # fmt: skip
    ops = _FUSED_OPS[impl]
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    if need_grad and inplace and not rows_may_overlap(logits):
        loss, stats = _FusedInplace.apply(logits, ops[1], args)
    else:
        loss, stats, _ = _dispatch.call(ops[0], logits, *args, need_grad)
    return loss, _fused_metrics(loss, stats, weights, n_valid, ref is not None, mode)


def _fused_inputs(labels, mask, old, adv, ref, mode, ignore_index, acc):
    """The fused kernels' per-token inputs as flat contiguous rows: ``(labels, old, adv, ref,
    weights, n_valid)``, the labels with every masked token set to ``ignore_index`` (int64),
    old, adv and ref (None stays None) in ``acc``, the :func:`token_weights` of the valid
    tokens and their count clamped to >= 1 (0-dim, in ``acc``; exact up to 2**24 tokens in
    float32).

    The sweep cannot start before these exist, and on a GPU each call before its launch is
    host time while the device idles: eager calls on plain tensors on a device the extension
    was built for make the mask's part (labels, weights, count) in one call into it
    (csrc/bindings.cpp: ppo_fused_inputs; one kernel launch for int32 / int64 labels, masks
    of the usual dtypes and up to 2**16 tokens, else the same ATen ops below Python);
    traced calls (torch.compile, whose compiler fuses them) and the rest use
    :func:`_fused_inputs_torch`."""
    if (_NATIVE_INPUTS is not None and type(labels) is torch.Tensor and type(mask) is torch.Tensor
            and _native_helpers_on(labels.device) and not torch.compiler.is_compiling()):  # fmt: skip
        labels, weights, n_valid = _NATIVE_INPUTS(labels, mask, _AGG_IDS[mode], ignore_index, acc == torch.float64)
        return labels, _flat_rows(old, acc), _flat_rows(adv, acc), _flat_rows(ref, acc), weights, n_valid
    return _fused_inputs_torch(labels, mask, old, adv, ref, mode, ignore_index, acc)


def _fused_inputs_torch(labels, mask, old, adv, ref, mode, ignore_index, acc):
    """:func:`_fused_inputs` in PyTorch calls."""
    valid = _valid_tokens(mask, labels, ignore_index)
    n_valid = valid.sum(dtype=acc).clamp_(min=1)
    weights = valid / n_valid if mode == "token-mean" else token_weights(valid, mode, acc)
    labels = torch.where(valid, labels.long(), ignore_index).flatten()
    return labels, _flat_rows(old, acc), _flat_rows(adv, acc), _flat_rows(ref, acc), weights.flatten(), n_valid


def _flat_rows(t, acc):
    """A detached ``[B, T]`` tensor as flat contiguous ``acc`` rows (no call into torch when it is one); None stays."""
    if t is None:
        return None
    t = t.detach()
    return (t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()).view(-1)


def _fused_consts(temperature, ignore_index, low, high, clip_c, kl_kind, kl_coef, entropy_coef):
    """The fused kernel's scalar arguments (after the logits and the per-token inputs)."""
    return (temperature, ignore_index, low, high, float(clip_c or 0.0), clip_c is not None, _KL_IDS[kl_kind], kl_coef,
            entropy_coef)  # fmt: skip


def _fused_metrics(loss, stats, weights, n_valid, has_ref, mode) -> PPOLossMetrics:
    """The metrics from the fused kernel's per-token stats ([tokens, 7]: weighted loss, pg loss,
    entropy, kl, clipped, clipped lower, -log ratio): pg, entropy and kl aggregated with the
    weights, the rest means over the valid tokens (for token-mean, whose weights are 1 / n,
    one matrix product); kl is 0 without a reference (the kernels' kl column is 0 there, but
    a kept token with a label outside [0, V) has a NaN row). With autocast off: inside a
    trainer's bf16 step the product would run, and round, in bf16. Eager calls on plain
    tensors: one call into the extension where it was built for the device
    (csrc/bindings.cpp: ppo_fused_metrics, the same product)."""
    if (_NATIVE_METRICS is not None and type(stats) is torch.Tensor and _native_helpers_on(stats.device)
            and not torch.compiler.is_compiling()):  # fmt: skip
        m = _NATIVE_METRICS(stats, weights, n_valid, _AGG_IDS[mode], has_ref)
    else:
        device = stats.device.type
        off = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if off else contextlib.nullcontext():
            if mode == "token-mean":
                m = weights @ stats[:, 1:7]
            else:
                m = torch.cat((weights @ stats[:, 1:4], stats[:, 4:7].sum(0) / n_valid))
        if not has_ref:
            m.select(0, 2).zero_()
    pg, entropy, kl, clip, lower, approx_kl = m.unbind()
    return PPOLossMetrics(loss.detach(), pg, clip, lower, approx_kl, entropy, kl)


class _FusedInplace(torch.autograd.Function):
    """The in-place variant: the gradient overwrites the logits during forward.

    torch.library cannot register autograd for an op that mutates its input,
    so this one goes through an autograd.Function; the out-of-place op has
    register_autograd like every other op.
    """

    @staticmethod
    def forward(ctx, logits, op, args):
        loss, stats = op(logits, *args)
        # The C++ op is registered for CPU/CUDA only, so nothing bumps the version
        # counter for it: do it here so that other nodes that saved the logits
        # notice they were overwritten (as they would for the Triton op).
        torch.autograd.graph.increment_version(logits)
        ctx.grad = logits
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    @_dispatch.first_order("ppo_loss_from_logits")
    def backward(ctx, grad_loss, _grad_stats):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("ppo_loss_from_logits: backward ran twice through the in-place fused loss "
                               "(its gradient was consumed); use grad_in_forward=False to retain the graph")
        return _scale_unless_one(grad, grad_loss), None, None


def _clip_bounds(clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c):
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
    return float(low), float(high)


def _elementwise_backend(backend: str, device: torch.device, native_op: str) -> str:
    """The backend for the O(B T) pieces: the requested one where it exists, else auto."""
    if backend != "auto" and _dispatch.unavailable_reason(backend, device, native_op) is None:
        return backend
    return "auto"


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, *, backend: str = "auto"
) -> torch.Tensor:
    r"""Whiten ``x`` with the statistics of its masked elements (as PPO implementations whiten advantages):

    .. math::

        n = \sum_i m_i,\quad \mu = \frac{\sum_i m_i x_i}{\max(n, 1)},\quad
        \sigma^2 = \frac{\sum_i m_i (x_i - \mu)^2}{\max(n - 1, 1)},\quad
        y_i = (x_i - \mu) / \sqrt{\sigma^2 + \epsilon}\ (+\,\mu \text{ when } \texttt{shift\_mean=False}),

    over every element of ``x`` (masked-out ones are transformed too). ``x`` has any shape, ``mask``
    the same (bool, integer or float: nonzero means valid). As the reference, no NaN for degenerate masks:
    no valid element gives :math:`\mu = \sigma^2 = 0` (:math:`y = x/\sqrt{\epsilon}`), one gives
    :math:`\sigma^2 = 0`. Masked-out elements never enter the statistics (the reference multiplies by the
    mask, so an inf / NaN there poisons its mean; the kernels select). Returns float32 (float64 for
    float64 ``x``).

    Kernel backends: a grid of programs each reduces a fixed 4096-element chunk to (count, mean, M2),
    one program merges them in a fixed order (Chan et al.'s parallel variance update), one elementwise
    pass writes ``y``: deterministic, float32 accumulation for float32 / bf16 / fp16 (float64 for
    float64), ``x`` read twice and ``y`` written once. Differentiable in ``x`` on every backend (the
    kernels' backward is the closed form below, in PyTorch, from the saved statistics):

    .. math::

        \bar g_i = g_i r + m_i (x_i - \mu)\frac{2}{\max(n-1,1)}\Big(-\frac{r^3}{2}\sum_j g_j (x_j - \mu)\Big),
        \quad \frac{\partial L}{\partial x_i} = \bar g_i + \frac{m_i}{\max(n,1)}
        \Big(-\sum_j \bar g_j + [\text{not shift\_mean}] \sum_j g_j\Big),\quad r = (\sigma^2 + \epsilon)^{-1/2}.
    """
    _check_rows(x=x, mask=mask, any_rank=True)
    check_flags(shift_mean=shift_mean)
    _check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    impl = _dispatch.resolve(backend, x.device, "masked_whiten_native")
    if impl == "torch" or x.numel() == 0:
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    out, _ = _dispatch.call(_OPS[impl]["masked_whiten"], x.contiguous().view(-1),
                            _mask_rows(mask, _records_graph(x)).view(-1), shift_mean, float(eps))  # fmt: skip
    return out.view(x.shape)


def grpo_advantages(
    scores: torch.Tensor,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    r"""GRPO's outcome advantages (Shao et al. 2024), per group :math:`G` of responses:

    .. math::

        A_i = \frac{s_i - \operatorname{mean}_G(s)}{\operatorname{std}_G(s) + \epsilon}
        \quad\text{or, without } \texttt{norm\_by\_std} \text{ (Dr. GRPO)},\quad A_i = s_i - \operatorname{mean}_G(s),

    with the unbiased standard deviation; a group of one has std 1 (its advantage is 0), a constant
    group std 0 (so :math:`A = (s - \text{mean}) / \epsilon`, 0 when the mean is exact). Groups are
    consecutive runs of ``group_size`` or the equal values of ``group_ids`` (any ids, in any order).
    Returns float32 (float64 for float64 scores).

    Kernel backends run one program (Triton) / warp (CUDA) / task (CPU) per group over group offsets;
    with ``group_ids`` the scores are first sorted by id (stable) in PyTorch and the result scattered
    back. The kernels do not differentiate: for ``scores`` that require grad, ``"auto"`` runs the
    (differentiable) PyTorch path and an explicit kernel backend raises.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not scores.dtype.is_floating_point:
        raise ValueError("scores: expected a 1-D floating-point tensor of per-response scores")
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size / group_ids: give exactly one")
    check_flags(norm_by_std=norm_by_std)
    _check_real("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
            raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
        if scores.numel() % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the {scores.numel()} scores")
    else:
        if not isinstance(group_ids, torch.Tensor):
            raise TypeError(f"group_ids: expected a tensor, got {type(group_ids).__name__}")
        if group_ids.shape != scores.shape:
            raise ValueError(f"group_ids: expected shape {tuple(scores.shape)}, got {tuple(group_ids.shape)}")
        if group_ids.device != scores.device:
            raise ValueError(f"group_ids: on device {group_ids.device}, but scores are on {scores.device}")
    needs_grad = scores.requires_grad and torch.is_grad_enabled()
    if needs_grad and backend not in ("auto", "torch"):
        raise RuntimeError(
            f"scores: requires grad, but the {backend} GRPO kernel does not differentiate; "
            "use backend='torch' or pass scores.detach()"
        )
    impl = "torch" if needs_grad else _dispatch.resolve(backend, scores.device, "grpo_advantages_native")
    acc = _acc_dtype(scores)
    s = scores.to(acc)
    if impl == "torch":
        if group_ids is None:
            return _grpo_torch_sized(s, group_size, norm_by_std, eps)
        return _grpo_torch(s, group_ids, norm_by_std, eps)
    kernel = _OPS[impl]["grpo_advantages"]
    if group_ids is None:
        offsets = torch.arange(0, scores.numel() + 1, group_size, dtype=torch.int64, device=scores.device)
        return _dispatch.call_below_autograd(kernel, s.detach().contiguous(), offsets, norm_by_std, float(eps))
    sorted_ids, order = torch.sort(group_ids.detach(), stable=True)
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=scores.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    sorted_adv = _dispatch.call_below_autograd(kernel, s.detach()[order].contiguous(), offsets, norm_by_std, float(eps))
    return torch.empty_like(sorted_adv).index_copy_(0, order, sorted_adv)


def _grpo_torch_sized(s, group_size, norm_by_std, eps):
    """Vectorised PyTorch (differentiable) over consecutive groups of ``group_size``: rows of a
    ``[n / group_size, group_size]`` view, so no data-dependent shapes (no host sync, and it
    runs on the meta device and under CUDA graph capture)."""
    groups = s.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if not norm_by_std:
        return centred.view(-1)
    if group_size == 1:  # a group of one has std 1
        return (centred / (1.0 + eps)).view(-1)
    std = ((centred * centred).sum(dim=1, keepdim=True) / (group_size - 1)).sqrt()
    return (centred / (std + eps)).view(-1)


def _grpo_torch(s, group_ids, norm_by_std, eps):
    """Vectorised PyTorch (differentiable): index_add over the unique ids."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts.to(s.dtype)
    mean = torch.zeros(len(counts), dtype=s.dtype, device=s.device).index_add_(0, inverse, s) / n
    centred = s - mean[inverse]
    if not norm_by_std:
        return centred
    var = torch.zeros_like(mean).index_add_(0, inverse, centred * centred) / (n - 1).clamp(min=1)
    # (a group of one has std 1: selected before the root, whose derivative at 0 is infinite)
    std = torch.where(counts > 1, var, torch.ones_like(var)).sqrt()
    return centred / (std[inverse] + eps)


# --- checks and helpers -------------------------------------------------------------------


_check_real = check_real  # any real but NaN (an infinite clip bound means no bound)


def _check_is_level(level):
    if level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level: unknown {level!r}; expected one of {', '.join(IS_LEVELS)}")


def sequence_log_ratio(logprobs, old_logprobs, mask, dtype=None):
    """GSPO's ``l_i``: each row's mean of ``log pi - log pi_old`` over its valid tokens (0 for a row
    without one), ``[B, 1]``, in ``dtype`` (default: the inputs' promoted with float32), without
    gradient. Masked positions are selected away (a NaN there stays out)."""
    dtype = dtype or torch.promote_types(torch.promote_types(logprobs.dtype, old_logprobs.dtype), torch.float32)
    valid = _nonzero(mask)
    diff = torch.where(valid, logprobs.detach().to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    return diff.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1).to(dtype)


def _sequence_inputs(logprobs, old_logprobs, mask, acc):
    """GSPO through the token kernels: ``(log pi - sg(log pi), -l_i)``, so that the kernels'
    ``log pi - old`` is ``0 + l_i = l_i`` exactly for every token of the sequence (one ratio: the
    clip binds for all of them or none), with gradient 1 (module docstring)."""
    seq = sequence_log_ratio(logprobs, old_logprobs, mask, acc)
    return logprobs - logprobs.detach(), (-seq).expand(logprobs.shape)


def _check_agg(mode):
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown {mode!r}; expected one of {', '.join(LOSS_AGG_MODES)}")


def _check_rows(*, need_mask=False, any_rank=False, **named):
    first = None
    for name, t in named.items():
        if t is None:
            if need_mask and name == "mask":
                raise ValueError("mask: required (the response mask)")
            if name in ("mask", "ref_logprobs"):  # the optional ones
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
    if t.dtype == dtype and t.is_contiguous():  # the common case, without two calls into torch
        return t
    return t.to(dtype).contiguous()


def _mask_bytes(mask):
    """The kernels' mask: uint8, nonzero = valid (a bool mask is reinterpreted, not converted); strides kept.

    Under torch.compile a bool mask is converted instead: Inductor cannot lower a bool -> uint8 view (and
    fuses the conversion into whatever produced the mask)."""
    m = mask.detach()
    if m.dtype == torch.uint8:
        return m
    if m.dtype != torch.bool:
        m = m != 0
    return m.to(torch.uint8) if torch.compiler.is_compiling() else m.view(torch.uint8)


def _mask_rows(mask, saved=False):
    """Contiguous _mask_bytes. ``saved``: autograd will keep it for backward, so it is copied (B * T bytes)
    rather than share the caller's storage (an in-place change of the caller's mask would then fail the
    backward, eager or traced)."""
    m = _mask_bytes(mask)
    return m.clone(memory_format=torch.contiguous_format) if saved else m.contiguous()


def _records_graph(x):
    return torch.is_grad_enabled() and x.requires_grad


_AGG_IDS = {mode: i for i, mode in enumerate(LOSS_AGG_MODES)}  # csrc/ppo_loss_math.h: kTokenMean ...


# --- torch.library registration -------------------------------------------------------------

_POLICY, _VALUE = 0, 1


def _fake_gae(rewards, values, mask, gamma, lam):
    return rewards.new_empty(rewards.shape), rewards.new_empty(rewards.shape)


def _fake_loss_fwd(kind, x, old, third, mask, p0, p1, p2, has_dual, agg):
    return x.new_empty(()), x.new_empty(5), x.new_empty(x.shape[0], 5)


def _fake_loss_bwd(kind, x, old, third, mask, rows, metrics, grad_loss, p0, p1, p2, has_dual, agg):
    return x.new_empty(x.shape)


def _fake_whiten(x, mask, shift_mean, eps):
    acc = _acc_dtype(x)
    return x.new_empty(x.shape, dtype=acc), x.new_empty(4, dtype=acc)


def _fake_grpo(scores, offsets, norm_by_std, eps):
    return scores.new_empty(scores.shape)


def _fake_kl_fwd(logp, ref, kind):
    return logp.new_empty(logp.shape)


def _fake_kl_bwd(logp, ref, kind, grad):
    return logp.new_empty(logp.shape)


_KL_IDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_FUSED_STATS = 7  # per token: weighted loss term, pg loss, entropy, kl, clipped, clipped-lower, -log ratio


def _fake_fused(logits, labels, old, adv, ref, weights, temperature, ignore_index, low, high, clip_c, has_dual,
                kl_kind, kl_coef, entropy_coef, write_grad):  # fmt: skip
    grad = logits.new_empty(logits.shape if write_grad else (0,))
    return old.new_empty(()), old.new_empty(labels.shape[0], _FUSED_STATS), grad


def _fake_fused_inputs(labels, mask, agg, ignore_index, double_acc):
    n = labels.numel()
    acc = torch.float64 if double_acc else torch.float32
    return labels.new_empty(n, dtype=torch.long), labels.new_empty(n, dtype=acc), labels.new_empty((), dtype=acc)


def _fake_fused_metrics(stats, weights, n_valid, agg, has_ref):
    return stats.new_empty(6)


def _fake_fused_inplace(logits, labels, old, adv, ref, weights, temperature, ignore_index, low, high, clip_c,
                        has_dual, kl_kind, kl_coef, entropy_coef):  # fmt: skip
    return old.new_empty(()), old.new_empty(labels.shape[0], _FUSED_STATS)


if triton_impl is not None:

    @triton_op("rlhf_kernels::gae_triton", mutates_args=())
    def _gae_triton(
        rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, gamma: float, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_impl.gae(rewards, values, mask, gamma, lam, launch=wrap_triton)

    @triton_op("rlhf_kernels::ppo_loss_fwd_triton", mutates_args=())
    def _loss_fwd_triton(
        kind: int, x: torch.Tensor, old: torch.Tensor, third: torch.Tensor, mask: torch.Tensor, p0: float,
        p1: float, p2: float, has_dual: bool, agg: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return triton_impl.ppo_loss_fwd(kind, x, old, third, mask, p0, p1, p2, has_dual, agg, launch=wrap_triton)

    @triton_op("rlhf_kernels::ppo_loss_bwd_triton", mutates_args=())
    def _loss_bwd_triton(
        kind: int, x: torch.Tensor, old: torch.Tensor, third: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
        metrics: torch.Tensor, grad_loss: torch.Tensor, p0: float, p1: float, p2: float, has_dual: bool, agg: int,
    ) -> torch.Tensor:  # fmt: skip
        return triton_impl.ppo_loss_bwd(kind, x, old, third, mask, rows, metrics, grad_loss, p0, p1, p2, has_dual,
                                        agg, launch=wrap_triton)  # fmt: skip

    @triton_op("rlhf_kernels::kl_penalty_fwd_triton", mutates_args=())
    def _kl_fwd_triton(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
        return triton_impl.kl_penalty(logp, ref, kind, launch=wrap_triton)

    @triton_op("rlhf_kernels::kl_penalty_bwd_triton", mutates_args=())
    def _kl_bwd_triton(logp: torch.Tensor, ref: torch.Tensor, kind: str, grad: torch.Tensor) -> torch.Tensor:
        return triton_impl.kl_penalty(logp, ref, kind, grad_out=grad.contiguous(), launch=wrap_triton)

    @triton_op("rlhf_kernels::masked_whiten_triton", mutates_args=())
    def _whiten_triton(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool, eps: float) -> tuple[
        torch.Tensor, torch.Tensor
    ]:
        return triton_impl.masked_whiten(x, mask, shift_mean, eps, launch=wrap_triton)

    @triton_op("rlhf_kernels::grpo_advantages_triton", mutates_args=())
    def _grpo_triton(scores: torch.Tensor, offsets: torch.Tensor, norm_by_std: bool, eps: float) -> torch.Tensor:
        return triton_impl.grpo_advantages(scores, offsets, norm_by_std, eps, launch=wrap_triton)

    @triton_op("rlhf_kernels::ppo_logits_fused_triton", mutates_args=())
    def _fused_triton(
        logits: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor | None,
        weights: torch.Tensor, temperature: float, ignore_index: int, low: float, high: float, clip_c: float,
        has_dual: bool, kl_kind: int, kl_coef: float, entropy_coef: float, write_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        grad = torch.empty(logits.shape if write_grad else (0,), dtype=logits.dtype, device=logits.device)
        stats = triton_impl.ppo_logits_fused(
            logits, labels, old, adv, ref, weights, grad if write_grad else None, temperature, ignore_index, low,
            high, clip_c, has_dual, kl_kind, kl_coef, entropy_coef, launch=wrap_triton,
        )  # fmt: skip
        return stats[:, 0].sum(), stats, grad

    @triton_op("rlhf_kernels::ppo_logits_fused_inplace_triton", mutates_args=("logits",))
    def _fused_inplace_triton(
        logits: torch.Tensor, labels: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, ref: torch.Tensor | None,
        weights: torch.Tensor, temperature: float, ignore_index: int, low: float, high: float, clip_c: float,
        has_dual: bool, kl_kind: int, kl_coef: float, entropy_coef: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        stats = triton_impl.ppo_logits_fused(
            logits, labels, old, adv, ref, weights, logits, temperature, ignore_index, low, high, clip_c, has_dual,
            kl_kind, kl_coef, entropy_coef, launch=wrap_triton,
        )  # fmt: skip
        return stats[:, 0].sum(), stats

    @triton_op("rlhf_kernels::scale_unless_one_triton", mutates_args=("x",))
    def _scale_unless_one_triton(x: torch.Tensor, scale: torch.Tensor) -> None:
        triton_impl.scale_unless_one_(x, scale, launch=wrap_triton)

    @_scale_unless_one_triton.register_fake
    def _(x, scale):
        return None

    for _op, _fake in ((_gae_triton, _fake_gae), (_loss_fwd_triton, _fake_loss_fwd),
                       (_loss_bwd_triton, _fake_loss_bwd), (_kl_fwd_triton, _fake_kl_fwd),
                       (_kl_bwd_triton, _fake_kl_bwd), (_fused_triton, _fake_fused),
                       (_fused_inplace_triton, _fake_fused_inplace), (_whiten_triton, _fake_whiten),
                       (_grpo_triton, _fake_grpo)):  # fmt: skip
        _op.register_fake(_fake)

if native.available():
    for _name, _fake in (("gae", _fake_gae), ("ppo_loss_fwd", _fake_loss_fwd), ("ppo_loss_bwd", _fake_loss_bwd),
                         ("kl_penalty_fwd", _fake_kl_fwd), ("kl_penalty_bwd", _fake_kl_bwd),
                         ("ppo_logits_fused", _fake_fused),
                         ("ppo_logits_fused_inplace", _fake_fused_inplace), ("masked_whiten", _fake_whiten),
                         ("grpo_advantages", _fake_grpo), ("ppo_fused_inputs", _fake_fused_inputs),
                         ("ppo_fused_metrics", _fake_fused_metrics)):  # fmt: skip
        if hasattr(torch.ops.rlhf_kernels, f"{_name}_native"):
            torch.library.register_fake(f"rlhf_kernels::{_name}_native")(_fake)

_OPS: dict[str, dict] = {}
for _backend, (_g,) in _dispatch.kernel_ops("gae").items():
    _OPS.setdefault(_backend, {})["gae"] = _g
for _backend, (_fwd, _bwd) in _dispatch.kernel_ops("ppo_loss_fwd", "ppo_loss_bwd").items():
    _OPS.setdefault(_backend, {})["ppo_loss_fwd"] = _fwd

    def _loss_setup(ctx, inputs, output):
        kind, x, old, third, mask, p0, p1, p2, has_dual, agg = inputs
        _, metrics, rows = output
        ctx.save_for_backward(x, old, third, mask, rows, metrics)
        ctx.args = (kind, p0, p1, p2, has_dual, agg)
        ctx.mark_non_differentiable(metrics, rows)
        ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs

    def _loss_backward(ctx, grad_loss, _grad_metrics, _grad_rows, bwd=_bwd):
        x, old, third, mask, rows, metrics = ctx.saved_tensors
        kind, p0, p1, p2, has_dual, agg = ctx.args
        grad_x = None
        if ctx.needs_input_grad[1] and grad_loss is not None:
            grad_x = _dispatch.call_below_autograd(bwd, kind, x, old, third, mask, rows, metrics, grad_loss, p0, p1,
                                                   p2, has_dual, agg)  # fmt: skip
        return None, grad_x, None, None, None, None, None, None, None, None

    _dispatch.register_autograd(_fwd, _loss_backward, setup_context=_loss_setup)
for _backend, (_fwd, _bwd) in _dispatch.kernel_ops("kl_penalty_fwd", "kl_penalty_bwd").items():
    _OPS.setdefault(_backend, {})["kl_fwd"] = _fwd

    def _kl_setup(ctx, inputs, output):
        logp, ref, kind = inputs
        ctx.save_for_backward(logp, ref)
        ctx.kind = kind

    def _kl_backward(ctx, grad, bwd=_bwd):
        logp, ref = ctx.saved_tensors
        d = _dispatch.call_below_autograd(bwd, logp, ref, ctx.kind, grad)
        return (d if ctx.needs_input_grad[0] else None), (-d if ctx.needs_input_grad[1] else None), None

    _dispatch.register_autograd(_fwd, _kl_backward, setup_context=_kl_setup)

for _backend, (_g,) in _dispatch.kernel_ops("grpo_advantages").items():
    _OPS.setdefault(_backend, {})["grpo_advantages"] = _g


def _whiten_setup(ctx, inputs, output):
    x, mask, shift_mean, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, mask, output[1])
    ctx.shift_mean = shift_mean
    ctx.eps = eps


def _whiten_backward(ctx, grad, _grad_stats):
    """The closed form of masked_whiten's docstring, from the saved (count, mean, var, rstd). Asked for
    a graph (create_graph=True), it recomputes the statistics from ``x`` in PyTorch, so that the
    second derivative sees them depend on ``x`` (the saved ones are constants)."""
    x, mask, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    m = (mask != 0).to(stats.dtype)  # any nonzero byte is a valid element
    if torch.is_grad_enabled():
        xs = torch.where(m != 0, x.to(stats.dtype), 0.0)
        count = m.sum()
        mean = xs.sum() / count.clamp(min=1)
        var = (m * (xs - mean) ** 2).sum() / (count - 1).clamp(min=1)
        rstd = (var + ctx.eps).rsqrt()
    else:
        count, mean, _var, rstd = stats.unbind()
    centred = x.to(stats.dtype) - mean
    g = grad.to(stats.dtype)
    d_var = -0.5 * rstd**3 * (g * centred).sum()
    g_centred = g * rstd + m * centred * (2.0 * d_var / (count - 1).clamp(min=1))
    d_mean = -g_centred.sum() + (0.0 if ctx.shift_mean else g.sum())
    return (g_centred + m * (d_mean / count.clamp(min=1))).to(x.dtype), None, None, None


for _backend, (_w,) in _dispatch.kernel_ops("masked_whiten").items():
    _OPS.setdefault(_backend, {})["masked_whiten"] = _w
    _dispatch.register_autograd(_w, _whiten_backward, setup_context=_whiten_setup, differentiable_backward=True)

# The fused single sweep: autograd on the out-of-place op hands back the gradient that
# forward wrote, scaled in place by the upstream gradient (a 0-dim tensor, so no sync).
_FUSED_OPS = _dispatch.kernel_ops("ppo_logits_fused", "ppo_logits_fused_inplace")
# The fused sweep's inputs and metrics in one call each (_fused_inputs, _fused_metrics), for every kernel backend.
_NATIVE_INPUTS = getattr(torch.ops.rlhf_kernels, "ppo_fused_inputs_native", None) if native.available() else None
_NATIVE_METRICS = getattr(torch.ops.rlhf_kernels, "ppo_fused_metrics_native", None) if native.available() else None
if _NATIVE_INPUTS is not None and _NATIVE_METRICS is not None:
    _NATIVE_INPUTS, _NATIVE_METRICS = _NATIVE_INPUTS.default, _NATIVE_METRICS.default
else:
    _NATIVE_INPUTS = _NATIVE_METRICS = None


def _native_helpers_on(device: torch.device) -> bool:
    """Whether the extension's helper ops run on ``device``: always on CPU, on CUDA only when
    it was built with nvcc (a CPU-only build with Triton on a GPU has no CUDA kernels)."""
    return device.type == "cpu" or (device.type == "cuda" and native.has_cuda())


def _fused_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    # Else autograd fills a zero "gradient" for the non-differentiable outputs: a [B, T, V] pass.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[2])


def _fused_backward(ctx, grad_loss, _grad_stats, _grad_grad):
    (grad,) = ctx.saved_tensors  # a second backward fails here: the first may have scaled it in place
    if not ctx.needs_input_grad[0]:
        return (None,) * 16
    return (_scale_unless_one(grad, grad_loss),) + (None,) * 15


def _scale_unless_one(grad, scale):
    """The saved gradient times the upstream scalar, in place; no pass over it when that is 1.

    On CUDA a Triton kernel reads the scalar on the device and exits early, so there
    is neither a host sync nor a [B, T, V] pass for ``loss.backward()``; on CPU the
    value is simply read. Without Triton, or for a buffer the kernels cannot address
    by rows: mul_.
    Traced (torch.compile: fake / functional tensors), the product is functional, for
    the compiler to fuse into the gradient's consumer.
    """
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling():
        return grad * scale
    if grad.device.type == "cpu":
        if scale.numel() != 1 or float(scale) != 1.0:
            grad.mul_(scale)
    elif triton_impl is not None and scale.numel() == 1 and grad.stride(-1) == 1 and row_layout(grad) is not None:
        scale = scale.reshape(1).to(_acc_dtype(grad))
        if _dispatch._observed():  # the registered op, for whatever watches
            torch.ops.rlhf_kernels.scale_unless_one_triton(grad, scale)
        else:  # its function, without the dispatcher's ~40 us for an op defined in Python (_dispatch)
            triton_impl.scale_unless_one_(grad, scale, launch=wrap_triton)
    else:
        grad.mul_(scale)
    torch.autograd.graph.increment_version(grad)  # also when skipped: a second backward must fail
    return grad


for _fused, _ in _FUSED_OPS.values():
    _dispatch.register_autograd(_fused, _fused_backward, setup_context=_fused_setup)
