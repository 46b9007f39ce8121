"""Preference losses and sequence log-probs: every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_cases

import rlhf_kernels
from rlhf_kernels.reference import preference as reference

try:
    from rlhf_kernels.triton import preference as triton_preference
except ImportError:  # no triton: its cases are skipped
    triton_preference = None

NATIVE_OP = "preference_fwd_native"
SEQ_NATIVE_OP = "sequence_logprobs_fwd_native"
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
# Float32 kernels against the float64 oracle on float64-exact inputs.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-9)}


def inputs(n, dtype, device, *, seed=0, scale=3.0, offset=-30.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(device) for _ in range(4)]


def forward_backward(fn, tensors, seed=1):
    """Run fn on leaf copies, backprop random weights through the losses; returns (outputs, grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    losses = out[0]
    w = torch.randn(losses.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (losses.double() * w.to(losses.device)).sum().backward()
    return out, [leaf.grad for leaf in leaves]


def compare(got, want, tol, grad_tol=None):
    (out, grads), (ref_out, ref_grads) = got, want
    grad_tol = grad_tol or tol
    for x, y in zip(out, ref_out, strict=True):
        if isinstance(x, dict):
            continue
        torch.testing.assert_close(x.double().cpu(), y.double().cpu(), **tol)
    for gx, gy in zip(grads, ref_grads, strict=True):
        if gx is None or gy is None:  # e.g. KTO's KL inputs: constant for the gradient
            assert gx is None and gy is None
            continue
        torch.testing.assert_close(gx.double().cpu(), gy.double().cpu(), **grad_tol)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dpo_loss_matches_reference(device, backend, loss_type, dtype):
    tensors = inputs(37, dtype, device, seed=len(loss_type))
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type in SMOOTHED else 0.0)
    got = forward_backward(lambda *t: rlhf_kernels.dpo_loss(*t, backend=backend, **kw), tensors)
    want = forward_backward(lambda *t: reference.dpo_loss(*t, **kw), [t.double() for t in tensors])
    # gradients come back in the inputs' dtype: bf16 rounds them to 8 bits
    grad_tol = dict(atol=1e-5, rtol=8e-3) if dtype == torch.bfloat16 else None
    compare(got, want, TOL[torch.float64 if dtype == torch.float64 else torch.float32], grad_tol)
    assert got[0].losses.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in got[1])


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
def test_dpo_metrics(device, backend, loss_type):
    pc, pr, rc, rr = inputs(50, torch.float32, device, seed=3)
    out = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, return_metrics=True, backend=backend)
    losses, cr, rj = (t.double() for t in reference.dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(),
                                                             beta=0.2, loss_type=loss_type))  # fmt: skip
    want = {
        "loss": losses.mean(),
        "rewards/accuracies": (cr > rj).double().mean(),
        "rewards/margins": (cr - rj).mean(),
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rj.mean(),
    }
    assert set(out.metrics) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(out.metrics[name].double().cpu(), value.cpu(), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "ipo"])
def test_metrics_changed_in_place_leave_backward_alone(device, backend, loss_type):
    """The caller may change the returned metrics in place: the backward reads the forward's
    metrics (bco_pair's batch-mean delta) from a tensor the caller does not hold, and the other
    losses' backward does not read them at all (they get the kernel's own tensor, no copy)."""
    pc, pr, rc, rr = inputs(40, torch.float32, device, seed=21)
    grads = []
    for bump in (False, True):
        a, b = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        out = rlhf_kernels.dpo_loss(a, b, rc, rr, beta=0.2, loss_type=loss_type, return_metrics=True,
                                    backend=backend)  # fmt: skip
        if bump:
            for value in out.metrics.values():
                value.add_(100.0)
        out.losses.sum().backward()
        grads.append((a.grad, b.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
def test_dpo_gradcheck(device, backend, loss_type):
    tensors = [t.requires_grad_(True) for t in inputs(6, torch.float64, device, seed=9, scale=2.0, offset=-4.0)]
    kw = dict(beta=0.7, loss_type=loss_type, label_smoothing=0.2 if loss_type in SMOOTHED else 0.0)
    if loss_type == "hinge":  # keep z away from the kink at 1
        kw["beta"] = 0.05
    if loss_type == "bco_pair":  # the batch-mean delta is held constant (detached), as in TRL
        kw["bco_delta"] = 0.3
    assert torch.autograd.gradcheck(lambda *t: rlhf_kernels.dpo_loss(*t, backend=backend, **kw).losses, tensors)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_extreme_inputs_stay_finite(device, backend, loss_type, magnitude):
    """Log-ratio gaps of +-magnitude: no inf or NaN in losses or gradients."""
    g = torch.Generator().manual_seed(0)
    pc, pr = [(torch.rand(16, generator=g) * 2 - 1) * magnitude for _ in range(2)]
    tensors = [pc.to(device), pr.to(device), torch.zeros(16, device=device), torch.zeros(16, device=device)]
    kw = dict(beta=1.0, loss_type=loss_type)
    (out, grads) = forward_backward(lambda *t: rlhf_kernels.dpo_loss(*t, backend=backend, **kw), tensors)
    if loss_type in ("ipo", "sppo_hard"):
        assert torch.isfinite(out.losses).all()  # quadratic: large but finite
    else:
        assert torch.isfinite(out.losses).all(), out.losses
    for grad in grads:
        assert torch.isfinite(grad).all(), grad
    want = forward_backward(lambda *t: reference.dpo_loss(*t, **kw), [t.double() for t in tensors])
    compare((out, grads), want, dict(atol=1e-4, rtol=1e-5))


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_reference_free_and_bco_delta(device, backend):
    pc, pr, rc, rr = inputs(20, torch.float32, device, seed=5)
    free = rlhf_kernels.dpo_loss(pc, pr, beta=0.1, reference_free=True, backend=backend)
    zeros = torch.zeros_like(pc)
    torch.testing.assert_close(
        free.losses, rlhf_kernels.dpo_loss(pc, pr, zeros, zeros, beta=0.1, backend=backend).losses
    )
    for delta in (None, 0.7):
        got = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="bco_pair", bco_delta=delta, backend=backend)
        want = reference.dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), beta=0.1,
                                  loss_type="bco_pair", bco_delta=delta)  # fmt: skip
        torch.testing.assert_close(got.losses.double(), want[0], atol=1e-5, rtol=1e-5)


