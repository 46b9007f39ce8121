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
  ``compute_policy_loss_vanilla`` (the registry's ``"vanilla"``, which verl 0.9's actors
  call: clip ranges and global-batch sizes from the actor config, a loss and a metrics
  dict) -> the same op, where the installed function has verl 0.9's parameters and a probe
  call at patch time gives the replacement's loss and metrics (other releases changed
  its return value and arguments: there verl keeps it); ``compute_policy_loss_gspo`` (the
  registry's ``"gspo"``, GSPO-token) -> the op's ``importance_sampling_level="sequence"``, probed
  the same way, where every sequence's mean log-ratio lies in [-20, 10] (verl clamps it at 10,
  the op at +-20; checked with one host sync, else verl's function runs);
  ``compute_value_loss`` -> :func:`rlhf_kernels.ppo_value_loss`; ``kl_penalty`` ->
  :func:`rlhf_kernels.kl_penalty` (``kl``/``k1``, ``abs``, ``mse``/``k2``, ``low_var_kl``/``k3``).
``verl.utils.torch_functional``
  ``logprobs_from_logits`` -> :func:`rlhf_kernels.token_logprobs` (where verl would take its
  flash-attn path: float32 out and ``inplace_backward`` as asked, the gradient overwriting the
  logits; elsewhere the logits' dtype and the logits kept, as its log_softmax + gather; labels
  are not checked, which would wait for the device every call: an out-of-range one gets NaN);
  ``entropy_from_logits`` -> the op's entropy (finite for a row with ``-inf`` logits, where
  verl's ``p * logits`` gives NaN); ``masked_whiten`` -> :func:`masked_whiten`.

Aggregation (``agg_loss``): verl's modes, with or without the global-batch arguments
(``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) that a
data-parallel actor passes, are the op's ``token-sum`` or ``seq-mean-token-mean`` times a
scale (:func:`_agg_plan`). At patch time the installed ``agg_loss`` is asked once, on a
float64 probe, which ``seq-mean-token-sum-norm`` rule it follows (verl 0.7 and earlier sum
the sequences' token sums over T, 0.8 on average them, as the op) and whether the plan
gives its results with global-batch arguments, mode by mode; the rest stays with verl.

Every replacement binds its arguments to the original's signature, so one module serves
verl releases whose later arguments differ, and hands every call it does not cover to
verl's own function with the same arguments: a loss_agg_mode the ops lack, a
``seq-mean-token-sum`` / ``-mean`` mode over a micro-batch with a sequence that has no
valid token where the probe saw the installed release count it (releases disagree; verl
0.9 drops it, as the op, and then the call needs no host sync), aggregation the probe did not
confirm, ``dp_size`` > 1 without the global counts (verl raises), rollout importance
weights, masks with weights other than 0 and 1 (verl uses them as weights), gamma or lam
outside [0, 1], a negative clip range, a ``"+"`` KL kind or ``"full"``, ``index`` values
numpy cannot order or that are not scalars, fewer than two valid values to whiten (verl
raises), shapes that only broadcast, inputs other than [B, T], advantages, old log-probs,
returns or old values that require grad (the ops treat them as constants), a per-row gamma,
empty responses, logits whose last dim is not contiguous. Results are verl's in meaning,
computed in float32 (float64 for float64 inputs) and returned in the dtype verl's own
arithmetic would give; a NaN or inf at a masked position is dropped (the ops never read
masked positions; verl's product with the mask gives NaN). ``tests/test_frameworks.py`` holds all of this to the
real verl 0.9.1 (``make test-frameworks``); ``tests/test_integrations_verl.py`` to
stand-ins for the semantics of other releases.

``patch(fused_lm_head=True)`` also routes verl's fused LM heads (the models' forward with
``use_fused_kernels``) through :func:`rlhf_kernels.linear_token_logprobs`: the Triton
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (``reduction="none"``, no
process group or one of a single rank, as Megatron models without tensor parallelism pass: a
vocab-parallel head stays verl's; float32 log-probs and entropy, flat) and
``FusedLinearForPPOFunction`` of ``verl.utils.experimental.torch_functional`` (the torch
backend; a subclass whose ``apply`` takes the op; log-probs float32, entropy in the hidden
states' dtype, shaped like the ids), for plain-tensor heads of the hidden states' dtype on a
device with a kernel backend. Off by default until timed on a GPU beside verl's own.

verl is not a dependency: nothing here imports it until :func:`patch`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import os

import torch

from rlhf_kernels.integrations import _patching
from rlhf_kernels.ops.logprobs import FLOAT_DTYPES, token_logprobs
from rlhf_kernels.ops.ppo import (
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_log_ratio,
)
from rlhf_kernels.reference import ppo as reference_ppo
from rlhf_kernels.reference.ppo import LOSS_AGG_MODES

CORE_ALGOS = "verl.trainer.ppo.core_algos"
TORCH_FUNCTIONAL = "verl.utils.torch_functional"

#: verl's KL kinds -> the op's.
KL_KINDS = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}

# No label can take this value: verl's log-probs have no ignore index.
_NO_IGNORE_INDEX = -(2**63)


def _build():
    _agg_rules.cache_clear()  # asked once per build, of the verl imported now
    _agg_promoting_modes.cache_clear()
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
            replacement = make(fn)
            if replacement is None:  # the installed function is not the one the replacement knows
                continue
            originals[f"{module_name}:{name}"] = fn
            replacements[f"{module_name}:{name}"] = replacement
    if not originals:
        raise RuntimeError("rlhf_kernels.integrations.verl: none of the functions it replaces was found in verl")
    return originals, replacements


_patcher = _patching.Patcher("verl", _build)


def _build_head():
    originals, replacements = {}, {}
    for module_name, names in _HEAD_TARGETS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # not in this verl release
            continue
        for name, (required, make) in names.items():
            fn = getattr(module, name, None)
            if fn is None:
                continue
            # (an autograd.Function's forward; linear_cross_entropy is LinearCrossEntropy.apply)
            owner = getattr(fn, "__self__", None) if not isinstance(fn, type) else fn
            _patching.check_params("verl", f"{module_name}.{name}", owner.forward if isinstance(owner, type) else fn,
                                   required, exact=True)  # fmt: skip
            originals[f"{module_name}:{name}"] = fn
            replacements[f"{module_name}:{name}"] = make(fn)
    if not originals:
        raise RuntimeError("rlhf_kernels.integrations.verl: this verl has neither fused LM head the patch replaces "
                           f"({', '.join(f'{m}.{n}' for m, ns in _HEAD_TARGETS.items() for n in ns)})")  # fmt: skip
    return originals, replacements


_head_patcher = _patching.Patcher("verl", _build_head)
_patches = _patching.WithHead(_patcher, _head_patcher)

# patch(backend="auto", *, fused_lm_head=False) -> locations patched; unpatch() -> locations
# restored; is_patched(); is_head_patched(); ``with patched(backend, fused_lm_head=...): ...``
# (see _patching.WithHead)
patch = _patches.patch
unpatch = _patches.unpatch
is_patched = _patcher.is_patched
is_head_patched = _patches.is_head_patched
patched = _patches.patched


# --- the replacements ------------------------------------------------------------------------------
_wrap = _patching.wrap


def _tensors(*ts) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dtype.is_floating_point for t in ts)


def _rows(*ts) -> bool:
    """[B, T] tensors of one shape: the ops' layout (verl's arithmetic also takes other ranks)."""
    return _tensors(*ts) and ts[0].dim() == 2 and all(t.shape == ts[0].shape for t in ts)


def _grad_into(*ts) -> bool:
    """Whether autograd would differentiate into one of ``ts``, which the ops treat as constants
    (advantages, old log-probs, returns, old values): verl's arithmetic then runs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _number(x):
    """A Python float of a number or a one-element tensor (verl's configs hold either), or None."""
    try:
        return float(x)
    except (TypeError, ValueError, RuntimeError):
        return None


def _fraction_dtype(call):
    """How the installed loss types its clip fractions, asked once at patch time: ``call(values,
    mask)`` runs it on float64 values and a float32 mask and returns a fraction. float32 where the
    release takes ``.float()`` of its flags (verl 0.9), float64 where it keeps the values' dtype.
    Returns ``(values dtype, mask) -> the fraction's dtype``."""
    v = torch.tensor([[-1.0, -0.5, -0.2], [-0.3, -0.1, -2.0]], dtype=torch.float64)
    try:
        flags_as_float = call(v, torch.ones(2, 3)).dtype == torch.float32
    except Exception:  # another signature: the values' dtype, as the ops' own outputs
        flags_as_float = False
    if flags_as_float:
        return lambda dtype, mask: _mean_dtype(torch.float32, mask)
    return _mean_dtype


def _float_flags(_dtype, mask):
    """The dtype of the clip fraction of verl's GSPO loss: ``masked_mean`` of ``.float()`` flags."""
    return _mean_dtype(torch.float32, mask)


def _mean_dtype(dtype, mask):
    """The dtype of verl's ``masked_mean`` of ``dtype`` values: their masked sum over the mask's
    count plus 1e-8, both 0-dim tensors, so they promote each other in full (a bool or integer
    mask's count becomes the default float dtype)."""
    count = mask.dtype if mask.dtype.is_floating_point else torch.get_default_dtype()
    return torch.promote_types(_with_mask(dtype, mask), count)


_with_mask = _patching.promoted_by_mask


#: agg_loss's global-batch arguments (verl 0.7 on), which the losses pass on.
GLOBAL_ARGS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")


_count = _patching.count


def _agg_plan(mode, mask, g, sum_norm):
    """verl's ``agg_loss(loss, mask, mode, **g)`` in terms of the op: ``(op_mode, scale)`` with
    verl's aggregate = scale * the op's in op_mode (scale a number or a 0-dim tensor), or None
    where verl raises or the rule is unknown (verl's own function then runs). ``g``: the
    global-batch arguments given (GLOBAL_ARGS; absent ones at their defaults). ``sum_norm``:
    the release's ``seq-mean-token-sum-norm`` rule, ``"sum"`` (0.7 and earlier: the
    sequences' token sums over T) or ``"mean"`` (0.8 on: their mean over the sequences with a
    valid token, then over T, as the op) (:func:`_agg_rules`)."""
    if mode not in LOSS_AGG_MODES or (mode == "seq-mean-token-sum-norm" and sum_norm is None):
        return None
    dp = g.get("dp_size", 1)
    tokens, seqs, norm = (g.get(k) for k in GLOBAL_ARGS[1:])
    if any(isinstance(x, numbers.Number) and x == 0 for x in (tokens, seqs, norm)):
        return None  # verl divides by it (inf / NaN); a Python zero would raise here
    if mode == "seq-mean-token-sum-norm" and sum_norm == "sum":
        return "token-sum", 1 / (norm if norm is not None else mask.shape[-1])  # neither dp nor batch size
    if dp == 1 and tokens is None and seqs is None and norm is None:
        return mode, 1  # the micro-batch alone: the op's own modes
    if not isinstance(dp, int) or dp < 1:
        return None
    valid = mask != 0
    if mode == "token-sum":
        return "token-sum", dp
    if mode == "token-mean":
        if tokens is None and dp != 1:
            return None  # verl raises (0.8 on) or differs by release
        return "token-sum", dp / (tokens if tokens is not None else _count(valid))
    if seqs is None:
        if dp != 1:
            return None
        seqs = _count(valid.any(-1))
    if mode == "seq-mean-token-sum":
        return "token-sum", dp / seqs
    if mode == "seq-mean-token-sum-norm":
        return "token-sum", dp / (seqs * (norm if norm is not None else mask.shape[-1]))
    return "seq-mean-token-mean", dp * _count(valid.any(-1)).clamp(min=1) / seqs  # the op divides by its count


# agg_loss's arguments in _agg_rules' probe: the micro-batch alone, then global-batch ones
_PROBE_ARGS = (
    {},
    {"dp_size": 2, "batch_num_tokens": 11.0, "global_batch_size": 3.0, "loss_scale_factor": 5.0},
    {"dp_size": 2, "batch_num_tokens": 11.0, "global_batch_size": 3.0},
    {"batch_num_tokens": 11.0, "global_batch_size": 3.0},
    {"loss_scale_factor": 5.0},
)


@functools.cache
def _agg_rules():
    """Ask the installed ``agg_loss`` once (float64, a [4, 5] mask with an empty row) which
    ``seq-mean-token-sum-norm`` rule it follows and for which modes :func:`_agg_plan` gives
    its results with global-batch arguments, and how it treats micro-batch calls with empty
    sequences. Returns ``(sum_norm, modes, local)``: the rule, or None when neither matches
    (that mode stays with verl); the modes whose global-batch calls the op may take (the others
    go to verl); ``{mode: nan}`` for the modes whose micro-batch calls give the op's results
    with an empty sequence in the batch, ``nan`` telling whether verl gives NaN (0 / 0) when
    no token at all is valid (else the op's 0). Those calls need no look at the mask on the
    host; the other modes' do (a device sync)."""
    try:
        agg = importlib.import_module(CORE_ALGOS).agg_loss
    except (ImportError, AttributeError):
        return None, frozenset(), {}
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)

    def matches(mode, args, rule):
        plan = _agg_plan(mode, mask, args, rule)
        if plan is None:
            return False
        try:
            want = float(agg(loss, mask, mode, **args))
        except Exception:  # another signature, or verl refuses these arguments
            return False
        got = float(plan[1] * reference_ppo.agg_loss(loss, mask, plan[0]))
        # (1e-6: verl's seq-mean-token-mean divides by count + 1e-8, which float64 resolves)
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12)

    sum_norm = next((rule for rule in ("mean", "sum") if matches("seq-mean-token-sum-norm", {}, rule)), None)
    modes = frozenset(m for m in LOSS_AGG_MODES if all(matches(m, a, sum_norm) for a in _PROBE_ARGS[1:]))
    local = {}
    for m in LOSS_AGG_MODES:
        if not matches(m, {}, sum_norm):
            continue
        try:
            none_valid = float(agg(loss, mask * 0, m))
        except Exception:
            continue
        if math.isnan(none_valid) or none_valid == 0.0:
            local[m] = math.isnan(none_valid)
    return sum_norm, modes, local


@functools.cache
def _agg_promoting_modes() -> frozenset:
    """The modes whose installed ``agg_loss`` returns float32 for a bfloat16 loss and mask (verl
    0.9's sequence means: ``(count > 0).float()`` and ``count + 1e-8`` promote), asked once: the
    dtype the drop-ins then give their loss."""
    try:
        agg = importlib.import_module(CORE_ALGOS).agg_loss
    except (ImportError, AttributeError):
        return frozenset()
    loss = torch.rand(3, 4, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bfloat16)
    found = set()
    for mode in LOSS_AGG_MODES:
        try:
            if agg(loss, mask, mode).dtype == torch.float32:
                found.add(mode)
        except Exception:
            continue
    return frozenset(found)


def _loss_dtype(dtype, mask, mode):
    """verl's aggregate's dtype for a loss computed in ``dtype``: promoted by a floating mask, and
    to float32 in the modes where its ``agg_loss`` does so (:func:`_agg_promoting_modes`)."""
    dtype = _with_mask(dtype, mask)
    return torch.promote_types(dtype, torch.float32) if mode in _agg_promoting_modes() else dtype


def _aggregation(mode, mask, g, rules):
    """The plan for a call (see :func:`_agg_plan`), or None to leave the call to verl: a mode
    the ops lack, a seq-mean mode over a micro-batch with an empty sequence (verl releases
    differ on whether it counts; theirs decides), global-batch arguments the probe did not
    confirm for the mode."""
    sum_norm, global_modes, local = rules
    if not (isinstance(mode, str) and mode in LOSS_AGG_MODES) or mask.dim() < 1 or mask.shape[-1] == 0:
        return None  # (empty responses: verl's arithmetic gives NaN or 0 by mode and release)
    dp = g.get("dp_size", 1)
    if isinstance(dp, bool) or not isinstance(dp, numbers.Integral):  # (a float or tensor rank count)
        return None
    g = {k: v for k, v in g.items() if v is not None and not (k == "dp_size" and dp == 1)}
    if "dp_size" in g:
        g["dp_size"] = int(dp)
    if g and mode not in global_modes:
        return None
    if not g and mode in local:  # the probe saw verl give the op's results here: no host sync
        plan = _agg_plan(mode, mask, g, sum_norm)
        if plan is not None and local[mode]:  # no valid token: verl's 0 / 0, NaN loss and gradient
            plan = (plan[0], plan[1] * torch.where((mask != 0).any(), 1.0, float("nan")))
        return plan
    if not g and mode != "token-sum":  # one host sync for either check
        rows = (mask != 0).any(-1)
        if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
            if rows.numel() == 0 or not bool(rows.all()):  # (with rows, this implies a valid token)
                return None
        elif not bool(rows.any()):
            return None  # no valid token: verl divides 0 by 0 (NaN), the op gives 0
    return _agg_plan(mode, mask, g, sum_norm)


def _scaled(out, plan):
    """The op's results with the loss scaled by the plan's factor."""
    out = tuple(out)
    scale = plan[1]
    if isinstance(scale, (int, float)) and scale == 1:
        return out
    return (out[0] * torch.as_tensor(scale, dtype=out[0].dtype, device=out[0].device), *out[1:])


_binary = _patching.binary_mask


def _whiten(values, mask, shift_mean=True):
    if not _tensors(values) or not _binary(mask, values) or int((mask != 0).sum()) < 2:
        return None  # verl raises for fewer than two valid values: let it
    # values.dtype: verl's (values - mean) * rsqrt(var) has 0-dim statistics, which do not promote values
    return masked_whiten(values, mask, shift_mean=bool(shift_mean), backend=_patcher.backend).to(values.dtype)


def _make_masked_whiten(original):
    return _wrap(original, lambda a: _whiten(a["values"], a["mask"], a.get("shift_mean", True)))


def _make_gae(original):
    def body(a):
        rewards, values, mask = a["token_level_rewards"], a["values"], a["response_mask"]
        if not _tensors(rewards, values) or rewards.shape != values.shape or rewards.dim() != 2:
            return None
        gamma, lam = _number(a["gamma"]), _number(a["lam"])  # (a per-row gamma tensor: verl's)
        if gamma is None or lam is None or not (0 <= gamma <= 1 and 0 <= lam <= 1) or not _binary(mask, values):
            return None
        with torch.no_grad():
            adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=_patcher.backend)
            whitened = _whiten(adv, mask)
        if whitened is None:
            return None
        dtype = _with_mask(torch.promote_types(rewards.dtype, values.dtype), mask)
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


