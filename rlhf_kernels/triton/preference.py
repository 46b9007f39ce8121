"""Triton kernels for the fused preference losses (DPO family, SimPO, ORPO, KTO, Bradley-Terry).

The loss table (ids, formulas, derivatives) is csrc/preference.h's; the same
ids are used here. ``_loss_and_grads`` writes every formula once; the forward
kernels keep the losses, the backward kernel the derivatives.

Forward: one program (``_pref_fwd_kernel``) up to FWD_MULTI_MIN pairs, where one
launch with the metrics reduced in registers beats any split. Above, one
program walking n pairs is latency-bound (a 512-pair tile per round trip to
memory), so ``_pref_fwd_partial_kernel`` runs one program per fixed FWD_CHUNK
pairs, each writing its metric sums to a [P, 8] workspace row, and
``_pref_sum_partials_kernel`` adds the rows in a fixed order (in float64) into
the metrics. bco_pair's batch-mean delta first gets the same two steps
(``_pref_bco_partial_kernel``, then the sum in its delta mode). No atomics;
the bits depend on n alone.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlhf_kernels.triton._common import cdiv, join_float, next_power_of_2, split_float

LOSS_IDS = {
    "sigmoid": 0,
    "robust": 1,
    "exo_pair": 2,
    "hinge": 3,
    "ipo": 4,
    "bco_pair": 5,
    "sppo_hard": 6,
    "nca_pair": 7,
    "apo_zero": 8,
    "apo_down": 9,
    "discopop": 10,
    "orpo": 11,
    "kto_chosen": 12,
    "kto_rejected": 13,
}
N_METRICS = 8
EXO_EPS = 1e-3  # exo_pair's epsilon when label_smoothing is 0 (the reference's)
ORPO_MAX_LOGP = tl.constexpr(-1e-6)
PARTIAL_COLS = tl.constexpr(N_METRICS)  # a row of forward partial sums mirrors the metrics

# The forward runs on one program up to FWD_MULTI_MIN pairs, on cdiv(n, FWD_CHUNK)
# programs above (as kPrefFwdMultiMin, kPrefFwdChunk in csrc/preference.h). Module
# globals, read at each launch, so that tests can lower them.
# 16384: one program does n / 512 dependent tile rounds (~1 us each), the split 4
# rounds per program plus a dependent summing launch (a few us), so the crossover
# is estimated at 4k-8k pairs (to be measured on a GPU); the margin keeps every
# training batch (64-4096 pairs a device) on one launch with unchanged bits.
# 2048: 4 tiles of 512 per program; 1M pairs are 512 programs (about what the
# SMs of an A100 / H100 hold at once) and a 16 KiB workspace.
FWD_MULTI_MIN = 16384
FWD_CHUNK = 2048  # pairs per program: fixed, so the reduction order depends on n alone
_SUM_ROWS = 256  # partial rows per step of the summing program


@triton.jit
def _sigmoid(x):
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + t), t / (1.0 + t))


@triton.jit
def _log1p_small(t):
    # log(1 + t) for t in [0, 1] to a few ulp: log(u) * t / (u - 1) with u = 1 + t rounded cancels
    # the rounding of u (Goldberg); t itself where u rounds to 1
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 (Taylor to x^5 below 1e-2: error < 2e-13 relative).
    small = x * (1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + x * 0.25 * (1.0 + x * 0.2))))
    return tl.where(tl.abs(x) < 1e-2, small, tl.exp(x) - 1.0)


@triton.jit
def _log1mexp(x):
    # log(1 - exp(x)) for x < 0
    return tl.where(x > -0.6931471805599453, tl.log(-_expm1(x)), tl.log(1.0 - tl.exp(x)))


@triton.jit
def _loss_and_grads(a, b, m, kl, delta, beta, gamma, ls, center, tau, weight, LOSS: tl.constexpr):
    """Per-element loss, dL/da, dL/db and the two ORPO metric terms (csrc/preference.h)."""
    zero = tl.zeros_like(a)  # (not a * 0: NaN for an infinite a)
    h = a - b
    z = beta * h - gamma - m
    x5 = zero
    x6 = zero
    if LOSS == 0:  # sigmoid (DPO, cDPO; SimPO with gamma; Bradley-Terry with margin and centering)
        # terms with a coefficient of 0 are selected away, not multiplied (0 * inf = NaN for an infinite input)
        loss = -(1.0 - ls) * _logsigmoid(z) - tl.where(ls != 0, ls * _logsigmoid(-z), 0.0)
        loss += tl.where(center != 0, center * (a + b) * (a + b), 0.0)
        d = -(1.0 - ls) * _sigmoid(-z) + ls * _sigmoid(z)
        t = tl.where(center != 0, 2.0 * center * (a + b), 0.0)
        da = beta * d + t
        db = -beta * d + t
    elif LOSS == 1:  # robust
        loss = (-(1.0 - ls) * _logsigmoid(z) + tl.where(ls != 0, ls * _logsigmoid(-z), 0.0)) / (1.0 - 2.0 * ls)
        d = (-(1.0 - ls) * _sigmoid(-z) - ls * _sigmoid(z)) / (1.0 - 2.0 * ls)
        da = beta * d
        db = -da
    elif LOSS == 2:  # exo_pair
        # ls is log(eps) here (smoothing_arg): an eps below float32's range keeps its log
        log_1me = _log1mexp(ls)
        sz = _sigmoid(z)
        snz = _sigmoid(-z)
        loss = sz * (_logsigmoid(z) - log_1me) + snz * (_logsigmoid(-z) - ls)
        d = sz * snz * (z - (log_1me - ls))
        da = beta * d
        db = -da
    elif LOSS == 3:  # hinge
        loss = tl.maximum(1.0 - z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN (GPU max drops it)
        da = tl.where(z < 1.0, -beta, 0.0) + zero
        db = -da
    elif LOSS == 4:  # ipo
        r = h - 0.5 / beta
        loss = r * r
        da = 2.0 * r
        db = -da
    elif LOSS == 5:  # bco_pair
        loss = -_logsigmoid(beta * a - delta) - _logsigmoid(delta - beta * b)
        da = -beta * _sigmoid(delta - beta * a)
        db = beta * _sigmoid(beta * b - delta)
    elif LOSS == 6:  # sppo_hard
        ra = a - 0.5 / beta
        rb = b + 0.5 / beta
        loss = ra * ra + rb * rb
        da = 2.0 * ra
        db = 2.0 * rb
    elif LOSS == 7:  # nca_pair
        c = beta * a
        r = beta * b
        loss = -_logsigmoid(c) - 0.5 * _logsigmoid(-c) - 0.5 * _logsigmoid(-r)
        da = beta * (-_sigmoid(-c) + 0.5 * _sigmoid(c))
        db = 0.5 * beta * _sigmoid(r)
    elif LOSS == 8:  # apo_zero
        sa = _sigmoid(beta * a)
        sb = _sigmoid(beta * b)
        loss = 1.0 - sa + sb
        da = -beta * sa * (1.0 - sa)
        db = beta * sb * (1.0 - sb)
    elif LOSS == 9:  # apo_down
        sa = _sigmoid(beta * a)
        sh = _sigmoid(beta * h)
        loss = sa + 1.0 - sh
        da = beta * sa * (1.0 - sa) - beta * sh * (1.0 - sh)
        db = beta * sh * (1.0 - sh)
    elif LOSS == 10:  # discopop
        z = beta * h
        q = _sigmoid(z / tau)
        e = tl.exp(-z + _logsigmoid(z / tau))
        softplus = -_logsigmoid(z)
        loss = softplus * (1.0 - q) + e
        d = -_sigmoid(-z) * (1.0 - q) - softplus * q * (1.0 - q) / tau + e * (-1.0 + (1.0 - q) / tau)
        da = beta * d
        db = -da
    elif LOSS == 11:  # orpo
        x = tl.minimum(a, ORPO_MAX_LOGP, propagate_nan=tl.PropagateNan.ALL)
        y = tl.minimum(b, ORPO_MAX_LOGP, propagate_nan=tl.PropagateNan.ALL)
        lo = (x - y) - (_log1mexp(x) - _log1mexp(y))
        ratio = _logsigmoid(lo)
        loss = -beta * ratio
        s = beta * _sigmoid(-lo)
        da = tl.where(a < ORPO_MAX_LOGP, s / _expm1(x), 0.0)  # -s / (1 - e^x)
        db = tl.where(b < ORPO_MAX_LOGP, -s / _expm1(y), 0.0)
        x5 = ratio
        x6 = lo
    elif LOSS == 12:  # kto_chosen
        sc = _sigmoid(beta * (a - kl))
        loss = weight * (1.0 - sc)
        da = -weight * beta * sc * (1.0 - sc)
        db = zero
    else:  # 13: kto_rejected
        sr = _sigmoid(beta * (kl - b))
        loss = weight * (1.0 - sr)
        da = zero
        db = weight * beta * sr * (1.0 - sr)
    return loss, da, db, x5, x6


@triton.jit
def _loss_scalars(
    beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo, tau_hi, tau_lo, weight_hi, weight_lo,
    acc_ty: tl.constexpr,
):  # fmt: skip
    """The loss scalars in the accumulation type (each passed as a float32 hi/lo pair)."""
    return (
        join_float(beta_hi, beta_lo, acc_ty), join_float(gamma_hi, gamma_lo, acc_ty), join_float(ls_hi, ls_lo, acc_ty),
        join_float(center_hi, center_lo, acc_ty), join_float(tau_hi, tau_lo, acc_ty),
        join_float(weight_hi, weight_lo, acc_ty),
    )  # fmt: skip


@triton.jit
def _load_inputs(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, offs, n, zeros,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr, HAS_REF_B: tl.constexpr,
):  # fmt: skip
    """a = chosen - ref_chosen, b = rejected - ref_rejected (absent terms are 0)."""
    inb = offs < n
    a = zeros
    b = zeros
    if HAS_A:
        a = tl.load(chosen_ptr + offs, mask=inb, other=0.0)
        if HAS_REF_A:
            a -= tl.load(ref_chosen_ptr + offs, mask=inb, other=0.0)
    if HAS_B:
        b = tl.load(rejected_ptr + offs, mask=inb, other=0.0)
        if HAS_REF_B:
            b -= tl.load(ref_rejected_ptr + offs, mask=inb, other=0.0)
    return a, b


@triton.jit
def _bco_tiles(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, start, stop, beta,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr, HAS_REF_B: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """BLOCK lane sums of beta a_i + beta b_i over i in [start, stop), walked in BLOCK tiles."""
    acc_ty = beta.dtype
    cols = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), acc_ty)
    for tile in range(start, stop, BLOCK):
        offs = tile + cols
        a, b = _load_inputs(chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, offs, stop,
                            tl.zeros((BLOCK,), acc_ty), HAS_A, HAS_B, HAS_REF_A, HAS_REF_B)  # fmt: skip
        total += tl.where(offs < stop, beta * (a + b), 0.0)
    return total


@triton.jit
def _fwd_tiles(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr,
    losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, start, stop,
    kl, delta, beta, gamma, ls, center, tau, weight,
    LOSS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr,
    HAS_REF_B: tl.constexpr, HAS_MARGIN: tl.constexpr, WRITE_REWARDS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Losses and rewards of the pairs [start, stop), walked in BLOCK tiles; returns the
    BLOCK lane sums of the seven metric terms (preference.h's metrics [0, 7))."""
    acc_ty = beta.dtype
    cols = tl.arange(0, BLOCK)
    sums = tl.zeros((BLOCK,), acc_ty)
    acc1 = tl.zeros((BLOCK,), acc_ty)
    acc2 = tl.zeros((BLOCK,), acc_ty)
    acc3 = tl.zeros((BLOCK,), acc_ty)
    acc4 = tl.zeros((BLOCK,), acc_ty)
    acc5 = tl.zeros((BLOCK,), acc_ty)
    acc6 = tl.zeros((BLOCK,), acc_ty)
    for tile in range(start, stop, BLOCK):
        offs = tile + cols
        inb = offs < stop
        a, b = _load_inputs(chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, offs, stop,
                            tl.zeros((BLOCK,), acc_ty), HAS_A, HAS_B, HAS_REF_A, HAS_REF_B)  # fmt: skip
        m = tl.zeros((BLOCK,), acc_ty)
        if HAS_MARGIN:
            m = tl.load(margin_ptr + offs, mask=inb, other=0.0)
        loss, _, _, x5, x6 = _loss_and_grads(a, b, m, kl, delta, beta, gamma, ls, center, tau, weight, LOSS)
        tl.store(losses_ptr + offs, loss, mask=inb)
        if WRITE_REWARDS:
            if HAS_A:
                tl.store(chosen_rewards_ptr + offs, beta * a, mask=inb)
            if HAS_B:
                tl.store(rejected_rewards_ptr + offs, beta * b, mask=inb)
        sums += tl.where(inb, loss, 0.0)
        if HAS_A and HAS_B:
            acc1 += tl.where(inb & (beta * a > beta * b), 1.0, 0.0)
            acc2 += tl.where(inb, beta * (a - b), 0.0)
        if HAS_A:
            acc3 += tl.where(inb, beta * a, 0.0)
        if HAS_B:
            acc4 += tl.where(inb, beta * b, 0.0)
        acc5 += tl.where(inb, x5, 0.0)
        acc6 += tl.where(inb, x6, 0.0)
    return sums, acc1, acc2, acc3, acc4, acc5, acc6


