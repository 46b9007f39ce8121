"""Drop-in for TRL users: route TRL's per-token log-prob and entropy helpers through the fused ops.

>>> from rlhf_kernels.integrations import trl as rk_trl
>>> rk_trl.patch()      # before or after building the TRL trainer
>>> ...                 # trainer.train()
>>> rk_trl.unpatch()    # restores TRL's own functions everywhere

What is replaced (``trl.trainer.utils`` and every ``trl.*`` module that holds a
``from ... import`` copy, including modules imported after :func:`patch`):

- ``selective_log_softmax(logits, index, temperature=1.0, row_mask=None)``
  -> :func:`rlhf_kernels.token_logprobs`;
- ``entropy_from_logits(logits, chunk_size=128)`` -> ``token_logprobs(...,
  return_entropy=True)`` (``chunk_size`` is a memory knob of TRL's loop; the
  op streams each row and has no ``[N, V]`` temporary, so it is not needed);
- ``selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
  temperature=1.0, row_mask=None)`` -> one ``token_logprobs`` pass for both.

The replacements return what TRL's functions return at every position: TRL's
helpers have no ignore index (padding labels are masked by the caller later),
so the op gets an ignore index no label can take, and labels outside
``[0, V)`` raise (TRL's ``gather`` raises too). The output dtype is TRL's:
float32 where TRL would use its own Triton kernel (CUDA), the logits' dtype
otherwise; the op itself accumulates in float32 either way. Calls the op does
not cover (top-K ``index`` of shape ``[..., K]``, logits whose last dim is not
contiguous, a temperature tensor, a row mask that only broadcasts, 1-D logits) go to
TRL's original function. One difference is kept: a row with ``-inf`` logits gets a finite
entropy (TRL's ``p * logits`` gives NaN there; telling the rows apart would cost a device sync).

Which TRL trainers this reaches: in trl 1.16 ``DPOTrainer``, ``GRPOTrainer``,
``RLOOTrainer`` and ``KTOTrainer`` score tokens with TRL's fused LM head
(``add_fused_lm_head``: hidden states times the LM head in tiles, no logits
tensor), which does not go through these helpers. The helpers' patch reaches
the trainers that compute logits and then call the helpers (in trl 1.16 the
experimental ORPO, CPO, TPO, SDPO, SDFT and A2PO trainers) and any user code
that calls them.

``patch(fused_lm_head=True)`` also routes the fused LM head through
:func:`rlhf_kernels.linear_token_logprobs` (TRL's ``ChunkedLogProbFunction``,
wherever ``trl`` holds it, is replaced by a subclass whose ``apply`` takes the
op): the same chunked scheme (logits a chunk at a time, recomputed in backward),
on this package's kernels. It covers the heads' usual calls: log-probs, and
entropy when asked (``outputs`` within ``("log_probs", "entropy")``), no final
logit soft-capping, a logit scale of 1, positive real-number temperatures, LM heads
that are not DeepSpeed ZeRO-3 partitions (TRL's backward gathers those again; the
op's does not), on a device with a kernel backend (elsewhere the op would build the
logits); the rest go to TRL's function. Outputs are float32 as TRL's. Under
``torch.compile`` the replacement is reached only where TRL's ``forward`` breaks the
graph (as trl 1.16's does): dynamo traces an ``autograd.Function``'s ``forward``,
not an ``apply`` that overrides it. Off by
default: on this repository's CPU the op took 239.5 ms and 94 MiB against TRL's
527.9 ms and 549 MiB (512 x 256 -> 32000 fp32, fwd+bwd, ``bench-cpu-20261127-133448``);
on a GPU the two have not yet been timed side by side (``rlhf-kernels bench --op
linear_logprobs`` does).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import warnings

import torch

from rlhf_kernels.integrations import _patching
from rlhf_kernels.ops.logprobs import FLOAT_DTYPES, token_logprobs

#: The trl releases whose helpers these replacements were checked against.
TESTED_TRL_VERSIONS = ("1.16",)

#: Helper name -> the parameters (in order) the replacement implements.
HELPERS = {
    "selective_log_softmax": ("logits", "index", "temperature", "row_mask"),
    "entropy_from_logits": ("logits", "chunk_size"),
    "selective_log_softmax_and_entropy": ("logits", "index", "entropy_requires_grad", "temperature", "row_mask"),
}

# No label can take this value: every label outside [0, V) raises, as in TRL's gather.
_NO_IGNORE_INDEX = -(2**63)


def _build():
    utils = _trl_utils()
    originals = {name: getattr(utils, name) for name in HELPERS}
    replacements = dict(
        selective_log_softmax=_make_selective_log_softmax(originals["selective_log_softmax"], utils),
        entropy_from_logits=_make_entropy_from_logits(originals["entropy_from_logits"], utils),
        selective_log_softmax_and_entropy=_make_logprobs_and_entropy(
            originals["selective_log_softmax_and_entropy"], utils
        ),
    )
    return originals, replacements


_patcher = _patching.Patcher("trl", _build)


def _build_head():
    utils = _trl_utils()
    original = getattr(utils, _HEAD, None)
    if original is None or not hasattr(original, "apply"):
        raise RuntimeError(f"rlhf_kernels.integrations.trl: trl.trainer.utils has no {_HEAD} to patch "
                           f"(fused_lm_head=True was written for trl {', '.join(TESTED_TRL_VERSIONS)})")  # fmt: skip
    _patching.check_params("trl", _HEAD + ".forward", original.forward, _HEAD_PARAMS, exact=True)
    return {_HEAD: original}, {_HEAD: _make_fused_head(original)}


_head_patcher = _patching.Patcher("trl", _build_head)


_patches = _patching.WithHead(_patcher, _head_patcher)

# patch(backend="auto", *, fused_lm_head=False) -> locations patched; unpatch() -> locations
# restored; is_patched(); is_head_patched(); ``with patched(backend, fused_lm_head=...): ...``
# (see _patching.WithHead)
patch = _patches.patch
unpatch = _patches.unpatch
is_patched = _patcher.is_patched
is_head_patched = _patches.is_head_patched
patched = _patches.patched


# --- version check ---------------------------------------------------------------------------
def _trl_utils():
    try:
        import trl
    except ImportError as exc:
        raise ImportError("rlhf_kernels.integrations.trl: trl is not installed (pip install trl)") from exc
    version = getattr(trl, "__version__", "unknown")
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except ImportError as exc:
        raise RuntimeError(
            f"rlhf_kernels.integrations.trl: trl {version} has no importable trl.trainer.utils ({exc}); "
            f"the patch was written for trl {', '.join(TESTED_TRL_VERSIONS)}"
        ) from exc
    problems = []
    for name, params in HELPERS.items():
        fn = getattr(utils, name, None)
        if fn is None:
            problems.append(f"{name} is missing")
            continue
        found = tuple(inspect.signature(fn).parameters)
        if found != params:
            problems.append(f"{name}{_sig(found)} differs from the expected {name}{_sig(params)}")
    if problems:
        raise RuntimeError(
            f"rlhf_kernels.integrations.trl: cannot patch trl {version}: " + "; ".join(problems)
            + f". The patch was written for trl {', '.join(TESTED_TRL_VERSIONS)}; nothing was changed."
        )  # fmt: skip
    if not version.startswith(tuple(v + "." for v in TESTED_TRL_VERSIONS)):
        warnings.warn(
            f"rlhf_kernels.integrations.trl: trl {version} is not one of the tested releases "
            f"({', '.join(TESTED_TRL_VERSIONS)}); its helpers have the expected signatures, so patching anyway",
            stacklevel=3,
        )
    return utils


def _sig(params) -> str:
    return "(" + ", ".join(params) + ")"


# --- the replacements ------------------------------------------------------------------------
def _trl_would_use_its_kernel(utils, logits, index=None, row_mask=None) -> bool:
    """Whether TRL's own function would take its Triton path (float32 outputs)."""
    supports = getattr(utils, "_supports_trl_loss_kernel", None)
    available = getattr(utils, "is_triton_available", None)
    return bool(supports and available and available() and supports(logits, index, row_mask))