def _policy_loss(old, logp, adv, mask, low, high, clip, clip_c, mode, g, rules, backend=None, fraction=None,
                 level="token"):  # fmt: skip
    """The op's (loss, clipfrac, approx_kl, clipfrac_lower) in verl's dtypes, or None for verl. ``level``
    "sequence" is GSPO, which has no dual clip (``clip_c`` None)."""
    dual = level == "token"
    if not _rows(old, logp, adv) or (dual and clip_c is None) or not _binary(mask, logp) or _grad_into(old, adv):
        return None
    plan = _aggregation(mode, mask, g, rules)
    if plan is None:
        return None
    clip, low, high, clip_c = (None if r is None else _number(r) for r in (clip, low, high, clip_c))
    ranges = [r for r in (clip, low, high) if r is not None]
    if clip is None or any(math.isnan(r) or r < 0 for r in ranges) or (dual and (clip_c is None or not clip_c > 1)):
        return None  # verl's own checks and messages for these
    out = ppo_policy_loss(logp, old, adv, mask, clip_ratio=clip, clip_ratio_low=low, clip_ratio_high=high,
                          clip_ratio_c=clip_c if dual else None, loss_agg_mode=plan[0],
                          importance_sampling_level=level, backend=backend or _patcher.backend)  # fmt: skip
    loss, clipfrac, approx_kl, lower = _scaled(out, plan)
    # verl's dtypes: the loss in its inputs' arithmetic (promoted by a floating mask), the KL a
    # masked mean of the log-ratio, the fractions masked means of flags typed as the release types
    # them (fraction; the log-ratio's dtype if not asked)
    ratio = torch.promote_types(logp.dtype, old.dtype)
    frac = (fraction or _mean_dtype)(ratio, mask)
    return (loss.to(_loss_dtype(torch.promote_types(ratio, adv.dtype), mask, mode)), clipfrac.to(frac),
            approx_kl.to(_mean_dtype(ratio, mask)), lower.to(frac))  # fmt: skip


