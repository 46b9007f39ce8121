"""Triton kernels for PPO: the chunked GAE scan, the token losses, the KL estimators,
masked whitening, GRPO group advantages and the fused single sweep from logits to
the PPO loss (and the logits' gradient).

GAE semantics (response-mask skip, verl's compute_gae_advantage_return) are in
csrc/ppo.h and rlhf_kernels.ops.ppo.gae's docstring.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from rlhf_kernels._dispatch import triton_interpreted
from rlhf_kernels.reference.ppo import LOSS_AGG_MODES
from rlhf_kernels.triton._common import cdiv, join_float, next_power_of_2, split_float, with_ones
from rlhf_kernels.triton.logprobs import (
    _LOG2E,
    _align_head,
    _block_v,
    _dead_exp,
    _grad_consts,
    _grad_part,
    _grad_tile,
    _lane_vec,
    _lse2_tile,
    _merge_lanes,
    _online_lse2,
    _row_results,
    _row_start,
    _tile_cols,
    check_distinct_rows,
    kernel_layout,
    rows_aligned,
)


@triton.jit
def _affine_combine(c_right, d_right, c_left, d_left):
    # Scanning right to left: (c_right, d_right) maps the carry entering from the
    # right to the running advantage at the right neighbour; prepending the map
    # x -> d_left + c_left x of the position to its left gives that position's map.
    return c_left * c_right, d_left + c_left * d_right


@triton.jit
def _nearest_valid_combine(has_right, value_right, has_left, value_left):
    # The nearest valid value at or right of a position: the left one if valid.
    return tl.maximum(has_left, has_right), tl.where(has_left != 0, value_left, value_right)


GAE_LANES = 32  # a row's chunk spans one warp's lanes, 4 consecutive positions per lane
# Rows per program, one per warp. One: with more, Triton 3.6's coalescer gives the column
# loads a transposed layout and converts through shared memory (24-32 barriers a chunk,
# sm_90 AOT compile); Triton 3.8 keeps the warp-per-row layout either way. A one-warp
# program has no barrier at all; up to 32 fit on an SM.
GAE_ROWS = 1


@triton.jit
def _quad_split(x):
    """A [ROWS, LANES, 4] tile as its four [ROWS, LANES] columns (each lane's 4 positions
    in order; register moves only: a lane holds its 4 elements)."""
    ROWS: tl.constexpr = x.shape[0]
    LANES: tl.constexpr = x.shape[1]
    even, odd = tl.split(tl.reshape(x, (ROWS, LANES, 2, 2)))  # positions 0, 2 and 1, 3
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _quad_join(x0, x1, x2, x3):
    """The inverse of _quad_split."""
    ROWS: tl.constexpr = x0.shape[0]
    LANES: tl.constexpr = x0.shape[1]
    return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (ROWS, LANES, 4))


@triton.jit
def _gae_column(r_row, v_row, m_row, t, T, row_ok, HAS_MASK: tl.constexpr):
    inb = (t >= 0) & (t < T) & row_ok
    r = tl.load(r_row + t, mask=inb, other=0.0)
    v = tl.load(v_row + t, mask=inb, other=0.0)
    if HAS_MASK:
        return r, v, tl.load(m_row + t, mask=inb, other=0) != 0
    return r, v, inb


@triton.jit
def _gae_chunk(r_row, v_row, m_row, pos, T, row_ok, HAS_MASK: tl.constexpr, VEC: tl.constexpr):
    # Rewards, values and validity at positions pos + k, k = 0..3, of each lane. VEC: as one
    # [ROWS, LANES, 4] tile per input, a lane's 4 positions contiguous (one 16-byte load of
    # float32 when the JIT knows the rows aligned), split into four [ROWS, LANES] columns;
    # else as four column loads. (Where the JIT cannot prove the alignment, the tile's load
    # layout is not the split's, and each tile went through shared memory.)
    if VEC:
        t = pos[:, :, None] + tl.arange(0, 4)[None, None, :]
        inb = (t >= 0) & (t < T) & row_ok[:, :, None]
        r0, r1, r2, r3 = _quad_split(tl.load(r_row[:, :, None] + t, mask=inb, other=0.0))
        v0, v1, v2, v3 = _quad_split(tl.load(v_row[:, :, None] + t, mask=inb, other=0.0))
        if HAS_MASK:
            m0, m1, m2, m3 = _quad_split(tl.load(m_row[:, :, None] + t, mask=inb, other=0) != 0)
        else:
            m0, m1, m2, m3 = _quad_split(inb)
    else:
        r0, v0, m0 = _gae_column(r_row, v_row, m_row, pos, T, row_ok, HAS_MASK)
        r1, v1, m1 = _gae_column(r_row, v_row, m_row, pos + 1, T, row_ok, HAS_MASK)
        r2, v2, m2 = _gae_column(r_row, v_row, m_row, pos + 2, T, row_ok, HAS_MASK)
        r3, v3, m3 = _gae_column(r_row, v_row, m_row, pos + 3, T, row_ok, HAS_MASK)
    return r0, r1, r2, r3, v0, v1, v2, v3, m0, m1, m2, m3


@triton.jit
def _gae_store(row_ptr, pos, T, row_ok, x0, x1, x2, x3, VEC: tl.constexpr):
    """Stores a chunk's four columns (positions pos + k) as _gae_chunk loads them."""
    if VEC:
        t = pos[:, :, None] + tl.arange(0, 4)[None, None, :]
        tl.store(row_ptr[:, :, None] + t, _quad_join(x0, x1, x2, x3), mask=(t < T) & row_ok[:, :, None])
    else:
        tl.store(row_ptr + pos, x0, mask=(pos < T) & row_ok)
        tl.store(row_ptr + pos + 1, x1, mask=(pos + 1 < T) & row_ok)
        tl.store(row_ptr + pos + 2, x2, mask=(pos + 2 < T) & row_ok)
        tl.store(row_ptr + pos + 3, x3, mask=(pos + 3 < T) & row_ok)


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    B, T, r_stride, v_stride, m_stride, gamma_hi, gamma_lo, gamma_lam_hi, gamma_lam_lo,
    HAS_MASK: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    # Grid: (cdiv(B, ROWS),), one warp per row (the layout of csrc/ppo.cu's kernel).
    # A warp walks its row right to left in chunks of 4 * LANES positions: lane l
    # holds the 4 consecutive positions 4 (LANES - 1 - l) + k, k = 0..3, as four
    # [ROWS, LANES] columns (four loads a lane, 16 bytes apart: the warp's loads
    # cover the same 128-byte lines, so memory traffic is that of 16-byte vectors, and the
    # layout is one row per warp whatever the rows' alignment; with VEC, rows the JIT knows
    # aligned, one 16-byte access a lane and input: _gae_chunk), and lane 0
    # is the chunk's right end. Within a lane both recurrences run sequentially
    # from its right end; across lanes they are forward scans (lane order is right
    # to left: no reverse scans, which have been unreliable on GPUs) over the
    # lanes' summaries: the nearest valid value, and the composed affine map
    # x -> d + c x of the running advantage. A lane takes its right neighbour's
    # inclusive result (a shuffle), and the results at the chunk's left end carry
    # into the next chunk. No shared memory, no barriers; the next chunk's loads
    # are in flight during a chunk's scans. Reads rewards, values and the mask,
    # writes advantages and returns: ~17 bytes per element in float32, each once.
    acc_ty = adv_ptr.dtype.element_ty
    gamma = join_float(gamma_hi, gamma_lo, acc_ty)
    gamma_lam = join_float(gamma_lam_hi, gamma_lam_lo, acc_ty)
    CHUNK: tl.constexpr = 4 * LANES
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = (rows < B)[:, None]
    rows = rows.to(tl.int64)[:, None]
    r_row, v_row, m_row = rewards_ptr + rows * r_stride, values_ptr + rows * v_stride, mask_ptr + rows * m_stride
    adv_row, ret_row = adv_ptr + rows * T, ret_ptr + rows * T
    lane = tl.arange(0, LANES)
    right_lane = tl.broadcast_to(tl.maximum(lane - 1, 0)[None, :], (ROWS, LANES))
    left_lane = tl.full((ROWS, LANES), LANES - 1, tl.int32)
    rightmost = (lane == 0)[None, :]
    carry_adv = tl.zeros((ROWS, LANES), acc_ty)  # the advantage entering from the right, in every lane
    carry_next = tl.zeros((ROWS, LANES), acc_ty)  # the next value entering from the right
    pos = (tl.cdiv(T, CHUNK) - 1) * CHUNK + (4 * (LANES - 1 - lane))[None, :]
    ahead = _gae_chunk(r_row, v_row, m_row, pos, T, row_ok, HAS_MASK, VEC)
    for _ in range(tl.cdiv(T, CHUNK)):
        here = pos
        r0, r1, r2, r3, v0, v1, v2, v3, m0, m1, m2, m3 = ahead
        pos = here - CHUNK
        ahead = _gae_chunk(r_row, v_row, m_row, pos, T, row_ok, HAS_MASK, VEC)
        r0, r1, r2, r3 = r0.to(acc_ty), r1.to(acc_ty), r2.to(acc_ty), r3.to(acc_ty)
        v0, v1, v2, v3 = v0.to(acc_ty), v1.to(acc_ty), v2.to(acc_ty), v3.to(acc_ty)
        # Next value at each position: the value at the nearest valid position right of it.
        has = (m0 | m1 | m2 | m3).to(tl.int32)
        leftmost = tl.where(m0, v0, tl.where(m1, v1, tl.where(m2, v2, v3)))
        has_inc, value_inc = tl.associative_scan((has, leftmost), 1, _nearest_valid_combine)
        from_right = tl.where(rightmost, 0, tl.gather(has_inc, right_lane, 1)) != 0
        n3 = tl.where(from_right, tl.gather(value_inc, right_lane, 1), carry_next)
        n2 = tl.where(m3, v3, n3)
        n1 = tl.where(m2, v2, n2)
        n0 = tl.where(m1, v1, n1)
        carry_next = tl.gather(tl.where(m0, v0, n0), left_lane, 1)
        # Running advantage: x -> d + c x per position, (gamma lam, delta) if valid, else the identity.
        c0 = tl.where(m0, gamma_lam, 1.0).to(acc_ty)
        c1 = tl.where(m1, gamma_lam, 1.0).to(acc_ty)
        c2 = tl.where(m2, gamma_lam, 1.0).to(acc_ty)
        c3 = tl.where(m3, gamma_lam, 1.0).to(acc_ty)
        d0 = tl.where(m0, r0 + gamma * n0 - v0, 0.0).to(acc_ty)
        d1 = tl.where(m1, r1 + gamma * n1 - v1, 0.0).to(acc_ty)
        d2 = tl.where(m2, r2 + gamma * n2 - v2, 0.0).to(acc_ty)
        d3 = tl.where(m3, r3 + gamma * n3 - v3, 0.0).to(acc_ty)
        c_inc, d_inc = tl.associative_scan((c0 * c1 * c2 * c3, d0 + c0 * (d1 + c1 * (d2 + c2 * d3))), 1,
                                           _affine_combine)  # fmt: skip
        c_right = tl.where(rightmost, 1.0, tl.gather(c_inc, right_lane, 1))
        d_right = tl.where(rightmost, 0.0, tl.gather(d_inc, right_lane, 1))
        a3 = d3 + c3 * (d_right + c_right * carry_adv)
        a2 = d2 + c2 * a3
        a1 = d1 + c1 * a2
        a0 = d0 + c0 * a1
        carry_adv = tl.gather(a0, left_lane, 1)
        _gae_store(adv_row, here, T, row_ok, a0, a1, a2, a3, VEC)
        _gae_store(ret_row, here, T, row_ok, a0 + v0, a1 + v1, a2 + v2, a3 + v3, VEC)