def check_relatives(device, backend, n, kto_sizes, seed):
    """SimPO, ORPO (its two metric means), KTO (unpaired; ``kto_sizes``: desirable,
    undesirable, KL samples, then their references), Bradley-Terry with centring, with and
    without a margin, and reference-free DPO, each against its float64 reference."""
    g = torch.Generator().manual_seed(seed)
    c, r = [(-torch.rand(n, generator=g, dtype=torch.float64) * 3 - 1e-3).to(device) for _ in range(2)]
    tol = TOL[torch.float64]

    def check(fn, ref_fn, tensors):
        compare(forward_backward(fn, tensors), forward_backward(ref_fn, tensors), tol)

    check(lambda a, b: rlhf_kernels.simpo_loss(a, b, beta=2.5, gamma=0.3, label_smoothing=0.1, backend=backend),
          lambda a, b: reference.simpo_loss(a, b, beta=2.5, gamma=0.3, label_smoothing=0.1), [c, r])  # fmt: skip
    check(lambda a, b: rlhf_kernels.orpo_loss(a, b, beta=0.2, backend=backend),
          lambda a, b: reference.orpo_loss(a, b, beta=0.2), [c, r])  # fmt: skip
    kto = [(torch.randn(k, generator=g, dtype=torch.float64) - 20).to(device) for k in kto_sizes]
    kto[2] = kto[5] + 0.5  # a positive KL estimate
    check(lambda *t: rlhf_kernels.kto_loss(*t, beta=0.4, desirable_weight=1.3, undesirable_weight=0.7,
                                           backend=backend),
          lambda *t: reference.kto_loss(*t, beta=0.4, desirable_weight=1.3, undesirable_weight=0.7), kto)  # fmt: skip
    margin = torch.rand(n, generator=g, dtype=torch.float64).to(device)
    for m in (None, margin):
        check(lambda a, b, m=m: rlhf_kernels.bradley_terry_loss(a, b, margin=m, center_rewards_coefficient=0.01,
                                                                backend=backend),
              lambda a, b, m=m: reference.bradley_terry_loss(a, b, margin=m, center_rewards_coefficient=0.01),
              [c * 3, r * 3])  # fmt: skip
    check(lambda a, b: rlhf_kernels.dpo_loss(a, b, beta=0.1, reference_free=True, backend=backend),
          lambda a, b: reference.dpo_loss(a, b, beta=0.1, reference_free=True), [c * 30, r * 30])  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_simpo_orpo_kto_bradley_terry(device, backend):
    check_relatives(device, backend, 25, (7, 4, 9, 7, 4, 9), seed=11)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_orpo_near_zero_logps(device, backend):
    c = torch.tensor([-1e-9, -1e-4, -0.5, 0.0], dtype=torch.float64, device=device, requires_grad=True)
    r = torch.tensor([-0.3, -1e-9, -2.0, -1.0], dtype=torch.float64, device=device, requires_grad=True)
    out = rlhf_kernels.orpo_loss(c, r, backend=backend)
    out.losses.sum().backward()
    for t in (out.losses, c.grad, r.grad, out.log_odds_ratio, out.log_odds_chosen):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device,backend", backend_cases(["native"], native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])
def test_dpo_large_batch_independent_of_threads(device, backend, loss_type):
    """Above the parallel threshold the CPU kernel splits pairs into fixed chunks:
    losses, metrics and gradients are bitwise the same for any thread count."""
    pc, pr, rc, rr = inputs(40000, torch.float32, device, seed=13)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            out, grads = forward_backward(
                lambda *t: rlhf_kernels.dpo_loss(*t, beta=0.1, loss_type=loss_type, return_metrics=True,
                                                 backend=backend), [pc, pr, rc, rr])  # fmt: skip
            runs.append((out, grads))
    finally:
        torch.set_num_threads(threads)
    (o1, g1), (o2, g2) = runs
    for a, b in zip(o1[:3], o2[:3], strict=True):
        assert torch.equal(a, b)
    for name in o1.metrics:
        assert torch.equal(o1.metrics[name], o2.metrics[name]), name
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    want = forward_backward(lambda *t: reference.dpo_loss(*t, beta=0.1, loss_type=loss_type),
                            [t.double() for t in (pc, pr, rc, rr)])  # fmt: skip
    compare((tuple(o1[:3]), g1), want, TOL[torch.float32])
    torch.testing.assert_close(o1.metrics["loss"].double(), want[0][0].mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("n", [15, 16, 1007, 20000])
def test_sigmoid_float32_all_widths(device, backend, n):
    """Float32 sigmoid-form losses (DPO with smoothing, SimPO, Bradley-Terry with a margin
    and centring) for batch sizes around the CPU kernel's 16-pair vector step and its
    2048-pair chunks, with |z| up to ~150 (past float exp's range): float32 accuracy."""
    g = torch.Generator().manual_seed(n)
    pc, pr, rc, rr = [(torch.randn(n, generator=g, dtype=torch.float64) * 400 - 50).float().to(device)
                      for _ in range(4)]  # fmt: skip
    tol = dict(atol=1e-6, rtol=2e-5)

    def check(fn, ref_fn, tensors):
        got, want = forward_backward(fn, tensors), forward_backward(ref_fn, [t.double() for t in tensors])
        compare(got, want, tol)

    kw = dict(beta=0.2, label_smoothing=0.1)
    check(lambda *t: rlhf_kernels.dpo_loss(*t, **kw, backend=backend), lambda *t: reference.dpo_loss(*t, **kw),
          [pc, pr, rc, rr])  # fmt: skip
    out = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.2, return_metrics=True, backend=backend)
    want = reference.dpo_loss(pc.double(), pr.double(), rc.double(), rr.double(), beta=0.2)
    torch.testing.assert_close(out.metrics["loss"].double(), want[0].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["rewards/accuracies"].double(), (want[1] > want[2]).double().mean(),
                               atol=1e-6, rtol=0)  # fmt: skip
    kw = dict(beta=2.5, gamma=0.3, label_smoothing=0.05)
    check(lambda a, b: rlhf_kernels.simpo_loss(a / 100, b / 100, **kw, backend=backend),
          lambda a, b: reference.simpo_loss(a / 100, b / 100, **kw), [pc, pr])  # fmt: skip
    margin = rr.abs() / 100
    kw = dict(margin=margin, center_rewards_coefficient=0.01)
    check(lambda a, b: rlhf_kernels.bradley_terry_loss(a / 50, b / 50, **kw, backend=backend),
          lambda a, b: reference.bradley_terry_loss(a / 50, b / 50, margin=margin.double(),
                                                    center_rewards_coefficient=0.01), [pc, pr])  # fmt: skip


