"""PPO ops: every backend against the float64 reference (the GAE reference is the Python loop)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, backend_cases, graph_replay

import rlhf_kernels
from rlhf_kernels.ops import ppo as ppo_ops
from rlhf_kernels.reference import ppo as reference

try:
    from rlhf_kernels.triton import ppo as triton_ppo
except ImportError:  # no triton: the triton cases are skipped
    triton_ppo = None

AGG_MODES = rlhf_kernels.ops.ppo.LOSS_AGG_MODES


def make_mask(B, T, g, kind):
    if kind == "none":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "response":  # right-padded responses of different lengths, one empty
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[-1] = 0
        return torch.arange(T)[None, :] < lengths[:, None]
    # multi-turn: gaps of masked observation tokens, and an all-masked row
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0] = False
    return mask


def assert_gae_matches_loop(rewards, values, mask, device, backend):
    """float64 GAE (gamma 0.99, lam 0.95) on ``backend`` equals the Python reverse loop."""
    want = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    got = rlhf_kernels.gae(rewards.to(device), values.to(device), mask.to(device), gamma=0.99, lam=0.95,
                           backend=backend)  # fmt: skip
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x.cpu(), y, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
@pytest.mark.parametrize("T", [300, 256], ids=["columns", "vectors"])
def test_gae_triton_several_rows_per_program(monkeypatch, device, backend, T):
    """The Triton kernel takes ROWS rows (warps) per program; the launcher uses one, the
    kernel supports more (a partial last program included), with either chunk layout
    (T = 256: a lane's 4 positions as one vector, gae_vectors; float64 here)."""
    monkeypatch.setattr(triton_ppo, "GAE_ROWS", 4)
    g = torch.Generator().manual_seed(5)
    rewards, values = (torch.randn(5, T, generator=g, dtype=torch.float64) for _ in range(2))
    mask = make_mask(5, T, g, "gaps")
    assert triton_ppo.gae_vectors(rewards, values, mask) == (T == 256)
    assert_gae_matches_loop(rewards, values, mask, device, backend)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="gae_native"))
def test_gae_carries_across_long_masked_gaps(device, backend):
    # Masked runs longer than a kernel's chunk (a tool call's observation tokens): the
    # next value and the running advantage cross whole chunks with no valid position.
    g = torch.Generator().manual_seed(7)
    B, T = 5, 1100
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 100:700] = False  # one gap over several chunks
    mask[1, 1:1099] = False  # only the two ends valid
    mask[2, 513:] = False  # valid prefix, a long masked tail
    mask[3, :900] = False  # a long masked head
    mask[4, ::129] = False  # isolated holes
    assert_gae_matches_loop(rewards, values, mask, device, backend)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="gae_native"))
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (4, 130), (2, 1500), (3, 256), (2, 1024)])  # 256, 1024: vectors
@pytest.mark.parametrize("mask_kind", ["none", "response", "gaps"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.0, 0.5)])
def test_gae_matches_python_loop(device, backend, B, T, mask_kind, gamma, lam):
    g = torch.Generator().manual_seed(B * T)
    rewards = torch.randn(B, T + 3, generator=g, dtype=torch.float64)[:, :T]  # row stride > T
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = make_mask(B, T, g, mask_kind)
    want = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for dtype, tol in ((torch.float32, dict(atol=2e-5, rtol=1e-5)), (torch.float64, dict(atol=1e-12, rtol=1e-12))):
        adv, ret = rlhf_kernels.gae(rewards.to(dtype).to(device), values.to(dtype).to(device),
                                    None if mask_kind == "none" else mask.to(device), gamma=gamma, lam=lam,
                                    backend=backend)  # fmt: skip
        assert adv.dtype == dtype and adv.shape == (B, T)
        torch.testing.assert_close(adv.double().cpu(), want[0], **tol)
        torch.testing.assert_close(ret.double().cpu(), want[1], **tol)


def test_gae_vectors_when_the_jit_knows_rows_aligned():
    """The Triton GAE kernel's chunks move a lane's 4 positions as one vector only when every
    row is provably 16-byte aligned: T and row strides multiples of 16 elements, storage
    offsets multiples of 16 bytes (the cases above run both ways)."""
    if triton_ppo is None:
        pytest.skip("triton is not installed")
    x = torch.zeros(4, 64)
    mask = torch.ones(4, 64, dtype=torch.uint8)
    assert triton_ppo.gae_vectors(x, x, mask) and triton_ppo.gae_vectors(x, x, None)
    assert triton_ppo.gae_vectors(torch.zeros(4, 80)[:, :64], x[:1], torch.zeros(1, 32)[:, :16])
    assert not triton_ppo.gae_vectors(torch.zeros(4, 72)[:, :64], x, mask)  # row stride 72
    assert not triton_ppo.gae_vectors(torch.zeros(4, 65)[:, 1:], x, mask)  # 4 bytes into the storage
    assert not triton_ppo.gae_vectors(x, x, torch.ones(4, 65, dtype=torch.uint8)[:, 1:])  # the mask's 1 byte
    assert not triton_ppo.gae_vectors(torch.zeros(4, 1500), torch.zeros(4, 1500), None)  # T


def test_gae_passes_a_single_rows_stride_as_zero():
    """With one row its stride is never used: the launcher passes 0, which the JIT knows
    divisible by 16, so the vector layout that gae_vectors picks for it (whatever the stride)
    really gets 16-byte accesses."""
    if triton_ppo is None:
        pytest.skip("triton is not installed")
    seen = {}

    def launch(kernel):
        def at(grid):
            def call(*args, **kw):
                seen["args"], seen["kw"] = args, kw
                return kernel[grid](*args, **kw)

            return call

        return type("Launch", (), {"__getitem__": lambda self, grid: at(grid)})()

    g = torch.Generator().manual_seed(3)
    device = "cuda" if HAS_CUDA else "cpu"
    rewards = torch.randn(1, 65, generator=g).to(device)[:, :64]
    values = torch.randn(1, 72, generator=g).to(device)[:, 8:]
    mask = (torch.rand(1, 64, generator=g) > 0.3).to(device)
    assert triton_ppo.gae_vectors(rewards, values, mask)
    adv, ret = triton_ppo.gae(rewards, values, mask, 0.99, 0.95, launch=launch)
    assert seen["args"][7:10] == (0, 0, 0) and seen["kw"]["VEC"]
    want = reference.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), want[1], rtol=1e-5, atol=1e-5)


def test_gae_skips_masked_positions():
    """A masked position neither adds a TD error nor breaks the recursion."""
    rewards = torch.tensor([[0.0, 5.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 0.25, 0.0]])
    mask = torch.tensor([[True, False, True, True]])
    adv, _ = rlhf_kernels.gae(rewards, values, mask, gamma=1.0, lam=1.0, backend="torch")
    # t=3: 1 - 0 = 1; t=2: 0 + 0 - 0.25 + 1 = 0.75; t=1 (masked) carries 0.75; t=0: 0 + 0.25 - 0.5 + 0.75
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.75, 0.75, 1.0]]))


def ppo_inputs(B, T, device, g, mask_kind="response"):
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = make_mask(B, T, g, mask_kind)
    return logp.to(device), old.to(device), adv.to(device), mask.to(device)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("clip", [dict(), dict(clip_ratio_low=0.2, clip_ratio_high=0.28), dict(clip_ratio_c=3.0)],
                         ids=["symmetric", "clip-higher", "dual-clip"])  # fmt: skip
@pytest.mark.parametrize("mask_kind", ["response", "gaps"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_policy_loss(device, backend, mode, clip, mask_kind, level):
    g = torch.Generator().manual_seed(1)
    logp, old, adv, mask = ppo_inputs(5, 33, device, g, mask_kind)
    if level == "sequence":  # sequence ratios near 1: some bind the clip, some not
        old = logp + (old - logp) * 0.4
    clip = {**clip, "importance_sampling_level": level}
    for dtype, tol in ((torch.float32, dict(atol=1e-5, rtol=1e-5)), (torch.float64, dict(atol=1e-12, rtol=1e-10))):
        x = logp.to(dtype).detach().clone().requires_grad_(True)
        out = rlhf_kernels.ppo_policy_loss(x, old.to(dtype), adv.to(dtype), mask, loss_agg_mode=mode,
                                           backend=backend, **clip)  # fmt: skip
        out.loss.backward()
        xr = logp.detach().clone().requires_grad_(True)
        want = reference.ppo_policy_loss(xr, old, adv, mask, loss_agg_mode=mode, **clip)
        want[0].backward()
        for got_v, want_v in zip(out, want, strict=True):
            assert torch.isfinite(got_v)
            torch.testing.assert_close(got_v.double(), want_v, **tol)
        torch.testing.assert_close(x.grad.double(), xr.grad, **tol)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("mask_kind", ["response", "gaps"])
def test_sequence_level_is_gspo(device, backend, mask_kind):
    """importance_sampling_level="sequence" against GSPO written at the sequence level (TRL's form: one
    ratio per sequence, exp of the mean log-ratio, its gradient through that mean), with GRPO's
    advantages (one per sequence) and aggregation (seq-mean-token-mean), where GSPO-token and GSPO
    have the same loss, clipping and gradient."""
    g = torch.Generator().manual_seed(9)
    logp, _, _, mask = ppo_inputs(6, 17, device, g, mask_kind)
    # each sequence its own drift (its mean log-ratio is about -shift), and an advantage whose sign
    # makes the first three bind the clip and the others not
    shift = torch.tensor([0.15, -0.12, 0.2, -0.18, 0.13, -0.16], dtype=torch.float64)[:, None]
    old = logp + (shift + torch.randn(6, 17, generator=g, dtype=torch.float64) * 0.02).to(device)
    sign = -shift.sign() * torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=torch.float64)[:, None]
    adv = (sign * (0.5 + torch.rand(6, 1, generator=g, dtype=torch.float64))).to(device).expand(6, 17)
    low, high = 0.03, 0.04
    xr = logp.clone().requires_grad_(True)
    m = (mask != 0).double()
    seq = (torch.where(mask != 0, xr - old, 0.0)).sum(-1) / m.sum(-1).clamp(min=1)
    s, a = torch.exp(seq)[:, None], adv[:, :1]
    per_seq = torch.maximum(-a * s, -a * torch.clamp(s, 1 - low, 1 + high))[:, 0]
    has = m.sum(-1) > 0
    want = per_seq[has].mean()
    want.backward()
    clipped = ((-a * torch.clamp(s, 1 - low, 1 + high)) > (-a * s))[:, 0]
    assert 0 < int(clipped[has].sum()) < int(has.sum())  # both kinds of sequence present
    x = logp.clone().requires_grad_(True)
    out = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, clip_ratio_low=low, clip_ratio_high=high,
                                       loss_agg_mode="seq-mean-token-mean", importance_sampling_level="sequence",
                                       backend=backend)  # fmt: skip
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-10)
    # the metrics: clip fraction over tokens of sequences that clipped; approx_kl the token-level one
    tokens = m.sum()
    torch.testing.assert_close(out.clipfrac, (m.sum(-1) * clipped).sum() / tokens, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out.approx_kl, (torch.where(mask != 0, old - logp, 0.0)).sum() / tokens,
                               atol=1e-12, rtol=1e-10)  # fmt: skip
    with pytest.raises(ValueError, match="importance_sampling_level: unknown 'seq'"):
        rlhf_kernels.ppo_policy_loss(x, old, adv, mask, importance_sampling_level="seq", backend=backend)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_sequence_level_clips_whole_sequences_in_float32(device, backend):
    """With GSPO's clip range (3e-4) and sequence ratios within a few float32 steps of its edge, each
    sequence clips as a whole (every token's gradient zero, or none), as the torch backend has it: the
    kernels get the sequence's log-ratio itself, not log pi - (log pi - l_i), which rounds per token
    (up to ulp(log pi) ~ 1e-6 here: a sequence then clipped in part). Which of the near-edge
    sequences clip may differ between backends by the rounding of exp."""
    g = torch.Generator().manual_seed(1)
    B, T = 6, 512
    logp = -torch.rand(B, T, generator=g) * 15 - 1
    noise = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.01
    noise -= noise.mean(-1, keepdim=True)
    edge = math.log(1 + 3e-4) + torch.tensor([-4e-7, -2e-7, -1e-7, 1e-7, 2e-7, 4e-7], dtype=torch.float64)[:, None]
    old = (logp.double() - edge - noise).float()
    mask, adv = torch.ones(B, T, dtype=torch.bool), torch.ones(B, T)
    x = logp.clone().to(device).requires_grad_()
    out = rlhf_kernels.ppo_policy_loss(x, old.to(device), adv.to(device), mask.to(device), clip_ratio=3e-4,
                                       loss_agg_mode="seq-mean-token-mean", importance_sampling_level="sequence",
                                       backend=backend)  # fmt: skip
    out.loss.backward()
    zero_grads = (x.grad == 0).sum(-1).tolist()
    assert all(n in (0, T) for n in zero_grads) and 0 < sum(zero_grads) < B * T, zero_grads
    assert out.clipfrac.item() == pytest.approx(sum(zero_grads) / (B * T), abs=1e-7)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_value_loss(device, backend, mode):
    g = torch.Generator().manual_seed(2)
    values, old, returns, mask = ppo_inputs(4, 20, device, g, "gaps")
    x = values.clone().requires_grad_(True)
    out = rlhf_kernels.ppo_value_loss(x, old, returns, mask, clip_range_value=0.1, loss_agg_mode=mode,
                                      backend=backend)  # fmt: skip
    out.loss.backward()
    xr = values.clone().requires_grad_(True)
    want = reference.ppo_value_loss(xr, old, returns, mask, clip_range_value=0.1, loss_agg_mode=mode)
    want[0].backward()
    torch.testing.assert_close(out.loss, want[0])
    torch.testing.assert_close(out.clipfrac, want[1])
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_value_loss_unclipped_tokens_never_count(device, backend):
    """Values inside old +- eps are not clipped, bit for bit: clip(v, old - eps, old + eps) is v
    there (as TRL and verl write it), where old + clip(v - old, +-eps) rounds, and a few float32
    tokens then counted as clipped with a zero gradient."""
    g = torch.Generator().manual_seed(5)
    # drawn apart (v - old is then not exact in float32), with -0.069 < v - old < 0.099 < eps
    old = torch.rand(64, 64, generator=g) * 0.099 - 0.03
    values = (torch.rand(64, 64, generator=g) * 0.069).to(device)
    old, returns = old.to(device), (torch.randn(64, 64, generator=g) * 3).to(device)
    mask = torch.ones(64, 64, dtype=torch.bool, device=device)
    x = values.clone().requires_grad_(True)
    out = rlhf_kernels.ppo_value_loss(x, old, returns, mask, clip_range_value=0.1, backend=backend)
    out.loss.backward()
    assert out.clipfrac.item() == 0.0
    err = values.double() - returns.double()
    torch.testing.assert_close(out.loss.double(), 0.5 * (err**2).mean(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), err / err.numel(), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_many_rows(monkeypatch, device, backend, mode):
    """More rows than one step of the in-kernel aggregation (AGG_BLOCK rows per Triton step, 256 CUDA threads),
    with empty rows among them and an upstream gradient that is not 1."""
    rows = 300
    if backend == "triton" and device == "cpu":  # the interpreter runs a program per row: fewer rows, smaller steps
        monkeypatch.setattr(triton_ppo, "AGG_BLOCK", 16)
        rows = 40
    g = torch.Generator().manual_seed(11)
    logp, old, adv, mask = ppo_inputs(rows, 3, device, g, "response")
    mask[::7] = False
    x = logp.float().requires_grad_(True)
    out = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), mask, clip_ratio_c=3.0, loss_agg_mode=mode,
                                       backend=backend)  # fmt: skip
    (2.5 * out.loss).backward()
    xr = logp.clone().requires_grad_(True)
    want = reference.ppo_policy_loss(xr, old, adv, mask, clip_ratio_c=3.0, loss_agg_mode=mode)
    (2.5 * want[0]).backward()
    for got_v, want_v in zip(out, want, strict=True):
        torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("B,T", [(0, 5), (3, 0)])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_losses_without_tokens(device, backend, B, T, mode):
    """No token at all: zero losses and metrics (no 0 / 0) and an empty or zero gradient."""
    x = torch.zeros(B, T, device=device, requires_grad=True)
    zeros = torch.zeros(B, T, device=device)
    pol = rlhf_kernels.ppo_policy_loss(x, zeros, zeros, zeros.bool(), loss_agg_mode=mode, backend=backend)
    val = rlhf_kernels.ppo_value_loss(x, zeros, zeros, zeros.bool(), loss_agg_mode=mode, backend=backend)
    (pol.loss + val.loss).backward()
    assert [v.item() for v in (*pol, *val)] == [0.0] * 6
    assert x.grad.shape == (B, T) and not x.grad.any()


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_policy_loss_gradcheck(device, backend):
    g = torch.Generator().manual_seed(3)
    logp, old, adv, mask = ppo_inputs(3, 6, device, g)
    x = logp.clone().requires_grad_(True)
    for mode in AGG_MODES:
        assert torch.autograd.gradcheck(
            lambda x, mode=mode: rlhf_kernels.ppo_policy_loss(x, old, adv, mask, clip_ratio_c=3.0,
                                                              loss_agg_mode=mode, backend=backend).loss, (x,)
        )  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(native_op="kl_penalty_fwd_native"))
