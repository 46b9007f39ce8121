r"""Per-token log-probs (and entropy) of labels under LM logits, fused.

For logits :math:`x \in \mathbb{R}^V` of one token, temperature :math:`T` and
label :math:`y`, with :math:`z = x / T`:

.. math::

    \operatorname{lse} = \log \sum_j e^{z_j}, \qquad
    \log p_y = z_y - \operatorname{lse}, \qquad
    H = -\sum_j p_j \log p_j = \operatorname{lse} - \sum_j p_j z_j .

Gradients, with upstream :math:`g = \partial L / \partial \log p_y` and
:math:`g_H = \partial L / \partial H`:

.. math::

    \frac{\partial L}{\partial x_j} = \frac{1}{T}\Big( g\,(\mathbb{1}[j = y] - p_j)
        - g_H\, p_j\, (z_j - \operatorname{lse} + H) \Big).

Forward streams each row once with an online max / log-sum-exp (Milakov &
Gimelshein, 2018, "Online normalizer calculation for softmax") and keeps only
``lse`` (and ``H``) per token; backward recomputes :math:`p` from the logits
and writes the gradient in one pass, so no ``[N, V]`` temporary exists besides
the gradient itself (none at all with ``inplace_backward=True``).

This is the log-prob gather of PPO/GRPO (``old_log_prob``, ``ref_log_prob``),
of DPO's sequence log-probs, and TRL's ``selective_log_softmax``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.library import triton_op

from rlhf_kernels import _dispatch, native
from rlhf_kernels._checks import check_flags
from rlhf_kernels._layout import row_layout, rows_may_overlap
from rlhf_kernels.reference import logprobs as reference
from rlhf_kernels.reference import preference as reference_preference

try:
    from rlhf_kernels.triton import logprobs as triton_impl
    from rlhf_kernels.triton._common import wrap_triton
except ImportError:  # triton missing: the torch and native backends still work
    triton_impl = None

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32, bfloat16 or float16 (float64 also works,
            for gradcheck). The last dim must have stride 1; other strides are
            used as they are, so ``logits[:, :-1]`` is not copied (only four or
            more leading dims that cannot be merged force a copy).
        labels: integer tensor of shape ``logits.shape[:-1]``.
        mask: optional bool or integer tensor of the same shape; tokens where
            it is 0 are treated like ``ignore_index``.
        temperature: positive divisor of the logits, in ``[1e-30, 1e30]``.
            The kernels keep ``lse`` in the accumulation type (float32 for
            16- and 32-bit logits), so the gradient's absolute error is about
            ``eps * |lse| / T``: negligible at sampling temperatures, but at
            ``T = 1e-3`` with logits of a few units (``|lse|`` in the
            thousands) it reaches 1e-1; the ``"torch"`` backend (or float64
            logits) is the accurate one there.
        ignore_index: label value of tokens that get 0 and no gradient.
        return_entropy: also return the entropy of ``softmax(logits / T)``.
        inplace_backward: write the gradient into ``logits``' own buffer
            (the logits must not be needed afterwards). Ignored by the
            ``"torch"`` backend.
        check_labels: raise if a label of a kept token is outside ``[0, V)``.
            This costs one device synchronisation; with ``False`` (and always
            under ``torch.compile``, which cannot trace the check, while a CUDA
            graph is being captured, where a sync is not allowed, and on the
            meta device) such tokens get NaN instead, never an out-of-bounds read.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.

    Returns:
        ``logprobs`` of shape ``logits.shape[:-1]`` in float32 (float64 for
        float64 logits), or ``(logprobs, entropy)`` with ``return_entropy``.
        Ignored and masked tokens are 0 in both.
    """
    check_flags(return_entropy=return_entropy, inplace_backward=inplace_backward, check_labels=check_labels)
    _check_inputs(logits, labels, mask, temperature, ignore_index, check_labels)
    impl = _dispatch.resolve(backend, logits.device, "token_logprobs_fwd_native")
    if impl == "torch":
        return reference.token_logprobs(
            logits,
            labels,
            mask,
            temperature=float(temperature),
            ignore_index=int(ignore_index),
            return_entropy=return_entropy,
        )
    if row_layout(logits) is None:
        # Four or more leading dims that no stride trick merges: the one layout
        # the kernels cannot address in place.
        logits = logits.contiguous()
    labels = labels.long()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    if inplace_backward and rows_may_overlap(logits):
        # rows that share memory (e.g. an expand) cannot each receive their own gradient in place
        inplace_backward = False
    fwd = _FWD_OPS[impl]
    logprobs, _, entropy = _dispatch.call(
        fwd, logits, labels, float(temperature), int(ignore_index), bool(return_entropy), bool(inplace_backward)
    )
    return (logprobs, entropy) if return_entropy else logprobs


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    average: bool = False,
    check_labels: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Per-sequence sum (or, with ``average``, mean over kept tokens) of token log-probs.

    ``[B, T, V] -> [B]``: :math:`\sum_t \log p(y_t)` over tokens that are not
    ignored or masked (a sequence without such tokens gets 0, also with
    ``average``). This is the DPO input: for a concatenated batch whose first
    half is chosen and second half rejected, ``lp[:B]`` and ``lp[B:]`` are the
    chosen and rejected log-probs. Arguments and backends as
    :func:`token_logprobs`; logits may be ``[B, T, V]`` or ``[B, V]`` (one token
    per sequence), with any strides but the last (``logits[:, :-1]`` is not copied).

    The triton and native kernels reduce over tokens themselves: each program
    owns a chunk of one sequence's tokens and writes one partial sum (and
    kept-token count), and the ``[B, n_chunks]`` partials are summed in a fixed
    order, so no per-token log-probs are written and reruns give the same bits.
    Backward is :math:`\partial L/\partial x_{t,j} = g_b\,(\mathbb{1}[j = y_t] - p_{t,j}) / T`
    (:math:`g_b / n_b` with ``average``) for kept tokens, from the saved
    per-token log-normalisers (``B * T`` floats); with ``inplace_backward`` (kernel
    backends) it is written into the logits' own buffer, as :func:`token_logprobs` does
    (the DPO step's ``[2B, T, V]`` gradient then needs no memory of its own).
    """
    if isinstance(logits, torch.Tensor) and logits.dim() < 2:
        raise ValueError(f"logits: expected shape [B, T, V] (or [B, V]), got {tuple(logits.shape)}")
    check_flags(average=average, check_labels=check_labels, inplace_backward=inplace_backward)
    _check_inputs(logits, labels, mask, temperature, ignore_index, check_labels)
    impl = _dispatch.resolve(backend, logits.device, "sequence_logprobs_fwd_native")
    if impl == "torch":
        return reference_preference.sequence_logprobs(logits, labels, mask, temperature=float(temperature),
                                                      ignore_index=int(ignore_index), average=average)  # fmt: skip
    if row_layout(logits) is None:
        logits = logits.contiguous()
    labels = labels.long()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    if inplace_backward and rows_may_overlap(logits):  # as token_logprobs
        inplace_backward = False
    total, _, _ = _dispatch.call(_SEQ_FWD_OPS[impl], logits, labels, float(temperature), int(ignore_index),
                                 bool(average), bool(inplace_backward))  # fmt: skip
    return total


def _check_inputs(logits, labels, mask, temperature, ignore_index, check_labels) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a tensor, got {type(labels).__name__}")
    if logits.dim() < 1:
        raise ValueError("logits: expected shape [..., V] with at least one dim, got a scalar")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits: dtype {logits.dtype} is not supported; expected float32, bfloat16, float16 or float64"
        )
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits: the vocab (last) dim is empty")
    if vocab > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"logits: the last dim must have stride 1 (got stride {logits.stride(-1)}); other dims may have any stride"
        )
    _check_labels_and_options(labels, mask, tuple(logits.shape[:-1]), vocab, logits.device, "logits",
                              temperature, ignore_index, check_labels)  # fmt: skip


# Temperatures the kernels take: 1 / T and the logits scaled by it stay normal float32 numbers
# (beyond, 1 / T rounds to 0 or inf and the kernels gave NaN).
TEMPERATURE_RANGE = (1e-30, 1e30)


def _as_float(value: numbers.Real) -> float:
    try:
        return float(value)
    except OverflowError:  # an int past float's range, e.g. 10**400
        return math.inf if value > 0 else -math.inf


def _can_sync(device: torch.device) -> bool:
    """Whether the label check may read a value back to the host: not under torch.compile
    (it cannot trace the check), not while work for ``device`` is recorded into a CUDA graph
    (a sync is not allowed there, nor meaningful: replays take new data), and not on the meta
    device (no data; shapes only). Where it may not, out-of-range labels give NaN, as with
    ``check_labels=False``."""
    if torch.compiler.is_compiling() or device.type == "meta":
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_labels_and_options(labels, mask, lead, vocab, device, source, temperature, ignore_index, check_labels):
    """Checks of labels, mask and the scalar options against rows of shape ``lead`` over
    ``vocab`` words; ``source`` names the tensor that fixed ``lead`` (logits or hidden)."""
    if labels.dtype not in _INT_DTYPES:
        raise TypeError(f"labels: expected an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels: expected shape {lead} ({source}.shape[:-1]), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: on device {labels.device}, but {source} are on {device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype not in _INT_DTYPES:
            raise TypeError(f"mask: expected a bool or integer tensor, got dtype {mask.dtype}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask: expected shape {lead} ({source}.shape[:-1]), got {tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask: on device {mask.device}, but {source} are on {device}")
    if type(temperature) is not float and type(temperature) is not int and (  # (an ABC check is slow)
        isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
    ):
        raise TypeError(f"temperature: expected a number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(_as_float(temperature))):
        raise ValueError(f"temperature: must be positive and finite, got {temperature}")
    if not TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]:  # the kernels scale by 1 / T in float32
        raise ValueError(f"temperature: must be in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}] (the kernels "
                         f"scale the logits by 1 / temperature in float32), got {temperature}")  # fmt: skip
    if type(ignore_index) is not int and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: must fit in int64, got {ignore_index}")
    if check_labels and labels.numel() > 0 and _can_sync(device):
        kept = reference.kept_labels(labels, ignore_index)
        if mask is not None:
            kept &= mask.bool()
        wide = labels.long()  # (compared in int64: a narrow dtype would wrap the bound, uint8 256 to 0)
        bad = kept & ((wide < 0) | (wide >= vocab))
        if bool(bad.any()):  # the one device sync that check_labels=False avoids
            value = int(labels[bad].flatten()[0])
            raise ValueError(
                f"labels: value {value} is outside [0, {vocab}) and is not ignore_index={ignore_index} "
                "(pass check_labels=False to skip this check; such tokens then get NaN)"
            )


# --- torch.library registration ---------------------------------------------
# Each kernel backend exposes three ops: forward -> (logprobs, lse, entropy),
# backward -> grad_logits, and an in-place backward that writes into logits.
# Autograd is registered on the forward op, so torch.compile sees one
# differentiable op per backend.


def _fake_fwd(logits, labels, temperature, ignore_index, return_entropy, inplace_backward):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lead = logits.shape[:-1]
    entropy_shape = lead if return_entropy else (0,)
    return (
        logits.new_empty(lead, dtype=acc),
        logits.new_empty(lead, dtype=acc),
        logits.new_empty(entropy_shape, dtype=acc),
    )


def _fake_bwd(grad_logprobs, grad_entropy, logits, labels, lse, entropy, temperature, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _fake_bwd_inplace(logits, grad_logprobs, grad_entropy, labels, lse, entropy, temperature, ignore_index):
    return None


if triton_impl is not None:

    @triton_op("rlhf_kernels::token_logprobs_fwd_triton", mutates_args=())
    def _fwd_triton(
        logits: torch.Tensor,
        labels: torch.Tensor,
        temperature: float,
        ignore_index: int,
        return_entropy: bool,
        inplace_backward: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_impl.logprobs_fwd(logits, labels, temperature, ignore_index, return_entropy, launch=wrap_triton)

    @triton_op("rlhf_kernels::token_logprobs_bwd_triton", mutates_args=())
    def _bwd_triton(
        grad_logprobs: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        logits: torch.Tensor,
        labels: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        temperature: float,
        ignore_index: int,
    ) -> torch.Tensor:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        triton_impl.logprobs_bwd(
            grad_logprobs, grad_entropy, logits, grad, labels, lse, entropy, temperature, ignore_index, wrap_triton
        )
        return grad

    @triton_op("rlhf_kernels::token_logprobs_bwd_inplace_triton", mutates_args=("logits",))
    def _bwd_inplace_triton(
        logits: torch.Tensor,
        grad_logprobs: torch.Tensor,
        grad_entropy: torch.Tensor | None,
        labels: torch.Tensor,
        lse: torch.Tensor,
        entropy: torch.Tensor,
        temperature: float,
        ignore_index: int,
    ) -> None:
        triton_impl.logprobs_bwd(
            grad_logprobs, grad_entropy, logits, logits, labels, lse, entropy, temperature, ignore_index, wrap_triton
        )

    _fwd_triton.register_fake(_fake_fwd)
    _bwd_triton.register_fake(_fake_bwd)
    _bwd_inplace_triton.register_fake(_fake_bwd_inplace)

if native.available():
    torch.library.register_fake("rlhf_kernels::token_logprobs_fwd_native")(_fake_fwd)
    torch.library.register_fake("rlhf_kernels::token_logprobs_bwd_native")(_fake_bwd)
    torch.library.register_fake("rlhf_kernels::token_logprobs_bwd_inplace_native")(_fake_bwd_inplace)

_OPS = _dispatch.kernel_ops("token_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_inplace")
_FWD_OPS = {name: ops[0] for name, ops in _OPS.items()}


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, return_entropy, inplace_backward = inputs
    _, lse, entropy = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse)


def _logits_grad(bwd, bwd_inplace, inplace, logits, grad_logprobs, grad_entropy, *rest):
    """The logits' gradient from a backend's token backward op (``rest``: labels, lse,
    entropy, temperature, ignore_index): written over ``logits`` with ``inplace``, else fresh."""
    if not inplace:
        return _dispatch.call_below_autograd(bwd, grad_logprobs, grad_entropy, logits, *rest)
    bwd_inplace(logits, grad_logprobs, grad_entropy, *rest)
    # The C++ op is registered for CPU/CUDA only, so nothing bumps the version counter for
    # it: do it here so that autograd's check for tensors saved by other ops and modified in
    # place fires, as it does for the Triton op.
    torch.autograd.graph.increment_version(logits)
    return logits


def _make_backward(bwd, bwd_inplace):
    def backward(ctx, grad_logprobs, grad_lse, grad_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if not ctx.return_entropy:
            grad_entropy = None
        grad_logits = _logits_grad(bwd, bwd_inplace, ctx.inplace_backward, logits, grad_logprobs, grad_entropy,
                                   labels, lse, entropy, ctx.temperature, ctx.ignore_index)  # fmt: skip
        return grad_logits, None, None, None, None, None

    return backward


for _fwd, _bwd, _bwd_inplace in _OPS.values():
    _dispatch.register_autograd(_fwd, _make_backward(_bwd, _bwd_inplace), setup_context=_setup_context)


# --- sequence_logprobs ---------------------------------------------------------
# Forward op per kernel backend -> (sequence_logprobs [B], kept counts [B], lse);
# its backward broadcasts the per-sequence gradient to the tokens and runs the
# same backend's token backward op.


def _fake_seq_fwd(logits, labels, temperature, ignore_index, average, inplace_backward):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch = logits.shape[:1]
    return (
        logits.new_empty(batch, dtype=acc),
        logits.new_empty(batch, dtype=acc),
        logits.new_empty(logits.shape[:-1], dtype=acc),
    )


if triton_impl is not None:

    @triton_op("rlhf_kernels::sequence_logprobs_fwd_triton", mutates_args=())
    def _seq_fwd_triton(
        logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, average: bool,
        inplace_backward: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        return triton_impl.sequence_logprobs_fwd(logits, labels, temperature, ignore_index, average, launch=wrap_triton)

    _seq_fwd_triton.register_fake(_fake_seq_fwd)

if native.available() and hasattr(torch.ops.rlhf_kernels, "sequence_logprobs_fwd_native"):
    torch.library.register_fake("rlhf_kernels::sequence_logprobs_fwd_native")(_fake_seq_fwd)

_SEQ_OPS = _dispatch.kernel_ops("sequence_logprobs_fwd", "token_logprobs_bwd", "token_logprobs_bwd_inplace")
_SEQ_FWD_OPS = {name: ops[0] for name, ops in _SEQ_OPS.items()}


def _seq_setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, average, inplace_backward = inputs
    _, n_valid, lse = output
    ctx.save_for_backward(logits, labels, lse, n_valid)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.average = average
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(n_valid, lse)


def _make_seq_backward(bwd, bwd_inplace):
    def backward(ctx, grad_seq, _grad_n_valid, _grad_lse):
        logits, labels, lse, n_valid = ctx.saved_tensors
        if grad_seq is None:
            grad_seq = torch.zeros_like(n_valid)
        g = grad_seq.to(lse.dtype)
        if ctx.average:
            g = g / n_valid.clamp(min=1)
        # Each token of sequence b gets g_b: a [B, T] float tensor, the token backward's input.
        g_tok = g.reshape((-1,) + (1,) * (lse.dim() - 1)).expand(lse.shape).contiguous()
        grad_logits = _logits_grad(bwd, bwd_inplace, ctx.inplace_backward, logits, g_tok, None, labels, lse,
                                   lse.new_empty(0), ctx.temperature, ctx.ignore_index)  # fmt: skip
        return grad_logits, None, None, None, None, None

    return backward


for _fwd, _tok_bwd, _tok_bwd_inplace in _SEQ_OPS.values():
    _dispatch.register_autograd(_fwd, _make_seq_backward(_tok_bwd, _tok_bwd_inplace), setup_context=_seq_setup_context)