# --- the many-program forward (n above FWD_MULTI_MIN) -------------------------------------------
# The Triton launcher reads FWD_MULTI_MIN and FWD_CHUNK at each call: lowered here, the
# per-chunk kernels and the partial-sum program run at small n in the interpreter (and
# on a GPU). (n, chunk): one partial chunk, one program of several tiles, many programs,
# the default chunk with a short last one.
MANY_PROGRAMS = {1: 32, 7: 32, 1000: 64, 20000: 2048}


def _many_programs(monkeypatch, chunk, multi_min=0):
    if triton_preference is not None:
        monkeypatch.setattr(triton_preference, "FWD_MULTI_MIN", multi_min)
        monkeypatch.setattr(triton_preference, "FWD_CHUNK", chunk)


def _metric_means(losses, chosen_rewards, rejected_rewards):
    return {
        "loss": losses.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
    }


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=NATIVE_OP))
@pytest.mark.parametrize("loss_type", rlhf_kernels.DPO_LOSS_TYPES)
@pytest.mark.parametrize("n", list(MANY_PROGRAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dpo_many_programs(monkeypatch, device, backend, loss_type, n, dtype):
    """Losses, rewards, gradients and metrics of the per-chunk forward against the float64
    reference, and against the one-program forward on the same inputs."""
    _many_programs(monkeypatch, MANY_PROGRAMS[n])
    tensors = inputs(n, dtype, device, seed=n + len(loss_type))
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type in SMOOTHED else 0.0)
    out, grads = forward_backward(
        lambda *t: rlhf_kernels.dpo_loss(*t, return_metrics=True, backend=backend, **kw), tensors
    )
    want = forward_backward(lambda *t: reference.dpo_loss(*t, **kw), [t.double() for t in tensors])
    compare((tuple(out[:3]), grads), want, TOL[dtype])
    # metric means: float32 sums of up to 20000 terms of size ~1-10 (float64: as the losses)
    metric_tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else TOL[dtype]
    for name, value in _metric_means(*(t.detach() for t in want[0])).items():
        torch.testing.assert_close(out.metrics[name].double().cpu(), value.cpu(), **metric_tol, msg=name)
    _many_programs(monkeypatch, MANY_PROGRAMS[n], multi_min=n)  # the one-program forward
    one = rlhf_kernels.dpo_loss(*tensors, return_metrics=True, backend=backend, **kw)
    for x, y in zip(out[:3], one[:3], strict=True):
        torch.testing.assert_close(x.detach(), y, **TOL[dtype])
    for name in one.metrics:
        torch.testing.assert_close(out.metrics[name], one.metrics[name], **metric_tol, msg=name)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=NATIVE_OP))
@pytest.mark.parametrize("n", list(MANY_PROGRAMS))
def test_relatives_many_programs(monkeypatch, device, backend, n):
    """The relatives of DPO on the per-chunk forward (KTO: one launch per side)."""
    _many_programs(monkeypatch, MANY_PROGRAMS[n])
    check_relatives(device, backend, n, (n, n // 2 + 1, 9, n, n // 2 + 1, 9), seed=n)


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=NATIVE_OP))
@pytest.mark.parametrize("n", list(MANY_PROGRAMS))
@pytest.mark.parametrize("bco_delta", [None, 0.7])
def test_bco_pair_many_programs(monkeypatch, device, backend, n, bco_delta):
    """bco_pair's delta on the per-chunk forward: the batch mean of the 2n rewards (its own
    partial-sum pass) or the given value, used by every loss and stored in metrics[7]."""
    _many_programs(monkeypatch, MANY_PROGRAMS[n])
    pc, pr, rc, rr = inputs(n, torch.float64, device, seed=n + 1)
    op = torch.ops.rlhf_kernels.preference_fwd_triton
    args = (pc, pr, rc, rr, None, None, 0.2, 0.0, 0.0, 0.0, 0.05, 0.0 if bco_delta is None else bco_delta,
            bco_delta is None, 1.0, True)  # fmt: skip
    losses, cr, rj, metrics = op("bco_pair", *args)
    want = reference.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="bco_pair", bco_delta=bco_delta)
    tol = TOL[torch.float64]
    for x, y in zip((losses, cr, rj), want, strict=True):
        torch.testing.assert_close(x, y, **tol)
    delta = torch.cat([want[1], want[2]]).mean() if bco_delta is None else torch.tensor(bco_delta, dtype=torch.float64)
    torch.testing.assert_close(metrics[7].cpu(), delta.to(metrics.dtype).cpu(), **tol)
    for k, value in enumerate(_metric_means(*want).values()):
        torch.testing.assert_close(metrics[k].cpu(), value.cpu(), **tol)
    assert (metrics[5:7] == 0).all()
    again = op("bco_pair", *args)
    assert all(torch.equal(x, y) for x, y in zip((losses, cr, rj, metrics), again, strict=True))


