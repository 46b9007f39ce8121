"""Triton kernels for per-token log-probs (forward and backward) and their launchers.

Layout: logits are ``[rows, V]`` seen through up to three leading dims with any
strides (see :func:`rlhf_kernels._layout.row_layout`); the last dim has stride 1. Labels are
contiguous int64 ``[rows]`` with the mask already folded into ``ignore_index``.
All row offsets are computed in int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rlhf_kernels._layout import row_layout
from rlhf_kernels.triton._common import join_float, split_float

# Kernels may only read globals that are constexpr.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_start(row, size1, size2, stride0, stride1, stride2):
    i2 = row % size2
    rest = row // size2
    i1 = rest % size1
    i0 = rest // size1
    return i0 * stride0 + i1 * stride1 + i2 * stride2


@triton.jit
def _online_lse2(
    row_ptr, V, scale2, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):  # fmt: skip
    """Streams one row of V logits once, BLOCK_V at a time, with u = x * scale2
    (z / T in base-2 units): returns the online max m, s = sum 2^(u - m) and,
    with HAS_ENTROPY, w = sum 2^(u - m) (u - m) (else 0). With PREFETCH the next
    tile's load is issued before this tile's reductions (two tiles in flight per
    program, a few more registers): for launches with one program per SM."""
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    m = tl.full((), float("-inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    w = tl.zeros((), acc_ty)
    if PREFETCH:
        x_next = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        if PREFETCH:
            x = x_next
            x_next = tl.load(row_ptr + BLOCK_V + offs, mask=offs + BLOCK_V < V, other=float("-inf"))
        else:
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        u = x.to(acc_ty) * scale2
        m_new = tl.maximum(m, tl.max(u, axis=0))
        # While every logit seen so far is -inf, use 0 as the pivot so that
        # no -inf - -inf appears; the sums then stay 0.
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)
        alpha = tl.exp2(m - pivot)
        e = tl.exp2(u - pivot)
        if HAS_ENTROPY:
            # w = sum e (u - m), relative to the max so that H = log2 s - w / s does
            # not cancel for large logits; moving the pivot shifts each (u - m).
            w = (
                alpha * (w + s * tl.where(s > 0, m - pivot, 0.0)) + tl.sum(e * tl.where(e > 0, u - pivot, 0.0), axis=0)
            ).to(acc_ty)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    return m, s, w


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    inv_temp_hi,  # 1/T as hi + lo float32 parts (Triton passes float scalars as
    inv_temp_lo,  # float32; the float64 path needs 1/T to double precision)
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):
    # Grid: (rows,). Each program owns one row: it streams the V logits once
    # (V * itemsize bytes read) keeping an online max / sum of 2^(u - m)
    # (u = z * log2 e, z = logits / T) and, for the entropy, a running sum of
    # 2^(u - m) * (u - m); writes 3 scalars. Ignored rows read nothing.
    # PREFETCH: each tile's load goes out before the previous tile's reductions
    # (see logprobs_prefetch).
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    # Constants in the accumulation type (a bare float literal would be float32).
    ln2 = tl.full((), _LN2, acc_ty)
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    label = tl.load(labels_ptr + row)
    if label == ignore_index:
        tl.store(logprobs_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
    elif (label < 0) | (label >= V):
        tl.store(logprobs_ptr + row, float("nan"))
        tl.store(lse_ptr + row, float("nan"))
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, float("nan"))
    else:
        row_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
        m, s, w = _online_lse2(row_ptr, V, scale2, acc_ty, HAS_ENTROPY, BLOCK_V, PREFETCH)
        lse2 = m + tl.log2(s)
        x_label = tl.load(row_ptr + label).to(acc_ty)
        tl.store(lse_ptr + row, lse2 * ln2)
        tl.store(logprobs_ptr + row, (x_label * scale2 - lse2) * ln2)
        if HAS_ENTROPY:
            tl.store(entropy_ptr + row, (tl.log2(s) - w / s) * ln2)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    grad_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    V,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    g_size1,
    g_size2,
    g_stride0,
    g_stride1,
    g_stride2,
    inv_temp_hi,  # 1/T as hi + lo float32 parts, as in the forward kernel
    inv_temp_lo,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Grid: (rows,). Each program owns one row of the gradient: it reads the V
    # logits once and writes V gradients once (2 * V * itemsize bytes), from
    # dlogits_j = (g * (1[j == y] - p_j) - gH * p_j * (z_j - lse + H)) / T.
    # grad_ptr may alias logits_ptr (in-place backward): each element is read
    # before it is written by the same program.
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    ln2 = tl.full((), _LN2, acc_ty)
    log2e = tl.full((), _LOG2E, acc_ty)
    inv_temp = join_float(inv_temp_hi, inv_temp_lo, acc_ty)
    scale2 = inv_temp * log2e
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    x_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
    g_ptr = grad_ptr + _row_start(row, g_size1, g_size2, g_stride0, g_stride1, g_stride2)
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(g_ptr + offs, tl.zeros((BLOCK_V,), acc_ty), mask=offs < V)
    elif (label < 0) | (label >= V):
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(g_ptr + offs, tl.full((BLOCK_V,), float("nan"), acc_ty), mask=offs < V)
    else:
        lse2 = tl.load(lse_ptr + row) * log2e
        g = tl.load(grad_logprobs_ptr + row)
        if HAS_ENTROPY:
            gh = tl.load(grad_entropy_ptr + row)
            # z - lse + H in base-2 units: (u - lse2 + H2) * ln2.
            shift2 = tl.load(entropy_ptr + row) * log2e - lse2
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(x_ptr + offs, mask=offs < V, other=0.0)
            u = x.to(acc_ty) * scale2
            p = tl.exp2(u - lse2)
            d = tl.where(offs == label, g - g * p, -g * p)
            if HAS_ENTROPY:
                d -= gh * p * tl.where(p > 0, u + shift2, 0.0) * ln2
            tl.store(g_ptr + offs, (d * inv_temp).to(g_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _seq_logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    partial_ptr,
    count_ptr,
    V,
    T,
    chunk,
    n_chunks,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    inv_temp_hi,
    inv_temp_lo,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    # sequence_logprobs. Grid: (B * n_chunks,). Program i owns the tokens
    # [c * chunk, min(T, (c + 1) * chunk)) of sequence b = i // n_chunks
    # (c = i % n_chunks), rows b * T + t of the flattened logits. For each kept
    # token it streams the V logits once (V * itemsize bytes) and writes lse;
    # it accumulates the token log-probs in order in the accumulation type and
    # writes one partial sum and one kept-token count (the launcher sums the
    # [B, n_chunks] partials in a fixed order: no atomics, reproducible bits).
    item = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    ln2 = tl.full((), _LN2, acc_ty)
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    b = item // n_chunks
    t0 = (item - b * n_chunks) * chunk
    t1 = tl.minimum(t0 + chunk, T)
    total = tl.zeros((), acc_ty)
    count = tl.zeros((), tl.int32)
    for t in range(t0, t1):
        row = b * T + t
        label = tl.load(labels_ptr + row)
        if label == ignore_index:
            tl.store(lse_ptr + row, 0.0)
        else:
            count += 1
            if (label < 0) | (label >= V):
                tl.store(lse_ptr + row, float("nan"))
                total += float("nan")
            else:
                row_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
                m, s, _ = _online_lse2(row_ptr, V, scale2, acc_ty, False, BLOCK_V)
                lse2 = m + tl.log2(s)
                x_label = tl.load(row_ptr + label).to(acc_ty)
                tl.store(lse_ptr + row, lse2 * ln2)
                total += (x_label * scale2 - lse2) * ln2
    tl.store(partial_ptr + item, total)
    tl.store(count_ptr + item, count)


def _block_v(vocab: int, itemsize: int) -> tuple[int, int]:
    """Vocab tile and warp count: 8 KiB of logits per loop step, 16 elements (two
    16-byte loads for 16-bit types) per thread, so that a 256-thread program
    stays near 64 registers and several programs fit on an SM."""
    block = min(triton.next_power_of_2(vocab), 8192 // itemsize)
    num_warps = max(1, min(8, block // (16 * 32)))
    return block, num_warps


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool, launch=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``labels`` is int64 of the leading shape."""
    layout = row_layout(logits)
    if layout is None:
        raise ValueError("logits: more than three non-mergeable leading dims; pass a contiguous tensor")
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    acc = _acc_dtype(logits.dtype)
    labels = labels.contiguous()
    logprobs = torch.empty(lead, dtype=acc, device=logits.device)
    lse = torch.empty(lead, dtype=acc, device=logits.device)
    entropy = torch.empty(lead if return_entropy else (0,), dtype=acc, device=logits.device)
    rows = logprobs.numel()
    if rows == 0:
        return logprobs, lse, entropy
    block, num_warps = _block_v(vocab, logits.element_size())
    kernel = _logprobs_fwd_kernel if launch is None else launch(_logprobs_fwd_kernel)
    kernel[(rows,)](
        logits,
        labels,
        logprobs,
        lse,
        entropy if return_entropy else lse,
        vocab,
        *layout,
        *split_float(1.0 / temperature),
        ignore_index,
        HAS_ENTROPY=return_entropy,
        BLOCK_V=block,
        PREFETCH=logprobs_prefetch(),
        num_warps=num_warps,
    )
    return logprobs, lse, entropy