def _make_policy_loss(original):
    """The legacy ``compute_policy_loss(old_log_prob, log_prob, advantages, response_mask,
    cliprange, cliprange_low, cliprange_high, clip_ratio_c, loss_agg_mode)`` -> 4-tuple."""
    rules = _agg_rules()
    fraction = _fraction_dtype(lambda v, m: original(v, v + 0.05, v, m, cliprange=0.2)[1])

    def body(a):
        clip = a.get("cliprange")
        if clip is None:
            return None
        return _policy_loss(a["old_log_prob"], a["log_prob"], a["advantages"], a["response_mask"],
                            a.get("cliprange_low"), a.get("cliprange_high"), clip, a.get("clip_ratio_c", 3.0),
                            a.get("loss_agg_mode", "token-mean"), {}, rules, fraction=fraction)  # fmt: skip

    return _wrap(original, body)


#: compute_policy_loss_vanilla as verl 0.9 has it (the registry's "vanilla").
VANILLA_PARAMS = ("old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                  "rollout_is_weights")  # fmt: skip
VANILLA_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")


class _ActorConfigProbe:
    """The fields of verl's actor config that the vanilla policy loss reads, for the probe call."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def get(self, key, default=None):
        return getattr(self, key, default)


def _registry_loss(a, rules, backend, level="token"):
    """The registry's ``"vanilla"`` (``level="token"``) or ``"gspo"`` (``"sequence"``) policy loss of
    verl 0.9, ``(pg_loss, metrics)``, from the op, or None. Clip ranges and global-batch sizes come
    from the actor config. GSPO: verl clamps the log-ratio at 10 from above only, the op at +-20,
    so the same wherever every sequence's mean log-ratio lies in [-20, 10], which is checked (one
    host sync; else verl's function runs); it has no dual clip and a clipfrac_lower of 0."""
    config = a.get("config")
    if config is None or a.get("rollout_is_weights") is not None:
        return None
    try:
        clip, low, high = config.clip_ratio, config.clip_ratio_low, config.clip_ratio_high
        clip_c, g = config.get("clip_ratio_c", 3.0), dict(config.global_batch_info)
    except Exception:  # a config without these fields: verl's own function says what is wrong
        return None
    if clip is None or not set(g) <= set(GLOBAL_ARGS):
        return None
    low, high = (low if low is not None else clip), (high if high is not None else clip)
    old, logp, mask = a["old_log_prob"], a["log_prob"], a["response_mask"]
    gspo = level == "sequence"
    if gspo:
        if not _rows(old, logp) or not _binary(mask, logp):
            return None
        seq = sequence_log_ratio(logp, old, mask)
        if bool(((seq > 10) | (seq < -20)).any()):
            return None
    out = _policy_loss(old, logp, a["advantages"], mask, low, high, clip, None if gspo else clip_c,
                       a.get("loss_agg_mode", "seq-mean-token-mean" if gspo else "token-mean"), g, rules, backend,
                       fraction=_float_flags if gspo else None, level=level)  # fmt: skip
    if out is None:
        return None
    metrics = torch.stack(out[1:3] if gspo else out[1:]).tolist()  # one device-to-host copy
    return out[0], dict(zip(VANILLA_METRICS, [*metrics, 0.0] if gspo else metrics, strict=True))


def _make_vanilla(original):
    """The registry's ``"vanilla"`` policy loss of verl 0.9 (``(pg_loss, metrics dict)``, clip
    ranges and global-batch arguments from the actor config). Its return value and arguments
    changed between releases, so it is replaced only where its parameters are these and a
    probe call (CPU, float64, clip-higher and dual clip, global-batch arguments) gives the
    same loss and metrics, keys included, as the replacement; otherwise None: verl keeps it."""
    if tuple(inspect.signature(original).parameters) != VANILLA_PARAMS:
        return None
    return _probed(original, _registry_loss, clip_ratio_c=3.0, mode="token-mean", make_config=_ActorConfigProbe)


def _probe_rows():
    """The vanilla probe's inputs: three rows of log-probs (float64) with a masked tail and gaps."""
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 2
    return dict(old_log_prob=old, log_prob=old + torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.3,
                advantages=torch.randn(3, 6, generator=g, dtype=torch.float64),
                response_mask=torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]],
                                           dtype=torch.float64))  # fmt: skip


