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

Each replacement binds its arguments to the installed function's own signature and hands
every call it does not cover to OpenRLHF with the same arguments: an estimator name it
does not know, the older ``action_mask`` argument of the KL when set (the older
``use_kl_estimator_k3`` flag is read: k3 or k1), a KL value at +-10 or beyond where the
installed release's clamping is not known (releases differ on clamping there; the patch
asks ``compute_approx_kl`` once, estimator by estimator, and then clamps as it does
without looking at the values), masks with weights other than 0 and 1, gamma
or lambd outside [0, 1] or not scalars, arguments of newer releases that are not at their
defaults, shapes that only broadcast. The experience maker must be importable when
:func:`patch` first runs (a warning says when it is not). The policy and value loss
modules (``PolicyLoss``, ``ValueLoss``) are left alone: their arguments and return values
changed between releases.

OpenRLHF is not a dependency: nothing here imports it until :func:`patch`.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from rlhf_kernels.integrations import _patching
from rlhf_kernels.ops.logprobs import FLOAT_DTYPES, token_logprobs
from rlhf_kernels.ops.ppo import gae, kl_penalty

UTILS = "openrlhf.models.utils"
EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"

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


#: utils function -> (the leading parameters the replacement reads, its factory).
_FUNCTIONS = {
    "compute_approx_kl": (("log_probs", "log_probs_base"), _make_kl),
    "log_probs_from_logits": (("logits", "labels"), _make_logprobs),
}