def _covered(logits, index=None, temperature=1.0, row_mask=None) -> bool:
    """Calls the op computes exactly as TRL does; the rest go to TRL's function: a temperature
    that is not a plain number (a tensor), a row mask that only broadcasts."""
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.dtype not in FLOAT_DTYPES:
        return False  # (TRL's helpers read 1-D logits as rows of one logit)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        return False
    if index is not None and (not isinstance(index, torch.Tensor) or tuple(index.shape) != tuple(logits.shape[:-1])):
        return False  # top-K gathers ([..., K] index) stay with TRL
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        return False
    return row_mask is None or (isinstance(row_mask, torch.Tensor) and row_mask.shape == logits.shape[:-1])


def _mask(row_mask):
    """TRL takes any 0/1 row mask; the op takes bool or integer masks (nonzero: kept)."""
    if isinstance(row_mask, torch.Tensor) and row_mask.dtype.is_floating_point:
        return row_mask != 0
    return row_mask


def _make_selective_log_softmax(original, utils):
    @functools.wraps(original)
    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if not _covered(logits, index, temperature, row_mask):
            return original(logits, index, temperature=temperature, row_mask=row_mask)
        out_dtype = torch.float32 if _trl_would_use_its_kernel(utils, logits, index, row_mask) else logits.dtype
        logprobs = token_logprobs(logits, index, _mask(row_mask), temperature=temperature,
                                  ignore_index=_NO_IGNORE_INDEX, backend=_patcher.backend)  # fmt: skip
        return logprobs.to(out_dtype)

    selective_log_softmax.__rlhf_kernels_original__ = original
    return selective_log_softmax