def _gspo_probe_rows():
    """GSPO's probe inputs, one behaviour a row, so that a release whose function differs from the
    one the replacement reproduces shows in the loss or the gradient: sequences clipped above (a
    positive advantage) and below (a negative one), one unclipped with a different advantage a
    token (the gradient goes to each token, not through the mean), one at a mean log-ratio of -15
    (a tighter clamp shows) and one far above 1 with a negative advantage (a dual clip shows)."""
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(5, 6, generator=g, dtype=torch.float64) * 2
    shift = torch.tensor([0.1, -0.1, 0.005, -15.0, 1.5], dtype=torch.float64)[:, None]
    adv = torch.tensor([1.0, -1.0, 0.0, 0.7, -0.8], dtype=torch.float64)[:, None].repeat(1, 6)
    adv[2] = torch.randn(6, generator=g, dtype=torch.float64)
    mask = torch.ones(5, 6, dtype=torch.float64)
    mask[1, 5] = mask[2, 1] = mask[4, 4:] = 0.0
    return dict(old_log_prob=old, log_prob=old + shift + torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.01,
                advantages=adv, response_mask=mask)  # fmt: skip


def _probed(original, body, *, clip_ratio_c, mode, make_config, rows=_probe_rows, clip=(0.2, None, 0.28)):
    """``original`` wrapped with ``body(args, rules, backend)`` (None: verl's call), where a probe
    call (CPU, float64, with and without global-batch arguments) gives the same loss, gradient
    and metrics, keys included, from both; else None (verl keeps its function)."""
    rules = _agg_rules()
    args = dict(rows(), loss_agg_mode=mode, rollout_is_weights=None)
    for info in ({}, {"dp_size": 2, "batch_num_tokens": 20, "global_batch_size": 5, "loss_scale_factor": None}):
        args["config"] = make_config(clip_ratio=clip[0], clip_ratio_low=clip[1], clip_ratio_high=clip[2],
                                     clip_ratio_c=clip_ratio_c, global_batch_info=info)  # fmt: skip
        try:
            results = []
            for run in (lambda a: original(**a), lambda a: body(a, rules, "torch")):
                x = args["log_prob"].clone().requires_grad_(True)
                out = run({**args, "log_prob": x})
                out[0].backward()
                results.append((out, x.grad))
            (want, want_grad), (got, got_grad) = results
            same = (got is not None and isinstance(want, tuple) and len(want) == 2 and isinstance(want[1], dict)
                    and set(want[1]) == set(got[1])
                    and math.isclose(float(want[0].detach()), float(got[0].detach()), rel_tol=1e-9)
                    and all(math.isclose(float(want[1][k]), got[1][k], rel_tol=1e-9, abs_tol=1e-12)
                            for k in got[1])
                    and torch.allclose(got_grad, want_grad, rtol=1e-9, atol=1e-12))  # fmt: skip
        except Exception:
            same = False
        if not same:
            return None
    return _wrap(original, lambda a: body(a, rules, _patcher.backend))