@triton.jit
def _pref_fwd_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr, kl_ptr,
    losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr,
    n,
    beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo,
    tau_hi, tau_lo, delta_hi, delta_lo, weight_hi, weight_lo,
    LOSS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr,
    HAS_REF_B: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_KL: tl.constexpr, WRITE_REWARDS: tl.constexpr,
    BCO_BATCH_MEAN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (1,), for n <= FWD_MULTI_MIN. One program owns the whole (small)
    # batch: it walks the n elements in BLOCK tiles (twice for bco_pair's
    # batch-mean delta), writes losses and rewards, and reduces the metrics in
    # registers. Reads 8-32 bytes and writes 12 bytes per element.
    acc_ty = metrics_ptr.dtype.element_ty
    beta, gamma, ls, center, tau, weight = _loss_scalars(
        beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo, tau_hi, tau_lo, weight_hi,
        weight_lo, acc_ty,
    )  # fmt: skip
    delta = join_float(delta_hi, delta_lo, acc_ty)
    kl = tl.zeros((), acc_ty)
    if HAS_KL:
        kl = tl.load(kl_ptr)
    if BCO_BATCH_MEAN:
        total = _bco_tiles(chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, 0, n, beta,
                           HAS_A, HAS_B, HAS_REF_A, HAS_REF_B, BLOCK)  # fmt: skip
        delta = tl.sum(total, axis=0) / tl.maximum(2 * n, 1).to(acc_ty)
    sums, acc1, acc2, acc3, acc4, acc5, acc6 = _fwd_tiles(
        chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr,
        losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, 0, n,
        kl, delta, beta, gamma, ls, center, tau, weight,
        LOSS, HAS_A, HAS_B, HAS_REF_A, HAS_REF_B, HAS_MARGIN, WRITE_REWARDS, BLOCK,
    )  # fmt: skip
    inv_n = 1.0 / tl.maximum(n, 1).to(acc_ty)
    tl.store(metrics_ptr + 0, tl.sum(sums, axis=0) * inv_n)
    tl.store(metrics_ptr + 1, tl.sum(acc1, axis=0) * inv_n)
    tl.store(metrics_ptr + 2, tl.sum(acc2, axis=0) * inv_n)
    tl.store(metrics_ptr + 3, tl.sum(acc3, axis=0) * inv_n)
    tl.store(metrics_ptr + 4, tl.sum(acc4, axis=0) * inv_n)
    tl.store(metrics_ptr + 5, tl.sum(acc5, axis=0) * inv_n)
    tl.store(metrics_ptr + 6, tl.sum(acc6, axis=0) * inv_n)
    if LOSS == 5:  # the delta used, 0 for an empty batch (as the CPU and CUDA kernels)
        tl.store(metrics_ptr + 7, tl.where(n > 0, delta, 0.0).to(acc_ty))
    else:
        tl.store(metrics_ptr + 7, tl.zeros((), acc_ty))