def logprobs_prefetch() -> bool:
    """Whether the log-prob forward issues each tile's load one tile ahead, as the fused PPO
    sweep's first pass does (where it measured 9.42 -> 7.22 ms on an H200). Here the forward
    runs many programs per SM and reached 2.84-3.33 TB/s against the CUDA kernel's 4.27 on
    the H200; whether the extra tile in flight helps is for a GPU run to say
    (``RLHF_KERNELS_LOGPROBS_PREFETCH=1``; ``rlhf-kernels bench`` on CUDA times both). Off by
    default."""
    return os.environ.get("RLHF_KERNELS_LOGPROBS_PREFETCH", "0") == "1"


_SEQ_TARGET_ITEMS = 2048  # as kSeqTargetItems in csrc/logprobs.h


def seq_chunk(batch: int, time: int) -> int:
    """Tokens per program of the sequence kernel (csrc/logprobs.h ``seq_chunk``):
    about 2048 programs, otherwise as few partial sums as possible."""
    if time <= 1:
        return 1
    return max(1, min(time, -(-batch * time // _SEQ_TARGET_ITEMS)))


def sequence_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, average: bool, launch=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the sequence kernel: ``(sequence_logprobs [B], kept counts [B], lse)``.
    ``labels`` is int64 of the leading shape ``[B, ...]`` (mask folded in)."""
    layout = row_layout(logits)
    if layout is None:
        raise ValueError("logits: more than three non-mergeable leading dims; pass a contiguous tensor")
    lead = logits.shape[:-1]
    batch = lead[0]
    rows = labels.numel()
    time = rows // batch if batch else 0
    acc = _acc_dtype(logits.dtype)
    chunk = seq_chunk(batch, time)
    n_chunks = -(-time // chunk)
    lse = torch.empty(lead, dtype=acc, device=logits.device)
    partial = torch.zeros((batch, n_chunks), dtype=acc, device=logits.device)
    count = torch.zeros((batch, n_chunks), dtype=torch.int32, device=logits.device)
    if rows > 0:
        block, num_warps = _block_v(logits.shape[-1], logits.element_size())
        kernel = _seq_logprobs_fwd_kernel if launch is None else launch(_seq_logprobs_fwd_kernel)
        kernel[(batch * n_chunks,)](
            logits,
            labels.contiguous(),
            lse,
            partial,
            count,
            logits.shape[-1],
            time,
            chunk,
            n_chunks,
            *layout,
            *split_float(1.0 / temperature),
            ignore_index,
            BLOCK_V=block,
            num_warps=num_warps,
        )
    n_valid = count.sum(-1).to(acc)
    total = partial.sum(-1)
    if average:
        total = total / n_valid.clamp(min=1)
    return total, n_valid, lse


def logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    grad_logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    launch=None,
) -> None:
    """Launch the backward kernel, writing into ``grad_logits`` (may be ``logits``)."""
    layout = row_layout(logits)
    grad_layout = row_layout(grad_logits)
    if layout is None or grad_layout is None:
        raise ValueError("logits: more than three non-mergeable leading dims; pass a contiguous tensor")
    rows = lse.numel()
    if rows == 0:
        return
    acc = lse.dtype
    has_entropy = grad_entropy is not None
    grad_logprobs = grad_logprobs.to(acc).contiguous()
    grad_entropy = grad_entropy.to(acc).contiguous() if has_entropy else grad_logprobs
    block, num_warps = _block_v(logits.shape[-1], logits.element_size())
    kernel = _logprobs_bwd_kernel if launch is None else launch(_logprobs_bwd_kernel)
    kernel[(rows,)](
        logits,
        grad_logits,
        labels.contiguous(),
        lse,
        entropy if has_entropy else lse,
        grad_logprobs,
        grad_entropy,
        logits.shape[-1],
        *layout,
        *grad_layout,
        *split_float(1.0 / temperature),
        ignore_index,
        HAS_ENTROPY=has_entropy,
        BLOCK_V=block,
        num_warps=num_warps,
    )


def kernel_configs() -> list[tuple[object, dict[str, str], dict[str, object], int]]:
    """Every (kernel, signature, constexprs, num_warps) the launchers can use, for AOT compile checks."""
    configs = []
    for ty, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        for vocab in (7, 1000, 128256):
            block, num_warps = _block_v(vocab, itemsize)
            for has_entropy in (False, True):
                const = {"HAS_ENTROPY": has_entropy, "BLOCK_V": block}
                ints = {n: "i64" for n in ("V", "size1", "size2", "stride0", "stride1", "stride2", "ignore_index")}
                fwd_sig = {
                    "logits_ptr": f"*{ty}",
                    "labels_ptr": "*i64",
                    "logprobs_ptr": "*fp32",
                    "lse_ptr": "*fp32",
                    "entropy_ptr": "*fp32",
                    **ints,
                    "inv_temp_hi": "fp32",
                    "inv_temp_lo": "fp32",
                    "HAS_ENTROPY": "constexpr",
                    "BLOCK_V": "constexpr",
                    "PREFETCH": "constexpr",
                }
                bwd_ints = {f"g_{n}": "i64" for n in ("size1", "size2", "stride0", "stride1", "stride2")}
                bwd_sig = {
                    "logits_ptr": f"*{ty}",
                    "grad_ptr": f"*{ty}",
                    "labels_ptr": "*i64",
                    "lse_ptr": "*fp32",
                    "entropy_ptr": "*fp32",
                    "grad_logprobs_ptr": "*fp32",
                    "grad_entropy_ptr": "*fp32",
                    **ints,
                    **bwd_ints,
                    "inv_temp_hi": "fp32",
                    "inv_temp_lo": "fp32",
                    "HAS_ENTROPY": "constexpr",
                    "BLOCK_V": "constexpr",
                }
                for prefetch in (False, True):
                    configs.append((_logprobs_fwd_kernel, fwd_sig, {**const, "PREFETCH": prefetch}, num_warps))
                if not has_entropy:
                    seq_sig = {
                        "logits_ptr": f"*{ty}",
                        "labels_ptr": "*i64",
                        "lse_ptr": "*fp32",
                        "partial_ptr": "*fp32",
                        "count_ptr": "*i32",
                        **{n: "i64" for n in ("V", "T", "chunk", "n_chunks", "size1", "size2")},
                        **{n: "i64" for n in ("stride0", "stride1", "stride2")},
                        "inv_temp_hi": "fp32",
                        "inv_temp_lo": "fp32",
                        "ignore_index": "i64",
                        "BLOCK_V": "constexpr",
                    }
                    configs.append((_seq_logprobs_fwd_kernel, seq_sig, {"BLOCK_V": block}, num_warps))
                configs.append((_logprobs_bwd_kernel, bwd_sig, const, num_warps))
    return configs