def _actor_config_like(cls):
    """A probe config of verl's own ``ActorConfig`` class where the loss insists on it (GSPO
    asserts the type), its fields set without its validation (which wants a whole trainer's
    settings); the plain probe where the class is unknown."""

    def make(**fields):
        if not isinstance(cls, type):
            return _ActorConfigProbe(**fields)
        config = cls.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(config, name, value)
        return config

    return make


def _make_gspo(original):
    """The registry's ``"gspo"`` policy loss (verl 0.9: GSPO-token, the vanilla loss's parameters),
    replaced, as the vanilla one, only where a probe call gives the replacement's loss and metrics."""
    if tuple(inspect.signature(original).parameters) != VANILLA_PARAMS:
        return None
    config_type = getattr(original, "__globals__", {}).get("ActorConfig")

    def body(a, rules, backend):
        if isinstance(config_type, type) and not isinstance(a.get("config"), config_type):
            return None  # verl asserts the type: its own message
        return _registry_loss(a, rules, backend, level="sequence")

    return _probed(original, body, clip_ratio_c=3.0, mode="token-mean", make_config=_actor_config_like(config_type),
                   rows=_gspo_probe_rows, clip=(0.02, None, 0.03))  # fmt: skip


def _make_value_loss(original):
    # arguments beyond these (newer releases may add some) only at their defaults
    unset = _patching.defaults_beyond(
        original, ("vpreds", "returns", "values", "response_mask", "cliprange_value", "loss_agg_mode", *GLOBAL_ARGS)
    )
    rules = _agg_rules()
    fraction = _fraction_dtype(lambda v, m: original(v, v + 0.1, v - 0.1, m, 0.2)[1])

    def body(a):
        vpreds, returns, values, mask = a["vpreds"], a["returns"], a["values"], a["response_mask"]
        if not _rows(vpreds, returns, values) or _grad_into(returns, values):
            return None
        clip = _number(a["cliprange_value"])
        if not _binary(mask, vpreds) or not unset(a) or clip is None or not clip >= 0:
            return None
        plan = _aggregation(a.get("loss_agg_mode", "token-mean"), mask, {k: a[k] for k in GLOBAL_ARGS if k in a}, rules)
        if plan is None:
            return None
        out = ppo_value_loss(vpreds, values, returns, mask, clip_range_value=clip, loss_agg_mode=plan[0],
                             backend=_patcher.backend)  # fmt: skip
        loss, clipfrac = _scaled(out, plan)
        dtype = torch.promote_types(torch.promote_types(vpreds.dtype, values.dtype), returns.dtype)
        return loss.to(_loss_dtype(dtype, mask, a.get("loss_agg_mode", "token-mean"))), clipfrac.to(
            fraction(vpreds.dtype, mask))

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
    module = importlib.import_module(original.__module__)

    def flash_path() -> bool:
        """Whether verl itself would take its flash-attn cross-entropy path (read per call, as verl does)."""
        return bool(getattr(module, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)) and (
            os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
        )

    def body(a):
        logits, labels = a["logits"], a["labels"]
        if not _covered_logits(logits, labels):
            return None
        # As verl: on its flash-attn path float32 log-probs and the gradient written over the logits
        # when asked, else log_softmax + gather's (logits' dtype, logits kept). Labels unchecked:
        # verl's come from the input ids, and a check would wait for the device every call
        # (an out-of-range label gets NaN instead of gather's error).
        flash = flash_path()
        lp = token_logprobs(logits, labels, ignore_index=_NO_IGNORE_INDEX, check_labels=False,
                            inplace_backward=flash and bool(a.get("inplace_backward", False)),
                            backend=_patcher.backend)  # fmt: skip
        return lp if flash else lp.to(logits.dtype)

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
        "compute_policy_loss_vanilla": ((), _make_vanilla),
        "compute_policy_loss_gspo": ((), _make_gspo),
        "compute_value_loss": (("vpreds", "returns", "values", "response_mask", "cliprange_value"), _make_value_loss),
        "kl_penalty": (("logprob", "ref_logprob", "kl_penalty"), _make_kl_penalty),
    },
    TORCH_FUNCTIONAL: {
        "logprobs_from_logits": (("logits", "labels"), _make_logprobs),
        "entropy_from_logits": (("logits",), _make_entropy),
        "masked_whiten": (("values", "mask"), _make_masked_whiten),
    },
}  # fmt: skip