# --- the forward for large n: per-chunk partial sums, then one program sums them --------------
# Column k < 7 of a partials row holds the chunk's sum of metric term k; column 7
# the chunk's sum of beta a_i + beta b_i (bco_pair's batch-mean delta).


@triton.jit
def _pref_bco_partial_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, partials_ptr, n, beta_hi, beta_lo,
    HAS_REF_A: tl.constexpr, HAS_REF_B: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (cdiv(n, CHUNK),). Program p owns the pairs [p CHUNK, min(n, (p + 1) CHUNK))
    # and writes partials[p, 7] = their sum of beta a_i + beta b_i. Reads
    # 8-16 (float32) bytes per pair (bco_pair: both sides present).
    pid = tl.program_id(0).to(tl.int64)
    acc_ty = partials_ptr.dtype.element_ty
    beta = join_float(beta_hi, beta_lo, acc_ty)
    start = pid * CHUNK
    stop = tl.minimum(start + CHUNK, n)
    total = _bco_tiles(chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, start, stop, beta,
                       True, True, HAS_REF_A, HAS_REF_B, BLOCK)  # fmt: skip
    tl.store(partials_ptr + pid * PARTIAL_COLS + 7, tl.sum(total, axis=0))


@triton.jit
def _pref_fwd_partial_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr, kl_ptr,
    losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, metrics_ptr, partials_ptr,
    n,
    beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo,
    tau_hi, tau_lo, delta_hi, delta_lo, weight_hi, weight_lo,
    LOSS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr,
    HAS_REF_B: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_KL: tl.constexpr, WRITE_REWARDS: tl.constexpr,
    BCO_BATCH_MEAN: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (cdiv(n, CHUNK),), for n > FWD_MULTI_MIN. Program p owns the pairs
    # [p CHUNK, min(n, (p + 1) CHUNK)), walked in CHUNK / BLOCK tiles: writes
    # their losses and rewards and partials[p, 0:7], the chunk's metric sums
    # (the tiles' per-lane sums in the accumulation type, then one tree).
    # bco_pair's batch-mean delta is read from metrics[7] (written by the
    # partial-sums pass before). Reads 8-32 bytes and writes 12 bytes per pair,
    # plus 28 (float32) bytes per program.
    pid = tl.program_id(0).to(tl.int64)
    acc_ty = metrics_ptr.dtype.element_ty
    beta, gamma, ls, center, tau, weight = _loss_scalars(
        beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo, tau_hi, tau_lo, weight_hi,
        weight_lo, acc_ty,
    )  # fmt: skip
    delta = join_float(delta_hi, delta_lo, acc_ty)
    if BCO_BATCH_MEAN:
        delta = tl.load(metrics_ptr + 7)
    kl = tl.zeros((), acc_ty)
    if HAS_KL:
        kl = tl.load(kl_ptr)
    start = pid * CHUNK
    stop = tl.minimum(start + CHUNK, n)
    sums, acc1, acc2, acc3, acc4, acc5, acc6 = _fwd_tiles(
        chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr,
        losses_ptr, chosen_rewards_ptr, rejected_rewards_ptr, start, stop,
        kl, delta, beta, gamma, ls, center, tau, weight,
        LOSS, HAS_A, HAS_B, HAS_REF_A, HAS_REF_B, HAS_MARGIN, WRITE_REWARDS, BLOCK,
    )  # fmt: skip
    row = partials_ptr + pid * PARTIAL_COLS
    tl.store(row + 0, tl.sum(sums, axis=0))
    tl.store(row + 1, tl.sum(acc1, axis=0))
    tl.store(row + 2, tl.sum(acc2, axis=0))
    tl.store(row + 3, tl.sum(acc3, axis=0))
    tl.store(row + 4, tl.sum(acc4, axis=0))
    tl.store(row + 5, tl.sum(acc5, axis=0))
    tl.store(row + 6, tl.sum(acc6, axis=0))