def gae(rewards, values, mask, gamma, lam, launch=None):
    """Launch the GAE kernel on [B, T] rows (unit stride along T). One row's stride is passed
    as 0, which the JIT knows divisible by 16 (gae_vectors ignores it)."""
    B, T = rewards.shape
    advantages = torch.empty((B, T), dtype=rewards.dtype, device=rewards.device)
    returns = torch.empty_like(advantages)
    if B == 0 or T == 0:
        return advantages, returns
    kernel = _gae_kernel if launch is None else launch(_gae_kernel)
    kernel[(cdiv(B, GAE_ROWS),)](
        rewards, values, values if mask is None else mask, advantages, returns,
        B, T, *(0 if t is None or B == 1 else t.stride(0) for t in (rewards, values, mask)), *split_float(gamma),
        *split_float(gamma * lam),
        HAS_MASK=mask is not None, ROWS=GAE_ROWS, LANES=GAE_LANES, VEC=gae_vectors(rewards, values, mask),
        num_warps=GAE_ROWS,
    )  # fmt: skip
    return advantages, returns


def gae_vectors(*tensors) -> bool:
    """Whether the GAE kernel's chunks load and store a lane's 4 positions as one vector
    (_gae_chunk's VEC): when the JIT will know every row 16-byte aligned, i.e. each
    ``[B, T]`` tensor (None: absent) starts 16 bytes into its storage and T and the row
    strides are multiples of 16 elements (the divisibility the JIT records of an int)."""
    for t in tensors:
        if t is None:
            continue
        if t.storage_offset() * t.element_size() % 16 or t.shape[1] % 16 or (t.shape[0] > 1 and t.stride(0) % 16):
            return False
    return True


# --- PPO token losses: clipped policy surrogate and clipped value loss ---------------------

POLICY = 0
VALUE = 1
N_ROW_SUMS = 5  # per row: loss sum, count, clipped, kl (policy), clipped-lower (policy)
ROW_SUMS = tl.constexpr(N_ROW_SUMS)  # kernels may only read constexpr globals
METRICS = 5  # clipfrac, approx kl, clipfrac lower, total tokens, sequences with tokens (both at least 1)
AGG_BLOCK = 1024  # rows per step of the aggregation program


@triton.jit
def _max(a, b):
    """max / min that propagate NaN (Triton's default drops it on GPU): a NaN token stays NaN, as in
    torch.clamp / torch.maximum and csrc/ppo_loss_math.h."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _policy_token(logp, old, adv, low, high, clip_c, HAS_DUAL: tl.constexpr):
    """Per-token PPO loss, d loss / d logp and the clip indicators (verl's compute_policy_loss)."""
    log_ratio = _min(_max(logp - old, -20.0), 20.0)
    ratio = tl.exp(log_ratio)
    dratio = tl.where(tl.abs(logp - old) < 20.0, ratio, 0.0)  # clamp cuts the gradient outside
    clipped_ratio = _min(_max(ratio, 1.0 - low), 1.0 + high)
    in_clip = (ratio > 1.0 - low) & (ratio < 1.0 + high)
    loss1 = -adv * ratio
    loss2 = -adv * clipped_ratio
    clipped = _max(loss1, loss2)
    # max picks the unclipped term unless the clipped one is larger (ties: same gradient)
    dclipped = tl.where(loss2 > loss1, tl.where(in_clip, -adv * dratio, 0.0), -adv * dratio)
    clip_hit = (loss2 > loss1).to(tl.float32)
    loss = clipped
    dloss = dclipped
    lower_hit = tl.zeros_like(clip_hit)
    if HAS_DUAL:
        loss3 = -adv * clip_c
        neg = adv < 0
        use3 = neg & (loss3 < clipped)
        loss = tl.where(use3, loss3, clipped)
        dloss = tl.where(use3, 0.0, dclipped)
        lower_hit = (neg & (clipped > loss3)).to(tl.float32)
    return loss, dloss, clip_hit, lower_hit, -log_ratio


@triton.jit
def _value_token(v, old_v, ret, clip_range):
    """Per-token 0.5 * max((v - R)^2, (clip(v, old +- eps) - R)^2) and d/dv."""
    clipped_v = _min(_max(v, old_v - clip_range), old_v + clip_range)  # v itself inside (csrc: value_token)
    e1 = v - ret
    e2 = clipped_v - ret
    l1 = e1 * e1
    l2 = e2 * e2
    use2 = l2 > l1  # only outside the range, where clipped_v does not depend on v
    loss = 0.5 * _max(l1, l2)
    dloss = tl.where(use2, 0.0, tl.where(l2 != l2, l2, e1))  # NaN old: NaN gradient, as torch
    return loss, dloss, use2.to(tl.float32)


@triton.jit
def _ppo_loss_fwd_kernel(
    x_ptr, old_ptr, third_ptr, mask_ptr, rows_ptr, T,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo, KIND: tl.constexpr, HAS_DUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (B,). Each program owns one row of [B, T] contiguous inputs and
    # writes rows[b, 0..4] = (masked loss sum, count, clipped, kl, clipped
    # lower). POLICY: x = logprobs, old = old logprobs, third = advantages,
    # (p0, p1, p2) = (clip low, clip high, dual-clip c). VALUE: x = values,
    # old = old values, third = returns, p0 = clip range. Reads 13 bytes per
    # token (float32 + bool mask); _ppo_loss_agg_kernel folds the rows.
    row = tl.program_id(0).to(tl.int64)
    acc_ty = rows_ptr.dtype.element_ty
    p0 = join_float(p0_hi, p0_lo, acc_ty)
    p1 = join_float(p1_hi, p1_lo, acc_ty)
    p2 = join_float(p2_hi, p2_lo, acc_ty)
    cols = tl.arange(0, BLOCK)
    loss_sum = tl.zeros((BLOCK,), acc_ty)
    count = tl.zeros((BLOCK,), acc_ty)
    clip_sum = tl.zeros((BLOCK,), acc_ty)
    kl_sum = tl.zeros((BLOCK,), acc_ty)
    lower_sum = tl.zeros((BLOCK,), acc_ty)
    for start in range(0, T, BLOCK):
        offs = row * T + start + cols
        inb = start + cols < T
        keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
        x = tl.load(x_ptr + offs, mask=inb, other=0.0)
        old = tl.load(old_ptr + offs, mask=inb, other=0.0)
        third = tl.load(third_ptr + offs, mask=inb, other=0.0)
        if KIND == 0:
            loss, _, clip_hit, lower_hit, kl = _policy_token(x, old, third, p0, p1, p2, HAS_DUAL)
            kl_sum += tl.where(keep, kl, 0.0)
            lower_sum += tl.where(keep, lower_hit, 0.0)
        else:
            loss, _, clip_hit = _value_token(x, old, third, p0)
        loss_sum += tl.where(keep, loss, 0.0)
        count += keep.to(acc_ty)
        clip_sum += tl.where(keep, clip_hit, 0.0)
    out = rows_ptr + row * ROW_SUMS
    tl.store(out + 0, tl.sum(loss_sum, axis=0))
    tl.store(out + 1, tl.sum(count, axis=0))
    tl.store(out + 2, tl.sum(clip_sum, axis=0))
    tl.store(out + 3, tl.sum(kl_sum, axis=0))
    tl.store(out + 4, tl.sum(lower_sum, axis=0))


@triton.jit
def _ppo_loss_agg_kernel(rows_ptr, loss_ptr, metrics_ptr, B, T, AGG: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (1,). Folds rows [B, 5] into the aggregated loss and metrics
    # (csrc/ppo.h, PpoLossParams), in float64 whatever the input type; a fixed
    # order, so deterministic. Reads 5 values per row once.
    cols = tl.arange(0, BLOCK)
    loss = tl.zeros((BLOCK,), tl.float64)
    loss_per_token = tl.zeros((BLOCK,), tl.float64)
    count = tl.zeros((BLOCK,), tl.float64)
    clip = tl.zeros((BLOCK,), tl.float64)
    kl = tl.zeros((BLOCK,), tl.float64)
    lower = tl.zeros((BLOCK,), tl.float64)
    seqs = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, B, BLOCK):
        r = start + cols
        inb = r < B
        base = rows_ptr + r.to(tl.int64) * ROW_SUMS
        row_loss = tl.load(base + 0, mask=inb, other=0.0).to(tl.float64)
        row_count = tl.load(base + 1, mask=inb, other=0.0).to(tl.float64)
        loss += row_loss
        loss_per_token += row_loss / tl.maximum(row_count, 1.0)
        count += row_count
        clip += tl.load(base + 2, mask=inb, other=0.0).to(tl.float64)
        kl += tl.load(base + 3, mask=inb, other=0.0).to(tl.float64)
        lower += tl.load(base + 4, mask=inb, other=0.0).to(tl.float64)
        seqs += tl.where(row_count > 0, 1.0, 0.0).to(tl.float64)
    total = tl.maximum(tl.sum(count, axis=0), 1.0)
    n_seqs = tl.maximum(tl.sum(seqs, axis=0), 1.0)
    if AGG == 0:
        result = tl.sum(loss, axis=0) / total
    elif AGG == 1:
        result = tl.sum(loss, axis=0) / n_seqs
    elif AGG == 2:
        result = tl.sum(loss_per_token, axis=0) / n_seqs
    elif AGG == 4:
        result = tl.sum(loss, axis=0)
    else:
        result = tl.sum(loss, axis=0) / (n_seqs * tl.maximum(T, 1).to(tl.float64))
    out_ty = loss_ptr.dtype.element_ty
    tl.store(loss_ptr, result.to(out_ty))
    tl.store(metrics_ptr + 0, (tl.sum(clip, axis=0) / total).to(out_ty))
    tl.store(metrics_ptr + 1, (tl.sum(kl, axis=0) / total).to(out_ty))
    tl.store(metrics_ptr + 2, (tl.sum(lower, axis=0) / total).to(out_ty))
    tl.store(metrics_ptr + 3, total.to(out_ty))
    tl.store(metrics_ptr + 4, n_seqs.to(out_ty))


@triton.jit
def _ppo_loss_bwd_kernel(
    x_ptr, old_ptr, third_ptr, mask_ptr, rows_ptr, metrics_ptr, grad_loss_ptr, grad_x_ptr, T,
    p0_hi, p0_lo, p1_hi, p1_lo, p2_hi, p2_lo, KIND: tl.constexpr, HAS_DUAL: tl.constexpr, AGG: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (B, cdiv(T, BLOCK)). Each program owns BLOCK tokens of one row:
    # d loss / d x = grad_loss * w_b * mask * d token_loss / d x, w_b the
    # row's weight in the aggregate (csrc/ppo_loss_math.h: row_weight).
    row = tl.program_id(0).to(tl.int64)
    acc_ty = grad_x_ptr.dtype.element_ty
    p0 = join_float(p0_hi, p0_lo, acc_ty)
    p1 = join_float(p1_hi, p1_lo, acc_ty)
    p2 = join_float(p2_hi, p2_lo, acc_ty)
    offs_t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs_t < T
    offs = row * T + offs_t
    keep = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    third = tl.load(third_ptr + offs, mask=inb, other=0.0)
    if AGG == 0:
        w = 1.0 / tl.load(metrics_ptr + 3)
    elif AGG == 1:
        w = 1.0 / tl.load(metrics_ptr + 4)
    elif AGG == 2:
        w = 1.0 / (tl.maximum(tl.load(rows_ptr + row * ROW_SUMS + 1), 1.0) * tl.load(metrics_ptr + 4))
    elif AGG == 4:
        w = tl.full((), 1.0, acc_ty)
    else:
        w = 1.0 / (tl.load(metrics_ptr + 4) * tl.maximum(T, 1).to(acc_ty))
    g = tl.load(grad_loss_ptr) * w
    if KIND == 0:
        _, dloss, _, _, _ = _policy_token(x, old, third, p0, p1, p2, HAS_DUAL)
    else:
        _, dloss, _ = _value_token(x, old, third, p0)
    tl.store(grad_x_ptr + offs, tl.where(keep, g * dloss, 0.0), mask=inb)


def _loss_block(T: int) -> int:
    """Up to 512 tokens per step, 4 per thread: five accumulators stay in registers."""
    return max(16, min(512, next_power_of_2(T)))


def ppo_loss_fwd(kind, x, old, third, mask, p0, p1, p2, has_dual, agg, launch=None):
    """(loss [], metrics [5], rows [B, 5]) of contiguous [B, T] inputs (csrc/ppo.h: PpoLossParams)."""
    B, T = x.shape
    loss = torch.empty((), dtype=x.dtype, device=x.device)
    metrics = torch.empty(METRICS, dtype=x.dtype, device=x.device)
    rows = torch.empty(B, N_ROW_SUMS, dtype=x.dtype, device=x.device)
    if B > 0:
        kernel = _ppo_loss_fwd_kernel if launch is None else launch(_ppo_loss_fwd_kernel)
        kernel[(B,)](x, old, third, mask, rows, T, *split_float(p0), *split_float(p1), *split_float(p2),
                     KIND=kind, HAS_DUAL=has_dual, BLOCK=_loss_block(T), num_warps=4)  # fmt: skip
    agg_kernel = _ppo_loss_agg_kernel if launch is None else launch(_ppo_loss_agg_kernel)
    agg_kernel[(1,)](rows, loss, metrics, B, T, AGG=agg, BLOCK=AGG_BLOCK, num_warps=8)
    return loss, metrics, rows


def ppo_loss_bwd(kind, x, old, third, mask, rows, metrics, grad_loss, p0, p1, p2, has_dual, agg, launch=None):
    B, T = x.shape
    grad = torch.empty_like(x)
    if B == 0 or T == 0:
        return grad
    block = _loss_block(T)
    kernel = _ppo_loss_bwd_kernel if launch is None else launch(_ppo_loss_bwd_kernel)
    kernel[(B, cdiv(T, block))](x, old, third, mask, rows, metrics, grad_loss.to(x.dtype).contiguous(), grad,
                                       T, *split_float(p0), *split_float(p1), *split_float(p2), KIND=kind,
                                       HAS_DUAL=has_dual, AGG=agg, BLOCK=block, num_warps=4)  # fmt: skip
    return grad


# --- KL penalty ------------------------------------------------------------------------------

KL_KIND_IDS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}


@triton.jit
def _kl_token(logp, ref, KIND: tl.constexpr):
    """The KL estimator and its derivative with respect to logp."""
    diff = logp - ref
    if KIND == 0:
        return diff, tl.full(diff.shape, 1.0, diff.dtype)
    elif KIND == 1:
        return tl.abs(diff), tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)).to(diff.dtype)
    elif KIND == 2:
        return 0.5 * diff * diff, diff
    else:
        kl = _min(_max(-diff, -20.0), 20.0)
        e = tl.exp(kl)
        raw = e - kl - 1.0
        value = _min(_max(raw, -10.0), 10.0)
        # d/dlogp = -(e - 1) inside both clamps, 0 outside
        live = (tl.abs(diff) < 20.0) & (raw < 10.0) & (raw > -10.0)
        return value, tl.where(live, 1.0 - e, 0.0)