# --- the fused LM heads (patch(fused_lm_head=True)) ---------------------------------------------
def _make_linear_cross_entropy(original):
    """verl's Triton ``linear_cross_entropy(hidden, weight, labels, temperature, reduction,
    dist_process_group)`` (the models' forward with ``use_fused_kernels`` and the Triton
    backend): per-token log-probs and entropy, float32, flat ``[N]``. Covered: ``reduction
    "none"``, no process group (a vocab-parallel head stays verl's), a float temperature (verl
    asserts one)."""

    def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        flat = None  # verl's kernel takes [N, H] and [N] views of them
        if (isinstance(hidden, torch.Tensor) and isinstance(labels, torch.Tensor) and hidden.dim() >= 1
                and labels.numel() * max(hidden.shape[-1], 1) == hidden.numel()):  # fmt: skip
            flat = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        covered = (flat is not None and isinstance(temperature, float) and isinstance(reduction, str)
                   and reduction.lower() == "none" and _single_rank(dist_process_group)
                   and _patching.head_covered(flat[0], weight, None, flat[1], temperature,
                                              _head_patcher.backend))  # fmt: skip
        if not covered:
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
        logprobs, entropy = _head_logprobs(flat[0], weight, flat[1], temperature)
        return logprobs.float(), entropy.float()

    return linear_cross_entropy