@pytest.mark.parametrize("kind", rlhf_kernels.ops.ppo.KL_KINDS)
def test_kl_penalty(device, backend, kind):
    g = torch.Generator().manual_seed(4)
    logp = (-torch.rand(3, 50, generator=g, dtype=torch.float64) * 4).to(device)
    ref = (-torch.rand(3, 50, generator=g, dtype=torch.float64) * 4).to(device)
    ref[0, :3] = logp[0, :3] + torch.tensor([25.0, -25.0, 12.0], dtype=torch.float64, device=device)  # clamps
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    out = rlhf_kernels.kl_penalty(a, b, kind, backend=backend)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    (out * w).sum().backward()
    ar, br = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    want = reference.kl_penalty(ar, br, kind)
    (want * w).sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(a.grad, ar.grad)
    torch.testing.assert_close(b.grad, br.grad)


def test_masked_whiten_and_grpo():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 1
    mask = make_mask(4, 9, g, "gaps")
    w = rlhf_kernels.masked_whiten(x, mask)
    kept = w[mask]
    torch.testing.assert_close(kept.mean(), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(kept.var(), torch.ones((), dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(rlhf_kernels.masked_whiten(x, mask, shift_mean=False) - w, x[mask].mean().expand(4, 9))
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    got = rlhf_kernels.grpo_advantages(scores, group_ids=ids)
    torch.testing.assert_close(got, reference.grpo_advantages(scores, ids))
    assert got[6] == 0 and got[4] == 0  # singleton group; zero-variance group
    by_size = rlhf_kernels.grpo_advantages(scores[:4], group_size=2, norm_by_std=False)
    torch.testing.assert_close(by_size, torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=torch.float64))


# Whitening / GRPO tolerances against the float64 reference on the same (rounded) inputs: float32
# accumulation of up to ~8M elements through a fixed chunked merge, or float64 throughout.
STAT_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _whiten_mask(shape, kind, g):
    if kind == "random":
        return torch.rand(shape, generator=g) > 0.3
    mask = torch.zeros(shape, dtype=torch.bool)
    if kind == "single":
        mask.view(-1)[mask.numel() // 2] = True
    return mask  # "none": no valid element


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 2049), (4096,)])
@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(device, backend, shape, dtype, shift_mean):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    mask = _whiten_mask(shape, "random", g)
    got = rlhf_kernels.masked_whiten(x.to(device), mask.to(device), shift_mean, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc and got.shape == x.shape
    want = reference.masked_whiten(x.double(), mask, shift_mean=shift_mean)
    torch.testing.assert_close(got.cpu().double(), want, **STAT_TOL[acc])


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
@pytest.mark.parametrize("mask_kind", ["none", "single"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_whiten_degenerate_masks(device, backend, mask_kind, mask_dtype, dtype):
    """No or one valid element: variance 0, no NaN (mean 0 without a valid element), as the reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 33, generator=g, dtype=dtype)
    mask = _whiten_mask((5, 33), mask_kind, g).to(mask_dtype)
    got = rlhf_kernels.masked_whiten(x.to(device), mask.to(device), backend=backend).cpu()
    want = reference.masked_whiten(x.double(), mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, **STAT_TOL[dtype])


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
def test_masked_whiten_strided_float_mask(device, backend):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 70, generator=g).to(device).t()  # non-contiguous
    mask = (torch.rand(70, 90, generator=g) > 0.5).float().to(device)[:, ::2][:, :40]
    got = rlhf_kernels.masked_whiten(x, mask, backend=backend)
    want = reference.masked_whiten(x.cpu().double(), mask.cpu())
    torch.testing.assert_close(got.cpu().double(), want, **STAT_TOL[torch.float32])


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_kind", ["random", "single"])
def test_masked_whiten_gradient(device, backend, shift_mean, mask_kind):
    """The kernels' closed-form backward equals autograd through the float64 reference."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 37, generator=g, dtype=torch.float64)
    mask = _whiten_mask((6, 37), mask_kind, g)
    upstream = torch.randn(6, 37, generator=g, dtype=torch.float64)
    a = x.clone().to(device).requires_grad_()
    (rlhf_kernels.masked_whiten(a, mask.to(device), shift_mean, backend=backend) * upstream.to(device)).sum().backward()
    b = x.clone().requires_grad_()
    (reference.masked_whiten(b, mask, shift_mean=shift_mean) * upstream).sum().backward()
    torch.testing.assert_close(a.grad.cpu(), b.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_double_backward(device, backend, shift_mean):
    """Second derivatives (create_graph=True) through the closed-form backward: the statistics are
    recomputed there so that they depend on x (as saved constants, the Hessian came out wrong)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device).requires_grad_()
    mask = (torch.rand(3, 7, generator=g) > 0.3).to(device)
    mask[0, 2] = False
    whiten = lambda t: rlhf_kernels.masked_whiten(t, mask, shift_mean, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(whiten, (x,))
    upstream = torch.randn(3, 7, generator=g, dtype=torch.float64).to(device)
    second = []
    for fn in (whiten, lambda t: reference.masked_whiten(t, mask, shift_mean=shift_mean)):
        (grad,) = torch.autograd.grad((fn(x) * upstream).sum(), x, create_graph=True)
        second.append(torch.autograd.grad((grad**2).sum(), x)[0])
    torch.testing.assert_close(second[0], second[1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op="ppo_loss_fwd_native"))
def test_kernel_backwards_refuse_create_graph(device, backend):
    """The kernels' gradients carry no graph: a backward asked for one raises (a C++ op gave a second
    derivative of zeros, silently) instead of returning a constant."""
    g = torch.Generator().manual_seed(13)
    logp, old, adv, mask = ppo_inputs(2, 9, device, g, "gaps")
    logp = logp.double().requires_grad_()
    cases = {
        "ppo_policy_loss": lambda: rlhf_kernels.ppo_policy_loss(logp, old.double(), adv.double(), mask,
                                                                backend=backend).loss,  # fmt: skip
        "kl_penalty": lambda: rlhf_kernels.kl_penalty(logp, old.double(), "k3", backend=backend).sum(),
    }
    for name, loss in cases.items():
        with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
            torch.autograd.grad(loss(), logp, create_graph=True)
        (grad,) = torch.autograd.grad(loss(), logp)  # a plain backward still works
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("device,backend", backend_cases(native_op="masked_whiten_native"))
def test_masked_whiten_byte_mask_values(device, backend):
    """A uint8 mask counts any nonzero byte as valid, in forward and backward alike."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2901, generator=g)  # float32, more than one 4096-element chunk, a ragged last step
    mask = torch.rand(3, 2901, generator=g) > 0.3
    upstream = torch.randn(3, 2901, generator=g).to(device)
    grads = []
    for m in (mask, mask.to(torch.uint8) * 7):
        a = x.clone().to(device).requires_grad_()
        y = rlhf_kernels.masked_whiten(a, m.to(device), backend=backend)
        (y * upstream).sum().backward()
        grads.append((y.detach(), a.grad))
    for u, v in zip(*grads, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_token_sum_is_token_mean_times_count(device, backend):
    """verl's token-sum: the plain sum over valid tokens (no normaliser), forward and gradient."""
    g = torch.Generator().manual_seed(31)
    logp, old, adv, mask = ppo_inputs(3, 11, device, g, "gaps")
    n = int((mask != 0).sum())
    grads = []
    for mode in ("token-sum", "token-mean"):
        x = logp.float().clone().requires_grad_(True)
        out = rlhf_kernels.ppo_policy_loss(x, old.float(), adv.float(), mask, loss_agg_mode=mode, backend=backend)
        out.loss.backward()
        grads.append((out.loss.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0] * n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1] * n, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_nan_token_propagates(device, backend):
    """A NaN log-prob (or value) at a valid token makes the loss NaN on every backend (clamps and maxes
    propagate NaN, as torch.clamp does); at a masked token it is ignored by the kernels."""
    g = torch.Generator().manual_seed(12)
    logp, old, adv, mask = ppo_inputs(2, 9, device, g, "none")
    logp = logp.float().clone()
    logp[1, 4] = float("nan")
    assert rlhf_kernels.ppo_policy_loss(logp, old.float(), adv.float(), mask, clip_ratio_c=3.0,
                                        backend=backend).loss.isnan()  # fmt: skip
    assert rlhf_kernels.ppo_value_loss(logp, old.float(), adv.float(), mask, backend=backend).loss.isnan()
    assert rlhf_kernels.kl_penalty(logp, old.float(), "k3", backend=backend)[1, 4].isnan()
    values, old_values = old.float().clone().requires_grad_(True), logp.nan_to_num(0.5)
    old_values[0, 2] = float("nan")  # a NaN old value: NaN loss and a NaN gradient there, as torch.clamp
    out = rlhf_kernels.ppo_value_loss(values, old_values, adv.float(), mask, backend=backend)
    out.loss.backward()
    assert out.loss.isnan() and values.grad[0, 2].isnan() and values.grad[1].isfinite().all()
    mask[1, 4] = False  # every backend selects by the mask: a NaN at padding never reaches the loss
    assert rlhf_kernels.ppo_policy_loss(logp, old.float(), adv.float(), mask, backend=backend).loss.isfinite()
    assert rlhf_kernels.ppo_value_loss(logp, old.float(), adv.float(), mask, backend=backend).loss.isfinite()
    whitened = rlhf_kernels.masked_whiten(logp, mask, backend=backend)
    assert whitened[mask].isfinite().all()


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_inplace_changes_after_forward_do_not_break_backward(device, backend, compiled):
    """The caller may reuse its mask buffer or scale the returned metrics in place before backward:
    what backward needs was saved apart from them (and gives the original mask's gradient), eager
    and traced alike."""
    if compiled and backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    if compiled and backend == "torch":
        pytest.skip("plain PyTorch: AOTAutograd saves the caller's mask itself (its partitioner recomputes from it)")
    if compiled:
        torch._dynamo.reset()
    wrap = (lambda f: torch.compile(f, backend="aot_eager", fullgraph=True)) if compiled else (lambda f: f)
    ops = {name: wrap(getattr(rlhf_kernels, name)) for name in ("ppo_policy_loss", "ppo_value_loss",
                                                                "masked_whiten", "dpo_loss", "bradley_terry_loss")}
    g = torch.Generator().manual_seed(9)
    logp, old, adv, mask = ppo_inputs(3, 11, device, g, "gaps")
    want_x = logp.clone().requires_grad_(True)
    rlhf_kernels.ppo_policy_loss(want_x, old, adv, mask, backend=backend).loss.backward()
    for m in (mask.clone(), mask.to(torch.uint8)):
        x = logp.clone().requires_grad_(True)
        out = ops["ppo_policy_loss"](x, old, adv, m, backend=backend)
        m.zero_()
        out.clipfrac.mul_(100)
        out.approx_kl.add_(1)
        out.loss.backward()
        torch.testing.assert_close(x.grad, want_x.grad)
    x = logp.clone().requires_grad_(True)
    m = mask.clone()
    val = ops["ppo_value_loss"](x, old, adv, m, backend=backend)
    m.zero_()
    val.clipfrac.mul_(100)
    val.loss.backward()
    w = logp.clone().requires_grad_(True)
    m = mask.clone()
    y = ops["masked_whiten"](w, m, backend=backend)
    m.zero_()
    y.sum().backward()
    pc, pr = (torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_(True) for _ in range(2))
    out = ops["dpo_loss"](pc, pr, pc.detach() * 0, pr.detach() * 0, loss_type="bco_pair", return_metrics=True,
                          backend=backend)  # fmt: skip
    for v in out.metrics.values():
        v.mul_(3)
    out.losses.sum().backward()
    bt = ops["bradley_terry_loss"](pc, pr, backend=backend)
    bt.accuracy.mul_(2)
    bt.loss.backward()


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op="masked_whiten_native"))
def test_masked_whiten_deterministic(device, backend):
    x = torch.randn(3 * 4096 + 17, generator=torch.Generator().manual_seed(2)).to(device)
    mask = x > -1
    first = rlhf_kernels.masked_whiten(x, mask, backend=backend)
    torch.testing.assert_close(rlhf_kernels.masked_whiten(x, mask, backend=backend), first, atol=0, rtol=0)


def _group_ids(kind, n, g):
    if kind == "shuffled":  # arbitrary, non-consecutive ids with groups of different sizes, incl. one
        ids = torch.tensor([7, -3, 7, 100, 42, -3, 7, 42, 5, 100, 42, 7])
        return ids.repeat(n // ids.numel())[torch.randperm(n, generator=g)]
    return torch.arange(n)  # every group of one


@pytest.mark.parametrize("device,backend", backend_cases(native_op="grpo_advantages_native"))
@pytest.mark.parametrize("group_size", [1, 2, 5, 16, 300])
@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grpo_group_size_matches_reference(device, backend, group_size, norm_by_std, dtype):
    g = torch.Generator().manual_seed(group_size)
    scores = torch.randn(group_size * 6, generator=g, dtype=torch.float64).to(dtype)
    scores[:group_size] = 0.5  # a constant group: std 0, advantages 0
    got = rlhf_kernels.grpo_advantages(scores.to(device), group_size, norm_by_std=norm_by_std, backend=backend)
    ids = torch.arange(scores.numel()) // group_size
    want = reference.grpo_advantages(scores.double(), ids, norm_by_std=norm_by_std)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == acc
    torch.testing.assert_close(got.cpu().double(), want, **STAT_TOL[acc])
    assert (got[:group_size] == 0).all()


@pytest.mark.parametrize("device,backend", backend_cases(native_op="grpo_advantages_native"))
@pytest.mark.parametrize("ids_kind", ["shuffled", "singletons"])
@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grpo_group_ids_matches_reference(device, backend, ids_kind, norm_by_std, dtype):
    g = torch.Generator().manual_seed(4)
    ids = _group_ids(ids_kind, 48, g)
    scores = torch.randn(48, generator=g, dtype=dtype)
    got = rlhf_kernels.grpo_advantages(scores.to(device), group_ids=ids.to(device), norm_by_std=norm_by_std,
                                       backend=backend)  # fmt: skip
    want = reference.grpo_advantages(scores.double(), ids, norm_by_std=norm_by_std)
    torch.testing.assert_close(got.cpu().double(), want, **STAT_TOL[dtype])


@pytest.mark.parametrize("device,backend", backend_cases(native_op="grpo_advantages_native"))
def test_grpo_gradient_or_error(device, backend):
    scores = torch.randn(8, dtype=torch.float64, device=device, requires_grad=True)
    if backend in ("torch",):
        rlhf_kernels.grpo_advantages(scores, 4, backend=backend).sum().backward()
        assert scores.grad is not None
        return
    with pytest.raises(RuntimeError, match="scores: requires grad"):
        rlhf_kernels.grpo_advantages(scores, 4, backend=backend)
    out = rlhf_kernels.grpo_advantages(scores, 4)  # auto: the differentiable path
    (out * torch.arange(8.0, dtype=torch.float64, device=device)).sum().backward()
    assert scores.grad.abs().sum() > 0


def test_meta_tensors_give_shapes():
    """On the meta device (shapes only) every PPO op runs with its defaults (no host sync: the
    label check is skipped, GRPO's consecutive groups need no data-dependent shapes) and
    gives the shapes of a real call; the losses differentiate."""
    def t(*shape, grad=False):
        return torch.empty(*shape, device="meta", requires_grad=grad)

    mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    assert [a.shape for a in rlhf_kernels.gae(t(2, 5), t(2, 5), mask)] == [(2, 5), (2, 5)]
    assert rlhf_kernels.masked_whiten(t(2, 5), mask).shape == (2, 5)
    assert rlhf_kernels.grpo_advantages(t(8), 4).shape == (8,)
    assert rlhf_kernels.kl_penalty(t(2, 5), t(2, 5), "k3").shape == (2, 5)
    x = t(2, 5, grad=True)
    rlhf_kernels.ppo_policy_loss(x, t(2, 5), t(2, 5), mask).loss.backward()
    rlhf_kernels.ppo_value_loss(x, t(2, 5), t(2, 5), mask).loss.backward()
    assert x.grad.shape == (2, 5)
    logits = torch.empty(2, 5, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    labels = torch.zeros(2, 5, dtype=torch.long, device="meta")
    for fused in (False, True):
        loss, metrics = rlhf_kernels.ppo_loss_from_logits(logits, labels, t(2, 5), t(2, 5), mask, grad_in_forward=fused)
        loss.backward()
        assert loss.shape == () and all(m.shape == () for m in metrics) and logits.grad.shape == logits.shape


def test_grpo_group_of_one_has_zero_gradient():
    """A group of one (std 1, advantage 0): its gradient is 0, not NaN from the root's infinite
    derivative at a variance of 0; the other groups' gradients match float64 autograd of the
    reference."""
    s = torch.tensor([0.5, 1.5, 2.0, 2.0], dtype=torch.float64, requires_grad=True)
    rlhf_kernels.grpo_advantages(s, group_ids=torch.tensor([0, 0, 0, 1])).sum().backward()
    assert s.grad.isfinite().all() and s.grad[3] == 0
    t = torch.tensor([0.3, -1.0], dtype=torch.float64, requires_grad=True)
    (rlhf_kernels.grpo_advantages(t, 1) * torch.tensor([2.0, 3.0], dtype=torch.float64)).sum().backward()
    assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_ppo_losses_data_inputs_and_masked_non_finite(device, backend):
    """Every backend treats old log-probs, advantages, old values and returns as data (no
    gradient), and a NaN or inf in them at a masked position reaches neither the loss nor any
    gradient (the torch backend selects it away before its arithmetic, as the kernels never read it)."""
    g = torch.Generator().manual_seed(23)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    x, old, adv, ret = (torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.3 for _ in range(4))
    adv[~mask], ret[~mask] = float("nan"), float("inf")
    x, old, adv, ret, mask = (t.to(device) for t in (x, old, adv, ret, mask))
    leaves = [t.clone().requires_grad_(True) for t in (x, old, adv)]
    rlhf_kernels.ppo_policy_loss(*leaves, mask, backend=backend).loss.backward()
    assert leaves[1].grad is None and leaves[2].grad is None
    assert leaves[0].grad.isfinite().all() and (leaves[0].grad[~mask] == 0).all()
    leaves = [t.clone().requires_grad_(True) for t in (x, old, ret)]
    out = rlhf_kernels.ppo_value_loss(*leaves, mask, backend=backend)
    out.loss.backward()
    assert out.loss.isfinite() and leaves[1].grad is None and leaves[2].grad is None
    assert leaves[0].grad.isfinite().all() and (leaves[0].grad[~mask] == 0).all()


def test_whiten_grpo_bad_inputs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask: shape"):
        rlhf_kernels.masked_whiten(x, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        rlhf_kernels.masked_whiten(torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4))
    with pytest.raises(ValueError, match="eps: must be >= 0"):
        rlhf_kernels.masked_whiten(x, x > 0, eps=-1.0)
    with pytest.raises(TypeError, match="shift_mean: expected a bool"):
        rlhf_kernels.masked_whiten(x, x > 0, "yes")
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        rlhf_kernels.masked_whiten(x, x > 0, backend="cuda")
    with pytest.raises(ValueError, match="scores: expected a 1-D"):
        rlhf_kernels.grpo_advantages(x, 2)
    with pytest.raises(ValueError, match="group_size / group_ids: give exactly one"):
        rlhf_kernels.grpo_advantages(x[0], 2, torch.zeros(4))
    with pytest.raises(ValueError, match="group_size: expected a positive int"):
        rlhf_kernels.grpo_advantages(x[0], 0)
    with pytest.raises(ValueError, match="group_ids: expected shape"):
        rlhf_kernels.grpo_advantages(x[0], group_ids=torch.zeros(3))
    with pytest.raises(ValueError, match="eps: must be >= 0"):
        rlhf_kernels.grpo_advantages(x[0], 2, eps=-1e-6)


def test_native_whiten_grpo_argument_checks():
    if not hasattr(torch.ops.rlhf_kernels, "masked_whiten_native"):
        pytest.skip("this build of rlhf_kernels._C has no masked_whiten_native")
    x = torch.randn(8)
    with pytest.raises(ValueError, match="mask: expected a contiguous uint8 tensor"):
        torch.ops.rlhf_kernels.masked_whiten_native(x, torch.ones(8, dtype=torch.bool), True, 1e-8)
    with pytest.raises(ValueError, match="x: must be contiguous"):
        torch.ops.rlhf_kernels.masked_whiten_native(torch.randn(8, 2)[:, 0], torch.ones(8, dtype=torch.uint8),
                                                    True, 1e-8)  # fmt: skip
    with pytest.raises(ValueError, match="offsets: expected a contiguous 1-D int64"):
        torch.ops.rlhf_kernels.grpo_advantages_native(x, torch.zeros(3, dtype=torch.int32), True, 1e-6)
    with pytest.raises(TypeError, match="scores: expected float32 or float64"):
        torch.ops.rlhf_kernels.grpo_advantages_native(x.half(), torch.zeros(3, dtype=torch.int64), True, 1e-6)


try:
    from hypothesis import given
    from hypothesis import strategies as st

    @given(n=st.integers(1, 9000), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), shift=st.booleans())
    def test_masked_whiten_property(n, p, seed, shift):
        """Every kernel backend on CPU agrees with the float64 reference for any length and density."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, generator=g, dtype=torch.float64) * 10
        mask = torch.rand(n, generator=g) < p
        want = reference.masked_whiten(x, mask, shift_mean=shift)
        for backend in rlhf_kernels._dispatch.available_backends("cpu"):
            if backend == "native" and not hasattr(torch.ops.rlhf_kernels, "masked_whiten_native"):
                continue
            got = rlhf_kernels.masked_whiten(x, mask, shift, backend=backend)
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
except ImportError:
    pass


def test_ppo_bad_inputs():
    x = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for n, name in enumerate(("logprobs", "old_logprobs", "advantages")):
        args = [x, x, x, mask]
        args[n] = None
        with pytest.raises(TypeError, match=f"^{name}: expected a tensor, got NoneType"):
            rlhf_kernels.ppo_policy_loss(*args)
    with pytest.raises(TypeError, match="returns: expected a tensor, got NoneType"):
        rlhf_kernels.ppo_value_loss(x, x, None, mask)
    with pytest.raises(ValueError, match="advantages: shape"):
        rlhf_kernels.ppo_policy_loss(x, x, x[:, :4], mask)
    with pytest.raises(ValueError, match="loss_agg_mode: unknown 'seq-mean'"):
        rlhf_kernels.ppo_policy_loss(x, x, x, mask, loss_agg_mode="seq-mean")
    with pytest.raises(ValueError, match="clip_ratio_c: the dual-clip constant must be > 1"):
        rlhf_kernels.ppo_policy_loss(x, x, x, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="kind: unknown KL estimator 'k4'"):
        rlhf_kernels.kl_penalty(x, x, "k4")
    with pytest.raises(ValueError, match="gamma: must be in"):
        rlhf_kernels.gae(x, x, gamma=1.5)
    with pytest.raises(ValueError, match="lam: must be in"):
        rlhf_kernels.gae(x, x, lam=-0.1)
    with pytest.raises(ValueError, match="mask: shape"):
        rlhf_kernels.gae(x, x, mask[:, :3])
    with pytest.raises(ValueError, match="values: expected shape"):
        rlhf_kernels.gae(x, x[0])
    with pytest.raises(ValueError, match="group_size: 3 does not divide"):
        rlhf_kernels.grpo_advantages(torch.randn(4), group_size=3)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_loss_from_logits_matches_unfused(device, backend, mode):
    """logits -> loss equals the unfused float64 composition (log_softmax, gather, entropy,
    clipped surrogate, k3 KL, aggregation) in value and in the logits' gradient."""
    from rlhf_kernels.reference.logprobs import token_logprobs as ref_token_logprobs

    g = torch.Generator().manual_seed(6)
    B, T, V = 3, 6, 97
    logits = (torch.randn(B, T, V, generator=g) * 2).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = make_mask(B, T, g, "gaps").to(device)
    old = (
        ref_token_logprobs(logits.double(), labels)
        + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(device)
    ).float()
    ref = old + 0.2 * torch.randn(B, T, generator=g).to(device)
    adv = torch.randn(B, T, generator=g).to(device)
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, loss_agg_mode=mode)

    x = logits.clone().requires_grad_(True)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(
        x, labels, old, adv, mask, temperature=0.9, ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01,
        backend=backend, **kw,
    )  # fmt: skip
    loss.backward()

    xr = logits.double().clone().requires_grad_(True)
    lp, ent = ref_token_logprobs(xr, labels, mask, temperature=0.9, return_entropy=True)
    pg = reference.ppo_policy_loss(lp, old.double(), adv.double(), mask, **kw)
    ent_agg = reference.agg_loss(ent, mask, mode)
    kl_agg = reference.agg_loss(reference.kl_penalty(lp, ref.double(), "k3"), mask, mode)
    want = pg[0] - 0.01 * ent_agg + 0.05 * kl_agg
    want.backward()
    torch.testing.assert_close(loss.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(metrics.entropy.double(), ent_agg.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(metrics.kl.double(), kl_agg.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(metrics.clipfrac.double(), pg[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op="ppo_loss_fwd_native"))
def test_ppo_opcheck(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("fake tensors have no data pointer for the Triton interpreter; checked on GPU")
    g = torch.Generator().manual_seed(7)
    logp, old, adv, mask = ppo_inputs(3, 5, device, g)
    x = logp.float().requires_grad_(True)
    m = mask.to(torch.uint8)
    ops = torch.ops.rlhf_kernels
    for agg in range(4):
        torch.library.opcheck(getattr(ops, f"ppo_loss_fwd_{backend}"), (0, x, old.float(), adv.float(), m, 0.2, 0.28,
                                                                        3.0, True, agg))  # fmt: skip
    torch.library.opcheck(getattr(ops, f"ppo_loss_fwd_{backend}"), (1, x, old.float(), adv.float(), m, 0.2, 0.0, 0.0,
                                                                    False, 2))  # fmt: skip
    torch.library.opcheck(getattr(ops, f"kl_penalty_fwd_{backend}"), (x, old.float(), "k3"))
    torch.library.opcheck(getattr(ops, f"gae_{backend}"), (adv.float(), old.float(), m, 0.99, 0.95))


@pytest.mark.parametrize(
    "device,backend", backend_cases(["torch", "triton", "native"], native_op="ppo_loss_fwd_native")
)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ppo_compile_fullgraph(device, backend, level):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    g = torch.Generator().manual_seed(8)
    logp, old, adv, mask = (t.float() if t.is_floating_point() else t for t in ppo_inputs(3, 9, device, g))

    def step(x):
        out = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, clip_ratio_c=3.0, importance_sampling_level=level,
                                           backend=backend)  # fmt: skip
        return out.loss + 0.1 * rlhf_kernels.kl_penalty(x, old, "k3", backend=backend).mean()

    torch._dynamo.reset()
    # Inductor on CPU for the native backend too. (Inductor could not lower the bool -> uint8 mask view
    # on CUDA; the CPU lowering accepted it, so only the GPU run of this test guards that.)
    inductor = device == "cuda" or backend == "native"
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if inductor else "aot_eager")
    x1, x2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    eager = step(x1)
    eager.backward()
    out = compiled(x2)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("device,backend", backend_cases(native_op="ppo_loss_fwd_native"))
def test_float_masks_mean_nonzero(device, backend):
    """A float mask counts nonzero entries as valid on every backend (like mask.bool())."""
    g = torch.Generator().manual_seed(10)
    logp, old, adv, mask = ppo_inputs(3, 8, device, g, "gaps")
    fmask = mask.double() * 0.5
    got = rlhf_kernels.ppo_policy_loss(logp, old, adv, fmask, backend=backend)
    want = reference.ppo_policy_loss(logp, old, adv, mask)
    torch.testing.assert_close(got.loss, want[0])
    adv_g, _ = rlhf_kernels.gae(adv, old, fmask, backend=backend)
    torch.testing.assert_close(adv_g, reference.gae(adv, old, mask)[0])


# --- ppo_loss_from_logits: the fused single sweep (grad_in_forward) and the two-pass composition ---

FUSED = "ppo_logits_fused_native"
# Tolerances of the loss / metrics and of the logits' gradient against the float64 oracle on the same
# (rounded) logits. Both accumulate in float32; bf16 / fp16 gradients are additionally rounded once
# (relative 2^-9 / 2^-12), and their entries are O(w / V), hence the small atol.
FUSED_TOL = {
    torch.float32: (dict(atol=2e-5, rtol=2e-5), dict(atol=1e-7, rtol=1e-4)),
    torch.bfloat16: (dict(atol=2e-5, rtol=2e-5), dict(atol=1e-7, rtol=8e-3)),
    torch.float16: (dict(atol=2e-5, rtol=2e-5), dict(atol=1e-7, rtol=1e-3)),
}


def fused_inputs(B, T, V, g, dtype=torch.float32, device="cpu", with_ref=True):
    """Logits, labels, old / ref log-probs near the policy's (so that clipping binds for some
    tokens), advantages, and a mask with gaps, an all-masked row."""
    from rlhf_kernels.reference.logprobs import token_logprobs as ref_token_logprobs

    full = (torch.randn(B, T + 1, V, generator=g) * 2).to(dtype)
    logits = full[:, :T].contiguous()
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = make_mask(B, T, g, "gaps")
    old = ref_token_logprobs(logits.double(), labels) + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64) if with_ref else None
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(logits), to(labels), to(old.float()), to(adv.float()), to(mask), to(None if ref is None else ref.float())


def fused_oracle(logits, labels, old, adv, mask, *, ref_logprobs=None, temperature=1.0, kl_coef=0.0, kl_kind="k3",
                 entropy_coef=0.0, loss_agg_mode="token-mean", ignore_index=-100, **clip):  # fmt: skip
    """The float64 composition: log_softmax, gather, entropy, clipped surrogate, KL, aggregation."""
    from rlhf_kernels.reference.logprobs import token_logprobs as ref_token_logprobs

    xr = logits.detach().double().requires_grad_(True)
    valid = (mask != 0) & (labels != ignore_index)
    lp, ent = ref_token_logprobs(xr, labels, valid, temperature=temperature, return_entropy=True)
    loss, clipfrac, approx_kl, lower = reference.ppo_policy_loss(lp, old.double(), adv.double(), valid,
                                                                 loss_agg_mode=loss_agg_mode, **clip)  # fmt: skip
    ent_agg = reference.agg_loss(ent, valid, loss_agg_mode)
    kl_agg = torch.zeros((), dtype=torch.float64, device=lp.device)
    if ref_logprobs is not None:
        kl_agg = reference.agg_loss(reference.kl_penalty(lp, ref_logprobs.double(), kl_kind), valid, loss_agg_mode)
    total = loss - entropy_coef * ent_agg + kl_coef * kl_agg
    total.backward()
    metrics = (total, loss, clipfrac, lower, approx_kl, ent_agg, kl_agg)
    return [m.detach() for m in metrics], xr.grad


def check_fused(logits, labels, old, adv, mask, backend, *, grad_in_forward=True, inplace_backward=False,
                sliced=False, pad=0, **kw):  # fmt: skip
    """The op against fused_oracle. sliced: the op gets logits[:, :T] of a [B, T + 1, V]
    tensor, as from an LM head's output (rows further apart than V; for an odd V each row a
    different distance from a 16-byte boundary, unlike those of a fresh gradient). pad: the
    op gets logits[..., :V] of [..., V + pad] rows (a padded vocabulary: rows spaced wider
    than they are long)."""
    tol, grad_tol = FUSED_TOL[logits.dtype]
    want, want_grad = fused_oracle(logits, labels, old, adv, mask, **kw)
    B, T, V = logits.shape
    if sliced or pad:
        leaf = torch.zeros(B, T + sliced, V + pad, dtype=logits.dtype, device=logits.device)
        leaf[:, :T, :V] = logits
        leaf.requires_grad_(True)
        x = (leaf * 1 if inplace_backward else leaf)[:, :T, :V]
        assert not x.is_contiguous()
    else:
        leaf = logits.detach().clone().requires_grad_(True)
        x = leaf * 1 if inplace_backward else leaf  # a non-leaf, as logits from an LM head are
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend,
                                                      grad_in_forward=grad_in_forward,
                                                      inplace_backward=inplace_backward, **kw)  # fmt: skip
    loss.backward()
    grad = leaf.grad
    if sliced or pad:
        outside = grad.clone()
        outside[:, :T, :V] = 0
        assert torch.all(outside == 0)
        grad = grad[:, :T, :V]
    assert loss.shape == () and grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), want[0], **tol)
    for name, got, exp in zip(metrics._fields, metrics, want, strict=True):
        assert not got.requires_grad, name
        torch.testing.assert_close(got.double(), exp, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grad.double(), want_grad, **grad_tol)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op="ppo_loss_fwd_native"))