@triton.jit
def _kl_kernel(logp_ptr, ref_ptr, out_ptr, grad_out_ptr, n, KIND: tl.constexpr, BACKWARD: tl.constexpr,
               BLOCK: tl.constexpr):  # fmt: skip
    # Grid: (cdiv(n, BLOCK),), elementwise over contiguous inputs. Forward
    # writes the estimator; backward writes grad_out * d estimator / d logp.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    value, d = _kl_token(logp, ref, KIND)
    if BACKWARD:
        g = tl.load(grad_out_ptr + offs, mask=inb, other=0.0)
        tl.store(out_ptr + offs, g * d, mask=inb)
    else:
        tl.store(out_ptr + offs, value, mask=inb)


def kl_penalty(logp, ref, kind, grad_out=None, launch=None):
    """Forward (grad_out None) or backward of the KL estimator on contiguous inputs."""
    out = torch.empty_like(logp)
    n = logp.numel()
    if n == 0:
        return out
    kernel = _kl_kernel if launch is None else launch(_kl_kernel)
    kernel[(cdiv(n, 1024),)](logp, ref, out, logp if grad_out is None else grad_out, n,
                                    KIND=KL_KIND_IDS[kind], BACKWARD=grad_out is not None, BLOCK=1024)  # fmt: skip
    return out


