"""Drop-in for verl users: route verl's PPO / GRPO math and per-token log-probs through the ops.

>>> from rlhf_kernels.integrations import verl as rk_verl
>>> rk_verl.patch()      # in every process that imports verl (driver and workers)
>>> ...                  # the verl trainer runs as before
>>> rk_verl.unpatch()

What is replaced, by identity in every imported ``verl`` module (``from ... import``
copies and registry entries such as ``ADV_ESTIMATOR_REGISTRY["gae"]`` included):

``verl.trainer.ppo.core_algos``
  ``compute_gae_advantage_return`` -> :func:`rlhf_kernels.gae` then :func:`masked_whiten`
  (masked positions are skipped and carry the recursion, as verl does);
  ``compute_grpo_outcome_advantage`` -> :func:`rlhf_kernels.grpo_advantages` over the
  groups of equal ``index`` values (a group of one keeps verl's mean 0 and std 1);
  ``compute_policy_loss`` (the legacy signature and 4-tuple) ->
  :func:`rlhf_kernels.ppo_policy_loss` (log-ratio clamped to +-20, clip-higher, dual clip);
  ``compute_value_loss`` -> :func:`rlhf_kernels.ppo_value_loss`; ``kl_penalty`` ->
  :func:`rlhf_kernels.kl_penalty` (``kl``/``k1``, ``abs``, ``mse``/``k2``, ``low_var_kl``/``k3``).
``verl.utils.torch_functional``
  ``logprobs_from_logits`` -> :func:`rlhf_kernels.token_logprobs` (float32 out, as verl's
  flash-attn path; ``inplace_backward`` as asked: the gradient overwrites the logits);
  ``entropy_from_logits`` -> the op's entropy; ``masked_whiten`` -> :func:`masked_whiten`.

Not replaced: the policy-loss registry's functions (``POLICY_LOSS_REGISTRY["vanilla"]``,
which newer actors call): their return value and extra arguments have changed between
verl releases (four values or a loss and a metrics dict; ``rollout_log_probs``,
``rollout_is_weights``), so a replacement could not be sure of matching the installed one.

Every replacement binds its arguments to the original's signature, so one module serves
verl releases whose later arguments differ, and hands every call it does not cover to
verl's own function with the same arguments: a loss_agg_mode the ops lack, a
``seq-mean-token-sum`` / ``-mean`` mode with a sequence that has no valid token (verl
releases disagree on whether it counts), ``seq-mean-token-sum-norm`` when the installed
``agg_loss`` follows neither known rule (older releases sum over the sequences where newer
ones and the op average; the patch asks ``agg_loss`` once and rescales), global-batch
normalisation (``dp_size`` > 1, ``batch_num_tokens`` ...), masks with weights other than
0 and 1 (verl uses them as weights), gamma or lam outside [0, 1], a negative clip range,
a ``"+"`` KL kind or ``"full"``, ``index`` values numpy cannot order or that are not
scalars, fewer than two valid values to whiten (verl raises), shapes that only broadcast,
logits whose last dim is not contiguous. Results are verl's
in meaning, computed in float32 (float64 for float64 inputs) and returned in the dtype
verl's own arithmetic would give. ``tests/test_frameworks.py`` holds all of this to the
real verl 0.9.1 (``make test-frameworks``); ``tests/test_integrations_verl.py`` to
stand-ins for the semantics of other releases.

verl is not a dependency: nothing here imports it until :func:`patch`.
"""

from __future__ import annotations

import importlib

import torch

from rlhf_kernels.integrations import _patching
from rlhf_kernels.ops.logprobs import FLOAT_DTYPES, token_logprobs
from rlhf_kernels.ops.ppo import gae, grpo_advantages, kl_penalty, masked_whiten, ppo_policy_loss, ppo_value_loss
from rlhf_kernels.reference.ppo import LOSS_AGG_MODES

