"""Drop-in for OpenRLHF users: its KL estimators, per-token log-probs and GAE on the ops.

>>> from rlhf_kernels.integrations import openrlhf as rk_openrlhf
>>> rk_openrlhf.patch()      # in every process that imports openrlhf (Ray actors included)
>>> ...
>>> rk_openrlhf.unpatch()

What is replaced, by identity in every imported ``openrlhf`` module (``from ... import``
copies, as the actor and experience maker hold them, included):

``openrlhf.models.utils``
  ``compute_approx_kl(log_probs, log_probs_base, kl_estimator)`` ->
  :func:`rlhf_kernels.kl_penalty` (``k1``, ``k2`` = x^2 / 2, ``k3`` = e^-x - 1 + x);
  ``log_probs_from_logits(logits, labels, temperature)`` -> :func:`rlhf_kernels.token_logprobs`
  (with a temperature the logits are still divided in place first, as OpenRLHF does, since
  its callers may read them again).
``openrlhf.trainer.ppo_utils.experience_maker``
  ``get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd)`` on every
  class that defines it -> :func:`rlhf_kernels.gae` on the masked values and rewards
  (OpenRLHF zeroes masked positions and runs the plain recursion over them: that is
  ``gae`` without a mask on the zeroed inputs).
``openrlhf.models.loss``
  ``PolicyLoss.forward`` -> :func:`rlhf_kernels.ppo_policy_loss` (clip-higher and dual clip
  from the module's settings) for ``policy_loss_type="ppo"`` without the train / rollout
  importance correction, returning ``(loss, clip_ratio, ppo_kl, None, None)`` as 0.11 does, and
  for ``"gspo"`` (its sequence-level ratio, through the op's ``importance_sampling_level=
  "sequence"``) where each sequence's advantage is one value over its valid tokens, as GRPO
  gives, and its mean log-ratio is within +-20 (then OpenRLHF's GSPO and the op's GSPO-token
  have the same loss and gradient; one host sync checks it);
  ``ValueLoss.forward`` -> :func:`rlhf_kernels.ppo_value_loss`. Both aggregate as
  OpenRLHF's ``aggregate_loss``: per token (``token_level_loss``) or per sequence, over the
  micro-batch or over the global counts (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``) a data-parallel actor passes. Their arguments and return values
  changed between releases, so each is replaced only where a probe call at patch time
  (float64, several settings of the module and of the global counts) gives the installed
  release's results, structure included. Values match OpenRLHF's, NaN for an empty
  micro-batch included; the gradient there is 0 (OpenRLHF's is NaN). A NaN or inf at a masked
  position is dropped (the ops never read masked positions; OpenRLHF's product with the mask
  gives NaN). Inputs other than [B, T] stay with OpenRLHF. OpenRLHF clips values
  as ``old + clamp(v - old, +-eps)``, the op as ``clamp(v, old - eps, old + eps)``: equal
  up to rounding.

Each replacement binds its arguments to the installed function's own signature and hands
every call it does not cover to OpenRLHF with the same arguments: an estimator name it
does not know, the older ``action_mask`` argument of the KL when set (the older
``use_kl_estimator_k3`` flag is read: k3 or k1), a KL value at +-10 or beyond where the
installed release's clamping is not known (releases differ on clamping there; the patch
asks ``compute_approx_kl`` once, estimator by estimator, and then clamps as it does
without looking at the values), masks with weights other than 0 and 1, gamma
or lambd outside [0, 1] or not scalars, arguments of newer releases that are not at their
defaults, shapes that only broadcast, the losses' other types and corrections (GSPO with
advantages that vary along a sequence, the vLLM importance correction), old log-probs,
advantages, old values or returns that require grad, and global counts of 0. The
experience maker must be importable when :func:`patch` first runs (a warning says when it
is not).

OpenRLHF is not a dependency: nothing here imports it until :func:`patch`.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import torch

from rlhf_kernels.integrations import _patching
from rlhf_kernels.ops.logprobs import FLOAT_DTYPES, token_logprobs
from rlhf_kernels.ops.ppo import gae, kl_penalty, ppo_policy_loss, ppo_value_loss, sequence_log_ratio

UTILS = "openrlhf.models.utils"
EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
LOSS = "openrlhf.models.loss"

#: OpenRLHF's KL estimator names -> the op's kinds.
KL_ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "k3"}

# No label can take this value: OpenRLHF's log-probs have no ignore index.
_NO_IGNORE_INDEX = -(2**63)


def _build():
    originals, replacements = {}, {}
    try:
        utils = importlib.import_module(UTILS)
    except ImportError as exc:
        raise ImportError(f"rlhf_kernels.integrations.openrlhf: cannot import {UTILS} ({exc})") from exc
    for name, (required, make) in _FUNCTIONS.items():
        fn = getattr(utils, name, None)
        if fn is not None:
            _patching.check_params("openrlhf", f"{UTILS}.{name}", fn, required)
            originals[name] = fn
            replacements[name] = make(fn)
    try:
        maker = importlib.import_module(EXPERIENCE_MAKER)
    except ImportError as exc:  # an OpenRLHF without this module (or without its Ray dependencies here)
        warnings.warn(f"rlhf_kernels.integrations.openrlhf: {EXPERIENCE_MAKER} is not importable ({exc}); "
                      "its GAE is not patched", stacklevel=3)  # fmt: skip
        maker = None
    for cls in [v for v in vars(maker).values() if isinstance(v, type)] if maker else ():
        fn = vars(cls).get("get_advantages_and_returns")
        if fn is not None and fn not in originals.values():
            _patching.check_params("openrlhf", f"{cls.__qualname__}.get_advantages_and_returns", fn, _GAE_PARAMS)
            originals[cls.__qualname__] = fn
            replacements[cls.__qualname__] = _make_gae(fn)
    try:
        loss = importlib.import_module(LOSS)
    except ImportError:
        loss = None
    for cls_name, make in _LOSS_MODULES.items():
        cls = getattr(loss, cls_name, None) if loss is not None else None
        fn = vars(cls).get("forward") if isinstance(cls, type) else None
        replacement = make(cls, fn) if fn is not None else None
        if replacement is not None:  # (None: a release whose loss the probe did not recognise: OpenRLHF's stays)
            originals[f"{cls_name}.forward"] = fn
            replacements[f"{cls_name}.forward"] = replacement
    if not originals:
        raise RuntimeError("rlhf_kernels.integrations.openrlhf: none of the functions it replaces was found")
    return originals, replacements


_patcher = _patching.Patcher("openrlhf", _build)

# patch(backend="auto") -> locations patched; unpatch() -> locations restored; is_patched();
# ``with patched(backend): ...`` (see _patching.Patcher)
patch = _patcher.patch
unpatch = _patcher.unpatch
is_patched = _patcher.is_patched
patched = _patcher.patched


# --- the replacements ------------------------------------------------------------------------------
_unset = _patching.defaults_beyond


def _kl_clamps(original):
    """Whether the installed ``compute_approx_kl`` clamps each estimator's value to +-10, asked
    once with log-ratios of +-30 (k3 is clamped by the op too): ``{name: bool}`` for the
    estimators that answer one way or the other, None when it cannot be asked by
    ``kl_estimator``. For the others each call checks its values (a device sync) and leaves
    those at the clamp to OpenRLHF."""
    far, zero = torch.tensor([30.0, -30.0]), torch.zeros(2)
    clamps = {}
    for name, kind in KL_ESTIMATORS.items():
        try:
            theirs = original(far, zero, kl_estimator=name).float()
        except Exception:
            return None
        ours = kl_penalty(far, zero, kind, backend="torch").float()
        if torch.allclose(theirs, ours.clamp(-10, 10)):
            clamps[name] = True
        elif torch.allclose(theirs, ours):
            clamps[name] = False
    return clamps


def _make_kl(original):
    unset = _unset(original, ("log_probs", "log_probs_base", "kl_estimator", "use_kl_estimator_k3", "action_mask"))
    clamps = _kl_clamps(original)

    def body(a):
        logp, base = a["log_probs"], a["log_probs_base"]
        if not all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in (logp, base)):
            return None
        if logp.shape != base.shape or a.get("action_mask") is not None or not unset(a):
            return None
        estimator = a.get("kl_estimator", "k3" if a.get("use_kl_estimator_k3") else "k1")
        kind = KL_ESTIMATORS.get(estimator) if isinstance(estimator, str) else None
        if kind is None:
            return None
        kl = kl_penalty(logp, base, kind, backend=_patcher.backend).float()
        if clamps is not None and estimator in clamps:
            return kl.clamp(-10, 10) if clamps[estimator] else kl
        if bool((kl.abs() >= 10).any()):  # releases differ on clamping to +-10 (the op's k3 clamps): theirs decides
            return None
        return kl

    return _patching.wrap(original, body)


def _make_logprobs(original):
    unset = _unset(original, ("logits", "labels", "temperature"))

    def body(a):
        logits, labels = a["logits"], a["labels"]
        temperature = a.get("temperature", 1.0)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.dtype not in FLOAT_DTYPES:
            return None
        if logits.shape[-1] > 1 and logits.stride(-1) != 1:
            return None
        if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(logits.shape[:-1]):
            return None
        if not unset(a) or not isinstance(temperature, (int, float)) or not temperature > 0:
            return None
        if temperature != 1.0:
            logits.div_(temperature)  # as OpenRLHF does: its callers may read the scaled logits again
        out = token_logprobs(logits, labels, ignore_index=_NO_IGNORE_INDEX, backend=_patcher.backend)
        return out.to(logits.dtype)

    return _patching.wrap(original, body)


_GAE_PARAMS = ("self", "values", "rewards", "action_mask", "gamma", "lambd")


def _make_gae(original):
    unset = _unset(original, _GAE_PARAMS)

    def body(a):
        values, rewards, mask = a["values"], a["rewards"], a["action_mask"]
        if not all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in (values, rewards)):
            return None
        if values.shape != rewards.shape or values.dim() != 2:
            return None
        try:
            gamma, lam = float(a["gamma"]), float(a["lambd"])
        except (TypeError, ValueError):  # e.g. a per-row tensor, which OpenRLHF's loop broadcasts
            return None
        if not (0 <= gamma <= 1 and 0 <= lam <= 1) or not unset(a):
            return None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != values.shape:
                return None
            if mask.dtype.is_floating_point and not bool(((mask == 0) | (mask == 1)).all()):
                return None
            values, rewards = values * mask, rewards * mask
        with torch.no_grad():
            adv, ret = gae(rewards, values, None, gamma=gamma, lam=lam, backend=_patcher.backend)
        dtype = torch.promote_types(values.dtype, rewards.dtype)
        return adv.to(dtype), ret.to(dtype)

    return _patching.wrap(original, body)


# --- PolicyLoss / ValueLoss -------------------------------------------------------------------------
GLOBAL_ARGS = ("dp_size", "batch_num_tokens", "global_batch_size")
_POLICY_PARAMS = ("self", "log_probs", "old_log_probs", "advantages", "action_mask")
_VALUE_PARAMS = ("self", "values", "old_values", "returns", "action_mask")


def _aggregation(module, like, mask, a):
    """OpenRLHF's ``aggregate_loss(loss, mask, token_level_loss, dp_size, batch_num_tokens,
    global_batch_size)`` of a loss computed like ``like``, in terms of the op:
    ``(op_mode, scale, empty, dtype)`` with its aggregate = scale * the op's in op_mode;
    ``empty`` a 0-dim bool tensor, true where OpenRLHF divides 0 by 0 (no valid token and no
    global count given), or None; ``dtype`` that of OpenRLHF's result (its per-sequence means
    divide by a float32 count, its global counts are float32 tensors). None where a count is
    neither a number nor a one-element tensor, or a Python number <= 0. (A tensor count of 0
    gives the infinities and NaN OpenRLHF's division gives, without a device sync.)"""
    token_level = getattr(module, "token_level_loss", True)
    dp, tokens, seqs = (a.get(k) for k in GLOBAL_ARGS)
    dp = 1 if dp is None else dp
    if not isinstance(token_level, bool) or type(dp) not in (int, float) or not dp > 0:
        return None
    for x in (tokens, seqs):
        if isinstance(x, torch.Tensor):
            if x.numel() != 1 or x.device != like.device:
                return None
        elif x is not None and (type(x) not in (int, float) or not x > 0):
            return None
    valid = mask != 0

    def dtype_with(count, dtype):  # a tensor count takes part in the promotion (0-dim by 0-dim)
        return torch.promote_types(dtype, count.dtype) if isinstance(count, torch.Tensor) else dtype

    def wide(count):  # the scale in float64
        return count.double() if isinstance(count, torch.Tensor) else count

    # loss * mask: a floating mask promotes the loss (a bool or integer one does not)
    base = _patching.promoted_by_mask(like.dtype, mask)
    if token_level:
        if tokens is None:
            return "token-mean", 1, ~valid.any(), base
        # OpenRLHF: (loss * mask).sum() / batch_num_tokens * dp_size
        return "token-sum", dp / wide(tokens), None, dtype_with(tokens, base)
    dtype = torch.promote_types(base, torch.float32)  # (OpenRLHF's sequence means divide by a float32 count)
    if seqs is None:
        return "seq-mean-token-mean", 1, ~valid.any(), dtype
    # the sum of the sequences' token means over the global count: the op's mean times its count
    return "seq-mean-token-mean", _patching.count(valid.any(-1)).clamp(min=1) * dp / wide(seqs), None, dtype_with(
        seqs, dtype)


def _nan_where(empty, x):
    """x, or NaN where ``empty`` (OpenRLHF's 0 / 0), without a device sync."""
    if empty is None:
        return x
    return torch.where(empty, torch.full_like(x, float("nan")), x)


def _masked_mean(x, mask):
    """OpenRLHF's ``masked_mean(x, mask, dim=None)`` (NaN for an empty mask)."""
    return (x * mask).sum() / mask.sum()


def _loss_call(a, names):
    """``(tensors, mask, plan)`` of a loss module's call: the tensors it reads (floating, of one
    shape, with a 0 / 1 mask) and its aggregation (:func:`_aggregation`), or None. None too where
    autograd would differentiate into the data (old log-probs, advantages, old values, returns:
    constants to the ops; OpenRLHF's arithmetic differentiates them)."""
    ts = [a[n] for n in names]
    mask = a.get("action_mask")
    if not all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in ts):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts[1:]):
        return None
    if any(t.shape != ts[0].shape for t in ts) or ts[0].dim() != 2 or not _patching.binary_mask(mask, ts[0]):
        return None
    plan = _aggregation(a["self"], ts[0], mask, a)
    return None if plan is None else (ts, mask, plan)