@pytest.mark.parametrize("device,backend", backend_cases(["triton"], native_op=NATIVE_OP))
def test_empty_batch_with_many_programs_enabled(monkeypatch, device, backend):
    """n == 0 always takes the one-program forward: empty outputs, metrics all 0."""
    _many_programs(monkeypatch, 32)
    empty = torch.zeros(0, device=device)
    out = rlhf_kernels.dpo_loss(empty, empty, empty, empty, loss_type="bco_pair", return_metrics=True,
                                backend=backend)  # fmt: skip
    assert all(t.shape == (0,) for t in out[:3])
    assert all(v == 0 for v in out.metrics.values())
    orpo = rlhf_kernels.orpo_loss(empty, empty, backend=backend)
    assert orpo.log_odds_ratio == 0 and orpo.log_odds_chosen == 0


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_empty_batch_metrics_are_zero(device, backend):
    """Every backend, the reference included, reports 0 (not 0 / 0) for an empty batch."""
    empty = torch.zeros(0, device=device)
    out = rlhf_kernels.dpo_loss(empty, empty, empty, empty, return_metrics=True, backend=backend)
    assert all(v == 0 for v in out.metrics.values())
    orpo = rlhf_kernels.orpo_loss(empty, empty, backend=backend)
    assert orpo.log_odds_ratio == 0 and orpo.log_odds_chosen == 0
    bt = rlhf_kernels.bradley_terry_loss(empty, empty, center_rewards_coefficient=0.1, backend=backend)
    assert bt.loss == 0 and bt.accuracy == 0
    seq = rlhf_kernels.sequence_logprobs(torch.zeros(0, 4, 7, device=device), torch.zeros(0, 4, dtype=torch.long,
                                         device=device), average=True, backend=backend)  # fmt: skip
    assert seq.shape == (0,)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
def test_empty_bco_pair_with_given_delta(device, backend):
    """An empty batch stores metrics[7] = 0 on every kernel backend, also with bco_delta given."""
    empty = torch.zeros(0, device=device)
    op = getattr(torch.ops.rlhf_kernels, f"preference_fwd_{backend}")
    args = (empty, empty, empty, empty, None, None, 0.2, 0.0, 0.0, 0.0, 0.05, 0.7, False, 1.0, True)
    metrics = op("bco_pair", *args)[3]
    assert metrics.shape == (8,) and (metrics == 0).all()


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
def test_backward_metrics_only_where_read(device, backend):
    """The backward ops take the forward's metrics only where they read them: bco_pair's delta
    (a clear error without), none for the other losses (the same gradient with or without)."""
    pc, pr, rc, rr = inputs(9, torch.float32, device, seed=22)
    fwd = getattr(torch.ops.rlhf_kernels, f"preference_fwd_{backend}")
    bwd = getattr(torch.ops.rlhf_kernels, f"preference_bwd_{backend}")
    grad = torch.ones(9, device=device)
    for loss in ("sigmoid", "bco_pair"):
        metrics = fwd(loss, pc, pr, rc, rr, None, None, 0.2, 0.0, 0.0, 0.0, 0.05, 0.0, True, 1.0, True)[3]
        args = (pc, pr, rc, rr, None, None)
        scalars = (0.2, 0.0, 0.0, 0.0, 0.05, 1.0, grad, 1, 1.0, True, True)
        with_metrics = bwd(loss, *args, metrics, *scalars)
        if loss == "bco_pair":
            with pytest.raises((ValueError, RuntimeError), match="metrics: bco_pair's backward needs"):
                bwd(loss, *args, None, *scalars)
        else:
            for got, want in zip(bwd(loss, *args, None, *scalars), with_metrics, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
@pytest.mark.parametrize("n", [16385, 40000])
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "orpo"])
def test_above_multi_threshold_default_chunks(device, backend, n, loss_type):
    """Past the one-program threshold with the shipped constants (on a GPU: the per-chunk
    Triton and CUDA forwards, 16385 leaving a one-pair last chunk): the reference's values,
    and the same bits on a rerun."""
    if triton_preference is not None:
        assert triton_preference.FWD_MULTI_MIN < n
    pc, pr, rc, rr = inputs(n, torch.float32, device, seed=n)
    if loss_type == "orpo":
        args, kw = (-pc.abs() / 30, -pr.abs() / 30), {}
        fn, ref_fn = rlhf_kernels.orpo_loss, reference.orpo_loss
    else:
        args, kw = (pc, pr, rc, rr), dict(loss_type=loss_type)
        fn, ref_fn = rlhf_kernels.dpo_loss, reference.dpo_loss
    out, grads = forward_backward(lambda *t: fn(*t, beta=0.1, backend=backend, **kw), list(args))
    want = forward_backward(lambda *t: ref_fn(*t, beta=0.1, **kw), [t.double() for t in args])
    compare((tuple(out[:3]), grads), (tuple(want[0][:3]), want[1]), TOL[torch.float32])
    if loss_type == "orpo":  # metric means over n float32 terms
        for got_m, want_m in zip(out[3:], want[0][3:], strict=True):
            torch.testing.assert_close(got_m.double().cpu(), want_m.cpu(), atol=1e-5, rtol=1e-5)
    again = fn(*args, beta=0.1, backend=backend, **kw)
    assert all(torch.equal(x.detach(), y) for x, y in zip(out, again, strict=True))


# --- bad input -----------------------------------------------------------------------------


def test_dpo_bad_inputs():
    pc, pr, rc, rr = inputs(4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="policy_rejected_logps: batch size 3"):
        rlhf_kernels.dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_chosen_logps: required unless reference_free"):
        rlhf_kernels.dpo_loss(pc, pr)
    with pytest.raises(ValueError, match="loss_type: unknown 'kto'.*sigmoid, robust"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="beta"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=-1.0)
    with pytest.raises(ValueError, match="label_smoothing: 0.6 is outside"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, label_smoothing=0.6)
    with pytest.raises(ValueError, match="label_smoothing: 0.5 is outside"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="does not use label smoothing"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(TypeError, match="policy_chosen_logps: expected a floating-point"):
        rlhf_kernels.dpo_loss(pc.long(), pr, rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps: expected a 1-D"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr[None])
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bco_delta: expected a finite number"):
            rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="bco_pair", bco_delta=value)
    with pytest.raises(ValueError, match="gamma: expected a finite number"):
        rlhf_kernels.simpo_loss(pc, pr, gamma=float("inf"))
    with pytest.raises(ValueError, match="bco_delta: only loss_type='bco_pair' uses it"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", bco_delta=0.5)
    with pytest.raises(TypeError, match="return_metrics: expected a bool"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, return_metrics="yes")
    with pytest.raises(TypeError, match="average: expected a bool"):
        rlhf_kernels.sequence_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), average="yes")
    with pytest.raises(ValueError, match="discopop_tau"):
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="ref_chosen_logps: on device meta"):
        rlhf_kernels.dpo_loss(pc, pr, rc.to("meta"), rr)
    with pytest.raises(ValueError, match="chosen_rewards"):
        rlhf_kernels.bradley_terry_loss(pc, pr, margin=rr[:2])
    with pytest.raises(ValueError, match="undesirable_weight"):
        rlhf_kernels.kto_loss(pc, pr, pc, rc, rr, rc, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="ref_kl_logps: required"):
        rlhf_kernels.kto_loss(pc, pr, pc, rc, rr, None)