CORE_ALGOS = "verl.trainer.ppo.core_algos"
TORCH_FUNCTIONAL = "verl.utils.torch_functional"

#: verl's KL kinds -> the op's.
KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}

# No label can take this value: verl's log-probs have no ignore index.
_NO_IGNORE_INDEX = -(2**63)


def _build():
    originals, replacements = {}, {}
    for module_name, names in _TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(f"rlhf_kernels.integrations.verl: cannot import {module_name} ({exc})") from exc
        for name, (required, make) in names.items():
            fn = getattr(module, name, None)
            if fn is None:  # not in this verl release
                continue
            _patching.check_params("verl", f"{module_name}.{name}", fn, required)
            originals[f"{module_name}:{name}"] = fn
            replacements[f"{module_name}:{name}"] = make(fn)
    if not originals:
        raise RuntimeError("rlhf_kernels.integrations.verl: none of the functions it replaces was found in verl")
    return originals, replacements


_patcher = _patching.Patcher("verl", _build)


# patch(backend="auto") -> locations patched; unpatch() -> locations restored; is_patched();
# ``with patched(backend): ...`` (see _patching.Patcher)
patch = _patcher.patch
unpatch = _patcher.unpatch
is_patched = _patcher.is_patched
patched = _patcher.patched


# --- the replacements ------------------------------------------------------------------------------
_wrap = _patching.wrap


def _tensors(*ts) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in ts)


def _sum_norm_rule():
    """How the installed verl aggregates ``seq-mean-token-sum-norm``, asked of its own
    ``agg_loss`` once, on ones over a [3, 2] mask with rows of 2, 1 and 0 valid tokens.
    Releases up to 0.7 sum the sequences' token sums and divide by T (3 / 2 = 1.5:
    ``"sum"``); 0.8 on take the mean over the sequences with a valid token first, as the
    op does and as Dr. GRPO reads (3 / 2 / 2 = 0.75: ``"mean"``). None when it cannot tell:
    that mode then stays with verl."""
    try:
        agg = importlib.import_module(CORE_ALGOS).agg_loss
        probe = agg(torch.ones(3, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), "seq-mean-token-sum-norm")
        got = float(probe)
    except Exception:  # no agg_loss, another signature: verl keeps the mode
        return None
    return {1.5: "sum", 0.75: "mean"}.get(got)


def _covered_agg(mode, mask, sum_norm) -> bool:
    """A mode the ops have; for the seq-mean modes, only when every sequence has a valid
    token (verl releases differ on whether an empty one counts: theirs decides); for
    ``seq-mean-token-sum-norm``, only when the release's rule is known (``sum_norm``)."""
    if not (isinstance(mode, str) and mode in LOSS_AGG_MODES):
        return False
    if mode == "seq-mean-token-sum-norm":
        return sum_norm is not None
    if mode not in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return True
    return bool((mask != 0).any(-1).all())


def _as_verl_aggregates(out, mode, mask, sum_norm):
    """The op's results, with the loss rescaled to the older verl rule for
    ``seq-mean-token-sum-norm`` (sequence sum rather than mean: times the count of
    sequences with a valid token, the op's divisor)."""
    out = tuple(out)
    if mode != "seq-mean-token-sum-norm" or sum_norm != "sum":
        return out
    seqs = (mask != 0).any(-1).sum().clamp(min=1).to(out[0].dtype)
    return (out[0] * seqs, *out[1:])


