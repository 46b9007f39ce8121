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

from rlhf_kernels._layout import row_layout, rows_may_overlap
from rlhf_kernels.triton._common import cdiv, join_float, next_power_of_2, split_float, with_ones

# Kernels may only read globals that are constexpr.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_start(row, size1, size2, stride0, stride1, stride2):
    """Element offset of row ``row`` (int64). The row index and sizes are below 2^31
    (kernel_layout), so the index arithmetic is 32-bit (a 64-bit division is a
    subroutine call whose calling convention spills registers), the products 64-bit."""
    r = tl.cast(row, tl.int32)
    n2 = tl.cast(size2, tl.int32)  # (tl.cast: a size of 1 arrives as a constant, not a tensor)
    n1 = tl.cast(size1, tl.int32)
    i2 = r % n2
    rest = r // n2
    i1 = rest % n1
    i0 = rest // n1
    return i0.to(tl.int64) * stride0 + i1.to(tl.int64) * stride1 + i2.to(tl.int64) * stride2


def kernel_layout(t: torch.Tensor, name: str = "logits") -> tuple[int, int, int, int, int]:
    """:func:`row_layout` of ``t`` for the kernels above: at most three unmergeable leading
    dims, and fewer than 2^31 rows (_row_start's index arithmetic is 32-bit)."""
    layout = row_layout(t)
    if layout is None:
        raise ValueError(f"{name}: more than three non-mergeable leading dims; pass a contiguous tensor")
    if t.numel() // max(1, t.shape[-1]) >= 1 << 31:
        raise ValueError(f"{name}: 2^31 or more rows are not supported by the Triton kernels")
    return layout


def check_distinct_rows(logits: torch.Tensor, grad: torch.Tensor | None) -> None:
    """An in-place gradient (``grad`` is ``logits``) needs rows that share no memory: a
    program reads and overwrites its own row only. (The public ops fall back to a fresh
    gradient for such logits; this guards the registered in-place ops called directly.)"""
    if grad is logits and rows_may_overlap(logits):
        raise ValueError("logits: rows share memory (an expand or overlapping windows); "
                         "the in-place ops need distinct rows")  # fmt: skip


def rows_aligned(*tensors: torch.Tensor) -> bool:
    """Whether the JIT can prove every row of each ``[..., V]`` tensor 16-byte aligned: its
    storage offset a multiple of 16 bytes and its leading strides (of dims longer than 1)
    multiples of 16 elements, the only divisibility the JIT records for an int argument
    (bf16 rows of 50264 elements are 16-byte aligned, yet a stride of 50264 proves
    nothing). Storage offset and strides are known to torch.compile's fake tensors, unlike
    data_ptr. Chooses the gradient sweeps' ROW_ALIGNED variant (no runtime search for a
    row's first 16-byte boundary), which is correct for any alignment: its vector accesses
    are only those the JIT proves from the actual pointers and strides. (The storage's own
    base is checked where there is one: PyTorch's allocators align it, but a view of
    foreign memory, from DLPack or a shifted untyped storage, need not be.)"""
    for t in tensors:
        if t.storage_offset() * t.element_size() % 16 or _data_ptr(t) % 16:
            return False
        if any(stride % 16 for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True) if size > 1):
            return False
    return True


def _data_ptr(t: torch.Tensor) -> int:
    """``t.data_ptr()``, or 0 for a tensor without storage (torch.compile's fake tensors)."""
    if isinstance(t, torch._subclasses.FakeTensor):
        return 0
    try:
        return t.data_ptr()
    except RuntimeError:  # other tensor subclasses without storage
        return 0