@triton.jit
def _pref_sum_partials_kernel(
    partials_ptr, metrics_ptr, n_parts, n, delta_hi, delta_lo,
    LOSS: tl.constexpr, BCO_BATCH_MEAN: tl.constexpr, DELTA_PASS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    # Grid: (1,). Sums the partials [n_parts, 8] in a fixed order (ROWS rows
    # per step into ROWS x 8 float64 accumulators, then one tree per column),
    # so the bits depend on n alone. DELTA_PASS: column 7 only, writes
    # metrics[7] = sum / 2n (bco_pair's batch-mean delta). Otherwise columns
    # 0..6: writes metrics[k] = sum_k / n and metrics[7] (the delta, or 0) as
    # the single-program kernel does. Reads 32 (float32) bytes per partial row.
    acc_ty = metrics_ptr.dtype.element_ty
    cols = tl.arange(0, PARTIAL_COLS)
    if DELTA_PASS:
        used = cols == 7
    else:
        used = cols < 7
    rows = tl.arange(0, ROWS)
    total = tl.zeros((ROWS, PARTIAL_COLS), tl.float64)
    for start in range(0, n_parts, ROWS):
        r = (start + rows).to(tl.int64)
        mask = (r < n_parts)[:, None] & used[None, :]
        part = tl.load(partials_ptr + r[:, None] * PARTIAL_COLS + cols[None, :], mask=mask, other=0.0)
        total += part.to(tl.float64)
    sums = tl.sum(total, axis=0)
    if DELTA_PASS:
        tl.store(metrics_ptr + cols, (sums / tl.maximum(2 * n, 1).to(tl.float64)).to(acc_ty), mask=used)
    else:
        tl.store(metrics_ptr + cols, (sums / tl.maximum(n, 1).to(tl.float64)).to(acc_ty), mask=used)
        if LOSS == 5:
            if not BCO_BATCH_MEAN:  # else metrics[7] already holds the batch mean
                tl.store(metrics_ptr + 7, join_float(delta_hi, delta_lo, acc_ty))
        else:
            tl.store(metrics_ptr + 7, tl.zeros((), acc_ty))


@triton.jit
def _pref_bwd_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, margin_ptr, kl_ptr, metrics_ptr,
    grad_losses_ptr, grad_a_ptr, grad_b_ptr,
    n, grad_stride,
    beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo,
    tau_hi, tau_lo, weight_hi, weight_lo, scale_hi, scale_lo,
    LOSS: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_REF_A: tl.constexpr,
    HAS_REF_B: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_KL: tl.constexpr, WRITE_A: tl.constexpr,
    WRITE_B: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Grid: (cdiv(n, BLOCK),). Each program owns BLOCK elements: reads the
    # inputs and the upstream gradient, writes dL/da and dL/db. metrics_ptr
    # (the forward's metrics; any input of the accumulation type but for
    # bco_pair) is read for bco_pair's delta only.
    acc_ty = metrics_ptr.dtype.element_ty
    beta, gamma, ls, center, tau, weight = _loss_scalars(
        beta_hi, beta_lo, gamma_hi, gamma_lo, ls_hi, ls_lo, center_hi, center_lo, tau_hi, tau_lo, weight_hi,
        weight_lo, acc_ty,
    )  # fmt: skip
    scale = join_float(scale_hi, scale_lo, acc_ty)
    delta = tl.zeros((), acc_ty)
    if LOSS == 5:
        delta = tl.load(metrics_ptr + 7)
    kl = tl.zeros((), acc_ty)
    if HAS_KL:
        kl = tl.load(kl_ptr)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    a, b = _load_inputs(chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, offs, n,
                        tl.zeros((BLOCK,), acc_ty), HAS_A, HAS_B, HAS_REF_A, HAS_REF_B)  # fmt: skip
    m = tl.zeros((BLOCK,), acc_ty)
    if HAS_MARGIN:
        m = tl.load(margin_ptr + offs, mask=inb, other=0.0)
    g = tl.load(grad_losses_ptr + offs * grad_stride, mask=inb, other=0.0).to(acc_ty) * scale
    _, da, db, _, _ = _loss_and_grads(a, b, m, kl, delta, beta, gamma, ls, center, tau, weight, LOSS)
    if WRITE_A:
        tl.store(grad_a_ptr + offs, g * da, mask=inb)
    if WRITE_B:
        tl.store(grad_b_ptr + offs, g * db, mask=inb)


def _block(n: int) -> tuple[int, int]:
    """Tile and warp count: up to 512 elements, 2 per thread (the forward keeps
    seven metric accumulators per element in registers)."""
    block = max(32, min(512, next_power_of_2(max(n, 1))))
    return block, max(1, block // 64)


def _chunk_block(chunk: int) -> tuple[int, int]:
    """Tile and warp count of the many-program forward: a quarter of the chunk, 32 to 512."""
    if chunk < 32 or chunk & (chunk - 1):
        raise ValueError(f"FWD_CHUNK: expected a power of two >= 32, got {chunk}")
    block = max(32, min(512, chunk // 4))
    return block, max(1, block // 64)


def smoothing_arg(loss: str, label_smoothing: float) -> float:
    """The kernels' smoothing argument: ``label_smoothing`` itself, except for exo_pair, whose
    loss needs only log(eps) and log(1 - eps): log(eps) (eps = EXO_EPS when 0), computed here in
    double, so that an eps too small for float32 (1e-300) still gives the reference's loss."""
    if loss != "exo_pair":
        return label_smoothing
    return math.log(label_smoothing or EXO_EPS)


def preference_fwd(loss, n, chosen, rejected, ref_chosen, ref_rejected, margin, kl, scalars, write_rewards,
                   launch=None):  # fmt: skip
    """Launch the forward kernels; returns (losses, chosen_rewards, rejected_rewards, metrics).

    One program for n <= FWD_MULTI_MIN (a training batch: one launch). Above, P =
    cdiv(n, FWD_CHUNK) programs write their chunks' metric sums to a [P, 8]
    workspace and one program sums it (bco_pair's batch-mean delta first gets
    the same two passes): 2 launches (4 with the batch-mean delta), no atomics."""
    ref = chosen if chosen is not None else rejected
    acc = ref.dtype
    losses = torch.empty(n, dtype=acc, device=ref.device)
    chosen_rewards = torch.empty(n if (write_rewards and chosen is not None) else 0, dtype=acc, device=ref.device)
    rejected_rewards = torch.empty(n if (write_rewards and rejected is not None) else 0, dtype=acc, device=ref.device)
    metrics = torch.empty(N_METRICS, dtype=acc, device=ref.device)
    dummy = metrics
    inputs = tuple(dummy if t is None else t for t in (chosen, rejected, ref_chosen, ref_rejected, margin, kl))
    outputs = (
        losses,
        chosen_rewards if chosen_rewards.numel() else dummy,
        rejected_rewards if rejected_rewards.numel() else dummy,
        metrics,
    )
    beta, delta = split_float(scalars["beta"]), split_float(scalars["bco_delta"])
    loss_scalars = (
        *beta, *split_float(scalars["gamma"]), *split_float(smoothing_arg(loss, scalars["label_smoothing"])),
        *split_float(scalars["center"]), *split_float(scalars["tau"]), *delta, *split_float(scalars["weight"]),
    )  # fmt: skip
    bco_batch_mean = loss == "bco_pair" and bool(scalars["bco_batch_mean"])
    flags = dict(
        LOSS=LOSS_IDS[loss], HAS_A=chosen is not None, HAS_B=rejected is not None,
        HAS_REF_A=ref_chosen is not None, HAS_REF_B=ref_rejected is not None, HAS_MARGIN=margin is not None,
        HAS_KL=kl is not None, WRITE_REWARDS=write_rewards, BCO_BATCH_MEAN=bco_batch_mean,
    )  # fmt: skip

    def kernel(fn):
        return fn if launch is None else launch(fn)

    if n <= max(FWD_MULTI_MIN, 0):  # n == 0 always: no programs to launch
        block, num_warps = _block(n)
        kernel(_pref_fwd_kernel)[(1,)](*inputs, *outputs, n, *loss_scalars, **flags, BLOCK=block,
                                       num_warps=num_warps)  # fmt: skip
        return losses, chosen_rewards, rejected_rewards, metrics

    chunk = FWD_CHUNK
    block, num_warps = _chunk_block(chunk)
    parts = cdiv(n, chunk)
    partials = torch.empty((parts, N_METRICS), dtype=acc, device=ref.device)
    sum_partials = kernel(_pref_sum_partials_kernel)
    if bco_batch_mean:
        kernel(_pref_bco_partial_kernel)[(parts,)](
            *inputs[:4], partials, n, *beta, HAS_REF_A=flags["HAS_REF_A"], HAS_REF_B=flags["HAS_REF_B"],
            CHUNK=chunk, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
        sum_partials[(1,)](partials, metrics, parts, n, *delta, LOSS=flags["LOSS"], BCO_BATCH_MEAN=True,
                           DELTA_PASS=True, ROWS=_SUM_ROWS, num_warps=4)  # fmt: skip
    kernel(_pref_fwd_partial_kernel)[(parts,)](*inputs, *outputs, partials, n, *loss_scalars, **flags, CHUNK=chunk,
                                               BLOCK=block, num_warps=num_warps)  # fmt: skip
    sum_partials[(1,)](partials, metrics, parts, n, *delta, LOSS=flags["LOSS"], BCO_BATCH_MEAN=bco_batch_mean,
                       DELTA_PASS=False, ROWS=_SUM_ROWS, num_warps=4)  # fmt: skip
    return losses, chosen_rewards, rejected_rewards, metrics


def preference_bwd(loss, n, chosen, rejected, ref_chosen, ref_rejected, margin, kl, metrics, scalars,
                   grad_losses, grad_stride, grad_scale, need_a, need_b, launch=None):  # fmt: skip
    """Launch the backward kernel; returns (grad_a, grad_b) (None where not needed). metrics: the
    forward's, for bco_pair (its delta); None for the other losses."""
    like = chosen if chosen is not None else rejected
    acc = like.dtype
    grad_a = torch.empty(n, dtype=acc, device=like.device) if need_a else None
    grad_b = torch.empty(n, dtype=acc, device=like.device) if need_b else None
    if n == 0:
        return grad_a, grad_b
    if metrics is None and LOSS_IDS[loss] == LOSS_IDS["bco_pair"]:
        raise ValueError("metrics: bco_pair's backward needs the forward's metrics (its delta)")
    dummy = like
    block, num_warps = _block(n)
    kernel = _pref_bwd_kernel if launch is None else launch(_pref_bwd_kernel)
    kernel[(cdiv(n, block),)](
        dummy if chosen is None else chosen,
        dummy if rejected is None else rejected,
        dummy if ref_chosen is None else ref_chosen,
        dummy if ref_rejected is None else ref_rejected,
        dummy if margin is None else margin,
        dummy if kl is None else kl,
        dummy if metrics is None else metrics,
        grad_losses,
        dummy if grad_a is None else grad_a,
        dummy if grad_b is None else grad_b,
        n,
        grad_stride,
        *split_float(scalars["beta"]), *split_float(scalars["gamma"]),
        *split_float(smoothing_arg(loss, scalars["label_smoothing"])), *split_float(scalars["center"]),
        *split_float(scalars["tau"]), *split_float(scalars["weight"]),
        *split_float(grad_scale),
        LOSS=LOSS_IDS[loss], HAS_A=chosen is not None, HAS_B=rejected is not None,
        HAS_REF_A=ref_chosen is not None, HAS_REF_B=ref_rejected is not None, HAS_MARGIN=margin is not None,
        HAS_KL=kl is not None, WRITE_A=need_a, WRITE_B=need_b, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return grad_a, grad_b


def kernel_configs() -> list[tuple[object, dict[str, str], dict[str, object], int]]:
    """Every loss's forward (one-program and per-chunk) and backward kernel, and the partial-sum
    kernels, as launched (float32), for AOT compile checks."""
    configs = []
    ptrs = ["chosen_ptr", "rejected_ptr", "ref_chosen_ptr", "ref_rejected_ptr", "margin_ptr", "kl_ptr"]
    pairs = ["beta", "gamma", "ls", "center", "tau"]
    for loss, loss_id in LOSS_IDS.items():
        has_a, has_b = loss != "kto_rejected", loss != "kto_chosen"
        flags = dict(LOSS=loss_id, HAS_A=has_a, HAS_B=has_b, HAS_REF_A=has_a, HAS_REF_B=has_b,
                     HAS_MARGIN=loss_id <= 3, HAS_KL=loss.startswith("kto"))  # fmt: skip
        scal = {f"{n}_{part}": "fp32" for n in pairs for part in ("hi", "lo")}
        fwd_sig = {**{p: "*fp32" for p in ptrs}, "losses_ptr": "*fp32", "chosen_rewards_ptr": "*fp32",
                   "rejected_rewards_ptr": "*fp32", "metrics_ptr": "*fp32", "n": "i64", **scal,
                   "delta_hi": "fp32", "delta_lo": "fp32", "weight_hi": "fp32", "weight_lo": "fp32"}  # fmt: skip
        block = _block(1 << 20)[0]
        fwd_const = {**flags, "WRITE_REWARDS": True, "BCO_BATCH_MEAN": loss == "bco_pair", "BLOCK": block}
        bwd_sig = {**{p: "*fp32" for p in ptrs}, "metrics_ptr": "*fp32", "grad_losses_ptr": "*fp32",
                   "grad_a_ptr": "*fp32", "grad_b_ptr": "*fp32", "n": "i64", "grad_stride": "i64", **scal,
                   "weight_hi": "fp32", "weight_lo": "fp32", "scale_hi": "fp32", "scale_lo": "fp32"}  # fmt: skip
        bwd_const = {**flags, "WRITE_A": has_a, "WRITE_B": has_b, "BLOCK": block}
        for sig, const, kernel in ((fwd_sig, fwd_const, _pref_fwd_kernel), (bwd_sig, bwd_const, _pref_bwd_kernel)):
            sig = {**sig, **{k: "constexpr" for k in const}}
            configs.append((kernel, sig, const, _block(1 << 20)[1]))
        chunk_block, chunk_warps = _chunk_block(FWD_CHUNK)
        part_sig = {}  # the forward's arguments with partials_ptr after metrics_ptr
        for name, ty in fwd_sig.items():
            part_sig.update({name: ty, "partials_ptr": "*fp32"} if name == "metrics_ptr" else {name: ty})
        part_const = {**fwd_const, "CHUNK": FWD_CHUNK, "BLOCK": chunk_block}
        configs.append((_pref_fwd_partial_kernel, {**part_sig, **{k: "constexpr" for k in part_const}}, part_const,
                        chunk_warps))  # fmt: skip
    chunk_block, chunk_warps = _chunk_block(FWD_CHUNK)
    bco_sig = {**{p: "*fp32" for p in ptrs[:4]}, "partials_ptr": "*fp32", "n": "i64", "beta_hi": "fp32",
               "beta_lo": "fp32"}  # fmt: skip
    bco_const = {"HAS_REF_A": True, "HAS_REF_B": True, "CHUNK": FWD_CHUNK, "BLOCK": chunk_block}
    configs.append((_pref_bco_partial_kernel, {**bco_sig, **{k: "constexpr" for k in bco_const}}, bco_const,
                    chunk_warps))  # fmt: skip
    sum_sig = {"partials_ptr": "*fp32", "metrics_ptr": "*fp32", "n_parts": "i64", "n": "i64", "delta_hi": "fp32",
               "delta_lo": "fp32"}  # fmt: skip
    for loss_id, batch_mean, delta_pass in ((0, False, False), (5, False, False), (5, True, True), (5, True, False)):
        const = {"LOSS": loss_id, "BCO_BATCH_MEAN": batch_mean, "DELTA_PASS": delta_pass, "ROWS": _SUM_ROWS}
        configs.append((_pref_sum_partials_kernel, {**sum_sig, **{k: "constexpr" for k in const}}, const, 4))
    return configs