def _binary(mask, like) -> bool:
    """A mask of the rows' shape whose values are 0 and 1 (verl multiplies by the mask, so
    other weights change its results; the ops read nonzero as valid)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape or mask.device != like.device:
        return False
    return not mask.dtype.is_floating_point or bool(((mask == 0) | (mask == 1)).all())


def _whiten(values, mask, shift_mean=True):
    if not _tensors(values) or not _binary(mask, values) or int((mask != 0).sum()) < 2:
        return None  # verl raises for fewer than two valid values: let it
    return masked_whiten(values, mask, shift_mean=bool(shift_mean), backend=_patcher.backend).to(
        torch.promote_types(values.dtype, mask.dtype)
    )


def _make_masked_whiten(original):
    return _wrap(original, lambda a: _whiten(a["values"], a["mask"], a.get("shift_mean", True)))


def _make_gae(original):
    def body(a):
        rewards, values, mask = a["token_level_rewards"], a["values"], a["response_mask"]
        if not _tensors(rewards, values) or rewards.shape != values.shape or rewards.dim() != 2:
            return None
        gamma, lam = float(a["gamma"]), float(a["lam"])
        if not (0 <= gamma <= 1 and 0 <= lam <= 1) or not _binary(mask, values):
            return None
        with torch.no_grad():
            adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=_patcher.backend)
            whitened = _whiten(adv, mask)
        if whitened is None:
            return None
        dtype = torch.promote_types(rewards.dtype, values.dtype)
        return whitened.to(dtype), ret.to(dtype)

    return _wrap(original, body)


def _make_grpo(original):
    def body(a):
        import numpy as np

        rewards, mask, index = a["token_level_rewards"], a["response_mask"], a["index"]
        if not _tensors(rewards) or rewards.dim() != 2 or not _binary(mask, rewards):
            return None
        try:
            index = np.asarray(index)
            if index.shape != (rewards.shape[0],):  # (tuples of ids become rows: verl's dict grouping)
                return None
            _, ids, counts = np.unique(index, return_inverse=True, return_counts=True)
        except TypeError:  # ids numpy cannot order (mixed types): verl's dict grouping
            return None
        ids = ids.reshape(-1)
        norm, eps = bool(a.get("norm_adv_by_std_in_grpo", True)), float(a.get("epsilon", 1e-6))
        with torch.no_grad():
            scores = rewards.sum(-1)
            group_ids = torch.as_tensor(ids, dtype=torch.long, device=rewards.device)
            adv = grpo_advantages(scores, group_ids=group_ids, norm_by_std=norm, eps=eps, backend=_patcher.backend)
            alone = counts[ids] == 1
            if alone.any():  # verl takes mean 0 and std 1 for a group of one (the op: its own mean, A = 0)
                alone = torch.as_tensor(alone, device=rewards.device)
                adv = torch.where(alone, scores.to(adv.dtype) / (1 + eps) if norm else scores.to(adv.dtype), adv)
            out = (adv.unsqueeze(-1) * mask).to(torch.promote_types(rewards.dtype, mask.dtype))
        return out, out

    return _wrap(original, body)


def _policy_loss(old, logp, adv, mask, low, high, clip, clip_c, mode, sum_norm):
    if not _tensors(old, logp, adv) or clip_c is None or not _binary(mask, logp):
        return None
    if not _covered_agg(mode, mask, sum_norm):
        return None
    if not (old.shape == logp.shape == adv.shape):
        return None
    ranges = [float(r) for r in (clip, low, high) if r is not None]
    if min(ranges) < 0 or not float(clip_c) > 1:  # verl's own checks and messages for these
        return None
    out = ppo_policy_loss(logp, old, adv, mask, clip_ratio=float(clip), clip_ratio_low=low, clip_ratio_high=high,
                          clip_ratio_c=float(clip_c), loss_agg_mode=mode, backend=_patcher.backend)  # fmt: skip
    return _as_verl_aggregates(out, mode, mask, sum_norm)


def _make_policy_loss(original):
    """The legacy ``compute_policy_loss(old_log_prob, log_prob, advantages, response_mask,
    cliprange, cliprange_low, cliprange_high, clip_ratio_c, loss_agg_mode)`` -> 4-tuple."""
    sum_norm = _sum_norm_rule()

    def body(a):
        clip = a.get("cliprange")
        if clip is None:
            return None
        out = _policy_loss(a["old_log_prob"], a["log_prob"], a["advantages"], a["response_mask"],
                           a.get("cliprange_low"), a.get("cliprange_high"), clip, a.get("clip_ratio_c", 3.0),
                           a.get("loss_agg_mode", "token-mean"), sum_norm)  # fmt: skip
        return out

    return _wrap(original, body)


def _make_value_loss(original):
    # newer releases' global-batch arguments (dp_size, batch_num_tokens ...) only at their defaults
    unset = _patching.defaults_beyond(
        original, ("vpreds", "returns", "values", "response_mask", "cliprange_value", "loss_agg_mode")
    )
    sum_norm = _sum_norm_rule()

    def body(a):
        vpreds, returns, values, mask = a["vpreds"], a["returns"], a["values"], a["response_mask"]
        mode = a.get("loss_agg_mode", "token-mean")
        if not _tensors(vpreds, returns, values) or not (vpreds.shape == returns.shape == values.shape):
            return None
        if not _binary(mask, vpreds) or not _covered_agg(mode, mask, sum_norm) or not unset(a):
            return None
        if not float(a["cliprange_value"]) >= 0:
            return None
        out = ppo_value_loss(vpreds, values, returns, mask, clip_range_value=float(a["cliprange_value"]),
                             loss_agg_mode=mode, backend=_patcher.backend)  # fmt: skip
        return _as_verl_aggregates(out, mode, mask, sum_norm)

    return _wrap(original, body)


def _make_kl_penalty(original):
    def body(a):
        kind = KL_KINDS.get(a["kl_penalty"]) if isinstance(a["kl_penalty"], str) else None
        logp, ref = a["logprob"], a["ref_logprob"]
        if kind is None or not _tensors(logp, ref) or logp.shape != ref.shape:
            return None
        return kl_penalty(logp, ref, kind, backend=_patcher.backend).to(torch.promote_types(logp.dtype, ref.dtype))

    return _wrap(original, body)


def _covered_logits(logits, labels=None) -> bool:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.dtype not in FLOAT_DTYPES:
        return False
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        return False
    return labels is None or (isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(logits.shape[:-1]))


def _make_logprobs(original):
    def body(a):
        logits, labels = a["logits"], a["labels"]
        if not _covered_logits(logits, labels):
            return None
        inplace = bool(a.get("inplace_backward", False))
        return token_logprobs(logits, labels, ignore_index=_NO_IGNORE_INDEX, inplace_backward=inplace,
                              backend=_patcher.backend)  # fmt: skip

    return _wrap(original, body)


def _make_entropy(original):
    def body(a):
        logits = a["logits"]
        if not _covered_logits(logits):
            return None
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        _, entropy = token_logprobs(logits, labels, return_entropy=True, check_labels=False, backend=_patcher.backend)
        return entropy.to(logits.dtype)

    return _wrap(original, body)


#: module -> function -> (the leading parameters the replacement reads, its factory).
_TARGETS = {
    CORE_ALGOS: {
        "compute_gae_advantage_return": (("token_level_rewards", "values", "response_mask", "gamma", "lam"),
                                         _make_gae),
        "compute_grpo_outcome_advantage": (("token_level_rewards", "response_mask", "index"), _make_grpo),
        "compute_policy_loss": (("old_log_prob", "log_prob", "advantages", "response_mask", "cliprange"),
                                _make_policy_loss),
        "compute_value_loss": (("vpreds", "returns", "values", "response_mask", "cliprange_value"), _make_value_loss),
        "kl_penalty": (("logprob", "ref_logprob", "kl_penalty"), _make_kl_penalty),
    },
    TORCH_FUNCTIONAL: {
        "logprobs_from_logits": (("logits", "labels"), _make_logprobs),
        "entropy_from_logits": (("logits",), _make_entropy),
        "masked_whiten": (("values", "mask"), _make_masked_whiten),
    },
}  # fmt: skip
