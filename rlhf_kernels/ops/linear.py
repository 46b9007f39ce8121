r"""Per-token log-probs straight from hidden states and the LM head, never holding ``[N, V]`` logits.

For hidden states :math:`h_t \in \mathbb{R}^H`, the LM head :math:`W \in
\mathbb{R}^{V \times H}` (and optional bias :math:`b`), temperature :math:`T` and label
:math:`y_t`:

.. math::

    x_t = W h_t + b, \qquad \log p_t = \operatorname{log\,softmax}(x_t / T)_{y_t},
    \qquad H_t = \text{entropy of } \operatorname{softmax}(x_t / T).

With :math:`G_t = \partial L / \partial x_t` from :func:`token_logprobs`' backward
(:math:`G_t = g_t(\mathbb{1}_{y_t} - p_t)/T - g_{H,t}\, p_t \odot (z_t - \operatorname{lse}_t + H_t)/T`):

.. math::

    \frac{\partial L}{\partial h_t} = W^\top G_t, \qquad
    \frac{\partial L}{\partial W} = \sum_t G_t h_t^\top, \qquad
    \frac{\partial L}{\partial b} = \sum_t G_t .

The tokens are processed in chunks of ``chunk_size`` rows. Forward computes one
chunk's logits with a matmul, runs the log-prob kernel over it (keeping one
log-normaliser, and one entropy, per token) and drops the logits. Backward
recomputes the logits piece by piece, overwrites each piece in place with
:math:`G` (the log-prob kernel's in-place backward: with the saved
log-normalisers and entropies, :math:`G` needs nothing from outside the piece)
and multiplies :math:`G` into the hidden state and weight gradients. The pieces
are token chunks (all V words for ``chunk_size`` tokens) or, when there are
fewer tokens than words, vocab slices (all N tokens for about ``chunk_size * V
/ N`` words; forward then walks the same slices, so that the recomputed logits
are its own bit for bit): a token chunk finishes its rows of the hidden-state gradient but
adds into all of the ``[V, H]`` weight gradient, a vocab slice finishes its rows
of the weight gradient but adds into all of the ``[N, H]`` hidden-state
gradient, and the cut that accumulates the smaller one moves less memory (see
``_by_vocab``). So at most about ``chunk_size x V`` logits exist at a time, in
the matmul's dtype: the ``[N, V]`` logits, their float32 log-softmax and their
gradient are never materialised. The price is one more
``N x V x H`` matmul (the recomputation), the trade made by Apple's Cut
Cross-Entropy (Wijmans et al., 2024) and Liger-Kernel's fused linear cross
entropy (Hsu et al., 2024); unlike a cross-entropy loss, the output here is the
per-token log-prob (and entropy), so any loss built on it (DPO, PPO, GRPO, KL
to a reference) gets the same memory profile.

The matmuls run in the inputs' dtype, or in autocast's where autocast is on (as
``F.linear`` would), with the forward's choice reused by the recomputation in
backward. For bfloat16 / float16 matmuls the accumulated gradient (the weight's over
token chunks, the hidden states' over vocab slices) is summed in float32 (a float32
buffer of its shape while it is built; on CUDA each piece's product is added in place
by ``addmm(out_dtype=float32)``, elsewhere rounded once to 16 bits first) and returned
in its input's dtype; the other is one product per piece.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import torch

from rlhf_kernels import _dispatch
from rlhf_kernels._checks import check_flags
from rlhf_kernels.ops import logprobs as logprobs_ops
from rlhf_kernels.ops import ppo as ppo_ops
from rlhf_kernels.reference import logprobs as reference

DEFAULT_CHUNK_BYTES = 256 << 20  # one chunk's logits: 256 MiB (1024 tokens of a 128256-word vocab in bf16)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    check_labels: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[..., H]`` hidden states (the LM's last layer, after its final
            norm) in float32, bfloat16, float16 or float64; any strides.
        weight: ``[V, H]`` LM head weight (``lm_head.weight``), same dtype and device.
        labels: integer tensor of shape ``hidden.shape[:-1]``.
        mask: optional bool or integer tensor of that shape; 0 means ignored.
        bias: optional ``[V]`` LM head bias.
        temperature, ignore_index, check_labels: as :func:`token_logprobs`.
        return_entropy: also return each token's entropy.
        chunk_size: tokens per chunk (default: as many as keep one chunk's
            logits near 256 MiB). Peak extra memory is about ``chunk_size * V``
            elements in the matmul dtype (backward's vocab slices hold as many),
            plus in backward a float32 accumulator for the 16-bit weight gradient
            (``[V, H]``, token chunks) or hidden-state gradient (``[N, H]``, vocab
            slices: ``N < V``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``: the
            log-prob kernel used on each chunk. ``"torch"`` is the unchunked
            composition (``hidden @ weight.T``, then the float64-capable reference),
            the oracle the tests compare against.

    Returns:
        ``logprobs`` of shape ``hidden.shape[:-1]`` (float32; float64 for float64
        inputs), or ``(logprobs, entropy)``. Ignored and masked tokens get 0 and
        no gradient. Gradients flow to ``hidden``, ``weight`` and ``bias``
        (whichever require them).
    """
    check_flags(return_entropy=return_entropy, check_labels=check_labels)
    _check_inputs(hidden, weight, bias, labels, chunk_size)
    vocab = weight.shape[0]
    lead = hidden.shape[:-1]
    logprobs_ops._check_labels_and_options(labels, mask, tuple(lead), vocab, hidden.device, "hidden", temperature,
                                           ignore_index, check_labels)  # fmt: skip
    impl = _dispatch.resolve(backend, hidden.device, "token_logprobs_fwd_native")
    if impl == "torch":
        _warn_unfused(backend)
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return reference.token_logprobs(logits, labels, mask, temperature=float(temperature),
                                         ignore_index=int(ignore_index), return_entropy=return_entropy)  # fmt: skip
    labels = labels.long()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, ignore_index)
    n_rows = labels.numel()
    dtype = _compute_dtype(hidden)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (vocab * dtype.itemsize))
    logprobs, entropy = _LinearLogprobs.apply(
        hidden.reshape(n_rows, hidden.shape[-1]), weight, bias, labels.reshape(n_rows).contiguous(), float(temperature),
        int(ignore_index), bool(return_entropy), int(chunk_size), impl, dtype, torch.is_grad_enabled(),
    )  # fmt: skip
    logprobs = logprobs.reshape(lead)
    return (logprobs, entropy.reshape(lead)) if return_entropy else logprobs


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
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
    chunk_size: int | None = None,
    importance_sampling_level: str = "token",
    backend: str = "auto",
) -> tuple[torch.Tensor, ppo_ops.PPOLossMetrics]:
    r"""The PPO policy step of :func:`ppo_loss_from_logits` from hidden states and the LM head.

    Same loss, options and metrics, with ``logits = hidden @ weight.T + bias`` never
    held: ``hidden`` is ``[B, T, H]``, ``weight`` ``[V, H]``. The loss is a scalar, so its
    gradient with respect to each chunk's logits is known in the same sweep that
    computes them (the fused PPO kernel writes it over the chunk's logits), and is
    multiplied into the hidden, weight and bias gradients right away: three matmuls in
    all, no recomputation, at most one chunk of ``chunk_size x V`` logits alive. The
    gradients (``[B, T, H]``, ``[V, H]``) are held from forward to backward, which only
    scales them by the upstream gradient (on the device, skipped when it is 1); so
    backward runs once. Liger-Kernel's fused linear GRPO loss works the same way.

    float16 inputs that need a gradient, ``importance_sampling_level="sequence"`` (GSPO), the
    ``"torch"`` backend and calls traced by
    ``torch.compile`` take the two-pass route instead: :func:`linear_token_logprobs` (log-probs and entropy, chunked and
    recomputed in backward) and the O(B T) loss ops, as ``grad_in_forward=False`` does
    for logits; ``ref_logprobs`` may then require grad. Autocast as in
    :func:`linear_token_logprobs`.
    """
    check_flags(check_labels=check_labels)
    _check_inputs(hidden, weight, bias, labels, chunk_size)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [B, T, H], got {tuple(hidden.shape)}")
    lead, vocab = tuple(hidden.shape[:2]), weight.shape[0]
    low, high = ppo_ops._check_step_args(hidden, "hidden states", old_logprobs, advantages, mask, ref_logprobs,
                                         kl_coef, entropy_coef, kl_kind, loss_agg_mode, clip_ratio, clip_ratio_low,
                                         clip_ratio_high, clip_ratio_c)  # fmt: skip
    ppo_ops._check_is_level(importance_sampling_level)
    valid = ppo_ops._valid_tokens(mask, labels, ignore_index)
    logprobs_ops._check_labels_and_options(labels, valid, lead, vocab, hidden.device, "hidden", temperature,
                                           ignore_index, check_labels)  # fmt: skip
    dtype = _compute_dtype(hidden)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    impl = _dispatch.resolve(backend, hidden.device, "ppo_logits_fused_native")
    if impl == "torch":
        _warn_unfused(backend)
    # The two-pass route also under torch.compile: traced by dynamo on torch 2.11 (the lent GPU
    # machines' version), the fused-in-forward Function below gave zero gradients; the two-pass
    # route traces correctly there and on 2.14.
    two_pass = importance_sampling_level == "sequence" or (dtype == torch.float16 and need_grad)
    if impl == "torch" or two_pass or torch.compiler.is_compiling():
        logprobs, entropy = linear_token_logprobs(
            hidden, weight, labels, valid, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=True, chunk_size=chunk_size, check_labels=False, backend=backend,
        )  # fmt: skip
        return ppo_ops._loss_from_logprobs(logprobs, entropy, old_logprobs, advantages, valid, ref_logprobs,
                                           clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c, kl_kind,
                                           kl_coef, entropy_coef, loss_agg_mode, backend,
                                           importance_sampling_level)  # fmt: skip
    if ref_logprobs is not None and ref_logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError("ref_logprobs: requires grad, but the fused step computes only the policy's gradients; "
                         "detach it")  # fmt: skip
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    *inputs, weights, n_valid = ppo_ops._fused_inputs(labels, valid, old_logprobs, advantages, ref_logprobs,
                                                      loss_agg_mode, int(ignore_index), acc)  # fmt: skip
    args = (*inputs, weights) + ppo_ops._fused_consts(float(temperature), int(ignore_index), low, high, clip_ratio_c,
                                                      kl_kind, float(kl_coef), float(entropy_coef))  # fmt: skip
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (vocab * dtype.itemsize))
    n_rows = labels.numel()
    loss, stats = _LinearPPO.apply(hidden.reshape(n_rows, hidden.shape[-1]), weight, bias, impl, dtype,
                                   int(chunk_size), need_grad, args)  # fmt: skip
    return loss, ppo_ops._fused_metrics(loss, stats, weights, n_valid, ref_logprobs is not None, loss_agg_mode)