def _policy(a, backend):
    """PolicyLoss.forward on the op: ``(loss, clip_ratio, ppo_kl, None, None)``, or None (not covered)."""
    module = a["self"]
    kind = getattr(module, "policy_loss_type", "ppo")
    if kind not in ("ppo", "gspo") or getattr(module, "is_correction_level", "off") != "off":
        return None
    low, high, dual = (getattr(module, k, None) for k in ("clip_eps_low", "clip_eps_high", "dual_clip"))
    if not all(type(x) in (int, float) and x >= 0 for x in (low, high)):
        return None
    if dual is not None and not (type(dual) in (int, float) and dual > 1):
        return None
    call = _loss_call(a, ("log_probs", "old_log_probs", "advantages"))
    if call is None:
        return None
    (logp, old, adv), mask, (mode, scale, empty, dtype) = call
    if kind == "gspo" and not _gspo_is_token_level(logp, old, adv, mask):
        return None
    out = ppo_policy_loss(logp, old, adv, mask, clip_ratio_low=float(low), clip_ratio_high=float(high),
                          clip_ratio_c=None if dual is None else float(dual), loss_agg_mode=mode,
                          importance_sampling_level="sequence" if kind == "gspo" else "token",
                          backend=backend)  # fmt: skip
    loss = _nan_where(empty, out.loss * scale).to(dtype)
    # ppo_kl from the raw log-ratio (the op's approx_kl is of the ratio's clamped one)
    ppo_kl = _masked_mean((old - logp).detach(), mask)
    # a masked mean of float32 flags: promoted by a floating mask
    clip_ratio = _nan_where(~(mask != 0).any(), out.clipfrac.to(_patching.promoted_by_mask(torch.float32, mask)))
    return loss, clip_ratio, ppo_kl, None, None