# --- sequence log-probs and the DPO step from logits ------------------------------------------


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(device, backend, average):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, 211, generator=g).to(device)[:, :5]
    labels = torch.randint(0, 211, (3, 5), generator=g).to(device)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(device)
    mask[2] = False  # a sequence with no kept token: 0, no NaN
    x = logits.detach().requires_grad_(True)
    got = rlhf_kernels.sequence_logprobs(x, labels, mask, average=average, backend=backend)
    got.sum().backward()
    xr = logits.detach().double().requires_grad_(True)
    want = reference.sequence_logprobs(xr, labels, mask, average=average)
    want.sum().backward()
    assert got.shape == (3,) and got[2] == 0
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logprobs_inplace_backward(device, backend, average, dtype):
    """inplace_backward writes the gradient into the logits' own buffer (a [:, :-1] slice of
    a model's output here: the row past it is left alone), the same values as a fresh one;
    rows that share memory fall back to a fresh gradient."""
    logits, labels, mask = _seq_case(3, 5, 211, dtype, device, seed=4)
    full = logits._base if logits._base is not None else logits
    weights = torch.tensor([1.0, -2.0, 0.5], device=device)
    grads = []
    for inplace in (False, True):
        leaf = full.detach().clone().requires_grad_(True)
        y = leaf * 1  # a non-leaf, as an LM head's output
        x = y[:, :-1]
        captured = {}
        x.register_hook(lambda g, captured=captured: captured.setdefault("grad", g))
        out = rlhf_kernels.sequence_logprobs(x, labels, mask, average=average, inplace_backward=inplace,
                                             backend=backend)  # fmt: skip
        (out * weights).sum().backward()
        assert (captured["grad"].data_ptr() == x.data_ptr()) == inplace
        assert torch.all(leaf.grad[:, -1] == 0)
        grads.append(leaf.grad[:, :-1].float())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    row = torch.randn(1, 1, 40, device=device)
    x = row.clone().requires_grad_(True)
    labels3 = torch.tensor([[3, 7, 9]], device=device)
    rlhf_kernels.sequence_logprobs((x * 1).expand(1, 3, 40), labels3, inplace_backward=True,
                                   backend=backend).sum().backward()  # fmt: skip
    xr = row.double().clone().requires_grad_(True)
    reference.sequence_logprobs(xr.expand(1, 3, 40), labels3).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)