def _single_rank(group) -> bool:
    """No process group, or one of a single rank (verl's Megatron models pass the tensor-parallel
    group also without tensor parallelism): the head is not split over the vocabulary."""
    if group is None:
        return True
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) == 1
    except (RuntimeError, ValueError, TypeError):
        return False


def _make_fused_linear_for_ppo(original):
    """verl's ``FusedLinearForPPOFunction`` (``FusedLinearForPPO`` with the torch backend): a
    subclass whose ``apply(hidden_states, vocab_weights, input_ids, temperature, chunk_size)``
    takes the op for ``[B, T, H]`` or ``[T, H]`` hidden states; log-probs in float32 and
    entropy in the hidden states' dtype, shaped like ``input_ids``, as verl's."""

    def apply(cls, hidden_states, vocab_weights, input_ids, temperature=1.0, chunk_size=512):
        if not (isinstance(hidden_states, torch.Tensor) and hidden_states.dim() in (2, 3)
                and _patching.head_covered(hidden_states, vocab_weights, None, input_ids, temperature,
                                           _head_patcher.backend)):  # fmt: skip
            return original.apply(hidden_states, vocab_weights, input_ids, temperature, chunk_size)
        logprobs, entropy = _head_logprobs(hidden_states, vocab_weights, input_ids, temperature)
        return logprobs.float(), entropy.to(hidden_states.dtype)

    return _patching.with_apply(original, apply)


def _head_logprobs(hidden, weight, labels, temperature):
    """Log-probs and entropy of softmax(hidden weight^T / temperature) at the labels: verl's labels
    are rolled input ids, every one in range, so they are not checked (which would wait for the
    device) and there is no ignore index (a label outside [0, V), -100 included, gives NaN)."""
    from rlhf_kernels.ops.linear import linear_token_logprobs

    return linear_token_logprobs(hidden, weight, labels, temperature=float(temperature), return_entropy=True,
                                 ignore_index=_NO_IGNORE_INDEX, check_labels=False,
                                 backend=_head_patcher.backend)  # fmt: skip


_HEAD_TARGETS = {
    "verl.utils.kernel.linear_cross_entropy": {
        "linear_cross_entropy": (("ctx", "hidden", "weight", "labels", "temperature", "reduction",
                                  "dist_process_group"), _make_linear_cross_entropy),
    },
    "verl.utils.experimental.torch_functional": {
        "FusedLinearForPPOFunction": (("ctx", "hidden_states", "vocab_weights", "input_ids", "temperature",
                                       "chunk_size"), _make_fused_linear_for_ppo),
    },
}  # fmt: skip