def _gspo_is_token_level(logp, old, adv, mask) -> bool:
    """Whether OpenRLHF's GSPO (one ratio a sequence, the gradient through its mean log-ratio, no
    clamp) is the op's GSPO-token here: each sequence's advantage is one value over its valid
    tokens (GRPO's; then the two have the same loss and gradient) and its mean log-ratio lies
    within the op's clamp (+-20). One host sync."""
    with torch.no_grad():
        valid = mask != 0
        inf = torch.tensor(float("inf"), dtype=adv.dtype, device=adv.device)
        spread = torch.where(valid, adv, -inf).amax(-1) - torch.where(valid, adv, inf).amin(-1)
        seq = sequence_log_ratio(logp, old, mask)[:, 0]
        bad = (valid.any(-1) & (spread != 0)) | (seq.abs() > 20)
        return not bool(bad.any())


def _value(a, backend):
    """ValueLoss.forward on the op (0.5 times the aggregate), or None (not covered)."""
    module = a["self"]
    eps = getattr(module, "clip_eps", None)
    if eps is not None and not (type(eps) in (int, float) and eps >= 0):
        return None
    call = _loss_call(a, ("values", "old_values", "returns"))
    if call is None:
        return None
    (values, old, returns), mask, (mode, scale, empty, dtype) = call
    out = ppo_value_loss(values, old, returns, mask, clip_range_value=float("inf") if eps is None else float(eps),
                         loss_agg_mode=mode, backend=backend)  # fmt: skip
    return _nan_where(empty, out.loss * scale).to(dtype)