@triton.constexpr_function
def _lane_vec(bits, block):
    """Elements of a lane row: one 16-byte vector, at most the tile."""
    return max(1, min(128 // bits, block))


@triton.jit
def _tile_cols(BITS: tl.constexpr, BLOCK_V: tl.constexpr, LANE_ROWS: tl.constexpr = True):
    """Offsets of a tile's elements as [BLOCK_V // VEC, VEC] lane rows (_lane_vec of BITS, the
    logits' element width; with LANE_ROWS=False a single row of BLOCK_V), int32 (V < 2^30:
    _block_v). Every loop over a row's tiles uses this one shape, so that a kernel with two
    passes keeps one set of offset registers.

    Takes the width, not the logits pointer: torch.compile's mutation analysis of a
    wrap_triton kernel (torch._higher_order_ops.triton_kernel_wrap) follows a store's address
    back through every operand of a call, so offsets computed from a call that took the
    logits pointer marked the logits as written, and AOT autograd then copied the gradient's
    values back into a leaf that requires grad (a failed compile of the backward)."""
    VEC: tl.constexpr = _lane_vec(BITS, BLOCK_V) if LANE_ROWS else BLOCK_V
    return tl.arange(0, BLOCK_V // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.constexpr_function
def _dead_exp(bits):
    """A base-2 exponent for "no probability" (as csrc/common.cuh dead_exp): 2^it is exactly 0
    and coefficient * it stays finite for coefficients up to ~1e36 (float32). -inf logits are
    clamped to it where 0 * -inf would be NaN."""
    return -2048.0 if bits == 64 else -256.0


@triton.jit
def _align_head(ptr, V):
    """Elements of a row at ``ptr`` before its first 16-byte boundary (0 when it starts on
    one), at most V; int32. The JIT knows a row is aligned only when the logits' base and
    strides are multiples of 16 bytes: for an odd vocabulary (GPT-2's 50257) it is not,
    every load was scalar, and the kernels now find the boundary at run time. (Elements
    are aligned to their own size, as in every torch tensor.)"""
    ITEM: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    addr = ptr.to(tl.int64, bitcast=True)
    head = ((16 - addr % 16) % 16) // ITEM
    return tl.minimum(head, V).to(tl.int32)


@triton.jit
def _lse2_tile(x, m, s, w, scale2, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """One tile x ([lane rows, VEC]) into the lane states (m, s, w) of _online_lse2."""
    u = x.to(acc_ty) * scale2
    m_new = tl.maximum(m, tl.max(u, axis=1))
    # While a lane row has seen only -inf, its pivot is 0 so that no -inf - -inf appears
    # (its sums stay 0).
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new).to(acc_ty)
    alpha = tl.exp2(m - pivot)
    d = u - pivot[:, None]
    if HAS_ENTROPY:
        # w = sum e (u - m), relative to the max so that H = log2 s - w / s does not cancel
        # for large logits. d of a -inf logit becomes _dead_exp: 2^d = 0 and 0 * d = 0,
        # where 0 * -inf would be NaN; a NaN logit stays NaN.
        d = tl.maximum(d, _dead_exp(acc_ty.primitive_bitwidth), propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp2(d)
        w = (alpha * (w + s * tl.where(s > 0, m - pivot, 0.0)) + tl.sum(e * d, axis=1)).to(acc_ty)
    else:
        e = tl.exp2(d)
    s = (s * alpha + tl.sum(e, axis=1)).to(acc_ty)
    return m_new, s, w


@triton.jit
def _online_lse2(
    row_ptr, V, scale2, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    u0, PREFETCH: tl.constexpr = False, LANE_ROWS: tl.constexpr = True,
):  # fmt: skip
    """Streams one row of V logits once, BLOCK_V at a time, with u = x * scale2
    (z / T in base-2 units): returns the max m, s = sum 2^(u - m) and, with
    HAS_ENTROPY, w = sum 2^(u - m) (u - m) (else 0).

    u0 is the u of one logit of the row (the label's), or -inf: the running maxima start
    there (any start at or below the row's max gives the same sums). The callers load the
    label's logit first and pass it in so that its load is issued before the row streams:
    left unused until after the loop, ptxas sank it below the loop, where its latency
    was paid at the end of every row.

    A tile is seen as BLOCK_V // VEC lane rows of VEC contiguous elements (one
    16-byte vector each, which the compiler gives to one thread), and each lane row
    keeps its own running (m, s, w): a tile then costs no reduction across threads
    (no shuffles, no barriers) and one rescale per lane row; the lane states are
    merged once, at the end of the row. Per element: a multiply, a max, a
    subtraction, one 2^x and an add (with entropy also a NaN-keeping max and an fma).

    The whole tiles load without a mask, the last partial tile with one: a masked load
    fills its register with the -inf default before it is issued, and with those fills
    ptxas issued a thread's second 16-byte load only after the first one's data had been
    used (one load in flight per thread instead of two; benchmarks/sass_loops.py counts
    them). With PREFETCH the next tile's load is issued before this tile's math (two
    tiles in flight per program, every load masked): for launches with one program per SM.

    LANE_ROWS=False makes the whole tile one lane row (a reduction across the program per
    tile, fewer live registers): for the kernels that keep more per-row state live
    (the sequence and fused PPO sweeps), which lane rows push past ptxas's 64-register
    target into spills (compile_check). Which is faster there is for a GPU run to say."""
    cols = _tile_cols(row_ptr.dtype.element_ty.primitive_bitwidth, BLOCK_V, LANE_ROWS)
    LANES: tl.constexpr = cols.shape[0]
    m = tl.zeros((LANES,), acc_ty) + u0.to(acc_ty)
    s = tl.zeros((LANES,), acc_ty)
    w = tl.zeros((LANES,), acc_ty)
    if PREFETCH:
        x_next = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
        for start in range(0, V, BLOCK_V):
            x = x_next
            offs = start + BLOCK_V + cols
            x_next = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
            m, s, w = _lse2_tile(x, m, s, w, scale2, acc_ty, HAS_ENTROPY)
    else:
        # A row that does not start on a 16-byte boundary (an odd vocabulary: row r starts
        # r * V elements in) streams its first `head` elements as a masked tile and the
        # rest from the boundary on, with 16-byte loads.
        head = _align_head(row_ptr, V)
        if head > 0:
            x = tl.load(row_ptr + cols, mask=cols < head, other=float("-inf"))
            m, s, w = _lse2_tile(x, m, s, w, scale2, acc_ty, HAS_ENTROPY)
        body = tl.multiple_of(row_ptr + head, 16)  # bytes
        rest = V - head
        whole = rest // BLOCK_V * BLOCK_V
        for start in range(0, whole, BLOCK_V):
            m, s, w = _lse2_tile(tl.load(body + start + cols), m, s, w, scale2, acc_ty, HAS_ENTROPY)
        if whole < rest:
            offs = whole + cols
            x = tl.load(body + offs, mask=offs < rest, other=float("-inf"))
            m, s, w = _lse2_tile(x, m, s, w, scale2, acc_ty, HAS_ENTROPY)
    return _merge_lanes(m, s, w, acc_ty, HAS_ENTROPY)


@triton.jit
def _merge_lanes(m, s, w, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """Lane states (m, s, w) of _lse2_tile (or any set of such partial sums, one per entry),
    merged to the row's max: scalars (m, s, w) as _online_lse2 returns them."""
    m_row = tl.max(m, axis=0)
    pivot = tl.where(m_row == float("-inf"), 0.0, m_row).to(acc_ty)
    a = tl.exp2(m - pivot)
    s_row = tl.sum(s * a, axis=0)
    w_row = tl.zeros((), acc_ty)
    if HAS_ENTROPY:
        w_row = tl.sum(a * (w + s * tl.where(s > 0, m - pivot, 0.0)), axis=0)
    return m_row, s_row, w_row


@triton.jit
def _row_results(m, s, w, x_label, scale2, acc_ty: tl.constexpr):
    """A row's (lse2, lse, log-prob, entropy) from _online_lse2's (m, s, w) and its label's
    logit: lse2 = m + log2 s in base 2, the rest in nats. m is subtracted from the label's
    base-2 logit before log2 s: a confident token's small log-prob keeps its relative
    accuracy (z_y - lse would cancel at the size of the logits)."""
    ln2 = tl.full((), _LN2, acc_ty)
    log2_s = tl.log2(s)
    lse2 = m + log2_s
    return lse2, lse2 * ln2, ((x_label * scale2 - m) - log2_s) * ln2, (log2_s - w / s) * ln2


@triton.jit
def _grad_tile(x, cols, label, scale2, lse2, gi, a0, a1, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """The gradient of a tile of a row's logits x (columns start + cols, label relative to
    start, so that the label test is one 32-bit compare of a per-thread constant):
        grad_j = (g (1[j == y] - p_j) - gH p_j (z_j - lse + H)) / T
               = fma(-p_j, a0 + a1 d_j, 1[j == y] gi),   d_j = u_j - lse2 = log2 p_j,
    with gi = g / T, a0 = (g + gH H) / T, a1 = gH ln2 / T (_grad_consts). d of a -inf
    logit is clamped to _dead_exp so that a1 d stays finite (p = 0 there)."""
    d = tl.fma(x.to(acc_ty), scale2, -lse2)
    if HAS_ENTROPY:
        d = tl.maximum(d, _dead_exp(acc_ty.primitive_bitwidth), propagate_nan=tl.PropagateNan.ALL)
        t = tl.fma(a1, d, a0)
    else:
        t = a0
    return tl.fma(-tl.exp2(d), t, tl.where(cols == label, gi, 0.0))


@triton.jit
def _grad_span(
    x_ptr, g_ptr, col0, col1, cols, label, scale2, lse2, gi, a0, a1, acc_ty: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Reads the logits [col0, col1) after x_ptr (col0 a multiple of BLOCK_V; label relative
    to x_ptr) and writes their gradients (_grad_tile) after g_ptr. Whole tiles go without
    a mask, a last partial tile with one (as in _online_lse2: with every load masked,
    ptxas issued a thread's second 16-byte load only after the first one's data had been
    used). Offsets and label in int32."""
    stop = col1 // BLOCK_V * BLOCK_V
    for start in range(col0, stop, BLOCK_V):
        offs = start + cols
        d = _grad_tile(tl.load(x_ptr + offs), cols, label - start, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY)
        tl.store(g_ptr + offs, d.to(g_ptr.dtype.element_ty))
    if stop < col1:
        offs = stop + cols
        x = tl.load(x_ptr + offs, mask=offs < col1, other=0.0)
        d = _grad_tile(x, cols, label - stop, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY)
        tl.store(g_ptr + offs, d.to(g_ptr.dtype.element_ty), mask=offs < col1)


@triton.jit
def _grad_part(
    x_ptr, g_ptr, part, part_cols, V, cols, label, scale2, lse2, gi, a0, a1, acc_ty: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, ROW_ALIGNED: tl.constexpr,
):  # fmt: skip
    """The gradient of part ``part`` of a row: its columns [part * part_cols, +part_cols).
    label int32; part_cols a multiple of BLOCK_V, or part 0 the whole row (part_cols = V, as
    the PPO kernel calls it).

    ROW_ALIGNED (rows_aligned: the JIT can prove every row of both tensors 16-byte
    aligned) takes the columns from the row start and leaves the rest to the JIT. Otherwise they are counted
    from the row's first 16-byte boundary when the logits and gradient rows are equally
    far from one (a contiguous gradient of contiguous logits with an odd vocabulary:
    16-byte loads and stores), part 0 also doing the columns before it; or, the two rows
    misaligned differently, from the row start with what the JIT can prove. (The runtime
    search and its second loop cost registers: 53 against 40 on sm_90 for bf16.)

    The boundary is taken from the gradient's pointer, not the logits': torch.compile's
    analysis of a wrap_triton kernel takes every pointer that a store's address derives
    from as written (see _tile_cols), and the logits are read-only."""
    head = _align_head(g_ptr, V)
    # (bwd_parts: whole tiles, not a JIT-known fact. The cast: with part 0 and V = 1 both
    # constexpr, as the PPO kernel calls it, the product is a constexpr, which multiple_of
    # does not take.)
    col0 = tl.multiple_of(tl.cast(part * part_cols, tl.int32), BLOCK_V)
    if ROW_ALIGNED:
        col1 = tl.minimum(col0 + part_cols, V)
        _grad_span(x_ptr, g_ptr, col0, col1, cols, label, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY, BLOCK_V)
    elif _align_head(x_ptr, V) == head:
        if (part == 0) & (head > 0):
            x = tl.load(x_ptr + cols, mask=cols < head, other=0.0)
            d = _grad_tile(x, cols, label, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY)
            tl.store(g_ptr + cols, d.to(g_ptr.dtype.element_ty), mask=cols < head)
        x_body = tl.multiple_of(x_ptr + head, 16)  # bytes
        g_body = tl.multiple_of(g_ptr + head, 16)
        # A last part within the head's length of V has no body columns (col1 = col0):
        # unclamped, col1 < col0 and _grad_span's tail would redo the previous part's.
        col1 = tl.maximum(col0, tl.minimum(col0 + part_cols, V - head))
        _grad_span(x_body, g_body, col0, col1, cols, label - head, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY,
                   BLOCK_V)  # fmt: skip
    else:
        col1 = tl.minimum(col0 + part_cols, V)
        _grad_span(x_ptr, g_ptr, col0, col1, cols, label, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY, BLOCK_V)


@triton.jit
def _grad_consts(g, gh, entropy, inv_temp, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    """A row's (gi, a0, a1) for _grad_tile from its entropy (nats) and the upstream
    gradients g, gh of its log-prob and entropy."""
    gi = g * inv_temp
    a0 = gi
    a1 = tl.zeros((), acc_ty)
    if HAS_ENTROPY:
        ghi = gh * inv_temp
        a0 = tl.fma(ghi, entropy, gi)
        a1 = ghi * tl.full((), _LN2, acc_ty)
    return gi, a0, a1


@triton.jit
def _column_part(pid, parts, part_cols):
    """(row as int64, part, first column) of program pid of a grid of rows * parts programs,
    parts of part_cols columns (int32 arithmetic: the grid is below 2^31, V below 2^30)."""
    row32 = pid // parts
    part = pid - row32 * parts
    return row32.to(tl.int64), part, part * part_cols


@triton.jit
def _store_row(logprobs_ptr, lse_ptr, entropy_ptr, row, logp, lse, entropy, HAS_ENTROPY: tl.constexpr):
    """A row's forward outputs."""
    tl.store(logprobs_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


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
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    label = tl.load(labels_ptr + row)
    if (label == ignore_index) | (label < 0) | (label >= V):  # 0 for an ignored label, NaN out of range
        v = tl.where(label == ignore_index, 0.0, float("nan"))
        _store_row(logprobs_ptr, lse_ptr, entropy_ptr, row, v, v, v, HAS_ENTROPY)
    else:
        row_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
        x_label = tl.load(row_ptr + label).to(acc_ty)
        m, s, w = _online_lse2(row_ptr, V, scale2, acc_ty, HAS_ENTROPY, BLOCK_V, x_label * scale2, PREFETCH)
        _, lse, logp, entropy = _row_results(m, s, w, x_label, scale2, acc_ty)
        _store_row(logprobs_ptr, lse_ptr, entropy_ptr, row, logp, lse, entropy, HAS_ENTROPY)


@triton.jit
def _logprobs_fwd_part_kernel(
    logits_ptr,
    labels_ptr,
    states_ptr,
    V,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    inv_temp_hi,
    inv_temp_lo,
    ignore_index,
    parts,  # column parts per row (> 1)
    part_cols,  # columns per part, a multiple of BLOCK_V
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The forward with column parts (RLHF_KERNELS_FWD_PART_COLS; fwd_parts), first of two
    # launches. Grid: (rows * parts,). Program i streams the columns [p * part_cols,
    # min(V, (p + 1) * part_cols)) of row i // parts (p = i % parts) once and stores their
    # (m, s, w) at states[3 i]; consecutive programs stream consecutive pieces of one row, as
    # the backward's parts do. A part starts part_cols * itemsize bytes (a multiple of 16)
    # after its row: _online_lse2 aligns it as it aligns the row. Skipped rows store nothing
    # (_logprobs_fwd_merge_kernel writes their outputs). Row and columns in int32, as the
    # backward's (the grid is below 2^31, V below 2^30).
    pid = tl.program_id(0)
    row, _, col0 = _column_part(pid, parts, part_cols)
    acc_ty = states_ptr.dtype.element_ty
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    label = tl.load(labels_ptr + row)
    if (label != ignore_index) & (label >= 0) & (label < V):
        row_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
        n = tl.minimum(part_cols, V - col0)
        m, s, w = _online_lse2(row_ptr + col0, n, scale2, acc_ty, HAS_ENTROPY, BLOCK_V,
                               tl.full((), float("-inf"), acc_ty))  # fmt: skip
        out = states_ptr + pid.to(tl.int64) * 3
        tl.store(out, m)
        tl.store(out + 1, s)
        tl.store(out + 2, w)


@triton.jit
def _logprobs_fwd_merge_kernel(
    logits_ptr,
    labels_ptr,
    states_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    size1,
    size2,
    stride0,
    stride1,
    stride2,
    inv_temp_hi,
    inv_temp_lo,
    ignore_index,
    parts,
    HAS_ENTROPY: tl.constexpr,
    PARTS: tl.constexpr,  # next_power_of_2(parts)
):
    # Second launch of the forward with column parts. Grid: (rows,). Program r merges row r's
    # part states (_merge_lanes: a fixed reduction, the same bits on every run), reads the
    # label's logit and writes the row's outputs (0 for an ignored label, NaN for one
    # outside [0, V), as _logprobs_fwd_kernel).
    row = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    label = tl.load(labels_ptr + row)
    if (label == ignore_index) | (label < 0) | (label >= V):  # 0 for an ignored label, NaN out of range
        v = tl.where(label == ignore_index, 0.0, float("nan"))
        _store_row(logprobs_ptr, lse_ptr, entropy_ptr, row, v, v, v, HAS_ENTROPY)
    else:
        row_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
        x_label = tl.load(row_ptr + label).to(acc_ty)
        q = tl.arange(0, PARTS)
        here = states_ptr + (row * parts + q) * 3
        inside = q < parts
        m = tl.load(here, mask=inside, other=float("-inf"))
        s = tl.load(here + 1, mask=inside, other=0.0)
        w = tl.load(here + 2, mask=inside, other=0.0)
        m, s, w = _merge_lanes(m, s, w, acc_ty, HAS_ENTROPY)
        _, lse, logp, entropy = _row_results(m, s, w, x_label, scale2, acc_ty)
        _store_row(logprobs_ptr, lse_ptr, entropy_ptr, row, logp, lse, entropy, HAS_ENTROPY)


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
    parts,  # column parts per row (1: a program per row)
    part_cols,  # columns per part, a multiple of BLOCK_V
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,
):
    # Grid: (rows * parts,). Program i owns the columns [p * part_cols,
    # min(V, (p + 1) * part_cols)) of row i // parts (p = i % parts; for a labelled row
    # _grad_part may count them from the row's first 16-byte boundary instead): it reads
    # those logits once and writes their gradients once (2 * itemsize bytes an
    # element), from dlogits_j = (g * (1[j == y] - p_j) - gH * p_j * (z_j - lse + H)) / T.
    # Consecutive programs share a row, so the programs in flight stream one
    # region of memory, as a copy does (see bwd_part_cols). grad_ptr may alias
    # logits_ptr (in-place backward): each element is read before it is
    # written by the same program.
    # The grid is below 2^31 (bwd_parts) and V below 2^30 (_block_v): the program's row and
    # columns in int32 (a 64-bit division is a subroutine call; 64-bit columns cost two
    # compares per element for the label test), the row's offset in int64 (_row_start).
    row, part, col0 = _column_part(tl.program_id(0), parts, part_cols)
    col1 = tl.minimum(col0 + part_cols, V)
    acc_ty = lse_ptr.dtype.element_ty
    inv_temp = join_float(inv_temp_hi, inv_temp_lo, acc_ty)
    scale2 = inv_temp * tl.full((), _LOG2E, acc_ty)
    label = tl.load(labels_ptr + row)
    cols = _tile_cols(logits_ptr.dtype.element_ty.primitive_bitwidth, BLOCK_V)
    x_ptr = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
    g_ptr = grad_ptr + _row_start(row, g_size1, g_size2, g_stride0, g_stride1, g_stride2)
    # (A tile starting in [col0, col1) ends by col0 + part_cols: only V bounds it.)
    if label == ignore_index:
        for start in range(col0, col1, BLOCK_V):
            offs = start + cols
            tl.store(g_ptr + offs, tl.zeros(cols.shape, acc_ty), mask=offs < V)
    elif (label < 0) | (label >= V):
        for start in range(col0, col1, BLOCK_V):
            offs = start + cols
            tl.store(g_ptr + offs, tl.full(cols.shape, float("nan"), acc_ty), mask=offs < V)
    else:
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_logprobs_ptr + row)
        gh = tl.zeros((), acc_ty)
        entropy = tl.zeros((), acc_ty)
        if HAS_ENTROPY:
            gh = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        # The saved lse (nats) to base 2, in float64 (one rounding). A row of only -inf logits
        # has lse = -inf and d = -inf + inf = NaN: a NaN gradient, as torch.
        lse2 = (lse.to(tl.float64) * tl.full((), _LOG2E, tl.float64)).to(acc_ty)
        gi, a0, a1 = _grad_consts(g, gh, entropy, inv_temp, acc_ty, HAS_ENTROPY)
        _grad_part(x_ptr, g_ptr, part, part_cols, V, cols, label.to(tl.int32), scale2, lse2, gi, a0, a1, acc_ty,
                   HAS_ENTROPY, BLOCK_V, ROW_ALIGNED)  # fmt: skip


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
    item = tl.program_id(0)  # int32: the 32-bit division below is inline (64-bit is a subroutine call)
    acc_ty = lse_ptr.dtype.element_ty
    scale2 = (join_float(inv_temp_hi, inv_temp_lo, acc_ty)) * tl.full((), _LOG2E, acc_ty)
    # (n_chunks <= items < 2^31; tl.cast: a value of 1 arrives as a constant, not a tensor)
    b = item // tl.cast(n_chunks, tl.int32)
    t0 = (item - b * n_chunks).to(tl.int64) * chunk
    t1 = tl.minimum(t0 + chunk, T)
    total = tl.zeros((), acc_ty)
    count = tl.zeros((), tl.int32)
    for t in range(t0, t1):
        row = b.to(tl.int64) * T + t
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
                x_label = tl.load(row_ptr + label).to(acc_ty)
                m, s, w = _online_lse2(row_ptr, V, scale2, acc_ty, False, BLOCK_V, x_label * scale2, LANE_ROWS=False)
                _, lse, logp, _ = _row_results(m, s, w, x_label, scale2, acc_ty)
                tl.store(lse_ptr + row, lse)
                total += logp
    tl.store(partial_ptr + item, total)
    tl.store(count_ptr + item, count)


def _block_v(vocab: int, itemsize: int) -> tuple[int, int]:
    """Vocab tile and warp count: 8 KiB of logits per loop step, 16 elements (two
    16-byte loads for 16-bit types) per thread, so that a 256-thread program
    stays near 64 registers and several programs fit on an SM. Offsets within a row
    are int32, so V is capped (as the CUDA kernels cap it)."""
    if vocab > 1 << 30:
        raise ValueError(f"logits: a vocabulary of {vocab} entries is above the supported 2^30")
    block = min(next_power_of_2(vocab), 8192 // itemsize)
    num_warps = max(1, min(8, block // (16 * 32)))
    return block, num_warps


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool, launch=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (with column parts, fwd_parts: the part and merge kernels).
    ``labels`` is int64 of the leading shape."""
    layout = kernel_layout(logits)
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
    parts, part_cols = fwd_parts(rows, vocab, block) if acc == torch.float32 else (1, 0)
    if parts > 1:
        states = torch.empty(rows * parts * 3, dtype=acc, device=logits.device)
        part_kernel = _logprobs_fwd_part_kernel if launch is None else launch(_logprobs_fwd_part_kernel)
        part_kernel[(rows * parts,)](
            logits, labels, states, vocab, *layout, *split_float(1.0 / temperature), ignore_index, parts, part_cols,
            HAS_ENTROPY=return_entropy, BLOCK_V=block, num_warps=num_warps,
        )  # fmt: skip
        merge = _logprobs_fwd_merge_kernel if launch is None else launch(_logprobs_fwd_merge_kernel)
        merge[(rows,)](
            logits, labels, states, logprobs, lse, entropy if return_entropy else lse, vocab, *layout,
            *split_float(1.0 / temperature), ignore_index, parts, HAS_ENTROPY=return_entropy,
            PARTS=next_power_of_2(parts), num_warps=1,
        )  # fmt: skip
        return logprobs, lse, entropy
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


_MAX_GRID = 2**31 - 1  # grid x limit
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
    layout = kernel_layout(logits)
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
    check_distinct_rows(logits, grad_logits)
    layout = kernel_layout(logits)
    grad_layout = kernel_layout(grad_logits)
    rows = lse.numel()
    if rows == 0:
        return
    acc = lse.dtype
    has_entropy = grad_entropy is not None
    grad_logprobs = grad_logprobs.to(acc).contiguous()
    grad_entropy = grad_entropy.to(acc).contiguous() if has_entropy else grad_logprobs
    vocab = logits.shape[-1]
    block, num_warps = _block_v(vocab, logits.element_size())
    parts, part_cols = bwd_parts(rows, vocab, block)
    kernel = _logprobs_bwd_kernel if launch is None else launch(_logprobs_bwd_kernel)
    kernel[(rows * parts,)](
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
        parts,
        part_cols,
        HAS_ENTROPY=has_entropy,
        BLOCK_V=block,
        ROW_ALIGNED=rows_aligned(logits, grad_logits),
        num_warps=num_warps,
    )


# Columns per program of the backward when RLHF_KERNELS_BWD_PART_COLS is unset: the
# H100's best (benchmarks/bwd_sweep.py, 16384 x 128256 bf16,
# gpu-session-NVIDIA_H100-20261126-1402): 3.19 ms (2.64 TB/s) against 3.57 ms (2.36 TB/s)
# for a program per row; 8K and 32K within 2%, 4K and 64K slower.
DEFAULT_PART_COLS = 16384


def _part_cols_setting(knob: str, default: int) -> int:
    """The columns a part that the environment variable ``knob`` asks for (``default`` when
    unset or empty; 0 or less: whole rows)."""
    value = os.environ.get(knob, "").strip() or str(default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{knob}: expected a number of columns, got {value!r}") from None


def _column_parts(rows: int, vocab: int, block: int, want: int) -> tuple[int, int]:
    """(parts per row, columns per part) for ``want`` columns a part rounded up to whole tiles
    of ``block``; whole rows when ``want`` <= 0, a row fits in one part, or rows * parts would
    pass the grid limit."""
    whole = (1, cdiv(max(vocab, 1), block) * block)
    if want <= 0:
        return whole
    part_cols = cdiv(want, block) * block
    parts = cdiv(vocab, part_cols)
    if parts <= 1 or rows * parts > _MAX_GRID:
        return whole
    return parts, part_cols


def fwd_parts(rows: int, vocab: int, block: int) -> tuple[int, int]:
    """(parts per row, columns per part) of the forward: RLHF_KERNELS_FWD_PART_COLS columns
    a part (:func:`_column_parts`), a program per row when it is unset or 0 (the default
    until a GPU has timed the parts; csrc/logprobs.cu reads the same knob). Not for float64
    (gradcheck's dtype: the launcher does not ask)."""
    return _column_parts(rows, vocab, block, _part_cols_setting("RLHF_KERNELS_FWD_PART_COLS", 0))


def bwd_part_cols() -> int:
    """Columns per program of the log-prob backward: RLHF_KERNELS_BWD_PART_COLS (0: a
    program per row), DEFAULT_PART_COLS when unset. The backward only streams (read a logit,
    write its gradient), so a row can be cut into parts; with parts, consecutive programs
    cover consecutive pieces of one row and the programs in flight read and write one region
    of memory, as a copy kernel does, instead of one stream per row in flight."""
    return _part_cols_setting("RLHF_KERNELS_BWD_PART_COLS", DEFAULT_PART_COLS)


def bwd_parts(rows: int, vocab: int, block: int) -> tuple[int, int]:
    """(parts per row, columns per part) for the backward's launch: whole rows unless
    :func:`bwd_part_cols` asks for parts (:func:`_column_parts`)."""
    return _column_parts(rows, vocab, block, bwd_part_cols())


def kernel_configs() -> list[tuple[object, dict[str, str], dict[str, object], int]]:
    """Every (kernel, signature, constexprs, num_warps) the launchers can use, for AOT compile checks."""
    configs = []
    for ty, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        for vocab in (7, 1000, 128256):
            block, num_warps = _block_v(vocab, itemsize)
            for has_entropy in (False, True):
                const = {"HAS_ENTROPY": has_entropy, "BLOCK_V": block}
                # V as the JIT passes it: i32 (V < 2^30, _block_v); the rest at their widest
                ints = {n: "i64" for n in ("V", "size1", "size2", "stride0", "stride1", "stride2", "ignore_index")}
                ints["V"] = "i32"
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
                    "parts": "i32",
                    "part_cols": "i32",
                    "HAS_ENTROPY": "constexpr",
                    "BLOCK_V": "constexpr",
                    "ROW_ALIGNED": "constexpr",
                }
                for prefetch in (False, True):
                    configs.append((_logprobs_fwd_kernel, fwd_sig, {**const, "PREFETCH": prefetch}, num_warps))
                part_sig = {"logits_ptr": f"*{ty}", "labels_ptr": "*i64", "states_ptr": "*fp32",
                            **{n: ints[n] for n in ("V", "size1", "size2", "stride0", "stride1", "stride2")},
                            "inv_temp_hi": "fp32", "inv_temp_lo": "fp32", "ignore_index": "i64", "parts": "i32",
                            "part_cols": "i32", "HAS_ENTROPY": "constexpr", "BLOCK_V": "constexpr"}  # fmt: skip
                configs.append((_logprobs_fwd_part_kernel, part_sig, const, num_warps))
                merge_sig = {"logits_ptr": f"*{ty}", "labels_ptr": "*i64", "states_ptr": "*fp32",
                             "logprobs_ptr": "*fp32", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                             **{n: ints[n] for n in ("V", "size1", "size2", "stride0", "stride1", "stride2")},
                             "inv_temp_hi": "fp32", "inv_temp_lo": "fp32", "ignore_index": "i64", "parts": "i32",
                             "HAS_ENTROPY": "constexpr", "PARTS": "constexpr"}  # fmt: skip
                if vocab == 128256:  # (the merge does not depend on V's tile)
                    merge_const = {"HAS_ENTROPY": has_entropy, "PARTS": 16}
                    configs.append((_logprobs_fwd_merge_kernel, merge_sig, merge_const, 1))
                if not has_entropy:
                    seq_sig = {
                        "logits_ptr": f"*{ty}",
                        "labels_ptr": "*i64",
                        "lse_ptr": "*fp32",
                        "partial_ptr": "*fp32",
                        "count_ptr": "*i32",
                        "V": "i32",
                        **{n: "i64" for n in ("T", "chunk", "n_chunks", "size1", "size2")},
                        **{n: "i64" for n in ("stride0", "stride1", "stride2")},
                        "inv_temp_hi": "fp32",
                        "inv_temp_lo": "fp32",
                        "ignore_index": "i64",
                        "BLOCK_V": "constexpr",
                    }
                    configs.append((_seq_logprobs_fwd_kernel, seq_sig, {"BLOCK_V": block}, num_warps))
                for row_aligned in (False, True):
                    configs.append((_logprobs_bwd_kernel, bwd_sig, {**const, "ROW_ALIGNED": row_aligned}, num_warps))
    # Ints equal to 1 reach the JIT as constants: the usual layout of contiguous logits
    # (size1 = 1), one chunk per sequence (n_chunks = 1: [B, V] logits, T = 1, large B), and
    # a one-word vocabulary.
    for entry in list(configs):
        if entry[1]["logits_ptr"] == "*bf16" and entry[2].get("BLOCK_V") == 4096:
            configs.append(with_ones(entry, ("size1", "g_size1", "n_chunks", "chunk", "T", "parts")))
    for entry in list(configs):  # the V = 7 configurations, as V = 1
        if entry[1]["logits_ptr"] in ("*fp32", "*bf16") and entry[2].get("BLOCK_V") == 8:
            block, num_warps = _block_v(1, 4 if entry[1]["logits_ptr"] == "*fp32" else 2)
            one = (entry[0], entry[1], {**entry[2], "BLOCK_V": block}, num_warps)
            configs.append(with_ones(one, ("V", "size1", "g_size1", "n_chunks", "chunk", "T", "parts", "part_cols")))
    return configs