@pytest.mark.parametrize("grad_in_forward", [False, True], ids=["two-pass", "fused"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_ppo_from_logits_double_backward_refused(device, backend, grad_in_forward, inplace):
    g = torch.Generator().manual_seed(14)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 33, g, device=device)
    x = logits.detach().clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x * 1.0, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                entropy_coef=0.01, grad_in_forward=grad_in_forward,
                                                inplace_backward=inplace, backend=backend)  # fmt: skip
    with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_agg_modes(device, backend, mode, grad_in_forward):
    """Every aggregation mode, with dual clip, clip-higher, k3 KL, entropy bonus and T != 1,
    an all-masked row and masked gaps."""
    g = torch.Generator().manual_seed(11)
    logits, labels, old, adv, mask, ref = fused_inputs(4, 7, 1000, g, device=device)
    check_fused(logits, labels, old, adv, mask, backend, grad_in_forward=grad_in_forward, temperature=0.9,
                clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.05,
                entropy_coef=0.01, loss_agg_mode=mode)  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_metrics_under_autocast(device, backend, mode, grad_in_forward):
    """Inside a bf16 autocast region (a trainer's mixed-precision step), the loss and metrics are
    still float32 sums: a weighted sum written as a matrix product ran in bf16 there."""
    g = torch.Generator().manual_seed(12)
    logits, labels, old, adv, mask, ref = fused_inputs(4, 7, 1000, g, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        check_fused(logits, labels, old, adv, mask, backend, grad_in_forward=grad_in_forward, ref_logprobs=ref,
                    kl_coef=0.05, entropy_coef=0.01, loss_agg_mode=mode)  # fmt: skip


FUSED_OPTIONS = {
    "symmetric-plain": dict(),
    "clip-higher-k1": dict(clip_ratio_low=0.1, clip_ratio_high=0.3, kl_kind="k1", kl_coef=0.1),
    "dual-abs-entropy": dict(clip_ratio_c=2.0, kl_kind="abs", kl_coef=0.2, entropy_coef=0.05),
    "k2-temperature": dict(kl_kind="k2", kl_coef=0.3, temperature=1.7),
    "k3-metric-only": dict(kl_kind="k3", kl_coef=0.0, entropy_coef=0.02, temperature=0.5),
    # GSPO: the single sweep falls back to the two-pass path (check_fused asks for the sweep)
    "gspo-k3": dict(importance_sampling_level="sequence", clip_ratio_low=0.05, clip_ratio_high=0.06, kl_kind="k3",
                    kl_coef=0.05, entropy_coef=0.01),
}


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("option", list(FUSED_OPTIONS))
def test_ppo_from_logits_options(device, backend, option):
    """Clip settings, each KL estimator (on, and as a metric only), entropy on / off,
    temperatures, and a vocab (5003) that no block size divides."""
    g = torch.Generator().manual_seed(12)
    kw = FUSED_OPTIONS[option]
    logits, labels, old, adv, mask, ref = fused_inputs(3, 5, 5003, g, device=device, with_ref="kl_kind" in kw)
    check_fused(logits, labels, old, adv, mask, backend, ref_logprobs=ref, loss_agg_mode="seq-mean-token-mean",
                **kw)  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("grad_in_forward,inplace", [(True, False), (True, True), (False, True)],
                         ids=["fused", "fused-inplace", "two-pass-inplace"])  # fmt: skip
def test_ppo_from_logits_dtypes_layouts(device, backend, dtype, layout, grad_in_forward, inplace):
    g = torch.Generator().manual_seed(13)
    logits, labels, old, adv, mask, ref = fused_inputs(3, 6, 1000, g, dtype, device)
    check_fused(logits, labels, old, adv, mask, backend, grad_in_forward=grad_in_forward, inplace_backward=inplace,
                sliced=layout == "sliced",
                clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, temperature=1.3)  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_ignored_and_bad_labels(device, backend, grad_in_forward):
    """ignore_index tokens count as masked (zero gradient row); a kept label outside [0, V)
    gives NaN without reading out of bounds (check_labels=False) or raises (default)."""
    g = torch.Generator().manual_seed(14)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 300, g, device=device)
    mask[:] = True
    labels[1, 2] = -100
    path = dict(grad_in_forward=grad_in_forward, backend=backend)
    check_fused(logits, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, **path)
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **path)
    loss.backward()
    assert torch.all(x.grad[1, 2] == 0)
    bad = labels.clone()
    bad[0, 1] = 300
    with pytest.raises(ValueError, match="labels: value 300 is outside"):
        rlhf_kernels.ppo_loss_from_logits(logits, bad, old, adv, mask, **path)
    x = logits.clone().requires_grad_(True)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, bad, old, adv, mask, check_labels=False, **path)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(metrics.entropy)
    assert torch.isfinite(x.grad[1]).all()
    if backend != "torch":  # the kernels flag the bad row; the reference's torch.where cuts its gradient
        assert torch.isnan(x.grad[0, 1]).all()


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 1000), (torch.bfloat16, 1024), (torch.bfloat16, 1003),
                                         (torch.bfloat16, 769), (torch.float16, 777), (torch.bfloat16, 1)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_ppo_from_logits_row_parts(monkeypatch, device, backend, dtype, vocab, layout, inplace):
    """The fused sweep's row-cut variant (RLHF_KERNELS_FUSED_PART_COLS: 256 columns a part
    here, so up to 4 parts a row, or one): rows whose parts publish their (m, s, w) and
    label logit and wait for each other. Rows the JIT proves aligned (bf16 x 1024);
    contiguous rows of an odd vocabulary, each off its 16-byte boundary by a different
    amount (counted from there: 769 leaves the last part of most rows empty); sliced
    rows, misaligned unlike the fresh gradient's (loads element-wise); fp32 rows of 4000
    bytes; a one-word vocabulary; in place. Labels at the row ends, around the part
    boundaries and the heads; the heaviest per-token math, an all-masked row, masked gaps."""
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "256")
    assert triton_ppo.fused_parts(vocab, 18) == (256, -(-vocab // 256))
    g = torch.Generator().manual_seed(15)
    logits, labels, old, adv, mask, ref = fused_inputs(3, 6, vocab, g, dtype, device)
    spots = torch.tensor([0, 1, 7, 8, 255, 256, 257, 263, 264, 511, 512, vocab - 1]).clamp(max=vocab - 1)
    labels.view(-1)[: spots.numel()] = spots.to(labels.device)
    check_fused(logits, labels, old, adv, mask, backend, inplace_backward=inplace, sliced=layout == "sliced",
                clip_ratio_c=3.0, ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, temperature=1.3,
                loss_agg_mode="seq-mean-token-sum")  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
@pytest.mark.parametrize("vocab,part_cols,sliced", [(32000, "256", False), (32000, "8192", False),
                                                    (32003, "4096", True)])  # fmt: skip
def test_ppo_from_logits_row_parts_many_rows(monkeypatch, device, backend, vocab, part_cols, sliced):
    """On a GPU, where the parts of a row run at once and wait on each other: thousands of
    rows of 125, 4 or 8 parts (many more programs than the GPU holds; aligned rows, and
    sliced rows of an odd vocabulary) agree with the program-per-row kernel, in place too.
    (The interpreter runs the two phases one after the other: there the small cases above
    check the same code.)"""
    if device == "cpu":
        pytest.skip("the wait between parts runs on a GPU only")
    g = torch.Generator().manual_seed(17)
    logits, labels, old, adv, mask, ref = fused_inputs(8, 512, vocab, g, torch.bfloat16, device)
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, grad_in_forward=True, backend=backend)
    out = {}
    for cols in ("0", part_cols):
        monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", cols)
        for inplace in (False, True):
            full = torch.cat([logits, logits[:, :1]], 1) if sliced else logits
            leaf = full.detach().clone().requires_grad_(True)
            x = leaf * 1 if inplace else leaf
            x = x[:, :-1] if sliced else x
            loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, inplace_backward=inplace, **kw)
            loss.backward()
            out[cols, inplace] = (torch.stack(list(metrics)), leaf.grad)
    want_metrics, want_grad = out["0", False]
    for key, (got_metrics, got_grad) in out.items():
        torch.testing.assert_close(got_metrics, want_metrics, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


@pytest.mark.parametrize("device,backend", [c for c in backend_cases() if c.values[0] == "cuda"])
@pytest.mark.parametrize("part_cols", ["0", "256"], ids=["rows", "row parts"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_cuda_graph_capture(monkeypatch, device, backend, part_cols, grad_in_forward):
    """The policy step records into a CUDA graph with the default check_labels=True (skipped
    while capturing: no host sync) and replays on new logits and advantages match eager calls
    and the float64 composition (the row-cut sweep's sync counters are reset by each replay)."""
    if part_cols != "0" and (backend != "triton" or not grad_in_forward):
        pytest.skip("the row-cut variant is the Triton fused sweep's")
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", part_cols)
    g = torch.Generator().manual_seed(21)
    logits, labels, old, adv, mask, ref = fused_inputs(3, 7, 1003, g, torch.bfloat16, device)
    new_logits, _, _, new_adv, _, _ = fused_inputs(3, 7, 1003, g, torch.bfloat16, device)
    x = logits.detach().clone().requires_grad_(True)
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, clip_ratio_c=3.0, loss_agg_mode="seq-mean-token-mean")

    def step():
        x.grad = None
        loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, backend=backend,
                                                          grad_in_forward=grad_in_forward, **kw)  # fmt: skip
        loss.backward()
        return loss, torch.stack(list(metrics)), x.grad

    replayed = graph_replay(step, [x, adv], [new_logits, new_adv])
    for got, want in zip(replayed, step(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    want, want_grad = fused_oracle(new_logits, labels, old, new_adv, mask, **kw)
    tol, grad_tol = FUSED_TOL[torch.bfloat16]
    torch.testing.assert_close(replayed[0].double(), want[0], **tol)
    torch.testing.assert_close(replayed[2].double(), want_grad, **grad_tol)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
def test_fused_inplace_op_refuses_rows_that_share_memory(device, backend):
    """The registered in-place fused step, called directly on rows that share memory (the
    public op writes a fresh gradient for them), raises naming the logits."""
    x = torch.randn(1, 40, device=device).expand(3, 40)
    labels, zeros, weights = torch.tensor([3, 7, 9], device=device), torch.zeros(3, device=device), torch.ones(3)
    op = getattr(torch.ops.rlhf_kernels, f"ppo_logits_fused_inplace_{backend}")
    with pytest.raises(ValueError, match="logits: rows share memory"):
        op(x, labels, zeros, zeros, None, weights.to(device), 1.0, -100, 0.8, 1.2, 3.0, False, 0, 0.0, 0.0)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
@pytest.mark.parametrize("part_cols", ["0", "256"], ids=["rows", "row parts"])
def test_ppo_from_logits_int64_offsets(monkeypatch, device, backend, part_cols):
    """Rows that start past 2**31 elements (two rows 2**31 apart in a 4 GiB buffer that
    torch.empty leaves untouched but for the rows written): the fused sweep (CUDA: the
    cluster kernel where it runs; Triton: rows, or cut into parts) gives what it gives on
    a contiguous copy, for the gradient written to a fresh tensor and in place."""

    if part_cols != "0" and backend != "triton":
        pytest.skip("the row-cut variant is the Triton fused sweep's")
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", part_cols)
    vocab = 1000
    g = torch.Generator().manual_seed(24)
    logits, labels, old, adv, mask, ref = fused_inputs(1, 2, vocab, g, torch.bfloat16, device)
    mask = torch.ones_like(mask)
    base = torch.empty(2**31 + 2 * vocab, dtype=torch.bfloat16, device=device)
    far = base.as_strided((1, 2, vocab), (2**32, 2**31, 1), storage_offset=vocab)
    far.copy_(logits)
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, grad_in_forward=True, backend=backend)
    out = []
    for x in (logits.clone(), far.detach()):
        x.requires_grad_(True)
        loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **kw)
        loss.backward()
        out.append((torch.stack(list(metrics)), x.grad.float()))
    # (to rounding: rows the JIT can prove aligned, as these, may take another code path)
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=8e-3, atol=1e-7)
    # in place, through the registered op (the public op would run it on a copy of a leaf)
    *inputs, weights, _ = ppo_ops._fused_inputs(labels, mask, old, adv, ref, "token-mean", -100, torch.float32)
    args = (*inputs, weights) + ppo_ops._fused_consts(1.0, -100, 0.8, 1.2, None, "k3", 0.05, 0.01)
    inplace = getattr(torch.ops.rlhf_kernels, f"ppo_logits_fused_inplace_{backend}")
    fresh = getattr(torch.ops.rlhf_kernels, f"ppo_logits_fused_{backend}")
    _, want_stats, want_grad = fresh(logits, *args, True)
    _, stats = inplace(far, *args)
    torch.testing.assert_close(stats, want_stats, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(far.float(), want_grad.float(), rtol=8e-3, atol=1e-7)
    del base, far


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
def test_ppo_from_logits_row_parts_ignored_and_bad_labels(monkeypatch, device, backend):
    """Parts of an ignored row write a zero gradient and no stats wait; a kept label outside
    [0, V) (check_labels=False) gives its row NaN, the others stay exact."""
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "256")
    g = torch.Generator().manual_seed(16)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 700, g, device=device)
    mask[:] = True
    labels[1, 2] = -100
    check_fused(logits, labels, old, adv, mask, backend, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01)
    bad = labels.clone()
    bad[0, 1] = 700
    x = logits.clone().requires_grad_(True)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, bad, old, adv, mask, check_labels=False, grad_in_forward=True,
                                                      backend=backend)  # fmt: skip
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(metrics.entropy)
    assert torch.isnan(x.grad[0, 1]).all() and torch.all(x.grad[1, 2] == 0) and torch.isfinite(x.grad[1]).all()