# Kernel sums (float32 accumulation) against the float64 reference on the same
# (rounded) logits; the gradient is rounded to the logits' dtype, hence its
# per-dtype tolerance. Upstream weights are up to 3 and 1/T up to 1.43, so a
# float32 p with a few ulp of error gives absolute gradient errors of a few 1e-6.
SEQ_TOL = {torch.float32: dict(atol=3e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-5, rtol=2e-5),
           torch.float16: dict(atol=3e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}  # fmt: skip
SEQ_GRAD_TOL = {torch.float32: dict(atol=5e-6, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=1e-2),
                torch.float16: dict(atol=2e-4, rtol=2e-3), torch.float64: dict(atol=1e-12, rtol=1e-10)}  # fmt: skip


def _seq_case(batch, time, vocab, dtype, device, seed, *, scale=2.0):
    """Strided logits (a [:, :-1] slice), labels and a mask whose sequence 1 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, time + 1, vocab, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, (batch, time), generator=g).to(device)
    mask = torch.rand(batch, time, generator=g) > 0.3
    mask[1 % batch] = False
    return logits[:, :-1], labels, mask.to(device)


def _seq_check(logits, labels, mask, backend, *, weights=None, **kw):
    x = logits.detach().requires_grad_(True)
    got = rlhf_kernels.sequence_logprobs(x, labels, mask, backend=backend, **kw)
    w = torch.arange(1, got.shape[0] + 1, dtype=torch.float64, device=logits.device) if weights is None else weights
    (got.double() * w).sum().backward()
    xr = logits.detach().double().requires_grad_(True)
    want = reference.sequence_logprobs(xr, labels, mask, **kw)
    (want * w).sum().backward()
    tol, grad_tol = SEQ_TOL[logits.dtype], SEQ_GRAD_TOL[logits.dtype]
    assert got.shape == want.shape and got.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **grad_tol)
    return got, x.grad


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("vocab", [1, 7, 1000, 5003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_reference(device, backend, vocab, dtype, average):
    logits, labels, mask = _seq_case(3, 6, vocab, dtype, device, seed=vocab)
    got, grad = _seq_check(logits, labels, mask, backend, average=average, temperature=0.7)
    assert got[1] == 0 and torch.isfinite(got).all()  # fully masked: 0 (also the mean), no NaN
    assert (grad[1] == 0).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_many_chunks(device, backend, average):
    """B * T above the kernels' 2048 work items: several tokens per program and
    several partial sums per sequence; bitwise equal on a rerun."""
    logits, labels, mask = _seq_case(3, 1500, 5, torch.float32, device, seed=4)
    labels[0, 100:700] = -100  # a long ignored run spanning whole chunks
    got, grad = _seq_check(logits, labels, mask, backend, average=average)
    again = rlhf_kernels.sequence_logprobs(logits, labels, mask, average=average, backend=backend)
    assert torch.equal(got.detach(), again)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
def test_sequence_logprobs_layouts_and_ignore_index(device, backend):
    g = torch.Generator().manual_seed(6)
    # [B, V]: one token per sequence; int32 labels, a custom ignore_index, no mask.
    logits = torch.randn(5, 33, generator=g).to(device)
    labels = torch.randint(0, 33, (5,), generator=g, dtype=torch.int32).to(device)
    labels[2] = 7777
    _seq_check(logits, labels, None, backend, ignore_index=7777, average=True)
    # Transposed leading dims (time-major storage), no copy needed by the kernels.
    logits = torch.randn(7, 4, 50, generator=g).to(device).transpose(0, 1)
    labels = torch.randint(0, 50, (4, 7), generator=g).to(device)
    labels[0, :3] = -100
    _seq_check(logits, labels, None, backend, temperature=1.9)
    # Out-of-range kept label without the check: that sequence is NaN, the others are not.
    labels[3, 2] = 50
    out = rlhf_kernels.sequence_logprobs(logits, labels, check_labels=False, backend=backend)
    assert torch.isnan(out[3]) and torch.isfinite(out[:3]).all()
    with pytest.raises(ValueError, match="labels: value 50 is outside"):
        rlhf_kernels.sequence_logprobs(logits, labels, backend=backend)
    with pytest.raises(ValueError, match=r"logits: expected shape \[B, T, V\]"):
        rlhf_kernels.sequence_logprobs(logits[0, 0], labels[0, 0], backend=backend)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_gradcheck(device, backend, average):
    logits, labels, mask = _seq_case(3, 4, 6, torch.float64, device, seed=12)
    x = logits.detach().clone().requires_grad_(True)
    fn = lambda t: rlhf_kernels.sequence_logprobs(t, labels, mask, average=average, temperature=1.3, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("device,backend", backend_cases(["native"], native_op=SEQ_NATIVE_OP))
def test_sequence_logprobs_opcheck(device, backend):
    logits, labels, _ = _seq_case(2, 5, 11, torch.float32, device, seed=1)
    op = torch.ops.rlhf_kernels.sequence_logprobs_fwd_native
    for average in (False, True):
        torch.library.opcheck(op, (logits.contiguous().requires_grad_(True), labels, 0.8, -100, average, False))


@pytest.mark.parametrize("device,backend", backend_cases(["torch", "triton", "native"], native_op=SEQ_NATIVE_OP))
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_sequence_logprobs_compile_fullgraph(device, backend, inplace):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    logits, labels, mask = _seq_case(4, 5, 40, torch.float32, device, seed=3)
    logits = logits._base  # [B, T + 1, V]: the op takes [:, :-1] of it

    def step(x):
        return rlhf_kernels.sequence_logprobs((x * 1)[:, :-1], labels, mask, average=True, check_labels=False,
                                              inplace_backward=inplace, backend=backend)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x1, x2 = (logits.detach().clone().requires_grad_(True) for _ in range(2))
    eager, out = step(x1), compiled(x2)
    eager.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=SEQ_NATIVE_OP))
def test_dpo_step_from_bf16_logits(device, backend):
    """sequence_logprobs on a concatenated chosen+rejected batch, then dpo_loss:
    matches the unfused float64 composition (log_softmax, gather, mask, sum, loss)."""
    B, T, V = 2, 7, 300
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(2 * B, T + 1, V, generator=g) * 2).to(torch.bfloat16).to(device)
    labels = torch.randint(0, V, (2 * B, T), generator=g).to(device)
    mask = torch.ones(2 * B, T, dtype=torch.bool)
    mask[:, :2] = False  # prompt tokens
    mask = mask.to(device)
    ref_logps = (torch.randn(2 * B, generator=g) - 40).to(device)

    def step(x, seq_fn, loss_fn):
        lp = seq_fn(x[:, :-1], labels, mask)
        out = loss_fn(lp[:B], lp[B:], ref_logps[:B], ref_logps[B:], beta=0.1)
        return out[0].mean()

    x = logits.detach().requires_grad_(True)
    loss = step(x, lambda *a: rlhf_kernels.sequence_logprobs(*a, backend=backend),
                lambda *a, **k: rlhf_kernels.dpo_loss(*a, **k, backend=backend))  # fmt: skip
    loss.backward()

    def unfused_seq(x, labels, mask):
        logp = torch.log_softmax(x.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(-1)

    xr = logits.detach().requires_grad_(True)
    want = step(xr, unfused_seq, reference.dpo_loss)
    want.backward()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad.double(), atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
@pytest.mark.parametrize("n", [5, 20000])  # one program / block, and per-chunk ones with a workspace
def test_preference_opcheck(device, backend, n):
    if backend == "triton" and device == "cpu":
        pytest.skip("fake tensors have no data pointer for the Triton interpreter; checked on GPU")
    pc, pr, rc, rr = [t.requires_grad_(True) for t in inputs(n, torch.float32, device)]
    op = getattr(torch.ops.rlhf_kernels, f"preference_fwd_{backend}")
    for loss in ("sigmoid", "bco_pair", "orpo"):
        args = (loss, pc, pr, rc, rr, None, None, 0.1, 0.0, 0.0, 0.0, 0.05, 0.0, True, 1.0, True)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", backend_cases(["torch", "triton", "native"], native_op=NATIVE_OP))
@pytest.mark.parametrize("n", [9, 20000])  # one program / block, and per-chunk ones with a workspace
@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])  # bco_pair's backward reads the forward's metrics
def test_dpo_compile_fullgraph(device, backend, n, loss_type):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    pc, pr, rc, rr = inputs(n, torch.float32, device)

    def step(pc, pr):
        out = rlhf_kernels.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, backend=backend,
                                    return_metrics=True)  # fmt: skip
        return out.losses.mean(), out.metrics["rewards/accuracies"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    a1, b1 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    a2, b2 = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    eager = step(a1, b1)
    eager[0].backward()
    out = compiled(a2, b2)
    out[0].backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(a2.grad, a1.grad)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_tiny_losses_keep_relative_accuracy(device, backend):
    """-log sigmoid(z) for large z is about exp(-z): kept to relative accuracy, not flushed to 0."""
    pc = torch.tensor([17.0, 25.0, 40.0], dtype=torch.float64, device=device)
    zeros = torch.zeros_like(pc)
    got = rlhf_kernels.dpo_loss(pc, zeros, zeros, zeros, beta=1.0, backend=backend).losses
    torch.testing.assert_close(got, torch.exp(-pc), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
def test_eager_calls_skip_the_custom_op_wrapper_only_when_unobserved(device, backend):
    """Eager calls of a functional Triton op run its Python function directly; under a
    dispatch mode (FlopCounterMode, FakeTensorMode ...), torch.profiler or a tracer they go
    through the registered op, which those see. C++ ops and ops that write an argument always
    go through the dispatcher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_kernels import _dispatch

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    pc, pr, rc, rr = inputs(5, torch.float32, device)
    pc.requires_grad_(True)
    plain = rlhf_kernels.dpo_loss(pc, pr, rc, rr, backend=backend)
    plain.losses.sum().backward()
    grad = pc.grad.clone()
    op = getattr(torch.ops.rlhf_kernels, f"preference_fwd_{backend}").default
    assert (_dispatch._DIRECT[op] is not None) == (backend == "triton")  # the first call looked it up
    if backend == "triton":
        assert _dispatch._python_impl(torch.ops.rlhf_kernels.scale_unless_one_triton.default) is None  # writes x
    pc.grad = None
    with Seen() as seen:
        watched = rlhf_kernels.dpo_loss(pc, pr, rc, rr, backend=backend)
        watched.losses.sum().backward()
    assert any(f"preference_fwd_{backend}" in name for name in seen.ops)
    assert any(f"preference_bwd_{backend}" in name for name in seen.ops)
    torch.testing.assert_close(watched.losses, plain.losses, rtol=0, atol=0)
    torch.testing.assert_close(pc.grad, grad, rtol=0, atol=0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rlhf_kernels.dpo_loss(pc, pr, rc, rr, backend=backend)
    assert any(f"preference_fwd_{backend}" in e.name for e in prof.events())
    with torch.no_grad():  # the TorchScript tracer records the op (and replays it on new inputs)
        traced = torch.jit.trace(lambda *t: rlhf_kernels.dpo_loss(*t, backend=backend).losses,
                                 (pc.detach(), pr, rc, rr))  # fmt: skip
        other = inputs(5, torch.float32, device, seed=9)
        torch.testing.assert_close(traced(*other), rlhf_kernels.dpo_loss(*other, backend=backend).losses)


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_infinite_inputs_with_zero_weight_terms(device, backend):
    """Terms whose coefficient is 0 (label smoothing, Bradley-Terry centring) are skipped, not
    multiplied: an infinite input (a token with -inf log-prob in the chosen sequence, a -inf
    reward) keeps the loss and gradient of the plain formula, as the float64 reference gives,
    instead of 0 * inf = NaN; the hinge gradient of an infinite margin is 0."""
    f = torch.tensor
    pc, pr = f([-float("inf"), -12.0], device=device), f([-15.0, -14.0], device=device)
    rc, rr = f([-10.0, -11.0], device=device), f([-13.0, -13.5], device=device)
    for loss_type in ("sigmoid", "hinge", "robust"):
        got_x, want_x = pc.clone().requires_grad_(True), pc.double().cpu().requires_grad_(True)
        kw = dict(loss_type=loss_type, label_smoothing=0.0)
        got = rlhf_kernels.dpo_loss(got_x, pr, rc, rr, backend=backend, **kw).losses
        want = reference.dpo_loss(want_x, pr.double().cpu(), rc.double().cpu(), rr.double().cpu(), **kw)[0]
        torch.testing.assert_close(got.double().cpu(), want, equal_nan=False)
        got[1].backward()
        want[1].backward()
        torch.testing.assert_close(got_x.grad.double().cpu(), want_x.grad)
    x = f([1.0, 2.0], device=device, requires_grad=True)
    got = rlhf_kernels.bradley_terry_loss(x, f([-float("inf"), 0.5], device=device), backend=backend).loss
    got.backward()
    assert got.isfinite() and x.grad.isfinite().all()
    x = f([float("inf"), 1.0], device=device, requires_grad=True)
    rlhf_kernels.dpo_loss(x, pr, rc, rr, loss_type="hinge", backend=backend).losses.sum().backward()
    assert x.grad.isfinite().all() and x.grad[0] == 0


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_log_sigmoid_accuracy_in_the_tail(device, backend, dtype):
    """-log sigmoid(z) for z from 6 to 12 (log1p of 2.5e-3 .. 6e-6) to a few ulp of the dtype, not
    the 1e-4 relative that log(1 + t) in float32 gives just above the series' range. Triton's
    float32 exp on a GPU is ex2.approx of x * log2(e): the product's rounding costs |x| * 2^-24
    relative besides ex2's 2 ulp, about 8 ulp at z = 12 (an H200 run: 7); 10 ulp there."""
    z = torch.linspace(6.0, 12.0, 301, dtype=torch.float64)
    zeros = torch.zeros_like(z)
    losses = rlhf_kernels.dpo_loss(z.to(dtype).to(device), zeros.to(dtype).to(device), zeros.to(dtype).to(device),
                                   zeros.to(dtype).to(device), beta=1.0, backend=backend).losses  # fmt: skip
    want = torch.nn.functional.softplus(-z.to(dtype).double())
    approx_exp = device == "cuda" and backend == "triton" and dtype == torch.float32
    tol = (10 if approx_exp else 4) * torch.finfo(dtype).eps
    torch.testing.assert_close(losses.double().cpu(), want, rtol=tol, atol=0)


try:
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    @settings(deadline=None, phases=[Phase.explicit, Phase.generate])  # examples: the profile's (conftest)
    @given(loss_type=st.sampled_from(rlhf_kernels.DPO_LOSS_TYPES), n=st.integers(1, 3000),
           beta=st.floats(0.01, 10.0), smoothing=st.floats(0.0, 0.49),
           scale=st.one_of(st.just(0.0), st.floats(1e-3, 200.0)),  # no near-ties for the accuracy metric
           reference_free=st.booleans(), bco_delta=st.one_of(st.none(), st.floats(-5.0, 5.0)),
           seed=st.integers(0, 2**16))  # fmt: skip
    def test_dpo_loss_property(loss_type, n, beta, smoothing, scale, reference_free, bco_delta, seed):
        """Every kernel backend on CPU agrees with the float64 reference (losses, rewards, metrics and
        gradients) for any batch size, strength, smoothing and spread of log-prob margins."""
        tensors = inputs(n, torch.float64, "cpu", seed=seed, scale=scale)
        kw = dict(beta=beta, loss_type=loss_type, label_smoothing=smoothing if loss_type in SMOOTHED else 0.0,
                  reference_free=reference_free, bco_delta=bco_delta if loss_type == "bco_pair" else None,
                  return_metrics=True)  # fmt: skip
        want = forward_backward(lambda *t: rlhf_kernels.dpo_loss(*t, backend="torch", **kw), tensors)
        for backend in rlhf_kernels._dispatch.available_backends("cpu"):
            if backend == "torch" or (backend == "native" and not hasattr(torch.ops.rlhf_kernels, NATIVE_OP)):
                continue
            got = forward_backward(lambda *t, b=backend: rlhf_kernels.dpo_loss(*t, backend=b, **kw), tensors)
            compare(got, want, TOL[torch.float64])
            for key, value in want[0].metrics.items():
                torch.testing.assert_close(got[0].metrics[key].double(), value.double(), **TOL[torch.float64],
                                           msg=lambda m, key=key, b=backend: f"{b} metric {key}: {m}")  # fmt: skip
except ImportError:
    pass


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"], native_op=NATIVE_OP))
def test_double_backward_refused(device, backend):
    """create_graph=True through the preference kernels raises instead of a constant gradient."""
    leaves = [t.requires_grad_() for t in inputs(5, torch.float64, device)]
    for loss in (lambda: rlhf_kernels.dpo_loss(*leaves, backend=backend).losses.sum(),
                 lambda: rlhf_kernels.bradley_terry_loss(leaves[0], leaves[1], backend=backend)[0]):  # fmt: skip
        with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
            torch.autograd.grad(loss(), leaves[0], create_graph=True)
        assert torch.autograd.grad(loss(), leaves[0])[0].abs().sum() > 0


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_nan_input_gives_nan_loss(device, backend):
    """A NaN log-prob makes its pair's loss and the batch's mean loss NaN on every backend, so that a
    diverged step is seen (Triton's hinge and ORPO clamps dropped it: GPU min / max return the other
    operand); the other pairs keep their finite losses (all of them NaN for bco_pair's batch-mean delta)."""
    nan = float("nan")
    pc = torch.tensor([nan, -1.0, -2.0], dtype=torch.float64, device=device)
    rest = [torch.tensor([-1.0, -1.5, -0.5], dtype=torch.float64, device=device) for _ in range(3)]
    for loss_type in rlhf_kernels.DPO_LOSS_TYPES:
        out = rlhf_kernels.dpo_loss(pc, *rest, loss_type=loss_type, return_metrics=True, backend=backend)
        assert out.metrics["loss"].isnan(), loss_type
        if loss_type == "bco_pair":
            assert out.losses.isnan().all()
        elif loss_type.startswith("aot"):  # the batch's sorted margins: the NaN one sorts last
            assert out.losses[:2].isfinite().all() and out.losses[2].isnan(), loss_type
        else:
            assert out.losses[0].isnan() and out.losses[1:].isfinite().all(), loss_type
    for losses in (rlhf_kernels.orpo_loss(pc, rest[0], backend=backend).losses,
                   rlhf_kernels.simpo_loss(pc, rest[0], backend=backend).losses):  # fmt: skip
        assert losses[0].isnan() and losses[1:].isfinite().all()


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_exo_pair_tiny_epsilon(device, backend, dtype):
    """exo_pair's log(eps) and log(1 - eps) come from the host in double on every backend: an eps
    below float32's range (1e-300) gives the float64 loss, not that of eps = 0 (inf) or of the
    default 1e-3 (what the Triton kernel's float32 argument made of it)."""
    tensors = inputs(5, torch.float64, "cpu", seed=4, scale=0.5)
    want = forward_backward(lambda *t: reference.dpo_loss(*t, loss_type="exo_pair", label_smoothing=1e-300), tensors)
    got = forward_backward(lambda *t: rlhf_kernels.dpo_loss(*t, loss_type="exo_pair", label_smoothing=1e-300,
                                                            backend=backend),
                           [t.to(dtype).to(device) for t in tensors])  # fmt: skip
    assert got[0].losses.min() > 100  # -log(eps) dominates: about 690 times sigmoid(-z)
    compare(got, want, TOL[dtype])


@pytest.mark.parametrize("device,backend", backend_cases(native_op=NATIVE_OP))
def test_mixed_dtypes_margin_and_infinite_margins(device, backend):
    """Every backend promotes as the reference does (a float64 input anywhere gives float64 results,
    not float32 ones from rounded float64 inputs), never differentiates Bradley-Terry's margin, and
    gives the limit 0, not NaN (0 * inf), for an infinite margin without smoothing."""
    g = torch.Generator().manual_seed(21)
    f32 = torch.randn(6, generator=g).to(device)
    f64 = (torch.randn(6, generator=g, dtype=torch.float64) * 1e-9 + 1.0 / 3.0).to(device)  # not float32-exact
    want = reference.bradley_terry_loss(f32.double(), f64)[0]
    got = rlhf_kernels.bradley_terry_loss(f32, f64, backend=backend)[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.to(device), **TOL[torch.float64])
    assert rlhf_kernels.dpo_loss(f32, f32, f64, f64, backend=backend).losses.dtype == torch.float64
    assert {t.dtype for t in rlhf_kernels.kto_loss(f32, f64, f32, f32, f32, f32, backend=backend)} == {torch.float64}
    margin = torch.randn(6, generator=g).to(device).requires_grad_()
    chosen = f32.clone().requires_grad_()
    rlhf_kernels.bradley_terry_loss(chosen, f32.flip(0), margin=margin, backend=backend)[0].backward()
    assert margin.grad is None and chosen.grad.abs().sum() > 0
    inf = torch.tensor([float("-inf")], device=device)
    one = torch.tensor([-1.0], device=device)
    for loss_type in ("sigmoid", "robust", "aot", "aot_pair"):
        out = rlhf_kernels.dpo_loss(one + 1, one, inf, one, loss_type=loss_type, backend=backend).losses
        assert out.item() == 0.0, loss_type