class _LinearPPO(torch.autograd.Function):
    """Chunked matmul + fused PPO sweep; the gradients are finished in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, impl, dtype, chunk_size, need_grad, args):
        fwd, fwd_inplace = ppo_ops._FUSED_OPS[impl]
        labels, old, adv, ref, weights, *scalars = args
        need_hidden, need_weight, need_bias = (need_grad and n for n in ctx.needs_input_grad[:3])
        w, b = _cast_head(weight, bias, dtype)
        hidden_parts = [] if need_hidden else None
        grad_weight = _weight_grad_buffer(w, weight, hidden.shape[0], chunk_size) if need_weight else None
        grad_bias = torch.zeros(w.shape[0], dtype=weights.dtype, device=w.device) if need_bias else None
        loss = torch.zeros((), dtype=weights.dtype, device=hidden.device)
        stats = []
        for rows, h, logits in _chunk_logits(hidden, w, b, dtype, chunk_size):
            chunk = (labels[rows], old[rows], adv[rows], None if ref is None else ref[rows], weights[rows])
            if need_grad:
                part, st = fwd_inplace(logits, *chunk, *scalars)  # logits now hold dL/dlogits
                _backprop_chunk(logits, h, w, hidden_parts, grad_weight, grad_bias)
            else:
                part, st, _ = fwd(logits, *chunk, *scalars, False)
            loss += part
            stats.append(st)
            del logits
        stats = torch.cat(stats) if stats else weights.new_zeros((0, 7))
        grad_hidden = _cat_rows(hidden_parts, hidden, dtype)
        # held until backward in the inputs' dtypes: the float32 weight accumulator is not kept
        grads = [None if g is None else g.to(t.dtype)
                 for g, t in zip((grad_hidden, grad_weight, grad_bias), (hidden, weight, bias), strict=True)]
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.consumed = False
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    @_dispatch.first_order("linear_ppo_loss", once_differentiable=True)
    def backward(ctx, grad_loss, _grad_stats):
        if ctx.consumed:
            raise RuntimeError("linear_ppo_loss: backward ran twice (its gradients were consumed in the first)")
        ctx.consumed = True
        if grad_loss is None:
            return (None,) * 8
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if has else None for has in ctx.has_grad]
        # the upstream scalar stays float32 (not rounded to a 16-bit gradient's dtype; float64 stays float64)
        scale = grad_loss.reshape(1).to(torch.float64 if grad_loss.dtype == torch.float64 else torch.float32)
        out = [None if grad is None else ppo_ops._scale_unless_one(grad, scale) for grad in grads]
        return (*out, None, None, None, None, None)


def _cast_head(weight, bias, dtype):
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _chunk_logits(hidden, w, b, dtype, chunk_size):
    """Yields ``(rows, h, logits)`` chunk by chunk: ``h = hidden[rows]`` in ``dtype`` and
    ``h @ w.T + b`` (``w``, ``b`` already in ``dtype``), with autocast off, so that every
    pass over the chunks makes the same logits."""
    n_rows = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(n_rows, start + chunk_size))
            h = hidden[rows].to(dtype)
            yield rows, h, torch.nn.functional.linear(h, w, b)


def _cat_rows(parts, hidden, dtype):
    """The hidden states' gradient from its chunks (None when it is not wanted)."""
    if parts is None:
        return None
    return torch.cat(parts) if parts else hidden.new_zeros(hidden.shape, dtype=dtype)