def test_fused_parts_setting(monkeypatch):
    """RLHF_KERNELS_FUSED_PART_COLS: off by default and at 0; columns rounded up to a power of
    two within [256, 16384]; rows of more than MAX_FUSED_PARTS parts keep the program-per-row
    kernel; anything but an integer is an error naming the variable."""
    if triton_ppo is None:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("RLHF_KERNELS_FUSED_PART_COLS", raising=False)
    assert triton_ppo.fused_parts(128256, 16384) == (0, 0)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "0")
    assert triton_ppo.fused_parts(128256, 16384) == (0, 0)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "8192")
    assert triton_ppo.fused_parts(128256, 16384) == (8192, 16)
    assert triton_ppo.fused_parts(100, 16384) == (8192, 1)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "5000")
    assert triton_ppo.fused_parts(128256, 16384) == (8192, 16)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "3")
    assert triton_ppo.fused_parts(1000, 4) == (256, 4)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "1000000")
    assert triton_ppo.fused_parts(128256, 4) == (16384, 8)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "256")
    assert triton_ppo.fused_parts(256 * triton_ppo.MAX_FUSED_PARTS, 4) == (256, triton_ppo.MAX_FUSED_PARTS)
    assert triton_ppo.fused_parts(256 * triton_ppo.MAX_FUSED_PARTS + 1, 4) == (0, 0)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PART_COLS", "8k")
    with pytest.raises(ValueError, match="RLHF_KERNELS_FUSED_PART_COLS"):
        triton_ppo.fused_parts(128256, 4)
    # its register cap: none for rows the JIT knows aligned, PARTS_MAXNREG for the others, or
    # RLHF_KERNELS_FUSED_PARTS_MAXNREG for all (0: none)
    monkeypatch.delenv("RLHF_KERNELS_FUSED_PARTS_MAXNREG", raising=False)
    assert triton_ppo.parts_maxnreg(True) == {}
    assert triton_ppo.parts_maxnreg(False) == {"maxnreg": triton_ppo.PARTS_MAXNREG}
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PARTS_MAXNREG", "0")
    assert triton_ppo.parts_maxnreg(False) == {}
    monkeypatch.setenv("RLHF_KERNELS_FUSED_PARTS_MAXNREG", "64")
    assert triton_ppo.parts_maxnreg(True) == {"maxnreg": 64}
    for bad in ("8", "300", "-1", "many"):
        monkeypatch.setenv("RLHF_KERNELS_FUSED_PARTS_MAXNREG", bad)
        with pytest.raises(ValueError, match="RLHF_KERNELS_FUSED_PARTS_MAXNREG"):
            triton_ppo.parts_maxnreg(True)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