def kernel_configs():
    """The PPO kernels as launched (float32), for AOT compile checks."""
    configs = []
    for has_mask in (False, True):
        for dtype in ("fp32", "fp64"):
            sig = {"rewards_ptr": f"*{dtype}", "values_ptr": f"*{dtype}",
                   "mask_ptr": "*u8" if has_mask else f"*{dtype}", "adv_ptr": f"*{dtype}",
                   "ret_ptr": f"*{dtype}", "B": "i32", "T": "i32", "r_stride": "i32", "v_stride": "i32",
                   "m_stride": "i32", "gamma_hi": "fp32", "gamma_lo": "fp32", "gamma_lam_hi": "fp32",
                   "gamma_lam_lo": "fp32", "HAS_MASK": "constexpr", "ROWS": "constexpr",
                   "LANES": "constexpr", "VEC": "constexpr"}  # fmt: skip
            for vec in (False, True):
                const = {"HAS_MASK": has_mask, "ROWS": GAE_ROWS, "LANES": GAE_LANES, "VEC": vec}
                entry = (_gae_kernel, sig, const, GAE_ROWS)
                configs.append(entry)
                if dtype == "fp32" and not vec:
                    configs.append(with_ones(entry, ("B", "T", "r_stride", "v_stride", "m_stride")))
    common = {"x_ptr": "*fp32", "old_ptr": "*fp32", "third_ptr": "*fp32", "mask_ptr": "*u8"}
    scalars = {"T": "i64", **{f"p{i}_{part}": "fp32" for i in range(3) for part in ("hi", "lo")}}
    consts = {"KIND": "constexpr", "HAS_DUAL": "constexpr", "BLOCK": "constexpr"}
    for kind, dual in ((POLICY, False), (POLICY, True), (VALUE, False)):
        fwd = {**common, "rows_ptr": "*fp32", **scalars, **consts}
        configs.append((_ppo_loss_fwd_kernel, fwd, {"KIND": kind, "HAS_DUAL": dual, "BLOCK": 512}, 4))
        for agg in range(len(LOSS_AGG_MODES)):  # AGG = the mode's index
            bwd = {**common, "rows_ptr": "*fp32", "metrics_ptr": "*fp32", "grad_loss_ptr": "*fp32",
                   "grad_x_ptr": "*fp32", **scalars, **consts, "AGG": "constexpr"}  # fmt: skip
            configs.append((_ppo_loss_bwd_kernel, bwd, {"KIND": kind, "HAS_DUAL": dual, "AGG": agg, "BLOCK": 512}, 4))
    for agg in range(len(LOSS_AGG_MODES)):  # AGG = the mode's index
        sig = {"rows_ptr": "*fp32", "loss_ptr": "*fp32", "metrics_ptr": "*fp32", "B": "i64", "T": "i64",
               "AGG": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
        configs.append((_ppo_loss_agg_kernel, sig, {"AGG": agg, "BLOCK": AGG_BLOCK}, 8))
    for kind in KL_KIND_IDS.values():
        for backward in (False, True):
            sig = {"logp_ptr": "*fp32", "ref_ptr": "*fp32", "out_ptr": "*fp32", "grad_out_ptr": "*fp32", "n": "i64",
                   "KIND": "constexpr", "BACKWARD": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
            configs.append((_kl_kernel, sig, {"KIND": kind, "BACKWARD": backward, "BLOCK": 1024}, 4))
    return configs + _fused_configs() + _whiten_grpo_configs()


# --- PPO from logits: the fused single sweep ---------------------------------------------------

FUSED_STATS = 7  # per token: weighted loss term, pg loss, entropy, kl, clipped, clipped-lower, -log ratio


@triton.jit
def _ppo_token(
    logp, entropy, row, old_ptr, adv_ptr, ref_ptr, weights_ptr, st, inv_temp, low_hi, low_lo, high_hi, high_lo,
    c_hi, c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, WRITE_STATS, HAS_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):  # fmt: skip
    """A token's PPO math on scalars, from its log-prob and entropy: the clipped surrogate,
    the KL to the reference, the entropy bonus and the aggregation weight. Stores the
    token's FUSED_STATS at ``st`` when WRITE_STATS; returns (gi, a0, a1) of its logits'
    gradient (_grad_tile): d loss / d logp = w (d pg / d logp + c_KL d KL / d logp) and
    d loss / d H = -c_H w."""
    acc_ty = entropy.dtype
    old = tl.load(old_ptr + row)
    adv = tl.load(adv_ptr + row)
    weight = tl.load(weights_ptr + row)
    low = join_float(low_hi, low_lo, acc_ty)
    high = join_float(high_hi, high_lo, acc_ty)
    clip_c = join_float(c_hi, c_lo, acc_ty)
    ent_coef = join_float(ent_coef_hi, ent_coef_lo, acc_ty)
    pg, dpg, clip_hit, lower_hit, neg_log_ratio = _policy_token(logp, old, adv, low, high, clip_c, HAS_DUAL)
    term = pg - ent_coef * entropy
    dlogp = dpg
    kl = tl.zeros((), acc_ty)
    if HAS_REF:
        kl_coef = join_float(kl_coef_hi, kl_coef_lo, acc_ty)
        kl, dkl = _kl_token(logp, tl.load(ref_ptr + row), KL_KIND)
        # kl_coef = 0: the KL is a metric only; an inf / NaN KL must not reach the loss
        term += tl.where(kl_coef != 0, kl_coef * kl, 0.0)
        dlogp += tl.where(kl_coef != 0, kl_coef * dkl, 0.0)
    if WRITE_STATS:
        tl.store(st + 0, weight * term)
        tl.store(st + 1, pg)
        tl.store(st + 2, entropy)
        tl.store(st + 3, kl)
        tl.store(st + 4, clip_hit)
        tl.store(st + 5, lower_hit)
        tl.store(st + 6, neg_log_ratio)
    return _grad_consts(weight * dlogp, -ent_coef * weight, entropy, inv_temp, acc_ty, HAS_ENTROPY_GRAD)


@triton.jit
def _ppo_logits_kernel(
    logits_ptr, grad_ptr, labels_ptr, old_ptr, adv_ptr, ref_ptr, weights_ptr, stats_ptr,
    rows, V, size1, size2, stride0, stride1, stride2, g_size1, g_size2, g_stride0, g_stride1, g_stride2,
    inv_temp_hi, inv_temp_lo, low_hi, low_lo, high_hi, high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo,
    ent_coef_hi, ent_coef_lo, ignore_index,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, PREFETCH: tl.constexpr, ROW_ALIGNED: tl.constexpr,
    PERSISTENT: tl.constexpr,
):  # fmt: skip
    # Grid: (G,), G <= rows = B * T; program i owns token rows i, i + G, ...
    # (G = rows by default; PERSISTENT: fewer, see ppo_logits_fused). A program of one row
    # has no loop over rows: inside one, ptxas issued a thread's second 16-byte load of
    # pass 1 only after the first one's data was used (benchmarks/sass_loops.py). Per row:
    # pass 1 streams its V logits once (online max / sum of 2^(u - m) / entropy
    # sum: _online_lse2, as _logprobs_fwd_kernel), then the per-token PPO math runs on
    # scalars (log-prob, entropy, clipped surrogate, KL, aggregation weight w
    # and dL/dlogp, dL/dH); with WRITE_GRAD, pass 2 reads the row again and
    # writes
    #   dlogits_j = (g (1[j == y] - p_j) - gH p_j (z_j - lse + H)) / T,
    #   g = w (d pg / d logp + c_KL d KL / d logp),  gH = -c_H w.
    # Bytes per row: V * itemsize read from HBM (pass 2's read is meant to hit
    # L2), V * itemsize written with WRITE_GRAD, 32 read + 28 written in
    # float32 for the per-token scalars. grad_ptr may alias logits_ptr (in
    # place): pass 2 reads each element before the same program writes it.
    # Ignored / masked rows read no logits and get zero stats and gradient.
    acc_ty = stats_ptr.dtype.element_ty
    log2e = tl.full((), _LOG2E, acc_ty)
    inv_temp = join_float(inv_temp_hi, inv_temp_lo, acc_ty)
    scale2 = inv_temp * log2e
    # Pass 1 with lane rows only without PREFETCH: lane rows and the prefetched tile together
    # cross ptxas's 64-register target into spills (see fused_prefetch).
    LANE_ROWS: tl.constexpr = _no(PREFETCH)
    # (the same offsets as pass 1's)
    cols = _tile_cols(logits_ptr.dtype.element_ty.primitive_bitwidth, BLOCK_V, LANE_ROWS)
    first = tl.program_id(0).to(tl.int64)
    if PERSISTENT:
        end = rows
        step = tl.num_programs(0)
    else:
        end = first + 1
        step = 1
    for row in range(first, end, step):
        st = stats_ptr + row * 7
        label = tl.load(labels_ptr + row)
        g_row = grad_ptr + _row_start(row, g_size1, g_size2, g_stride0, g_stride1, g_stride2)
        if (label == ignore_index) | (label < 0) | (label >= V):
            # masked / ignored: 0 everywhere; a kept label outside [0, V): NaN (never an address)
            fill = tl.where(label == ignore_index, 0.0, float("nan")).to(acc_ty)
            for k in tl.static_range(7):
                tl.store(st + k, fill)
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tl.store(g_row + offs, tl.zeros(cols.shape, acc_ty) + fill, mask=offs < V)
        else:
            x_row = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
            # (The label's logit loaded after the sweep, not passed in as u0 the way the
            # log-prob forward does: loaded first, it spilled registers on sm_80 for the
            # single-row constant configuration, compile_check.)
            no_max = tl.full((), float("-inf"), acc_ty)
            m, s, w2 = _online_lse2(x_row, V, scale2, acc_ty, True, BLOCK_V, no_max, PREFETCH, LANE_ROWS)
            x_label = tl.load(x_row + label).to(acc_ty)
            lse2, _, logp, entropy = _row_results(m, s, w2, x_label, scale2, acc_ty)
            gi, a0, a1 = _ppo_token(
                logp, entropy, row, old_ptr, adv_ptr, ref_ptr, weights_ptr, st, inv_temp, low_hi, low_lo, high_hi,
                high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, True, HAS_DUAL, HAS_REF,
                KL_KIND, HAS_ENTROPY_GRAD,
            )  # fmt: skip
            if WRITE_GRAD:
                _grad_part(x_row, g_row, 0, V, V, cols, label.to(tl.int32), scale2, lse2, gi, a0, a1, acc_ty,
                           HAS_ENTROPY_GRAD, BLOCK_V, ROW_ALIGNED)  # fmt: skip


@triton.jit
def _part_stats(x, scale2, acc_ty: tl.constexpr):
    """(m, s, w) of one tile of logits x as _online_lse2 returns them for a row: m the max
    of u = x * scale2, s = sum 2^(u - m), w = sum 2^(u - m) (u - m); a tile of only -inf
    has m = -inf and s = w = 0."""
    u = x.to(acc_ty) * scale2
    m = tl.max(u, axis=0)
    pivot = tl.where(m == float("-inf"), 0.0, m).to(acc_ty)
    d = tl.maximum(u - pivot, _dead_exp(acc_ty.primitive_bitwidth), propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    return m, tl.sum(e, axis=0), tl.sum(e * d, axis=0)


@triton.jit
def _sub_grad(
    g_ptr, x, cols, label, n, full, scale2, lse2, gi, a0, a1, acc_ty: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):  # fmt: skip
    """Stores the gradient (_grad_tile) of a tile x of a part at g_ptr: its first n columns
    (all of them when ``full``); label relative to the tile."""
    d = _grad_tile(x, cols, label, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY).to(g_ptr.dtype.element_ty)
    if full:
        tl.store(g_ptr + cols, d)
    else:
        tl.store(g_ptr + cols, d, mask=cols < n)


@triton.jit
def _ppo_part(
    x_row, g_row, x_part, g_part, head, part, row, label, parts, V, st, partial_ptr, sync_ptr, old_ptr, adv_ptr,
    ref_ptr, weights_ptr, inv_temp_hi, inv_temp_lo, low_hi, low_lo, high_hi, high_lo, c_hi, c_lo, kl_coef_hi,
    kl_coef_lo, ent_coef_hi, ent_coef_lo, acc_ty: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr,
    KL_KIND: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, PART: tl.constexpr, MAX_PARTS: tl.constexpr,
    PHASE: tl.constexpr,
):  # fmt: skip
    """One part of a labelled row for _ppo_logits_parts_kernel: its columns [part PART,
    +PART) counted from x_part / g_part, which lie ``head`` elements into the row (the
    columns before them belong to part 0)."""
    inv_temp = join_float(inv_temp_hi, inv_temp_lo, acc_ty)
    scale2 = inv_temp * tl.full((), _LOG2E, acc_ty)
    # The part as 4 tiles of SUB columns, each [SUB // VEC, VEC] lane rows of one 16-byte
    # vector (_tile_cols), all loaded before any is used, then reduced and differentiated one
    # after the other: as one [PART] tile ptxas kept float32 copies of all of a thread's
    # elements live at once (164 to 222 registers on sm_90).
    SUB: tl.constexpr = PART // 4
    cols = _tile_cols(x_row.dtype.element_ty.primitive_bitwidth, SUB)
    col0 = part * PART
    rest = V - head - col0  # columns of the row from col0 on (<= 0: none)
    x_sub = x_part + col0
    # Whole parts load without a mask (see _online_lse2: a masked load held back the
    # thread's next one).
    full = rest >= PART
    if full:
        x0 = tl.load(x_sub + cols)
        x1 = tl.load(x_sub + SUB + cols)
        x2 = tl.load(x_sub + 2 * SUB + cols)
        x3 = tl.load(x_sub + 3 * SUB + cols)
    else:
        x0 = tl.load(x_sub + cols, mask=cols < rest, other=float("-inf"))
        x1 = tl.load(x_sub + SUB + cols, mask=cols < rest - SUB, other=float("-inf"))
        x2 = tl.load(x_sub + 2 * SUB + cols, mask=cols < rest - 2 * SUB, other=float("-inf"))
        x3 = tl.load(x_sub + 3 * SUB + cols, mask=cols < rest - 3 * SUB, other=float("-inf"))
    # The label's logit, published by the part that holds it (0 from the others): read
    # after the wait it could already be the gradient of an in-place sweep.
    label32 = label.to(tl.int32)
    owner = tl.where(label32 < head, part == 0, (label32 - head) // PART == part)
    x_label = tl.load(x_row + label, mask=owner, other=0.0).to(acc_ty)
    HEAD_COLS: tl.constexpr = _lane_vec(x_row.dtype.element_ty.primitive_bitwidth, PART)
    hcols = tl.arange(0, HEAD_COLS)
    has_head = (part == 0) & (head > 0)
    x_head = tl.load(x_row + hcols, mask=(hcols < head) & has_head, other=float("-inf"))
    LANES: tl.constexpr = cols.shape[0]
    m = tl.full((LANES,), float("-inf"), acc_ty)
    s = tl.zeros((LANES,), acc_ty)
    w = tl.zeros((LANES,), acc_ty)
    m, s, w = _lse2_tile(x0, m, s, w, scale2, acc_ty, True)
    m, s, w = _lse2_tile(x1, m, s, w, scale2, acc_ty, True)
    m, s, w = _lse2_tile(x2, m, s, w, scale2, acc_ty, True)
    m, s, w = _lse2_tile(x3, m, s, w, scale2, acc_ty, True)
    m, s, w = _merge_lanes(m, s, w, acc_ty, True)
    if has_head:
        m_h, s_h, w_h = _part_stats(x_head, scale2, acc_ty)
        m, s, w = _merge_lanes(tl.join(m, m_h), tl.join(s, s_h), tl.join(w, w_h), acc_ty, True)
    slot = partial_ptr + (row * parts + part) * 4
    if PHASE != 2:
        tl.store(slot, m)
        tl.store(slot + 1, s)
        tl.store(slot + 2, w)
        tl.store(slot + 3, x_label)
    if PHASE == 0:
        count = sync_ptr + 1 + row
        # (The JIT stores the scalars above and issues the release from one thread, but the
        # barrier orders every thread's stores before it whatever the JIT does.)
        tl.debug_barrier()
        tl.atomic_add(count, 1, sem="release")
        while tl.atomic_add(count, 0, sem="acquire") < parts:
            pass
    if PHASE != 1:
        # The row's (m, s, w), merged in part order (the same bits in every part).
        others = tl.arange(0, MAX_PARTS)
        slots = partial_ptr + (row * parts + others) * 4
        valid = others < parts
        ms = tl.load(slots, mask=valid, other=float("-inf"), cache_modifier=".cg")
        ss = tl.load(slots + 1, mask=valid, other=0.0, cache_modifier=".cg")
        ws = tl.load(slots + 2, mask=valid, other=0.0, cache_modifier=".cg")
        m_row, s_row, w_row = _merge_lanes(ms, ss, ws, acc_ty, True)
        x_label = tl.sum(tl.load(slots + 3, mask=valid, other=0.0, cache_modifier=".cg"), axis=0)
        lse2, _, logp, entropy = _row_results(m_row, s_row, w_row, x_label, scale2, acc_ty)
        gi, a0, a1 = _ppo_token(
            logp, entropy, row, old_ptr, adv_ptr, ref_ptr, weights_ptr, st, inv_temp, low_hi, low_lo, high_hi,
            high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, part == 0, HAS_DUAL, HAS_REF,
            KL_KIND, HAS_ENTROPY_GRAD,
        )  # fmt: skip
        g_sub = g_part + col0
        lab = label32 - head - col0
        _sub_grad(g_sub, x0, cols, lab, rest, full, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY_GRAD)
        _sub_grad(g_sub + SUB, x1, cols, lab - SUB, rest - SUB, full, scale2, lse2, gi, a0, a1, acc_ty,
                  HAS_ENTROPY_GRAD)  # fmt: skip
        _sub_grad(g_sub + 2 * SUB, x2, cols, lab - 2 * SUB, rest - 2 * SUB, full, scale2, lse2, gi, a0, a1, acc_ty,
                  HAS_ENTROPY_GRAD)  # fmt: skip
        _sub_grad(g_sub + 3 * SUB, x3, cols, lab - 3 * SUB, rest - 3 * SUB, full, scale2, lse2, gi, a0, a1, acc_ty,
                  HAS_ENTROPY_GRAD)  # fmt: skip
        if has_head:
            d_head = _grad_tile(x_head, hcols, label32, scale2, lse2, gi, a0, a1, acc_ty, HAS_ENTROPY_GRAD)
            tl.store(g_row + hcols, d_head.to(g_part.dtype.element_ty), mask=hcols < head)


@triton.jit
def _ppo_logits_parts_kernel(
    logits_ptr, grad_ptr, labels_ptr, old_ptr, adv_ptr, ref_ptr, weights_ptr, stats_ptr, partial_ptr, sync_ptr,
    V, size1, size2, stride0, stride1, stride2, g_size1, g_size2, g_stride0, g_stride1, g_stride2,
    inv_temp_hi, inv_temp_lo, low_hi, low_lo, high_hi, high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo,
    ent_coef_hi, ent_coef_lo, ignore_index, parts,
    HAS_DUAL: tl.constexpr, HAS_REF: tl.constexpr, KL_KIND: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
    PART: tl.constexpr, MAX_PARTS: tl.constexpr, PHASE: tl.constexpr, ROW_ALIGNED: tl.constexpr,
):  # fmt: skip
    # The fused PPO step (as _ppo_logits_kernel with WRITE_GRAD) with each row cut into
    # `parts` column parts of PART, a program per part that loads its part once, into
    # registers, and keeps it there: it reduces the part to (m, s, w) (_part_stats),
    # publishes them in partial_ptr, waits until every part of its row has, merges the
    # row's, runs the token's PPO math (_ppo_token; part 0 stores the stats) and writes
    # its part's gradient from its registers. The logits are read from HBM once and the
    # gradient written once whatever the size of L2 (_ppo_logits_kernel re-reads each row
    # for its gradient, from L2 only while few enough rows are in flight); only the
    # parts' (m, s, w) travel.
    #
    # Waiting on other programs is safe only if they make progress. Programs take their
    # part from a ticket (an atomic counter, sync_ptr[0]) in the order they start, so a
    # program waits only on parts of its own row, and every row but the last one begun
    # has all its parts started, none of them waiting on anything later: they finish.
    # The last row's waiters hold fewer than `parts` of the GPU's program slots, so the
    # next program can start as long as the GPU holds `parts` programs at once (the
    # launcher's condition). sync_ptr[1 + row] counts the row's published parts
    # (release / acquire). PHASE 0 does all of it in one launch. The Triton interpreter
    # runs programs one after another, where a wait would never end: it runs PHASE 1
    # (publish) and then PHASE 2 (merge and write) as two launches of the same code,
    # tickets being program ids.
    #
    # Columns: with ROW_ALIGNED (rows_aligned), part p owns [p PART, (p + 1) PART) of its
    # row. Otherwise they are counted from the gradient row's first 16-byte boundary (head
    # elements in; part 0 also owns the head): 16-byte stores, and 16-byte loads when the
    # logits row lies equally far from one (a contiguous gradient of contiguous logits, or
    # in place), element-wise loads when not. (The head is taken from the gradient's
    # pointer: see _grad_part. Counting from the row start in that case instead, a second
    # body beside the first, took ptxas past the 128-register cap into spills on sm_80.)
    acc_ty = stats_ptr.dtype.element_ty
    if PHASE == 0:
        ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    else:
        ticket = tl.program_id(0)
    row32 = ticket // parts
    part = ticket - row32 * parts
    row = row32.to(tl.int64)
    label = tl.load(labels_ptr + row)
    st = stats_ptr + row * 7
    x_row = logits_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
    g_row = grad_ptr + _row_start(row, g_size1, g_size2, g_stride0, g_stride1, g_stride2)
    if (label == ignore_index) | (label < 0) | (label >= V):
        if PHASE != 1:  # masked / ignored: 0 everywhere; a kept label outside [0, V): NaN (never an address)
            fill = tl.where(label == ignore_index, 0.0, float("nan")).to(acc_ty)
            if part == 0:
                for k in tl.static_range(7):
                    tl.store(st + k, fill)
            offs = part * PART + tl.arange(0, PART)
            tl.store(g_row + offs, tl.zeros((PART,), acc_ty) + fill, mask=offs < V)
    elif ROW_ALIGNED:
        _ppo_part(x_row, g_row, x_row, g_row, 0, part, row, label, parts, V, st, partial_ptr, sync_ptr, old_ptr,
                  adv_ptr, ref_ptr, weights_ptr, inv_temp_hi, inv_temp_lo, low_hi, low_lo, high_hi, high_lo, c_hi,
                  c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, acc_ty, HAS_DUAL, HAS_REF, KL_KIND,
                  HAS_ENTROPY_GRAD, PART, MAX_PARTS, PHASE)  # fmt: skip
    else:
        head = _align_head(g_row, V)
        g_body = tl.multiple_of(g_row + head, 16)  # bytes
        if _align_head(x_row, V) == head:
            x_body = tl.multiple_of(x_row + head, 16)
            _ppo_part(x_row, g_row, x_body, g_body, head, part, row, label, parts, V, st, partial_ptr, sync_ptr,
                      old_ptr, adv_ptr, ref_ptr, weights_ptr, inv_temp_hi, inv_temp_lo, low_hi, low_lo, high_hi,
                      high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, acc_ty, HAS_DUAL,
                      HAS_REF, KL_KIND, HAS_ENTROPY_GRAD, PART, MAX_PARTS, PHASE)  # fmt: skip
        else:
            _ppo_part(x_row, g_row, x_row + head, g_body, head, part, row, label, parts, V, st, partial_ptr,
                      sync_ptr, old_ptr, adv_ptr, ref_ptr, weights_ptr, inv_temp_hi, inv_temp_lo, low_hi, low_lo,
                      high_hi, high_lo, c_hi, c_lo, kl_coef_hi, kl_coef_lo, ent_coef_hi, ent_coef_lo, acc_ty, HAS_DUAL,
                      HAS_REF, KL_KIND, HAS_ENTROPY_GRAD, PART, MAX_PARTS, PHASE)  # fmt: skip


def ppo_logits_fused(
    logits, labels, old, adv, ref, weights, grad, temperature, ignore_index, low, high, clip_c, has_dual, kl_kind,
    kl_coef, entropy_coef, launch=None,
):  # fmt: skip
    """Launch the fused kernel; returns the per-token stats ``[rows, 7]``.

    ``labels`` (int64, mask folded into ``ignore_index``), ``old``, ``adv``,
    ``ref`` and ``weights`` are contiguous ``[rows]``, the last four in the
    accumulation dtype. ``grad`` is ``None`` (no gradient), a fresh tensor or
    ``logits`` itself (in place).
    """
    check_distinct_rows(logits, grad)
    layout = kernel_layout(logits)
    grad_layout = layout if grad is None else kernel_layout(grad)
    rows = labels.numel()
    stats = torch.empty(rows, FUSED_STATS, dtype=old.dtype, device=logits.device)
    if rows == 0:
        return stats
    vocab = logits.shape[-1]
    if grad is not None:
        part_cols, parts = fused_parts(vocab, rows)
        # The parts of a row wait on each other: the GPU must be able to hold them all at once.
        # One program an SM always fits; half the SMs leave room for a second launch of the
        # kernel on another stream, whose last row's waiters hold slots too.
        if parts > 1 and logits.is_cuda:
            if 2 * parts > torch.cuda.get_device_properties(logits.device).multi_processor_count:
                parts = 0
        if parts:
            _ppo_logits_parts(logits, grad, labels, old, adv, ref, weights, stats, temperature, ignore_index, low,
                              high, clip_c, has_dual, kl_kind, kl_coef, entropy_coef, part_cols, parts, layout,
                              grad_layout, launch)  # fmt: skip
            return stats
    programs = rows
    per_sm = fused_programs_per_sm()
    if grad is not None and logits.is_cuda and per_sm > 0:
        # Persistent programs, the rows in flight (one per program) within half of L2 so that pass 2
        # re-reads its row from there, but at least per_sm programs per SM.
        props = torch.cuda.get_device_properties(logits.device)
        row_bytes = vocab * logits.element_size()
        programs = min(rows, max(per_sm * props.multi_processor_count, props.L2_cache_size // 2 // row_bytes))
    persistent = programs < rows
    block, num_warps = _fused_block(vocab, logits.element_size(), persistent)
    num_warps = fused_warps(num_warps)
    kernel = _ppo_logits_kernel if launch is None else launch(_ppo_logits_kernel)
    kernel[(programs,)](
        logits, logits if grad is None else grad, labels, old, adv, old if ref is None else ref, weights, stats,
        rows, vocab, *layout, *grad_layout, *split_float(1.0 / temperature), *split_float(low), *split_float(high),
        *split_float(clip_c), *split_float(kl_coef), *split_float(entropy_coef), ignore_index,
        HAS_DUAL=has_dual, HAS_REF=ref is not None, KL_KIND=kl_kind, HAS_ENTROPY_GRAD=entropy_coef != 0,
        WRITE_GRAD=grad is not None, BLOCK_V=block, PREFETCH=fused_prefetch(),
        ROW_ALIGNED=grad is None or rows_aligned(logits, grad), PERSISTENT=persistent, num_warps=num_warps,
    )  # fmt: skip
    return stats


def _ppo_logits_parts(
    logits, grad, labels, old, adv, ref, weights, stats, temperature, ignore_index, low, high, clip_c, has_dual,
    kl_kind, kl_coef, entropy_coef, part_cols, parts, layout, grad_layout, launch,
):  # fmt: skip
    """ppo_logits_fused with the gradient, by _ppo_logits_parts_kernel: ``parts`` programs a
    row of ``part_cols`` columns each (fused_parts)."""
    rows, device = labels.numel(), logits.device
    partial = torch.empty(rows * parts * 4, dtype=stats.dtype, device=device)  # (m, s, w, label's logit)
    sync = torch.zeros(rows + 1, dtype=torch.int32, device=device)  # the ticket, then a count per row
    kernel = _ppo_logits_parts_kernel if launch is None else launch(_ppo_logits_parts_kernel)
    row_aligned = rows_aligned(logits, grad)
    # The interpreter runs one program after another, where a wait for another part would never
    # end: two phases there. (A row of one part waits for nothing.)
    for phase in (1, 2) if triton_interpreted() and parts > 1 else (0,):
        kernel[(rows * parts,)](
            logits, grad, labels, old, adv, old if ref is None else ref, weights, stats, partial, sync,
            logits.shape[-1], *layout, *grad_layout, *split_float(1.0 / temperature), *split_float(low),
            *split_float(high), *split_float(clip_c), *split_float(kl_coef), *split_float(entropy_coef),
            ignore_index, parts, HAS_DUAL=has_dual, HAS_REF=ref is not None, KL_KIND=kl_kind,
            HAS_ENTROPY_GRAD=entropy_coef != 0, PART=part_cols, MAX_PARTS=next_power_of_2(parts),
            PHASE=phase, ROW_ALIGNED=row_aligned, num_warps=_parts_warps(part_cols, logits.element_size()),
            **parts_maxnreg(row_aligned),
        )  # fmt: skip


MAX_FUSED_PARTS = 256

# Launch options beyond num_warps, by kernel: a dict, or a function of the constexprs giving
# one (compile_check compiles with them too). _ppo_logits_parts_kernel holds 32 elements a
# thread (bf16: 16 registers) from its load to its stores, so registers set its occupancy
# and with it the bytes in flight per SM. ptxas, left alone, takes 56-63 registers (bf16) or
# 40 (float32) where the JIT knows the rows aligned, but 80-128 where it does not; and
# given a cap it fills it. So rows not known aligned (ROW_ALIGNED False) get a cap of 72 (no
# configuration spills there; 3 programs of 8 warps an SM), the others none (4 programs of
# 8 warps, bf16 at 8192 columns a part). RLHF_KERNELS_FUSED_PARTS_MAXNREG sets a cap for
# every launch instead (0: none; parts_maxnreg).
PARTS_MAXNREG = 72


def _parts_launch_options(constexprs: dict) -> dict:
    return {} if constexprs.get("ROW_ALIGNED") else {"maxnreg": PARTS_MAXNREG}


LAUNCH_OPTIONS = {"_ppo_logits_parts_kernel": _parts_launch_options}


def parts_maxnreg(row_aligned: bool) -> dict:
    """The register cap of a _ppo_logits_parts_kernel launch, as launch options."""
    setting = os.environ.get("RLHF_KERNELS_FUSED_PARTS_MAXNREG")
    if setting is None:
        return _parts_launch_options({"ROW_ALIGNED": row_aligned})
    try:
        cap = int(setting)
    except ValueError:
        raise ValueError(f"RLHF_KERNELS_FUSED_PARTS_MAXNREG must be an integer, got {setting!r}") from None
    if cap < 0 or 0 < cap < 24 or cap > 255:
        raise ValueError(f"RLHF_KERNELS_FUSED_PARTS_MAXNREG must be 0 (no cap) or 24 to 255, got {cap}")
    return {"maxnreg": cap} if cap else {}


def _parts_warps(part_cols: int, itemsize: int) -> int:
    """Warps of a _ppo_logits_parts_kernel program: four 16-byte vectors of its part a
    thread (8 warps for 8192 bf16 columns), 1 to 16."""
    return max(1, min(16, part_cols * itemsize // (4 * 16) // 32))


def fused_parts(vocab: int, rows: int) -> tuple[int, int]:
    """(columns per part, parts per row) of the fused sweep's row-cut variant
    (_ppo_logits_parts_kernel), or (0, 0) for the program-per-row kernel.
    ``RLHF_KERNELS_FUSED_PART_COLS``: columns per part (rounded up to a power of two,
    256 to 16384), 0 or unset for the program-per-row kernel: not yet timed on a GPU,
    so off by default (``rlhf-kernels bench --op ppo_step`` on CUDA times it beside the
    default). More than MAX_FUSED_PARTS parts (the programs of a row wait on each other:
    the GPU must hold a row's parts at once; the launcher also asks for twice as many
    SMs) or a grid of 2^31 programs also take the program-per-row kernel."""
    setting = os.environ.get("RLHF_KERNELS_FUSED_PART_COLS", "0")
    try:
        cols = int(setting)
    except ValueError:
        raise ValueError(f"RLHF_KERNELS_FUSED_PART_COLS must be an integer, got {setting!r}") from None
    if cols <= 0:
        return 0, 0
    cols = min(16384, max(256, next_power_of_2(cols)))
    parts = cdiv(vocab, cols)
    if parts > MAX_FUSED_PARTS or rows * parts >= 1 << 31:
        return 0, 0
    return cols, parts


def fused_prefetch() -> bool:
    """Whether the fused sweep's first pass (from HBM) issues each tile's load one tile
    ahead. (The gradient pass re-reads from L2 and is at the register ceiling already:
    prefetching there spills fp16 on sm_90.)

    With about one program per SM (register-bound at 16 warps; the persistent launch of
    fused_programs_per_sm) its bytes in flight per SM are one 8 KiB tile unless the next
    load goes out early; by Little's law that is well short of HBM bandwidth. On an H200
    (8 x 2048 x 128256 bf16, whole step) it took the sweep from 9.42 to 7.22 ms (9.65 to
    7.46 ms in an earlier run), against a first pass that reduced across the program
    (shuffles and a barrier) every tile. Without PREFETCH the first pass now keeps per-lane
    states instead (_online_lse2's lane rows: no barrier per tile, so the warps drift apart
    and overlap each other's loads; both together spill). On an H100 (same step, one
    program per SM) lane rows took 6.72 ms against 8.32 with the tile-ahead load
    (benchmarks/results/bench-NVIDIA_H100_80GB_HBM3-20261126-092208.txt), and 5.85 against
    5.22 ms with a program per row (bench-NVIDIA_H100_80GB_HBM3-20261126-140554.txt): off
    by default; ``RLHF_KERNELS_FUSED_PREFETCH=1`` turns it on."""
    return os.environ.get("RLHF_KERNELS_FUSED_PREFETCH", "0") == "1"


def fused_programs_per_sm() -> int:
    """How many programs the fused sweep runs when it writes the gradient:
    RLHF_KERNELS_FUSED_PROGRAMS_PER_SM, 0 (the default) for one program per row, else
    persistent programs, at least that many per SM, capped so that the rows in flight fit
    half of L2 (for the gradient pass's re-read). More programs keep more bytes in flight,
    and that won: on an H100 (8 x 2048 x 128256 bf16, whole step) 6.82 ms at 1 per SM, 5.15 at
    2, 4.75 with a program per row (two-pass: 4.70;
    benchmarks/results/bench-NVIDIA_H100_80GB_HBM3-20261126-095459.txt); later 6.95 at 1,
    5.44 at 2 and 5.22 with a program per row (bench-NVIDIA_H100_80GB_HBM3-20261126-140554.txt)."""
    return int(os.environ.get("RLHF_KERNELS_FUSED_PROGRAMS_PER_SM", "0"))


def fused_warps(default: int) -> int:
    """Warps of a _ppo_logits_kernel program: ``RLHF_KERNELS_FUSED_WARPS`` (1, 2, 4, 8 or 16),
    else ``default`` (_fused_block). For GPU runs to compare: ``rlhf-kernels bench --op
    ppo_step`` on CUDA times 16 warps (8 elements a thread, the layout before the program-per-row
    kernel went to 16 a thread) beside the default."""
    setting = os.environ.get("RLHF_KERNELS_FUSED_WARPS", "0")
    if setting not in ("0", "1", "2", "4", "8", "16"):
        raise ValueError(f"RLHF_KERNELS_FUSED_WARPS must be 0 (the default) or 1, 2, 4, 8 or 16, got {setting!r}")
    return int(setting) or default


@triton.constexpr_function
def _no(flag):
    return not flag


def _fused_block(vocab: int, itemsize: int, persistent: bool = False) -> tuple[int, int]:
    """The fused sweep's vocab tile and warps: the log-prob kernels' 8 KiB tile, at least
    4 warps (with 2, ptxas spilled the gradient sweep of a 1024-wide tile on sm_90).

    A program per row (the default): 16 elements a thread, as the log-prob kernels (8
    warps; bf16 on sm_90: 40-48 registers without the gradient, 46-60 with it under triton
    3.6 and 3.8, no spills), so that a thread has two 16-byte loads in flight in both passes. Persistent programs
    (fused_programs_per_sm): 8 elements a thread (16 warps for 16-bit logits), where the
    row loop kept ptxas near 128 registers at 16 (triton 3.6 spilled there)."""
    block, _ = _block_v(vocab, itemsize)
    return block, max(4, min(16, block // 256) if persistent else min(8, block // 512))


def _fused_configs():
    configs = []
    ints = {n: "i64" for n in ("rows", "V", "size1", "size2", "stride0", "stride1", "stride2", "g_size1", "g_size2",
                               "g_stride0", "g_stride1", "g_stride2")}  # fmt: skip
    ints["V"] = "i32"  # as the JIT passes it (V < 2^30: _block_v)
    floats = {f"{n}_{part}": "fp32" for n in ("inv_temp", "low", "high", "c", "kl_coef", "ent_coef")
              for part in ("hi", "lo")}  # fmt: skip
    consts = ("HAS_DUAL", "HAS_REF", "KL_KIND", "HAS_ENTROPY_GRAD", "WRITE_GRAD", "BLOCK_V", "PREFETCH", "ROW_ALIGNED",
              "PERSISTENT")  # fmt: skip
    for ty, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        for vocab in (1000, 128256):
            block, _ = _fused_block(vocab, itemsize)
            sig = {"logits_ptr": f"*{ty}", "grad_ptr": f"*{ty}", "labels_ptr": "*i64",
                   **{f"{n}_ptr": "*fp32" for n in ("old", "adv", "ref", "weights", "stats")}, **ints, **floats,
                   "ignore_index": "i64", **{c: "constexpr" for c in consts}}  # fmt: skip
            # the heaviest per-token math (dual clip, k3, entropy gradient) and the lightest, each with and without
            # the gradient sweep
            for dual, has_ref, kind, ent in ((True, True, KL_KIND_IDS["k3"], True), (False, False, 0, False)):
                for write in (False, True):
                    const = {"HAS_DUAL": dual, "HAS_REF": has_ref, "KL_KIND": kind, "HAS_ENTROPY_GRAD": ent,
                             "WRITE_GRAD": write, "BLOCK_V": block}  # fmt: skip
                    # persistent programs (fused_programs_per_sm) too with the gradient, for the large bf16 rows
                    persistents = (False, True) if write and ty == "bf16" and vocab == 128256 else (False,)
                    for persistent, prefetch, row_aligned in itertools.product(
                            persistents, (False, True), (True, False) if write else (True,)):
                        configs.append((_ppo_logits_kernel, sig, {**const, "PREFETCH": prefetch, "ROW_ALIGNED":
                                        row_aligned, "PERSISTENT": persistent},
                                        _fused_block(vocab, itemsize, persistent)[1]))  # fmt: skip
            # the row-cut variant (fused_parts) at 8192 columns a part, as a GPU launches it (PHASE 0);
            # both per-token maths and row alignments for bf16, the heavier aligned one for the others
            if vocab == 128256:
                part_cols = 8192
                types = {**sig, "partial_ptr": "*fp32", "sync_ptr": "*i32", "parts": "i32", "PART": "constexpr",
                         "MAX_PARTS": "constexpr", "PHASE": "constexpr"}  # fmt: skip
                parts_sig = {name: types[name] for name in _ppo_logits_parts_kernel.arg_names}  # in argument order
                for dual, has_ref, kind, ent in ((True, True, KL_KIND_IDS["k3"], True), (False, False, 0, False)):
                    for row_aligned in (True, False):
                        if ty != "bf16" and not (dual and row_aligned):
                            continue
                        const = {"HAS_DUAL": dual, "HAS_REF": has_ref, "KL_KIND": kind, "HAS_ENTROPY_GRAD": ent,
                                 "PART": part_cols, "MAX_PARTS": 16, "PHASE": 0, "ROW_ALIGNED": row_aligned}
                        configs.append((_ppo_logits_parts_kernel, parts_sig, const,
                                        _parts_warps(part_cols, itemsize)))  # fmt: skip
        sig = {"x_ptr": f"*{ty}", "scale_ptr": "*fp32", **{n: "i64" for n in ("n_tiles", "V", "size1", "size2",
                                                                          "stride0", "stride1", "stride2")},
               "BLOCK": "constexpr"}  # fmt: skip
        configs.append((_scale_unless_one_kernel, sig, {"BLOCK": _SCALE_BLOCK}, 8))
    # Ints equal to 1 reach the JIT as constants (a contiguous [N, V] layout has size1 = 1;
    # one token, one tile): the usual case must compile too.
    for entry in list(configs):
        if entry[0] is _ppo_logits_parts_kernel or entry[2].get("PERSISTENT"):
            continue
        if entry[1].get("logits_ptr", entry[1].get("x_ptr")) == "*bf16" and entry[2].get("BLOCK_V", 4096) == 4096:
            configs.append(with_ones(entry, ("size1", "g_size1", "rows", "n_tiles")))
    for entry in list(configs):  # a one-word vocabulary: V a constant too
        kernel, sig, const, _ = entry
        if kernel is _ppo_logits_kernel and sig["logits_ptr"] in ("*fp32", "*bf16") and const["BLOCK_V"] < 4096 \
                and not const["PREFETCH"]:
            block, num_warps = _fused_block(1, 4 if entry[1]["logits_ptr"] == "*fp32" else 2)
            one = (entry[0], entry[1], {**entry[2], "BLOCK_V": block}, num_warps)
            configs.append(with_ones(one, ("V", "size1", "g_size1")))
    return configs


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n_tiles, V, size1, size2, stride0, stride1, stride2,
                             BLOCK: tl.constexpr):  # fmt: skip
    # Grid: (P,), P <= n_tiles = rows * cdiv(V, BLOCK); program p scales the
    # tiles p, p + P, ... x *= scale in place over the rows of a [..., V]
    # tensor in any row layout (the in-place gradient of a sliced view too),
    # unless scale == 1: then each program reads the one scalar and exits, so
    # the usual loss.backward() (upstream gradient 1) costs no pass over x and
    # no host synchronisation. P is a few programs per SM rather than one per
    # tile: on the H200 a grid of 16384 x 32 programs that all exited at once
    # still took 0.7 ms. Otherwise reads and writes rows * V * itemsize bytes.
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        tiles_per_row = tl.cdiv(V, BLOCK)
        for t in range(tl.program_id(0).to(tl.int64), n_tiles, tl.num_programs(0)):
            row = t // tiles_per_row
            x_row = x_ptr + _row_start(row, size1, size2, stride0, stride1, stride2)
            offs = (t - row * tiles_per_row) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < V, other=0.0)
            tl.store(x_row + offs, (x.to(scale.dtype) * scale).to(x_ptr.dtype.element_ty), mask=offs < V)


def scale_unless_one_(x, scale, launch=None):
    """``x *= scale`` in place for a ``[..., V]`` ``x`` whose rows ``row_layout`` addresses
    (last stride 1) and a one-element ``scale``; skipped on the device when it is 1."""
    if x.stride(-1) != 1:
        raise ValueError("x: expected unit last stride")
    layout = kernel_layout(x, "x")
    vocab = x.shape[-1]
    if x.numel():
        n_tiles = x.numel() // vocab * cdiv(vocab, _SCALE_BLOCK)
        programs = min(n_tiles, 4 * _sm_count(x.device))
        kernel = _scale_unless_one_kernel if launch is None else launch(_scale_unless_one_kernel)
        kernel[(programs,)](x, scale, n_tiles, vocab, *layout, BLOCK=_SCALE_BLOCK, num_warps=8)
    return x


_SCALE_BLOCK = 4096


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (a fixed 32 elsewhere: the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 32


# --- masked whitening and GRPO advantages -----------------------------------------------------

WHITEN_CHUNK = 4096  # elements per partial: fixed, so the reduction order never depends on the device
_MERGE_BLOCK = 1024
_APPLY_BLOCK = 4096
GRPO_BLOCK = 128  # scores per step of a group's loops; groups are usually 4 to 64 responses


@triton.jit
def _sqrt_rn(v):
    # IEEE-rounded square root (tl.sqrt is the approximate one for float32; float64's is exact).
    if v.dtype == tl.float64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def _div_rn(a, b):
    # IEEE-rounded quotient of two scalars: float32 `/` is div.full.f32 on GPU (up to 2 ulp off), which
    # made a constant group's mean differ from its scores and its advantages nonzero. float64's is exact.
    if b.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _whiten_partial_kernel(x_ptr, mask_ptr, count_ptr, mean_ptr, m2_ptr, n, CHUNK: tl.constexpr):
    # Grid: (cdiv(n, CHUNK),). Program c owns the elements [c CHUNK, (c + 1) CHUNK)
    # of the flat x and writes their (count, mean, M2) over the valid ones: the
    # chunk stays in registers, so the mean and then the squared deviations from
    # it are two sums over registers (the two-pass formula, no cancellation).
    # Reads n * (itemsize + 1) bytes; writes 3 values per program.
    pid = tl.program_id(0).to(tl.int64)
    acc_ty = mean_ptr.dtype.element_ty
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    inb = offs < n
    valid = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    x = tl.where(valid, tl.load(x_ptr + offs, mask=inb, other=0.0).to(acc_ty), 0.0)
    count = tl.sum(valid.to(tl.int32), 0)
    mean = _div_rn(tl.sum(x, 0), tl.maximum(count, 1).to(acc_ty))
    dev = tl.where(valid, x - mean, 0.0)
    tl.store(count_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, tl.sum(dev * dev, 0))


@triton.jit
def _whiten_merge_kernel(count_ptr, mean_ptr, m2_ptr, stats_ptr, n_parts, eps_hi, eps_lo, BLOCK: tl.constexpr):
    # Grid: (1,). Merges the n_parts partials in a fixed order: each BLOCK of
    # them with the k-way form of Chan et al.'s parallel variance update
    # (mean = sum n_i mean_i / n, M2 = sum M2_i + n_i (mean_i - mean)^2), then
    # into the running total with the pairwise one; counts in int64. Writes
    # stats = (count, mean, unbiased var = M2 / max(count - 1, 1), 1 / sqrt(var + eps)).
    # Reads 12 (float32) bytes per partial: 1/1365 of x's float32 bytes.
    acc_ty = mean_ptr.dtype.element_ty
    total_n = tl.zeros((), tl.int64)
    total_mean = tl.zeros((), acc_ty)
    total_m2 = tl.zeros((), acc_ty)
    for start in range(0, n_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n_parts
        c = tl.load(count_ptr + offs, mask=inb, other=0).to(tl.int64)
        mu = tl.load(mean_ptr + offs, mask=inb, other=0.0)
        m2 = tl.load(m2_ptr + offs, mask=inb, other=0.0)
        block_n = tl.sum(c, 0)
        cf = c.to(acc_ty)
        block_mean = _div_rn(tl.sum(cf * mu, 0), tl.maximum(block_n, 1).to(acc_ty))
        dev = mu - block_mean
        block_m2 = tl.sum(m2 + cf * dev * dev, 0)
        new_n = total_n + block_n
        w = _div_rn(block_n.to(acc_ty), tl.maximum(new_n, 1).to(acc_ty))
        delta = block_mean - total_mean
        total_mean = total_mean + delta * w
        total_m2 = total_m2 + block_m2 + delta * delta * total_n.to(acc_ty) * w
        total_n = new_n
    var = _div_rn(total_m2, tl.maximum(total_n - 1, 1).to(acc_ty))
    eps = join_float(eps_hi, eps_lo, acc_ty)
    tl.store(stats_ptr, total_n.to(acc_ty))
    tl.store(stats_ptr + 1, total_mean)
    tl.store(stats_ptr + 2, var)
    tl.store(stats_ptr + 3, _div_rn(tl.full((), 1.0, acc_ty), _sqrt_rn(var + eps)))


@triton.jit
def _whiten_apply_kernel(x_ptr, stats_ptr, out_ptr, n, SHIFT_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (cdiv(n, BLOCK),), elementwise: out = (x - mean) * rstd (+ mean
    # without SHIFT_MEAN), masked-out elements included, as the reference does.
    # Reads n * itemsize bytes, writes n accumulation-type values.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    mean = tl.load(stats_ptr + 1)
    rstd = tl.load(stats_ptr + 3)
    y = (tl.load(x_ptr + offs, mask=inb, other=0.0).to(mean.dtype) - mean) * rstd
    if not SHIFT_MEAN:
        y = y + mean
    tl.store(out_ptr + offs, y, mask=inb)


def masked_whiten(x, mask, shift_mean, eps, launch=None):
    """``(out, stats)`` for a contiguous flat ``x`` (any float dtype) and uint8 ``mask``;
    ``out`` and ``stats = (count, mean, var, rstd)`` in float32 (float64 for float64 x)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.numel()
    out = torch.empty(x.shape, dtype=acc, device=x.device)
    stats = torch.empty(4, dtype=acc, device=x.device)
    n_parts = cdiv(n, WHITEN_CHUNK)
    counts = torch.empty(n_parts, dtype=torch.int32, device=x.device)
    means = torch.empty(n_parts, dtype=acc, device=x.device)
    m2s = torch.empty(n_parts, dtype=acc, device=x.device)
    partial, merge, apply = (_whiten_partial_kernel, _whiten_merge_kernel, _whiten_apply_kernel)
    if launch is not None:
        partial, merge, apply = launch(partial), launch(merge), launch(apply)
    if n_parts:
        partial[(n_parts,)](x, mask, counts, means, m2s, n, CHUNK=WHITEN_CHUNK, num_warps=8)
    merge[(1,)](counts, means, m2s, stats, n_parts, *split_float(eps), BLOCK=_MERGE_BLOCK, num_warps=4)
    if n:
        apply[(cdiv(n, _APPLY_BLOCK),)](x, stats, out, n, SHIFT_MEAN=shift_mean, BLOCK=_APPLY_BLOCK,
                                               num_warps=8)  # fmt: skip
    return out, stats


@triton.jit
def _grpo_kernel(scores_ptr, offsets_ptr, out_ptr, n, eps_hi, eps_lo, NORM_BY_STD: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    # Grid: (G,). Program g owns the group scores[offsets[g] : offsets[g + 1]]
    # (clamped to [0, n]: never an out-of-bounds read) and walks it in BLOCK
    # steps: the sum, then the squared deviations from the mean (two-pass, in
    # BLOCK-wide accumulators reduced once), then writes
    # (s - mean) / (std + eps), or s - mean without NORM_BY_STD; a group of one
    # has std 1, as the reference. Reads each score 2-3 times (cache-resident),
    # writes it once.
    g = tl.program_id(0).to(tl.int64)
    acc_ty = out_ptr.dtype.element_ty
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + g), 0), n)
    end = tl.minimum(tl.maximum(tl.load(offsets_ptr + g + 1), start), n)
    size = end - start
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), acc_ty)
    for k in range(start, end, BLOCK):
        offs = k + cols
        acc += tl.load(scores_ptr + offs, mask=offs < end, other=0.0).to(acc_ty)
    mean = _div_rn(tl.sum(acc, 0), tl.maximum(size, 1).to(acc_ty))
    denom = tl.full((), 1.0, acc_ty)
    if NORM_BY_STD:
        acc = tl.zeros((BLOCK,), acc_ty)
        for k in range(start, end, BLOCK):
            offs = k + cols
            s = tl.load(scores_ptr + offs, mask=offs < end, other=0.0).to(acc_ty)
            dev = tl.where(offs < end, s - mean, 0.0)
            acc += dev * dev
        var = _div_rn(tl.sum(acc, 0), tl.maximum(size - 1, 1).to(acc_ty))
        std = tl.where(size > 1, _sqrt_rn(var), 1.0)
        denom = std + join_float(eps_hi, eps_lo, acc_ty)
    for k in range(start, end, BLOCK):
        offs = k + cols
        s = tl.load(scores_ptr + offs, mask=offs < end, other=0.0).to(acc_ty)
        if NORM_BY_STD:
            tl.store(out_ptr + offs, _div_rn(s - mean, tl.zeros((BLOCK,), acc_ty) + denom), mask=offs < end)
        else:
            tl.store(out_ptr + offs, s - mean, mask=offs < end)


def grpo_advantages(scores, offsets, norm_by_std, eps, launch=None):
    """Group advantages of contiguous float32/float64 ``scores`` over the groups
    ``[offsets[g], offsets[g + 1])`` (int64, G + 1 values)."""
    out = torch.empty_like(scores)
    groups = offsets.numel() - 1
    if groups > 0 and scores.numel():
        kernel = _grpo_kernel if launch is None else launch(_grpo_kernel)
        kernel[(groups,)](scores, offsets, out, scores.numel(), *split_float(eps), NORM_BY_STD=norm_by_std,
                          BLOCK=GRPO_BLOCK, num_warps=4)  # fmt: skip
    return out


def _whiten_grpo_configs():
    configs = []
    for ty in ("fp32", "bf16", "fp16"):
        sig = {"x_ptr": f"*{ty}", "mask_ptr": "*u8", "count_ptr": "*i32", "mean_ptr": "*fp32", "m2_ptr": "*fp32",
               "n": "i64", "CHUNK": "constexpr"}  # fmt: skip
        configs.append((_whiten_partial_kernel, sig, {"CHUNK": WHITEN_CHUNK}, 8))
        sig = {"x_ptr": f"*{ty}", "stats_ptr": "*fp32", "out_ptr": "*fp32", "n": "i64", "SHIFT_MEAN": "constexpr",
               "BLOCK": "constexpr"}  # fmt: skip
        for shift in (False, True):
            configs.append((_whiten_apply_kernel, sig, {"SHIFT_MEAN": shift, "BLOCK": _APPLY_BLOCK}, 8))
    sig = {"count_ptr": "*i32", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "stats_ptr": "*fp32", "n_parts": "i64",
           "eps_hi": "fp32", "eps_lo": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    configs.append((_whiten_merge_kernel, sig, {"BLOCK": _MERGE_BLOCK}, 4))
    sig = {"scores_ptr": "*fp32", "offsets_ptr": "*i64", "out_ptr": "*fp32", "n": "i64", "eps_hi": "fp32",
           "eps_lo": "fp32", "NORM_BY_STD": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    for norm in (False, True):
        configs.append((_grpo_kernel, sig, {"NORM_BY_STD": norm, "BLOCK": GRPO_BLOCK}, 4))
    return configs