def _grad_accumulator(w: torch.Tensor, single: bool = False) -> torch.Tensor:
    """An accumulated gradient's buffer (the weight's over token chunks, the hidden states' over
    vocab slices): float32 for 16-bit matmuls, so that its rounding does not grow with the number
    of pieces (a 16-bit sum rounded per chunk did); in ``w``'s dtype when there is a ``single``
    piece and the gradient is returned in that dtype (its one product, accumulated in float32
    by the matmul, is rounded once either way)."""
    wide = w.dtype in (torch.bfloat16, torch.float16) and not single
    return torch.zeros(w.shape, dtype=torch.float32 if wide else w.dtype, device=w.device)


def _weight_grad_buffer(w, weight, n_rows, chunk_size):
    """The weight gradient's buffer over token chunks: :func:`_grad_accumulator` of the matmul
    weight ``w``, single when one chunk holds every row and the gradient goes back in ``w``'s
    dtype (under autocast a float32 ``weight`` keeps its float32 product)."""
    return _grad_accumulator(w, n_rows <= chunk_size and w.dtype == weight.dtype)


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` possibly float32 and ``a``, ``b`` 16-bit: CUDA's addmm with
    out_dtype accumulates in place; elsewhere the 16-bit product (rounded once) is added."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError):  # an older torch: remember, and use the fallback
            _ADDMM_OUT_DTYPE[0] = False
            acc.add_(a @ b)
    else:
        acc.add_(a @ b)


_ADDMM_OUT_DTYPE = [True]


def _backprop_chunk(grad_logits, h, w, hidden_parts, grad_weight, grad_bias) -> None:
    """A chunk's logits gradient G into the gradients that are wanted (the others are None):
    ``G @ w`` appended to ``hidden_parts``, ``grad_weight += G.T @ h``, ``grad_bias += sum_rows G``.
    (No ``out=`` into row slices of one buffer: traced by torch.compile on torch 2.11, such
    writes were lost.)"""
    if hidden_parts is not None:
        hidden_parts.append(grad_logits @ w)
    if grad_weight is not None:
        _accumulate_product(grad_weight, grad_logits.t(), h)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)


def _warn_unfused(backend: str) -> None:
    if backend == "auto":  # asked for "torch" explicitly: the oracle, no surprise
        warnings.warn("rlhf_kernels: no kernel backend here (no native extension, no Triton on this device): the "
                      "fused-linear ops fall back to the torch composition, which builds the [N, V] logits",
                      RuntimeWarning, stacklevel=3)  # fmt: skip


def _autocast_on(hidden: torch.Tensor) -> bool:
    device = hidden.device.type
    return device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and hidden.dtype != torch.float64


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on for the device (as ``F.linear`` would
    use), else the inputs'."""
    return torch.get_autocast_dtype(hidden.device.type) if _autocast_on(hidden) else hidden.dtype


class _LinearLogprobs(torch.autograd.Function):
    """Chunked matmul + log-prob kernel, by token chunks or vocab slices (_by_vocab); backward
    recomputes the logits the same way.

    Every matmul runs with autocast off on inputs cast to ``dtype`` (autocast's dtype
    when it was on in forward), so forward and the recomputation in backward (which
    autograd runs outside autocast) produce the same logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, return_entropy, chunk_size, impl, dtype,
                grad_enabled):  # fmt: skip
        fwd = logprobs_ops._FWD_OPS[impl]
        n_rows = hidden.shape[0]
        w, b = _cast_head(weight, bias, dtype)
        # backward's cut, decided here: by vocab slices, forward walks the same slices (so that
        # backward recomputes its logits bit for bit); without a backward, token chunks
        need_grad = grad_enabled and any(ctx.needs_input_grad[:3])  # (forward itself runs without grad)
        ctx.by_vocab = need_grad and _by_vocab(n_rows, weight.shape[0], *ctx.needs_input_grad[:2], chunk_size)
        if ctx.by_vocab:
            logprobs, lse, entropy = _forward_by_vocab(hidden, w, b, dtype, labels, temperature, ignore_index,
                                                       return_entropy, fwd, chunk_size * weight.shape[0])  # fmt: skip
        else:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            logprobs = hidden.new_empty(n_rows, dtype=acc)
            lse = hidden.new_empty(n_rows, dtype=acc)
            entropy = hidden.new_empty(n_rows if return_entropy else 0, dtype=acc)
            for rows, _, logits in _chunk_logits(hidden, w, b, dtype, chunk_size):
                lp, row_lse, ent = fwd(logits, labels[rows], temperature, ignore_index, return_entropy, False)
                logprobs[rows], lse[rows] = lp, row_lse
                if return_entropy:
                    entropy[rows] = ent
                del logits
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy
        ctx.chunk_size, ctx.impl, ctx.dtype = chunk_size, impl, dtype
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @_dispatch.first_order("linear_token_logprobs", once_differentiable=True)
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if not (need_hidden or need_weight or need_bias):
            return (None,) * 11
        _, bwd, bwd_inplace = logprobs_ops._OPS[ctx.impl]
        dtype = ctx.dtype
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        grad_logprobs = grad_logprobs.to(lse.dtype).contiguous()
        if ctx.return_entropy and grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        else:
            grad_entropy = None
        w, b = _cast_head(weight, bias, dtype)
        if ctx.by_vocab:
            kernel_args = (grad_logprobs, grad_entropy, labels, lse, entropy, ctx.temperature, ctx.ignore_index)
            grads = _backprop_by_vocab(hidden, w, b, dtype, kernel_args, bwd_inplace, ctx.chunk_size * weight.shape[0],
                                       need_hidden, need_weight, need_bias)  # fmt: skip
            inputs = (hidden, weight, bias)
            return (*(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True)),
                    None, None, None, None, None, None, None, None)  # fmt: skip
        hidden_parts = [] if need_hidden else None
        grad_weight = _weight_grad_buffer(w, weight, hidden.shape[0], ctx.chunk_size) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_bias else None
        # the forward's logits, recomputed, then overwritten with their gradient (a fresh
        # buffer when traced, so that no in-place write of a custom op is traced)
        for rows, h, logits in _chunk_logits(hidden, w, b, dtype, ctx.chunk_size):
            args = (grad_logprobs[rows], None if grad_entropy is None else grad_entropy[rows], labels[rows],
                    lse[rows], entropy[rows] if ctx.return_entropy else entropy, ctx.temperature, ctx.ignore_index)
            if torch.compiler.is_compiling():
                grad_logits = bwd(args[0], args[1], logits, *args[2:])
            else:
                bwd_inplace(logits, *args)
                grad_logits = logits
            _backprop_chunk(grad_logits, h, w, hidden_parts, grad_weight, grad_bias)
            del logits, grad_logits
        grad_hidden = _cat_rows(hidden_parts, hidden, dtype)
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _by_vocab(n_rows: int, vocab: int, need_hidden: bool, need_weight: bool, chunk_size: int) -> bool:
    """Whether forward and backward walk the vocab in slices rather than the tokens in chunks.

    Token chunks (each chunk's logits for all V words) finish each chunk's hidden-state rows
    but add every chunk's product into the whole ``[V, H]`` weight gradient; vocab slices
    (all N tokens' logits for a slice of the words) finish each slice's weight rows but add
    into the whole ``[N, H]`` hidden-state gradient. For the same chunk memory there are as
    many slices as chunks, so the cut that accumulates the smaller gradient moves less: the
    vocab's when there are fewer tokens than words (a micro-batch of 8K tokens against a
    128K vocab: 16x less accumulator traffic, and no ``[V, H]`` float32 accumulator).

    Forward then walks the same slices (merging each token's log-normaliser and entropy over
    them, :func:`_forward_by_vocab`): a slice's matmul has another shape than a chunk's and
    may sum in another order, and in 16 bits round a logit to the other neighbouring value,
    so that backward would mix two sets of logits (its softmax uses the forward's
    log-normaliser); made by the same call, the recomputed logits are the forward's bit for
    bit. RLHF_KERNELS_LINEAR_BWD_CUT=rows or =vocab forces a cut (read in forward; tests and
    benchmarks). Traced calls keep the token chunks (the slices write into views, see
    _backprop_chunk)."""
    if torch.compiler.is_compiling():
        return False
    cut = os.environ.get("RLHF_KERNELS_LINEAR_BWD_CUT", "auto")
    if cut in ("rows", "vocab"):
        return cut == "vocab"
    return need_weight and (not need_hidden or n_rows < vocab) and n_rows > chunk_size  # (one chunk: nothing to add)


_SPARE = 8  # spare columns after each vocab slice (16 bytes of a 16-bit row: rows stay aligned)


def _vocab_slices(h, w, b, budget):
    """Yields ``(start, cols, logits)`` slice by slice: ``logits`` the ``[N, cols + _SPARE]``
    view of one buffer whose first ``cols`` columns hold ``h @ w[start:start + cols].T (+ b)``
    (autocast off; ``h``, ``w``, ``b`` already in the matmul dtype), for slices of about
    ``budget / N`` words (a multiple of :data:`_SPARE`). Forward and backward make the slices
    here, with the same call on the same shapes, so that the recomputed logits are the
    forward's bit for bit. The spare columns start at 0; the kernels may write into them."""
    n_rows, vocab = h.shape[0], w.shape[0]
    width = max(_SPARE, min(vocab, budget // max(n_rows, 1)) // _SPARE * _SPARE)
    buf = torch.zeros(n_rows, width + _SPARE, dtype=h.dtype, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, vocab, width):
            cols = min(vocab, start + width) - start
            logits = buf[:, :cols + _SPARE]
            if b is None:
                torch.mm(h, w[start:start + cols].t(), out=logits[:, :cols])
            else:
                torch.addmm(b[start:start + cols], h, w[start:start + cols].t(), out=logits[:, :cols])
            yield start, cols, logits


def _label_kinds(labels, ignore_index, vocab):
    """``(ignored, bad)``: the tokens whose label is ``ignore_index``, and the others whose label
    lies outside [0, vocab)."""
    ignored = labels == ignore_index
    return ignored, ~ignored & ((labels < 0) | (labels >= vocab))


def _slice_labels(labels, ignored, bad, start, cols, outside):
    """A slice's labels for the log-prob kernels (ignore_index -1): a label inside the slice as
    its column, a valid one outside it at column ``outside``, an ignored token at -1 (no valid
    column is negative, whatever the caller's ignore_index), a label outside [0, V) past the
    spare columns (the kernels then give its token NaN, as unsliced)."""
    local = labels - start
    local = torch.where((local >= 0) & (local < cols), local, outside)
    return local.masked_fill_(ignored, -1).masked_fill_(bad, cols + _SPARE)


def _forward_by_vocab(hidden, w, b, dtype, labels, temperature, ignore_index, return_entropy, fwd, budget):
    r"""linear_token_logprobs' forward walking the vocab in the slices backward will recompute
    (:func:`_vocab_slices`): ``(logprobs, lse, entropy)`` from each slice's log-prob kernel
    outputs (``lse_s``, ``H_s``) merged per token, and the label's logit read from its slice:

    .. math::

        \operatorname{lse} = \log \sum_s e^{\operatorname{lse}_s}, \qquad
        \log p_y = z_y - \operatorname{lse}, \qquad
        H = \sum_s e^{\operatorname{lse}_s - \operatorname{lse}}
            \big(H_s + \operatorname{lse} - \operatorname{lse}_s\big)

    (the entropy carried under the running lse, slice by slice: each term is the part's
    entropy plus a non-negative shift, with no cancellation of |lse|-sized terms; a slice whose
    logits are all -inf adds nothing). A token whose label lies outside the slice gets column 0
    there; ignored tokens get 0, labels outside [0, V) NaN (log-prob and entropy), as unsliced."""
    n_rows, vocab = hidden.shape[0], w.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ignored, bad = _label_kinds(labels, ignore_index, vocab)
    lse = torch.full((n_rows,), -math.inf, dtype=acc, device=w.device)
    label_z, entropy = torch.zeros_like(lse), torch.zeros_like(lse)
    for start, cols, logits in _vocab_slices(hidden.to(dtype), w, b, budget):
        local = _slice_labels(labels, ignored, bad, start, cols, 0).masked_fill_(bad, 0)
        _, lse_s, ent_s = fwd(logits[:, :cols], local, temperature, -1, return_entropy, False)
        here = (labels >= start) & (labels < start + cols)
        z = logits[:, :cols].gather(1, local.clamp(min=0)[:, None])[:, 0].to(acc) / temperature
        label_z = torch.where(here, z, label_z)
        merged = torch.logaddexp(lse, lse_s)
        if return_entropy:
            old = torch.where(lse == -math.inf, 0.0, torch.exp(lse - merged) * (entropy + (merged - lse)))
            new = torch.where(lse_s == -math.inf, 0.0, torch.exp(lse_s - merged) * (ent_s + (merged - lse_s)))
            entropy = old + new
        lse = merged
    logprobs = (label_z - lse).masked_fill_(ignored, 0.0).masked_fill_(bad, math.nan)
    if return_entropy:
        entropy = torch.where((lse == -math.inf) | bad, math.nan, entropy).masked_fill_(ignored, 0.0)
    else:
        entropy = lse.new_empty(0)
    return logprobs, lse, entropy


def _backprop_by_vocab(hidden, w, b, dtype, kernel_args, bwd_inplace, budget, need_hidden, need_weight, need_bias):
    """linear_token_logprobs' gradients (hidden, weight, bias; None where not wanted, in
    ``dtype`` or float32 accumulators) walking the vocab in the forward's slices
    (:func:`_vocab_slices`): per slice, the N x slice logits are recomputed, overwritten with
    their gradient by the log-prob kernel's in-place backward (with the saved
    log-normalisers and entropies a row's gradient needs nothing from outside the slice),
    and multiplied into the slice's weight rows (one product, written once) and the hidden
    states' accumulator. Labels as :func:`_slice_labels` gives them, a valid one outside the
    slice pointed at the first spare column, where its one-hot term lands and is dropped."""
    grad_logprobs, grad_entropy, labels, lse, entropy, temperature, ignore_index = kernel_args
    vocab = w.shape[0]
    h = hidden.to(dtype)
    grad_hidden = _grad_accumulator(h) if need_hidden else None
    grad_weight = torch.empty_like(w) if need_weight else None
    grad_bias = torch.empty(vocab, dtype=lse.dtype, device=w.device) if need_bias else None
    ignored, bad = _label_kinds(labels, ignore_index, vocab)
    with torch.autocast(hidden.device.type, enabled=False):
        for start, cols, logits in _vocab_slices(h, w, b, budget):
            local = _slice_labels(labels, ignored, bad, start, cols, cols)  # outside: the first spare column
            bwd_inplace(logits, grad_logprobs, grad_entropy, local, lse, entropy, temperature, -1)
            g = logits[:, :cols]
            if need_weight:
                torch.mm(g.t(), h, out=grad_weight[start:start + cols])
            if need_hidden:
                _accumulate_product(grad_hidden, g, w[start:start + cols])
            if need_bias:
                grad_bias[start:start + cols] = g.sum(0, dtype=grad_bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def _check_inputs(hidden, weight, bias, labels, chunk_size) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if hidden.dtype not in logprobs_ops.FLOAT_DTYPES:
        raise TypeError(
            f"hidden: dtype {hidden.dtype} is not supported; expected float32, bfloat16, float16 or float64"
        )
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., H], got a scalar")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: expected shape [V, {hidden.shape[-1]}] (hidden's last dim), got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: the vocab (first) dim is empty")
    if weight.dtype not in logprobs_ops.FLOAT_DTYPES:  # (checked under autocast too: it casts floats only)
        raise TypeError(
            f"weight: dtype {weight.dtype} is not supported; expected float32, bfloat16, float16 or float64"
        )
    if weight.dtype != hidden.dtype and not _autocast_on(hidden):  # autocast casts both
        raise TypeError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on device {weight.device}, but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias: expected weight's dtype {weight.dtype} on {weight.device}, got {bias.dtype} on {bias.device}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