def _probe_calls():
    """(module settings, global counts) of the patch-time probe, and its inputs (float64)."""
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(3, 7, generator=g, dtype=torch.float64) * 2
    x = old + torch.randn(3, 7, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(3, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0, 1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    settings = ({}, {"clip_eps_low": 0.1, "clip_eps_high": 0.28, "dual_clip": 3.0, "token_level_loss": False},
                {"policy_loss_type": "gspo", "clip_eps_low": 0.02, "clip_eps_high": 0.03,
                 "dual_clip": 1.5})  # (GSPO: with GRPO's advantages, one a sequence)
    as_given = {"dp_size": 2, "batch_num_tokens": torch.tensor(30.0), "global_batch_size": torch.tensor(5.0)}
    counts = ({}, {"dp_size": 2, "batch_num_tokens": 30, "global_batch_size": 5}, as_given)  # (0.11: tensors)
    return settings, counts, (x, old, adv, mask)


def _same(got, want) -> bool:
    """The probe's comparison: the same structure (tuple length, None positions) and values."""
    if isinstance(want, tuple) != isinstance(got, tuple):
        return False
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if (g is None) != (w is None):
            return False
        if g is not None and not torch.allclose(torch.as_tensor(g).double(), torch.as_tensor(w).double(),
                                                rtol=1e-9, atol=1e-12):  # fmt: skip
            return False
    return True


def _make_loss(cls, original, params, body, settings_map):
    """A loss module's forward on the op, or None where its parameters are not ``params`` (then
    any) or a probe call disagrees with the installed release (see the module docstring)."""
    if tuple(inspect.signature(original).parameters)[: len(params)] != params:
        return None
    unset = _unset(original, (*params, *GLOBAL_ARGS, "rollout_log_probs"))
    settings, counts, (x, old, adv, mask) = _probe_calls()
    for setting in settings:
        try:
            module = cls(**settings_map(setting))
        except Exception:
            continue  # a setting this release does not take
        for count_args in counts:
            if any(k not in inspect.signature(original).parameters for k in count_args):
                continue
            third = adv[:, :1].expand_as(adv) if setting.get("policy_loss_type") == "gspo" else adv
            try:
                want = original(module, x, old, third, mask, **count_args)
                got = body(dict(self=module, **dict(zip(params[1:], (x, old, third, mask), strict=True)), **count_args),
                           "torch")  # fmt: skip
                same = got is not None and _same(got, want)
            except Exception:
                same = False
            if not same:
                return None

    def covered(a):
        return body(a, _patcher.backend) if unset(a) else None

    return _patching.wrap(original, covered)


def _make_policy_loss(cls, original):
    return _make_loss(cls, original, _POLICY_PARAMS, _policy, lambda s: s)


def _make_value_loss(cls, original):
    def settings(s):  # the value loss's clip and aggregation from the policy probe's settings
        return {"clip_eps": 0.2, **({"token_level_loss": s["token_level_loss"]} if "token_level_loss" in s else {})}

    return _make_loss(cls, original, _VALUE_PARAMS, _value, settings)


#: openrlhf.models.loss class -> the factory of its forward's replacement.
_LOSS_MODULES = {"PolicyLoss": _make_policy_loss, "ValueLoss": _make_value_loss}


#: utils function -> (the leading parameters the replacement reads, its factory).
_FUNCTIONS = {
    "compute_approx_kl": (("log_probs", "log_probs_base"), _make_kl),
    "log_probs_from_logits": (("logits", "labels"), _make_logprobs),
}