def test_ppo_from_logits_float16_keeps_small_gradients(device, backend):
    """With a loss scale (as torch.amp.GradScaler applies), float16 gradient entries far
    below float16's range before scaling survive: they are not stored unscaled."""
    g = torch.Generator().manual_seed(21)
    logits, labels, old, adv, mask, _ = fused_inputs(2, 256, 64, g, torch.float16, device, with_ref=False)
    logits = (logits.float() * 4).half()  # peaked rows: many probabilities near 1e-6
    scale = 65536.0
    x = logits.clone().requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, grad_in_forward=True, backend=backend)
    (loss * scale).backward()
    _, want = fused_oracle(logits, labels, old, adv, mask)
    big = (want * scale).abs() > 1e-2  # float16-normal after scaling; most are subnormal unscaled
    assert (want[big].abs() < 6.1e-5).double().mean() > 0.5
    torch.testing.assert_close(x.grad[big].double() / scale, want[big], rtol=2e-3, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("sms", [1, None], ids=["4-programs", "one-per-tile"])
def test_scale_unless_one_on_a_sliced_gradient(monkeypatch, device, backend, scale, sms):
    """The backward's in-place scaling (the Triton kernel CUDA uses for both kernel
    backends) addresses the rows of a view: the rows outside it stay untouched; with fewer
    programs than tiles each program walks several (across row boundaries)."""
    from rlhf_kernels.triton import ppo as triton_ppo

    if sms is not None:
        monkeypatch.setattr(triton_ppo, "_sm_count", lambda device: sms)

    base = torch.randn(3, 5, 4100, generator=torch.Generator().manual_seed(3)).to(device)
    want = base.clone()
    want[:, :-1] *= scale
    triton_ppo.scale_unless_one_(base[:, :-1], torch.tensor([scale], device=device))
    torch.testing.assert_close(base, want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_empty_time(device, backend, grad_in_forward):
    """[B, 0, V]: no token at all gives a zero loss and an empty gradient, not an error."""
    logits = torch.randn(2, 0, 50, device=device, requires_grad=True)
    labels = torch.zeros(2, 0, dtype=torch.long, device=device)
    zeros = torch.zeros(2, 0, device=device)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(logits, labels, zeros, zeros, zeros.bool(), backend=backend,
                                                      grad_in_forward=grad_in_forward, entropy_coef=0.01)  # fmt: skip
    loss.backward()
    assert loss.item() == 0 and metrics.clipfrac.item() == 0 and logits.grad.shape == (2, 0, 50)


def _fused_steps_under(monkeypatch, variable, settings, inputs, backend):
    """(loss, *metrics, logits' gradient) of one fused step per setting of a launch knob."""
    logits, labels, old, adv, mask, ref = inputs
    out = []
    for setting in settings:
        monkeypatch.setenv(variable, setting)
        x = logits.clone().requires_grad_(True)
        loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                          entropy_coef=0.01, grad_in_forward=True, backend=backend)
        loss.backward()  # fmt: skip
        out.append((loss, *metrics, x.grad))
    return out


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ppo_from_logits_prefetch_settings_agree(monkeypatch, device, backend, dtype):
    """RLHF_KERNELS_FUSED_PREFETCH picks the fused sweep's first pass: one tile loaded ahead with a
    reduction across the program per tile (1), or per-lane states merged once per row (0). Same
    loss, stats and gradient to float rounding (the sums are merged in another order), with V
    spanning several tiles and a partial last one."""
    g = torch.Generator().manual_seed(16)
    inputs = fused_inputs(2, 3, 5000, g, dtype=dtype, device=device)
    out = _fused_steps_under(monkeypatch, "RLHF_KERNELS_FUSED_PREFETCH", ("1", "0"), inputs, backend)
    _assert_fused_steps_close(out[0], out[1], dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="the program count is chosen for CUDA launches only")
@pytest.mark.parametrize("backend", ["triton"])
def test_ppo_from_logits_fused_program_count_is_schedule_only(monkeypatch, backend):
    """RLHF_KERNELS_FUSED_PROGRAMS_PER_SM changes how many programs walk the rows (0, the
    default: one per row; 1 and 2 per SM: persistent, each walking several rows, with more
    rows than programs), not the result: the same bits between persistent counts (the same
    layout), float rounding against a program per row (16 elements a thread, not 8: its sums
    merge in another order)."""
    g = torch.Generator().manual_seed(18)
    # rows of 256 KiB, so that L2 caps neither count: 300 rows over 1 or 2 programs per SM
    inputs = fused_inputs(3, 100, 128256, g, dtype=torch.bfloat16, device="cuda")
    out = _fused_steps_under(monkeypatch, "RLHF_KERNELS_FUSED_PROGRAMS_PER_SM", ("0", "1", "2"), inputs, backend)
    for a, b in zip(out[1], out[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_fused_steps_close(out[0], out[1], torch.bfloat16)


def _assert_fused_steps_close(a, b, dtype):
    """Two _fused_steps_under results equal to float rounding (the gradient to one rounding
    step of its dtype)."""
    for x, y in zip(a[:-1], b[:-1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=FUSED))
def test_ppo_from_logits_fused_warps_setting(monkeypatch, device, backend):
    """RLHF_KERNELS_FUSED_WARPS sets the program-per-row sweep's warps (how many elements of a
    tile a thread holds), not the result beyond float rounding; anything but 0, 1, 2, 4, 8 or
    16 is an error naming it."""
    g = torch.Generator().manual_seed(19)
    inputs = fused_inputs(2, 3, 5000, g, dtype=torch.bfloat16, device=device)
    out = _fused_steps_under(monkeypatch, "RLHF_KERNELS_FUSED_WARPS", ("0", "16", "4"), inputs, backend)
    for other in out[1:]:
        _assert_fused_steps_close(out[0], other, torch.bfloat16)
    monkeypatch.setenv("RLHF_KERNELS_FUSED_WARPS", "3")
    with pytest.raises(ValueError, match="RLHF_KERNELS_FUSED_WARPS"):
        _fused_steps_under(monkeypatch, "RLHF_KERNELS_FUSED_WARPS", ("3",), inputs, backend)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_nan_logit_stays_in_its_row(device, backend, grad_in_forward):
    """A NaN logit makes its token's log-prob, entropy and gradient row NaN (and so the loss);
    the gradient rows of the other tokens stay finite, with and without the entropy term."""
    g = torch.Generator().manual_seed(17)
    logits, labels, old, adv, _, ref = fused_inputs(2, 3, 1500, g, device=device)
    mask = torch.ones_like(labels, dtype=torch.bool)
    logits = logits.clone()
    logits[1, 2, 777] = float("nan")
    x = logits.requires_grad_(True)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                entropy_coef=0.01, grad_in_forward=grad_in_forward,
                                                backend=backend)  # fmt: skip
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[1, 2]).all()
    others = torch.ones(2, 3, dtype=torch.bool)
    others[1, 2] = False
    assert torch.isfinite(x.grad[others]).all()


@pytest.mark.parametrize("device,backend", backend_cases(native_op=FUSED))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_ppo_from_logits_non_finite_kl_and_padding(device, backend, grad_in_forward, kind):
    """With kl_coef = 0 the KL is a metric only: a NaN or inf reference log-prob (or a -inf
    log-prob) must not reach the loss or the gradient. NaN in old / ref log-probs or advantages
    at masked positions never does, on either path."""
    g = torch.Generator().manual_seed(23)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 300, g, device=device)
    mask = mask.clone()
    mask[1] = True
    ref = ref.clone()
    ref[1, 1], ref[1, 2] = float("nan"), -float("inf")
    x = logits.clone().requires_grad_(True)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.0,
                                                      kl_kind=kind, grad_in_forward=grad_in_forward,
                                                      backend=backend)  # fmt: skip
    loss.backward()
    want = rlhf_kernels.ppo_loss_from_logits(logits.double(), labels, old.double(), adv.double(), mask,
                                             backend="torch")[0]  # fmt: skip
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert x.grad.isfinite().all()

    mask[0, 3] = False
    old, adv, ref = old.clone(), adv.clone(), ref.clone()
    old[0, 3], adv[0, 3], ref[0, 3] = float("nan"), float("nan"), float("nan")
    ref[1] = old[1]  # finite KL on every kept token
    x.grad = None
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                      kl_kind=kind, grad_in_forward=grad_in_forward,
                                                      backend=backend)  # fmt: skip
    loss.backward()
    assert loss.isfinite() and metrics.kl.isfinite() and x.grad.isfinite().all()