def _make_entropy_from_logits(original, utils):
    @functools.wraps(original)
    def entropy_from_logits(logits, chunk_size=128):
        if not _covered(logits):
            return original(logits, chunk_size=chunk_size)
        out_dtype = torch.float32 if _trl_would_use_its_kernel(utils, logits) else logits.dtype
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        _, entropy = token_logprobs(logits, labels, return_entropy=True, check_labels=False, backend=_patcher.backend)
        return entropy.to(out_dtype)

    entropy_from_logits.__rlhf_kernels_original__ = original
    return entropy_from_logits


def _make_logprobs_and_entropy(original, utils):
    @functools.wraps(original)
    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if not _covered(logits, index, temperature, row_mask):
            return original(logits, index, entropy_requires_grad=entropy_requires_grad, temperature=temperature,
                            row_mask=row_mask)  # fmt: skip
        out_dtype = torch.float32 if _trl_would_use_its_kernel(utils, logits, index, row_mask) else logits.dtype
        logprobs, entropy = token_logprobs(
            logits, index, _mask(row_mask), temperature=temperature, ignore_index=_NO_IGNORE_INDEX, return_entropy=True,
            backend=_patcher.backend,
        )  # fmt: skip
        if not entropy_requires_grad:
            entropy = entropy.detach()
        return logprobs.to(out_dtype), entropy.to(out_dtype)

    selective_log_softmax_and_entropy.__rlhf_kernels_original__ = original
    return selective_log_softmax_and_entropy


# --- the fused LM head (patch(fused_lm_head=True)) --------------------------------------------
_HEAD = "_ChunkedLogProbFunction"  # trl.trainer.utils' name for trl.kernels.ChunkedLogProbFunction
_HEAD_PARAMS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                "logit_scale", "outputs")  # fmt: skip
_HEAD_OUTPUTS = ("log_probs", "entropy")  # what linear_token_logprobs computes


def _head_covered(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale, outputs) -> bool:
    """The fused head's calls the op computes as TRL does (the rest go to TRL's function)."""
    if final_logit_softcapping is not None or isinstance(logit_scale, bool):
        return False
    if not isinstance(logit_scale, numbers.Real) or logit_scale != 1.0 or not set(outputs) <= set(_HEAD_OUTPUTS):
        return False
    if not isinstance(hidden, torch.Tensor):
        return False
    return hidden.dim() == 2 and _patching.head_covered(hidden, weight, bias, targets, temperature,
                                                        _head_patcher.backend)  # fmt: skip


def _make_fused_head(original):
    """A subclass of TRL's ChunkedLogProbFunction whose ``apply`` runs linear_token_logprobs on
    the calls it covers (:func:`_head_covered`) and TRL's own apply on the rest."""

    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):  # fmt: skip
        if not _head_covered(hidden, weight, bias, targets, temperature, final_logit_softcapping, logit_scale,
                             outputs):  # fmt: skip
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)  # fmt: skip
        from rlhf_kernels.ops.linear import linear_token_logprobs

        want_entropy = "entropy" in outputs
        # TRL's fused forward passes the valid positions' labels (or all labels clamped at 0):
        # every one in range, so no device sync to check them, and no ignore index (a label
        # outside [0, V), -100 included, gives NaN)
        out = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                    ignore_index=_NO_IGNORE_INDEX, return_entropy=want_entropy, check_labels=False,
                                    backend=_head_patcher.backend)  # fmt: skip
        logprobs, entropy = out if want_entropy else (out, None)
        # float32 as TRL's (its running statistics are float32 whatever the inputs)
        return logprobs.float(), None if entropy is None else entropy.float(), None, None, None

    return _patching.with_apply(original, apply)