CLUSTER_CASES = {  # (B, T, V, RLHF_KERNELS_CLUSTER_SLICE_BYTES, pad, cluster kernel on sm_90): what the
    # CUDA one-read sweep sees
    "default": (3, 6, 1000, None, 0, True),  # one block per cluster
    "off": (3, 6, 1000, "0", 0, False),  # the streaming kernel
    "4-8-blocks": (3, 6, 1000, "512", 0, True),  # bf16: 4 slices of 256; fp32: 8 of 128, the last one 104
    "tail": (1, 1, 1003, "512", 0, True),  # one row: aligned, with a scalar tail in the last slice
    "one-element-slice": (1, 1, 33, "32", 0, True),  # fp32: slices 8, 8, 8, 8, 1; bf16: 16, 16, 1 (no vector)
    "padded-tail": (3, 6, 1003, "512", 5, True),  # rows of 1003 spaced 1008 apart, each with a tail (in place)
    # slices of 1250 vectors: 4 or 5 a thread, copied (staged mode) in groups of 2 (the last one short or empty)
    "uneven-groups": (2, 3, 20000, "20000", 0, True),
    "too-many-blocks": (2, 2, 1000, "64", 0, False),  # > 8 blocks: the streaming kernel
    "unaligned-rows": (2, 3, 1003, "512", 0, False),  # rows not on 16-byte boundaries: the streaming kernel
}


def cluster_launches(device) -> int | None:
    """The CUDA extension's count of cluster kernel launches, where the cluster kernel can run
    (an sm_90 GPU, an extension built for it); else None."""
    native_c = pytest.importorskip("rlhf_kernels._C")
    if device != "cuda" or torch.cuda.get_device_capability()[0] != 9 or not hasattr(native_c, "ppo_cluster_launches"):
        return None
    if "9.0" not in native_c.build_info()["cuda_archs"]:
        return None
    return native_c.ppo_cluster_launches()


@pytest.mark.parametrize("device,backend", backend_cases(["native"], native_op=FUSED))
@pytest.mark.parametrize("case", list(CLUSTER_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("pipeline,clusters", [("0", "0"), ("1", "0"), ("1", "2"), ("2", "0"), ("2", "2"), ("3", "0"),
                                               ("3", "2"), ("4", "0"), ("4", "2")],
                         ids=["plain", "pipelined", "pipelined-2-clusters", "double", "double-2-clusters", "staged",
                              "staged-2-clusters", "bulk", "bulk-2-clusters"])  # fmt: skip
def test_ppo_from_logits_cluster_sweep(monkeypatch, device, backend, case, dtype, inplace, pipeline, clusters):
    """The CUDA gradient sweep that holds each row in the shared memory of a thread-block
    cluster (sm_90), with the row cut into 1 to 8 slices, a scalar tail (one row; padded rows),
    in place, and the cases that fall back to the streaming kernel. (On CPU and before sm_90 this
    runs the other kernels: same expectations.) The pipelined variant copies the next row of
    its cluster while writing this one's gradient, the double-buffered one when it starts this
    one, the staged one as the pipelined one but waiting for the copies group by group during
    the log-sum-exp, the bulk one as the double-buffered one with a slice a bulk (TMA) copy on
    an mbarrier: with at most 2 clusters each walks many rows, skipped ones among them (the mask's
    gaps, an all-masked sequence, an ignored label). On an sm_90 GPU, the cases meant for the
    cluster kernel must have run it (not passed by falling back), the others must not have."""
    B, T, V, budget, pad, clustered = CLUSTER_CASES[case]
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_PIPELINE", pipeline)
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_MAX", clusters)
    if budget is not None:
        monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", budget)
    g = torch.Generator().manual_seed(17)
    logits, labels, old, adv, mask, ref = fused_inputs(B, T, V, g, dtype, device)
    if B * T > 2:
        labels[0, 1] = -100  # a skipped row: every block of its cluster skips it
    before = cluster_launches(device)
    check_fused(logits, labels, old, adv, mask, backend, inplace_backward=inplace, clip_ratio_c=3.0,
                ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, temperature=1.3, pad=pad)  # fmt: skip
    if before is not None:  # (out of place, padded rows get a fresh, unpadded gradient: not 16-byte aligned)
        assert cluster_launches(device) - before == (clustered and (inplace or not pad))


@pytest.mark.parametrize("device,backend", backend_cases(["native"], native_op=FUSED))
@pytest.mark.parametrize("pipeline,clusters", [("0", "0"), ("1", "2"), ("2", "2"), ("3", "2"), ("4", "2")],
                         ids=["plain", "pipelined-2-clusters", "double-2-clusters", "staged-2-clusters",
                              "bulk-2-clusters"])  # fmt: skip
def test_ppo_from_logits_cluster_llama_vocab(monkeypatch, device, backend, pipeline, clusters):
    """At Llama-3's vocabulary and the default 64 KiB slices (bf16 rows of 250 KiB: 4-block
    clusters), each of 2 clusters walking a dozen rows: the cluster kernel agrees with the
    streaming one, in place too. A kept label outside [0, V) (check_labels=False) makes its
    row's gradient NaN and no other's; an ignored row's gradient is 0."""
    if device == "cpu":
        pytest.skip("the cluster kernel runs on sm_90 GPUs; on CPU this is the streaming kernel twice")
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_PIPELINE", pipeline)
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_MAX", clusters)
    g = torch.Generator().manual_seed(23)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 12, 128256, g, torch.bfloat16, device)
    labels[0, 2], mask[0, 2] = 128256, True
    labels[1, 5], mask[1, 5] = -100, True
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, grad_in_forward=True, check_labels=False,
              backend=backend)  # fmt: skip
    grads = {}
    for budget in ("0", None):
        if budget is None:
            monkeypatch.delenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", raising=False)
        else:
            monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", budget)
        for inplace in (False, True):
            before = cluster_launches(device)
            leaf = logits.detach().clone().requires_grad_(True)
            x = leaf * 1 if inplace else leaf
            loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, inplace_backward=inplace, **kw)
            loss.backward()
            if before is not None:
                assert cluster_launches(device) - before == (budget is None)
            grads[budget, inplace] = leaf.grad.float()
    want = grads["0", False]
    nan_rows = want.isnan().any(-1)
    assert nan_rows[0, 2] and want[0, 2].isnan().all() and nan_rows.sum() == 1
    assert torch.all(want[1, 5] == 0)
    for key, got in grads.items():
        assert torch.equal(got.isnan(), want.isnan()), key
        torch.testing.assert_close(got[~nan_rows], want[~nan_rows], rtol=1e-2, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")  # fmt: skip


def test_cuda_cluster_layout(monkeypatch):
    """The sm_90 cluster kernel's cut of a row (host code of its launcher, so it runs wherever
    the extension was built with nvcc): C blocks of at most the slice budget (and the device's
    shared memory), each a slice of whole 16-byte vectors that together cover the row; no
    cluster kernel past 8 blocks or with a budget of 0."""
    native_c = pytest.importorskip("rlhf_kernels._C")
    if not hasattr(native_c, "ppo_cluster_layout"):
        pytest.skip("extension built without CUDA")
    layout = native_c.ppo_cluster_layout
    smem = 227 * 1024  # an H100's per-block opt-in
    monkeypatch.delenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", raising=False)
    assert layout(128256, 2, smem) == (4, 32064, 64128)  # the default: 64 KiB slices
    for budget, vocab, item in ((53248, 128256, 2), (88064, 128256, 2), (45056, 151936, 2), (512, 1003, 2),
                                (512, 1000, 4), (32, 33, 4)):  # fmt: skip
        monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", str(budget))
        C, slice_, nbytes = layout(vocab, item, smem)
        assert C == math.ceil(vocab * item / budget) and slice_ % (16 // item) == 0
        assert vocab <= slice_ * C and nbytes == slice_ * item  # every element held, in its block's memory
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "64")
    assert layout(1000, 2, smem)[0] == 0  # 32 blocks: past the portable cluster size
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "0")
    assert layout(1000, 2, smem)[0] == 0  # off
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "65536")
    assert layout(128256, 2, 48 * 1024)[0] == 6  # the device's limit caps the slice
    # double buffered: the budget is per buffer, a block's memory holds two slices
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "32768")
    assert layout(128256, 2, smem, buffers=2) == (8, 16032, 64128)
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "65536")
    assert layout(128256, 2, smem, buffers=2) == (4, 32064, 128256)
    assert layout(128256, 2, 96 * 1024, buffers=2)[0] == 6  # 48 KiB a buffer
    monkeypatch.setenv("RLHF_KERNELS_CLUSTER_SLICE_BYTES", "16384")
    assert layout(128256, 2, smem, buffers=2)[0] == 0  # 16 blocks
    with pytest.raises(RuntimeError, match="buffers"):
        layout(1000, 2, smem, buffers=3)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
def test_ppo_from_logits_fused_grad_modes(device, backend):
    """Without grad the fused sweep writes no gradient and gives the same loss; the upstream
    gradient scales the saved one; a second backward through the consumed gradient raises."""
    g = torch.Generator().manual_seed(15)
    logits, labels, old, adv, mask, _ = fused_inputs(2, 4, 200, g, device=device)
    x = logits.clone().requires_grad_(True)
    fused = dict(entropy_coef=0.1, grad_in_forward=True, backend=backend)
    loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **fused)
    (3.0 * loss).backward(retain_graph=True)
    with torch.no_grad():
        loss_ng, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, **fused)
    # bitwise on CPU; compiled GPU kernels with and without the gradient sweep may contract FMAs differently
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=0 if device == "cpu" else 2e-7, atol=0)
    _, want_grad = fused_oracle(logits, labels, old, adv, mask, entropy_coef=0.1)
    torch.testing.assert_close(x.grad.double(), 3.0 * want_grad, atol=3e-7, rtol=1e-4)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    y = (logits.clone().requires_grad_(True)) * 1
    loss, _ = rlhf_kernels.ppo_loss_from_logits(y, labels, old, adv, mask, inplace_backward=True,
                                                grad_in_forward=True, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_ppo_from_logits_bad_inputs():
    g = torch.Generator().manual_seed(16)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 3, 10, g)
    call = rlhf_kernels.ppo_loss_from_logits
    with pytest.raises(ValueError, match="logits: expected shape"):
        call(logits[0], labels, old, adv, mask)
    with pytest.raises(ValueError, match="old_logprobs: expected shape"):
        call(logits[:, :2], labels[:, :2], old, adv, mask)
    with pytest.raises(ValueError, match=r"old_logprobs: expected shape \(2, 3\) \(the logits' .B, T.\), got \(2, 2\)"):
        call(logits, labels, old[:, :2], adv, mask)  # the one that differs is named, not its neighbour
    with pytest.raises(ValueError, match="advantages: on device meta, but the logits are on cpu"):
        call(logits, labels, old, adv.to("meta"), mask)
    with pytest.raises(ValueError, match="clip_ratio: expected a number, got nan"):
        call(logits, labels, old, adv, mask, clip_ratio=float("nan"))
    with pytest.raises(ValueError, match="ref_logprobs: required when kl_coef"):
        call(logits, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_kind: unknown KL estimator 'k5'"):
        call(logits, labels, old, adv, mask, kl_kind="k5")
    with pytest.raises(ValueError, match="clip_ratio_c: the dual-clip constant"):
        call(logits, labels, old, adv, mask, clip_ratio_c=0.5)
    with pytest.raises(TypeError, match="grad_in_forward: expected a bool"):
        call(logits, labels, old, adv, mask, grad_in_forward=1)
    with pytest.raises(ValueError, match="temperature: must be positive"):
        call(logits, labels, old, adv, mask, temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="ref_logprobs: requires grad"):
        call(logits, labels, old, adv, mask, ref_logprobs=ref.requires_grad_(True), kl_coef=0.1,
             grad_in_forward=True, backend="triton")


def test_token_weights_reproduce_agg_loss():
    g = torch.Generator().manual_seed(17)
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = make_mask(5, 9, g, "gaps")
    for mode in AGG_MODES:
        w = rlhf_kernels.ops.ppo.token_weights(mask, mode, torch.float64)
        torch.testing.assert_close((w * x).sum(), reference.agg_loss(x, mask, mode))


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
def test_ppo_fused_opcheck(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("fake tensors have no data pointer for the Triton interpreter; checked on GPU")
    g = torch.Generator().manual_seed(18)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 3, 50, g, device=device)
    weights = rlhf_kernels.ops.ppo.token_weights(mask, "token-mean").flatten()
    args = (labels.masked_fill(~mask, -100).flatten(), old.flatten(), adv.flatten(), ref.flatten(), weights, 0.9,
            -100, 0.2, 0.28, 3.0, True, 3, 0.05, 0.01)  # fmt: skip
    ops = torch.ops.rlhf_kernels
    # Backward hands back the gradient output scaled in place (it is consumed, by design), which the
    # eager-vs-AOT output comparison flags; compiled correctness is test_ppo_from_logits_compile_fullgraph's.
    torch.library.opcheck(getattr(ops, f"ppo_logits_fused_{backend}"), (logits.requires_grad_(True), *args, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))  # fmt: skip
    torch.library.opcheck(getattr(ops, f"ppo_logits_fused_{backend}"), (logits.detach(), *args, False))
    torch.library.opcheck(getattr(ops, f"ppo_logits_fused_inplace_{backend}"), (logits.detach().clone(), *args))


NATIVE_INPUTS = backend_cases(["native"], native_op="ppo_fused_inputs_native")


@pytest.mark.parametrize("device,backend", NATIVE_INPUTS)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_ppo_fused_inputs_extension_matches_torch(device, backend, mode, mask_dtype, acc):
    """The extension's one-call inputs of the fused sweep (labels with masked tokens set to
    ignore_index, rows in the accumulation dtype, weights, valid count) equal the PyTorch
    composition's bit for bit: same mask semantics (nonzero valid, ignored labels masked), a
    fully masked sequence, int32 labels, non-contiguous rows, with and without a reference."""
    g = torch.Generator().manual_seed(31)
    B, T = 4, 7
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[0, 2] = -7  # an ignore_index inside the mask
    mask = make_mask(B, T, g, "gaps")
    mask[2] = False  # a sequence with no valid token
    mask = mask.to(mask_dtype) * (3 if mask_dtype != torch.bool else 1)  # nonzero, not just 1
    wide = torch.randn(B, 2 * T, generator=g)
    old, adv = wide[:, ::2], torch.randn(B, T, generator=g, dtype=torch.float64)  # strided; float64
    ref = torch.randn(B, T, generator=g)
    to = lambda t: t.to(device)  # noqa: E731
    for r in (ref, None):
        for lab in (labels, labels.int(), labels.t().contiguous().t()):  # int64, int32, column-major
            args = (to(lab), to(mask), to(old), to(adv), None if r is None else to(r), mode, -7, acc)
            got = ppo_ops._fused_inputs(*args)
            want = ppo_ops._fused_inputs_torch(*args)
            assert (got[3] is None) == (r is None)
            for name, a, b in zip(("labels", "old", "adv", "ref", "weights", "n_valid"), got, want, strict=True):
                if b is None:
                    continue
                assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), name
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    # and the weights are token_weights (the oracle of every aggregation)
    valid = (mask != 0) & (labels != -7)
    torch.testing.assert_close(got[4].cpu(), ppo_ops.token_weights(valid, mode, acc).flatten(), rtol=0, atol=0)
    torch.testing.assert_close(got[5].cpu(), valid.sum().clamp(min=1).to(acc), rtol=0, atol=0)


def _inputs_kernel_ran(labels, mask) -> bool:
    """Whether ppo_fused_inputs_native took its one-launch kernel (no ATen composition inside)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.rlhf_kernels.ppo_fused_inputs_native(labels, mask, 0, -100, False)
    return not {e.name for e in prof.events()} & {"aten::ne", "aten::where", "aten::logical_and_"}


def _assert_inputs_match(args, what):
    got, want = ppo_ops._fused_inputs(*args), ppo_ops._fused_inputs_torch(*args)
    for i, name in ((0, "labels"), (4, "weights"), (5, "n_valid")):
        assert got[i].dtype == want[i].dtype and got[i].shape == want[i].shape, (what, name)
        torch.testing.assert_close(got[i], want[i], rtol=0, atol=0, msg=lambda m, n=name: f"{what}, {n}: {m}")


@pytest.mark.parametrize("device,backend", NATIVE_INPUTS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_fused_inputs_kernel_mask_dtypes_and_shapes(device, backend, mode):
    """The extension's inputs kernel (one block: a warp a row, or the whole block a row under
    32 rows) against the PyTorch composition bit for bit over every mask dtype it reads (bytes,
    int32 / int64, float32 / float64 with NaN (valid) and -0.0 (not), float16 / bfloat16 as
    bits) and one it leaves to the ATen composition (int16); int32 labels and float64
    weights; more rows than warps and tokens than lanes, empty rows, an expanded (stride 0)
    mask, a transposed one; few long rows; exactly at the kernel's token bound, past it and
    empty inputs (the ATen composition)."""
    g = torch.Generator().manual_seed(34)
    B, T = 70, 100
    labels = torch.randint(0, 1000, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.1] = -100
    bits = torch.rand(B, T, generator=g) < 0.6
    bits[5] = False  # an empty row
    bits[:, 0] = True
    masks = {}
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                  torch.bfloat16, torch.float32, torch.float64):  # fmt: skip
        masks[str(dtype)] = bits.to(dtype) * (-2 if dtype not in (torch.bool, torch.uint8) else 1)
    nan_zero = bits.double()
    nan_zero[0, :3] = float("nan")  # valid (nonzero)
    nan_zero[1, :3] = -0.0  # not
    masks["nan and -0.0"] = nan_zero
    masks["nan and -0.0, float16"] = nan_zero.half()
    masks["expanded"] = bits[0].expand(B, T)
    masks["transposed"] = bits.t().contiguous().t()
    for name, mask in masks.items():
        for lab, acc in ((labels, torch.float32), (labels.int(), torch.float64)):
            lab, m = lab.to(device), mask.to(device)
            _assert_inputs_match((lab, m, None, None, None, mode, -100, acc), f"{name}, {lab.dtype}, {acc}")
            assert _inputs_kernel_ran(lab, m) == (name != "torch.int16"), name  # the kernel, unless left to ATen
    # few rows, longer than the block (the whole block a row), one of them empty; exactly at the
    # kernel's bound (ppo.h: kMaxInputsTokens = 2**16); past it and empty (the ATen composition)
    bound = 1 << 16
    for (b, t), kernel in (((1, 3000), True), ((3, 2500), True), ((31, 97), True), ((2, bound // 2), True),
                           ((1, bound + 1), False), ((0, 5), False), ((4, 0), False)):  # fmt: skip
        lab = torch.randint(-1, 10, (b, t), generator=g).to(device)  # -1: ignored
        m = torch.rand(b, t, generator=g) < 0.5
        if b > 1:
            m[1] = False
        m = m.to(device)
        for acc in (torch.float32, torch.float64):
            _assert_inputs_match((lab, m, None, None, None, mode, -1, acc), f"{b} x {t}, {acc}")
        assert _inputs_kernel_ran(lab, m) == kernel, (b, t)


@pytest.mark.parametrize("device,backend", NATIVE_INPUTS)
def test_ppo_fused_inputs_narrow_labels_compare_in_int64(device, backend):
    """Labels of a narrow dtype against an ignore_index outside its range: compared in int64, so
    uint8 156 is not -100 and int32 0 is not 2**32 (wrapped in the labels' dtype, they would be)."""
    mask = torch.ones(1, 3, dtype=torch.bool, device=device)
    for labels, ignore_index in ((torch.tensor([[156, 1, 2]], dtype=torch.uint8), -100),
                                 (torch.tensor([[0, 1, 0]], dtype=torch.int32), 2**32),
                                 (torch.tensor([[0, 1, 0]], dtype=torch.int32), -(2**63))):  # fmt: skip
        labels = labels.to(device)
        got = ppo_ops._fused_inputs(labels, mask, None, None, None, "token-mean", ignore_index, torch.float32)
        want = ppo_ops._fused_inputs_torch(labels, mask, None, None, None, "token-mean", ignore_index, torch.float32)
        torch.testing.assert_close(got[0], labels.long().flatten(), rtol=0, atol=0)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        assert float(got[5]) == float(want[5]) == 3.0


@pytest.mark.parametrize("device,backend", NATIVE_INPUTS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_fused_metrics_extension_matches_torch(monkeypatch, device, backend, mode):
    """The extension's one-call metrics of the fused sweep against the PyTorch composition's, also
    under a bf16 autocast region (both keep float32), and a fully masked batch (no NaN)."""
    g = torch.Generator().manual_seed(32)
    stats = torch.randn(12, 7, generator=g).to(device) * 1.7
    for valid in (torch.rand(3, 4, generator=g) > 0.3, torch.zeros(3, 4, dtype=torch.bool)):
        valid = valid.to(device)
        weights = ppo_ops.token_weights(valid, mode).flatten()
        n_valid = valid.sum(dtype=torch.float32).clamp(min=1)
        masked = stats * valid.flatten()[:, None]  # the kernels' stats are 0 on masked tokens
        loss = masked[:, 0].sum()
        got = ppo_ops._fused_metrics(loss, masked, weights, n_valid, True, mode)
        with torch.autocast(device, dtype=torch.bfloat16):
            in_autocast = ppo_ops._fused_metrics(loss, masked, weights, n_valid, True, mode)
        with monkeypatch.context() as m:
            m.setattr(ppo_ops, "_NATIVE_METRICS", None)
            want = ppo_ops._fused_metrics(loss, masked, weights, n_valid, True, mode)
        w64, s64 = weights.double(), masked.double()
        exact = torch.cat((w64 @ s64[:, 1:4], s64[:, 4:7].sum(0) / n_valid.double()))  # pg, entropy, kl; means
        for name, a, b, c in zip(("loss", "pg_loss", "clipfrac", "clipfrac_lower", "approx_kl", "entropy", "kl"),
                                 got, want, in_autocast, strict=True):  # fmt: skip
            assert a.dtype == b.dtype == c.dtype == torch.float32 and a.shape == (), name
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
            torch.testing.assert_close(c, a, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
            assert torch.isfinite(a), name
        order = dict(pg_loss=0, entropy=1, kl=2, clipfrac=3, clipfrac_lower=4, approx_kl=5)
        for name, i in order.items():
            torch.testing.assert_close(getattr(got, name).double(), exact[i], rtol=1e-6, atol=1e-7)
    # without a reference the kl is 0, also when a kept token's row is NaN (a label outside [0, V))
    masked[3] = float("nan")
    for native_metrics in (True, False):
        with monkeypatch.context() as m:
            if not native_metrics:
                m.setattr(ppo_ops, "_NATIVE_METRICS", None)
            got = ppo_ops._fused_metrics(masked[:, 0].sum(), masked, weights, n_valid, False, mode)
        assert got.kl == 0 and torch.isnan(got.pg_loss), (native_metrics, got)


@pytest.mark.parametrize("device,backend", NATIVE_INPUTS)
def test_ppo_fused_inputs_and_metrics_opcheck_and_bad_input(device, backend):
    g = torch.Generator().manual_seed(33)
    labels = torch.randint(0, 9, (2, 5), generator=g).to(device)
    mask = (torch.rand(2, 5, generator=g) > 0.3).to(device)
    ops = torch.ops.rlhf_kernels
    for agg in range(len(AGG_MODES)):
        for double_acc in (False, True):
            torch.library.opcheck(ops.ppo_fused_inputs_native, (labels, mask, agg, -100, double_acc))
    stats = torch.randn(10, 7, generator=g).to(device)
    weights, n = torch.rand(10, generator=g).to(device), torch.tensor(3.0).to(device)
    for agg in range(len(AGG_MODES)):
        for has_ref in (True, False):
            torch.library.opcheck(ops.ppo_fused_metrics_native, (stats, weights, n, agg, has_ref))
    with pytest.raises(ValueError, match="labels: expected shape"):
        ops.ppo_fused_inputs_native(labels.flatten(), mask.flatten(), 0, -100, False)
    with pytest.raises(ValueError, match="mask: expected shape"):
        ops.ppo_fused_inputs_native(labels, mask[:1], 0, -100, False)
    with pytest.raises(TypeError, match="labels: expected an integer"):
        ops.ppo_fused_inputs_native(labels.float(), mask, 0, -100, False)
    with pytest.raises(ValueError, match="agg: unknown"):
        ops.ppo_fused_inputs_native(labels, mask, 7, -100, False)
    with pytest.raises(ValueError, match="stats: expected shape"):
        ops.ppo_fused_metrics_native(stats[:, :6], weights, n, 0, True)
    with pytest.raises(ValueError, match="weights: expected shape"):
        ops.ppo_fused_metrics_native(stats, weights[:9], n, 0, True)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_ppo_from_logits_compile_fullgraph(device, backend, grad_in_forward, inplace):
    """Traced whole (fullgraph), also with the gradient written into a sliced non-leaf view of
    the logits (inplace_backward: its overlap check must not break the graph)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    g = torch.Generator().manual_seed(19)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 64, g, device=device)
    logits = torch.cat([logits, logits[:, :1]], 1)  # [B, T + 1, V]: the op takes [:, :-1] of it

    def step(x):
        loss, metrics = rlhf_kernels.ppo_loss_from_logits((x * 1)[:, :-1], labels, old, adv, mask, ref_logprobs=ref,
                                                          kl_coef=0.1, entropy_coef=0.01, check_labels=False,
                                                          grad_in_forward=grad_in_forward, inplace_backward=inplace,
                                                          backend=backend)
        return loss, metrics.clipfrac  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x1, x2 = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    eager = step(x1)
    eager[0].backward()
    out = compiled(x2)
    out[0].backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


# CPU only: its profiler sees every allocation (CUDA peak memory is what the bench reports).
# Ops that only make a view or a wrapper: no kernel launch on a GPU.
_NO_LAUNCH = ("view", "_unsafe_view", "detach", "slice", "select", "unsqueeze", "squeeze", "squeeze_", "expand",
              "alias", "t", "transpose", "unbind", "as_strided", "_reshape_alias")  # fmt: skip


def _check_against_oracle(metrics, grad, logits, labels, old, adv, mask, ref):
    """A float32 step's metrics and gradient (kl_coef 0.1 with a reference, entropy_coef 0.01) against
    the float64 composition."""
    want, want_grad = fused_oracle(logits, labels, old, adv, mask, ref_logprobs=ref,
                                   kl_coef=0.1 if ref is not None else 0.0, entropy_coef=0.01)  # fmt: skip
    tol, grad_tol = FUSED_TOL[torch.float32]
    for name, got, exp in zip(metrics._fields, metrics, want, strict=True):
        torch.testing.assert_close(got.double(), exp, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(grad.double(), want_grad, **grad_tol)


def _launches(fn):
    """fn()'s result and the ops it dispatched that launch a kernel on a GPU, by name, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        result = fn()
    return result, [op for op in seen.ops if op not in _NO_LAUNCH]


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=FUSED))
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "no-ref"])
@pytest.mark.parametrize("inputs", ["extension", "torch"])
def test_ppo_from_logits_fused_launches_around_the_kernel(monkeypatch, device, backend, with_ref, inputs):
    """The fused step's kernel cannot start before its weights and masked labels exist, and on a
    GPU every call before it is host time on the step's path (the device idles meanwhile). With
    the extension the inputs are one call (ppo_fused_inputs_native; its ATen ops are made in
    C++) and the metrics one more; without it, token-mean with a bool mask and int64 labels
    takes at most 7 launches before the kernel (mask & kept labels, the count, its clamp, the
    weights, the masked labels and the scalar they are filled with) and 1 after it (the metrics'
    product)."""
    if inputs == "torch":
        monkeypatch.setattr(ppo_ops, "_NATIVE_INPUTS", None)
        monkeypatch.setattr(ppo_ops, "_NATIVE_METRICS", None)
    elif ppo_ops._NATIVE_INPUTS is None:
        pytest.skip("the extension is not built")
    g = torch.Generator().manual_seed(21)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 40, g, device=device, with_ref=with_ref)
    assert mask.dtype == torch.bool and labels.dtype == torch.int64
    x = logits.requires_grad_(True)
    (loss, metrics), ops = _launches(lambda: rlhf_kernels.ppo_loss_from_logits(
        x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1 if with_ref else 0.0, entropy_coef=0.01,
        check_labels=False, grad_in_forward=True, backend=backend))  # fmt: skip
    kernel = f"ppo_logits_fused_{backend}"
    assert kernel in ops, ops
    before, after = ops[:ops.index(kernel)], ops[ops.index(kernel) + 1:]
    if inputs == "extension":
        assert before == ["ppo_fused_inputs_native"], before
        assert after == ["ppo_fused_metrics_native"], after
    else:
        assert len(before) <= 7, before
        assert len(after) <= (1 if with_ref else 2), after  # (the product; a zero KL without a reference)
    loss.backward()
    _check_against_oracle(metrics, x.grad, logits, labels, old, adv, mask, ref)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "no-ref"])
def test_ppo_from_logits_two_pass_launches_between_the_sweeps(device, backend, with_ref):
    """Between the two-pass step's forward and backward sweeps over the logits (forward and
    backward together) the O(B T) tail takes at most 28 launches with a reference (the PPO,
    KL and entropy terms, their aggregation and its backward), 18 without: on a GPU each is
    device time between the two logits-sized kernels. (Some slack for torch versions whose
    autograd formulas launch one more op.)"""
    g = torch.Generator().manual_seed(22)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 5, 40, g, device=device, with_ref=with_ref)
    x = logits.requires_grad_(True)

    def step():
        loss, metrics = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref,
                                                          kl_coef=0.1 if with_ref else 0.0, entropy_coef=0.01,
                                                          check_labels=False, backend=backend)  # fmt: skip
        loss.backward()
        return metrics

    metrics, ops = _launches(step)
    fwd, bwd = ops.index(f"token_logprobs_fwd_{backend}"), ops.index(f"token_logprobs_bwd_{backend}")
    assert bwd - fwd - 1 <= (28 if with_ref else 18), ops[fwd + 1:bwd]
    _check_against_oracle(metrics, x.grad, logits, labels, old, adv, mask, ref)


CPU_NATIVE = [c for c in backend_cases(["native"], native_op=FUSED) if c.id == "cpu-native"]


@pytest.mark.parametrize("device,backend", CPU_NATIVE)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["fused", "two-pass"])
def test_ppo_from_logits_no_float32_temporary(device, backend, inplace, grad_in_forward):
    """The whole bf16 step (forward + backward) allocates at most one bf16 [B, T, V] gradient
    besides O(B T) buffers: no float32 copy of the logits."""
    from rlhf_kernels.bench import _peak_bytes

    g = torch.Generator().manual_seed(20)
    logits, labels, old, adv, mask, ref = fused_inputs(2, 16, 4096, g, torch.bfloat16, device)
    size = logits.numel() * logits.element_size()

    def setup():
        return (logits.detach().clone().requires_grad_(True) * 1) if inplace else logits.detach().requires_grad_(True)

    def step(x):
        loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                                                    entropy_coef=0.01, inplace_backward=inplace,
                                                    grad_in_forward=grad_in_forward, backend=backend)
        loss.backward()  # fmt: skip

    step(setup())
    peak = _peak_bytes(step, setup, torch.device(device))
    # one bf16 gradient: the op's (out of place) or the leaf's, from the `* 1` in setup (in place);
    # a float32 temporary alone would be 2 * size
    assert peak < size + 64 * 1024, f"peak {peak} bytes for {size} bytes of logits"


@pytest.mark.parametrize("device,backend", backend_cases(native_op="gae_native"))
def test_gae_under_vmap(device, backend):
    """vmap's batched tensors look like plain tensors to type(): an eager call under a functorch
    transform must take the registered op (and its per-sample fallback), never a raw launch."""
    g = torch.Generator().manual_seed(3)
    r, v = (torch.randn(3, 2, 5, generator=g).to(device) for _ in range(2))
    got = torch.vmap(lambda a, c: rlhf_kernels.gae(a, c, gamma=0.9, backend=backend)[0])(r, v)
    want = torch.stack([reference.gae(r[i].cpu().double(), v[i].cpu().double(), gamma=0.9)[0] for i in range(3)])
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)
