"""The verl and OpenRLHF drop-ins against the real releases, not stand-ins.

``make test-frameworks`` installs the pinned releases (tests/frameworks/requirements.txt,
verl 0.9.1 and OpenRLHF 0.11.2) into ``.frameworks/`` and runs this file with them on the
path; elsewhere (``make test``, CI) it is skipped, since neither installs with its
dependencies on a machine without a GPU. Each test calls the release's own function,
captured before :func:`patch`, and the patched one on the same inputs, and checks that
the patched call reached the op (a drop-in that quietly handed every call back to the
framework would pass the comparison alone). float32 inputs are compared with the
framework at float32; bfloat16 ones with the framework on the same values in float64,
since its own bfloat16 arithmetic rounds at every step where the ops accumulate in float32.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rlhf_kernels.integrations import openrlhf as rk_openrlhf
from rlhf_kernels.integrations import verl as rk_verl

AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
DTYPES = [torch.float32, torch.bfloat16]


def _counting(monkeypatch, module, names):
    """Count the integration module's calls of the ops it imported by these names."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        op = getattr(module, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def verl(monkeypatch):
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl not installed: make test-frameworks")
    functional = pytest.importorskip("verl.utils.torch_functional")
    names = ["compute_gae_advantage_return", "compute_grpo_outcome_advantage", "compute_policy_loss",
             "compute_value_loss", "kl_penalty"]  # fmt: skip
    original = {n: getattr(core, n) for n in names}
    original["vanilla"] = core.get_policy_loss_fn("vanilla")
    original["gspo"] = core.get_policy_loss_fn("gspo")
    original.update({n: getattr(functional, n) for n in ("logprobs_from_logits", "entropy_from_logits",
                                                           "masked_whiten")})  # fmt: skip
    calls = _counting(monkeypatch, rk_verl, ["gae", "grpo_advantages", "ppo_policy_loss", "ppo_value_loss",
                                             "kl_penalty", "token_logprobs", "masked_whiten"])  # fmt: skip
    rk_verl.patch("auto")
    calls.update(dict.fromkeys(calls, 0))  # (patch itself checks the vanilla loss on a probe call)
    try:
        yield core, functional, original, calls
    finally:
        rk_verl.unpatch()
        assert all(getattr(core, n) is original[n] for n in names)
        assert core.ADV_ESTIMATOR_REGISTRY["gae"] is original["compute_gae_advantage_return"]
        assert core.get_policy_loss_fn("vanilla") is original["vanilla"]
        assert core.get_policy_loss_fn("gspo") is original["gspo"]


@pytest.fixture
def openrlhf(monkeypatch):
    utils = pytest.importorskip("openrlhf.models.utils", reason="OpenRLHF not installed: make test-frameworks")
    maker = pytest.importorskip("openrlhf.trainer.ppo_utils.experience_maker")
    loss = pytest.importorskip("openrlhf.models.loss")
    original = {"compute_approx_kl": utils.compute_approx_kl, "log_probs_from_logits": utils.log_probs_from_logits,
                "gae": maker.RemoteExperienceMaker.get_advantages_and_returns,
                "PolicyLoss": loss.PolicyLoss.forward, "ValueLoss": loss.ValueLoss.forward}  # fmt: skip
    calls = _counting(monkeypatch, rk_openrlhf, ["kl_penalty", "token_logprobs", "gae", "ppo_policy_loss",
                                                 "ppo_value_loss"])  # fmt: skip
    rk_openrlhf.patch("auto")
    calls.update(dict.fromkeys(calls, 0))  # (patch itself asks compute_approx_kl how it clamps, and probes the losses)
    try:
        yield utils, maker, original, calls
    finally:
        rk_openrlhf.unpatch()
        assert utils.compute_approx_kl is original["compute_approx_kl"]
        assert maker.RemoteExperienceMaker.get_advantages_and_returns is original["gae"]
        assert loss.PolicyLoss.forward is original["PolicyLoss"] and loss.ValueLoss.forward is original["ValueLoss"]


def _masks(B, T, g):
    gaps = (torch.rand(B, T, generator=g) > 0.3).float()
    gaps[:, -1] = 1
    prefix = torch.zeros(B, T)
    for b in range(B):
        prefix[b, : 1 + b * (T - 1) // max(B - 1, 1)] = 1
    empty = gaps.clone()
    empty[1] = 0
    return {"ones": torch.ones(B, T), "gaps": gaps, "prefix": prefix, "empty-row": empty}


def _inputs(dtype, mask_kind, B=6, T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = [(torch.randn(B, T, generator=g) * 0.5).to(dtype) for _ in range(4)]
    return (*r, _masks(B, T, g)[mask_kind])


def _tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-5, rtol=2e-5)


def _wide(dtype, *ts):
    """The framework's inputs: as given for float32, in float64 for bfloat16 (see the module docstring)."""
    return [t.double() if dtype == torch.bfloat16 and t.dtype.is_floating_point else t for t in ts]


def _close(got, want, tol):
    for a, b in zip(got if isinstance(got, tuple | list) else [got], want if isinstance(want, tuple | list) else [want],
                    strict=True):  # fmt: skip
        torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), **tol)


# --- verl --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["ones", "gaps", "prefix", "empty-row"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_verl_gae(verl, dtype, mask_kind, gamma, lam):
    core, _, original, calls = verl
    rewards, values, _, _, mask = _inputs(dtype, mask_kind)
    got = core.ADV_ESTIMATOR_REGISTRY["gae"](rewards, values, mask.to(dtype), gamma, lam)
    want = original["compute_gae_advantage_return"](*_wide(dtype, rewards, values, mask), gamma, lam)
    assert calls["gae"] == 1 and got[0].dtype == dtype
    _close(got, want, _tol(dtype))


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo(verl, group, norm):
    core, _, original, calls = verl
    g = torch.Generator().manual_seed(4)
    scores, mask = torch.randn(6, 11, generator=g), _masks(6, 11, g)["gaps"]
    index = np.array([f"prompt-{i // group}" for i in range(6)], dtype=object)
    got = core.compute_grpo_outcome_advantage(scores, mask, index, 1e-6, norm)
    want = original["compute_grpo_outcome_advantage"](scores.clone(), mask, index, 1e-6, norm)  # (writes scores)
    assert calls["grpo_advantages"] == 1
    _close(got, want, dict(atol=1e-6, rtol=1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["gaps", "empty-row"])
@pytest.mark.parametrize("clip", [(0.2, None, None, 3.0), (0.2, 0.1, 0.28, 2.0)], ids=["symmetric", "clip-higher"])
def test_verl_policy_and_value_loss(verl, dtype, mode, mask_kind, clip):
    core, _, original, calls = verl
    logp, old, adv, vpred, mask = _inputs(dtype, mask_kind, seed=1)
    # verl releases differ on empty sequences in the seq-mean modes: such calls go to verl itself unless the
    # patch-time probe saw the installed release give the op's results (verl 0.9 does: no host sync then)
    covered = mask_kind != "empty-row" or mode in ("token-mean", "seq-mean-token-sum-norm", *rk_verl._agg_rules()[2])
    wide = dtype == torch.bfloat16 and covered
    tol = _tol(dtype) if covered else dict(atol=0, rtol=0)

    def check(name, op, x, call):
        """verl's ``name`` patched and its own, through ``call(fn, x, others)``, x differentiated."""
        results = []
        for fn, w in ((getattr(core, name), False), (original[name], wide)):
            xg = (x.double() if w else x).clone().requires_grad_(True)
            out = call(fn, xg, _wide(dtype, old, adv) if w else (old, adv))
            out[0].backward()
            results.append((out, xg.grad))
        assert calls[op] == int(covered)
        for got, want in zip(*results, strict=True):
            _close(got, want, tol)

    # policy: (old_log_prob, log_prob, advantages, ...); value: (vpreds, returns = adv, values = old, ...)
    check("compute_policy_loss", "ppo_policy_loss", logp,
          lambda fn, x, o: fn(o[0], x, o[1], mask, *clip, loss_agg_mode=mode))  # fmt: skip
    check("compute_value_loss", "ppo_value_loss", vpred, lambda fn, x, o: fn(x, o[1], o[0], mask, 0.2, mode))


GLOBAL_BATCH = {"none": {}, "dp2": dict(dp_size=2, batch_num_tokens=300, global_batch_size=14),
                "dp2-norm": dict(dp_size=2, batch_num_tokens=300, global_batch_size=14, loss_scale_factor=64),
                "dp1": dict(dp_size=1, batch_num_tokens=150, global_batch_size=7)}  # fmt: skip


@pytest.mark.parametrize("mode", [*AGG_MODES, "token-sum"])
@pytest.mark.parametrize("batch", list(GLOBAL_BATCH))
@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_vanilla_policy_loss_and_global_batch(verl, mode, batch, dtype):
    """The registry's "vanilla" loss (what verl 0.9's actors call, with verl's own actor
    config) and the value loss, with the global-batch arguments a data-parallel actor passes."""
    core, _, original, calls = verl
    from verl.workers.config import FSDPActorConfig

    logp, old, adv, vpred, mask = _inputs(dtype, "gaps", seed=9)
    config = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                             clip_ratio_high=0.28, clip_ratio_c=3.0)  # fmt: skip
    config.global_batch_info.update(GLOBAL_BATCH[batch])
    tol = _tol(dtype)

    def loss_and_grad(fn, x, *others):
        x = x.clone().requires_grad_(True)
        out = fn(x, *others)
        out[0].backward()
        return out, x.grad

    vanilla = core.get_policy_loss_fn("vanilla")
    assert vanilla is not original["vanilla"]
    (got, metrics), got_grad = loss_and_grad(lambda x, o, a: vanilla(o, x, a, mask, mode, config), logp, old, adv)
    (want, want_metrics), want_grad = loss_and_grad(lambda x, o, a: original["vanilla"](o, x, a, mask, mode, config),
                                                    *_wide(dtype, logp, old, adv))  # fmt: skip
    assert calls["ppo_policy_loss"] == 1 and set(metrics) == set(want_metrics)
    assert got.dtype == original["vanilla"](old, logp, adv, mask, mode, config)[0].dtype
    _close(got, want, tol)
    _close(got_grad, want_grad, tol)
    _close([metrics[k] for k in sorted(metrics)], [want_metrics[k] for k in sorted(metrics)], tol)

    info = GLOBAL_BATCH[batch]
    got, got_grad = loss_and_grad(lambda x, r, v: core.compute_value_loss(x, r, v, mask, 0.2, mode, **info),
                                  vpred, adv, old)  # fmt: skip
    assert got[0].dtype == original["compute_value_loss"](vpred, adv, old, mask, 0.2, mode, **info)[0].dtype
    want, want_grad = loss_and_grad(lambda x, r, v: original["compute_value_loss"](x, r, v, mask, 0.2, mode, **info),
                                    *_wide(dtype, vpred, adv, old))  # fmt: skip
    assert calls["ppo_value_loss"] == 1
    _close(got, want, tol)
    _close(got_grad, want_grad, tol)


@pytest.mark.parametrize("mode", [*AGG_MODES, "token-sum"])
@pytest.mark.parametrize("batch", ["none", "dp2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_gspo_policy_loss(verl, mode, batch, dtype):
    """The registry's "gspo" loss (GSPO-token, verl's actor config) through the op's sequence level;
    a sequence whose mean log-ratio passes verl's clamp (10) goes to verl's own function."""
    core, _, original, calls = verl
    from verl.workers.config import FSDPActorConfig

    logp, old, adv, _, mask = _inputs(dtype, "gaps", seed=10)  # sequence ratios about 1 +- 0.2: some clip
    config = FSDPActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.05,
                             clip_ratio_high=0.06)  # fmt: skip
    config.global_batch_info.update(GLOBAL_BATCH[batch])
    tol = _tol(dtype)
    gspo = core.get_policy_loss_fn("gspo")
    assert gspo is not original["gspo"]

    def loss_and_grad(fn, x, o, a):
        x = x.clone().requires_grad_(True)
        out = fn(o, x, a, mask, mode, config)
        out[0].backward()
        return out, x.grad

    (got, metrics), got_grad = loss_and_grad(gspo, logp, old, adv)
    (want, want_metrics), want_grad = loss_and_grad(original["gspo"], *_wide(dtype, logp, old, adv))
    assert calls["ppo_policy_loss"] == 1 and set(metrics) == set(want_metrics)
    # verl's own dtype at these inputs (its sequence means promote a bf16 loss to float32)
    assert got.dtype == original["gspo"](old, logp, adv, mask, mode, config)[0].dtype
    assert 0 < want_metrics["actor/pg_clipfrac"] < 1
    _close(got, want, tol)
    _close(got_grad, want_grad, tol)
    _close([metrics[k] for k in sorted(metrics)], [want_metrics[k] for k in sorted(metrics)], tol)
    far = logp - 11.0  # mean log-ratios of 11: verl clamps them at 10, the op at 20
    (got, _), got_grad = loss_and_grad(gspo, logp, far, adv)
    (want, _), want_grad = loss_and_grad(original["gspo"], logp, far, adv)
    assert calls["ppo_policy_loss"] == 1  # verl's function ran
    _close(got, want, tol)
    _close(got_grad, want_grad, tol)


@pytest.mark.parametrize("mode", [*AGG_MODES, "token-sum"])
def test_verl_losses_without_valid_tokens(verl, mode):
    """A micro-batch without a valid token: verl's local means divide 0 by 0 (NaN) where the op's
    give 0. Where the patch-time probe saw the installed release's results (verl 0.9), the op runs
    and its loss is scaled by NaN on the device (loss and gradient NaN, no host sync); otherwise
    those calls go to verl. token-sum (0) and given global counts stay with the op."""
    core, _, original, calls = verl
    logp, old, adv, vpred, _ = _inputs(torch.float32, "ones", seed=10)
    empty = torch.zeros_like(logp)
    x, y = vpred.clone().requires_grad_(True), vpred.clone().requires_grad_(True)
    got = core.compute_value_loss(x, adv, old, empty, 0.2, mode)
    want = original["compute_value_loss"](y, adv, old, empty, 0.2, mode)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(x.grad, y.grad, equal_nan=True)
    assert calls["ppo_value_loss"] == int(mode == "token-sum" or mode in rk_verl._agg_rules()[2])
    local = calls["ppo_value_loss"]
    got = core.compute_value_loss(vpred, adv, old, empty, 0.2, mode, dp_size=2, batch_num_tokens=40,
                                  global_batch_size=4)  # fmt: skip
    want = original["compute_value_loss"](vpred, adv, old, empty, 0.2, mode, dp_size=2, batch_num_tokens=40,
                                          global_batch_size=4)  # fmt: skip
    _close(got, want, _tol(torch.float32))
    assert calls["ppo_value_loss"] == 1 + local


def test_verl_calls_the_ops_cannot_mirror_stay_verls(verl):
    """Calls outside the ops' layout or meaning go to verl with the same arguments, and the
    covered ones return verl's dtypes: 1-D losses, a per-row gamma tensor, a tensor clip range,
    empty responses with global-batch arguments, advantages that require grad (the ops treat them
    as constants), bf16 with a bool mask, float64 with a float32 mask, bf16 GAE or whitening with a
    float mask; log-probs off verl's flash-attn path keep the logits (and their dtype)."""
    core, functional, original, calls = verl
    g = torch.Generator().manual_seed(11)
    B, T = 3, 5
    mask = torch.ones(B, T)
    mask[:, 3:] = 0
    old = -torch.rand(B, T, generator=g)
    logp, adv = old + 0.1 * torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

    def same(name, *args, **kw):
        fn = getattr(core, name) if hasattr(core, name) else getattr(functional, name)
        got, want = fn(*args, **kw), original[name](*args, **kw)
        # (verl's bf16 arithmetic rounds each step, and flags of bf16 losses may flip)
        tol = 2e-2 if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in args) else 1e-5
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,),
                        strict=True):  # fmt: skip
            assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)
        return got

    same("compute_value_loss", logp.flatten(), adv.flatten(), old.flatten(), mask.flatten(), 0.2)
    same("compute_gae_advantage_return", adv, old, mask, torch.full((B,), 0.99), 0.95)
    same("compute_policy_loss", old, logp, adv, mask, cliprange=0.2, cliprange_low=torch.tensor(0.1))
    assert calls["ppo_policy_loss"] == 1  # (the tensor clip range is the op's)
    same("compute_value_loss", logp[:, :0], adv[:, :0], old[:, :0], mask[:, :0], 0.2, "seq-mean-token-sum-norm",
         dp_size=2, batch_num_tokens=10, global_batch_size=4)  # fmt: skip
    same("compute_policy_loss", old.bfloat16(), logp.bfloat16(), adv.bfloat16(), mask.bool(), cliprange=0.2)
    same("compute_policy_loss", old.double(), logp.double(), adv.double(), mask, cliprange=0.2)
    same("compute_value_loss", logp.double(), adv.double(), old.double(), mask, 0.2)
    same("compute_gae_advantage_return", adv.bfloat16(), old.bfloat16(), mask, 1.0, 0.95)
    same("masked_whiten", adv.bfloat16(), mask)
    used = calls["ppo_policy_loss"]
    a1, a2 = adv.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    core.compute_policy_loss(old, logp, a1, mask, cliprange=0.2)[0].backward()
    original["compute_policy_loss"](old, logp, a2, mask, cliprange=0.2)[0].backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    assert calls["ppo_policy_loss"] == used  # (verl's)
    x = torch.randn(4, 7, generator=g)
    h = x.clone().requires_grad_(True) * 1.0
    lp = functional.logprobs_from_logits(h, torch.tensor([1, 2, 3, 4]))
    lp.sum().backward()
    assert torch.equal(h.detach(), x) and lp.dtype == x.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_kl_penalty(verl, dtype):
    core, _, original, calls = verl
    logp, ref, _, _, _ = _inputs(dtype, "ones", seed=2)
    kinds = ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"]
    for kind in [*kinds, "k3+"]:
        _close(core.kl_penalty(logp, ref, kind), original["kl_penalty"](*_wide(dtype, logp, ref), kind), _tol(dtype))
    assert calls["kl_penalty"] == len(kinds)  # "k3+" (straight-through k2 gradient) stays with verl


@pytest.mark.parametrize("dtype,V", list(itertools.product(DTYPES, [7, 1000])))
def test_verl_logprobs_entropy_whiten(verl, dtype, V):
    _, functional, original, calls = verl
    g = torch.Generator().manual_seed(3)
    logits, labels = (torch.randn(3, 5, V, generator=g) * 2).to(dtype), torch.randint(0, V, (3, 5), generator=g)
    a, b = logits.clone().requires_grad_(True), logits.double().requires_grad_(True)
    got, want = functional.logprobs_from_logits(a, labels, False), original["logprobs_from_logits"](b, labels, False)
    got.sum().backward()
    want.sum().backward()
    _close(got, want, _tol(dtype))
    _close(a.grad, b.grad, _tol(dtype))
    _close(functional.entropy_from_logits(logits), original["entropy_from_logits"](logits.double()), _tol(dtype))
    x, _, _, _, mask = _inputs(torch.float32, "gaps", seed=5)
    _close(functional.masked_whiten(x, mask), original["masked_whiten"](x, mask), _tol(torch.float32))
    assert calls["token_logprobs"] == 2 and calls["masked_whiten"] == 1


@pytest.fixture
def verl_heads(monkeypatch):
    """verl's two fused LM heads (use_fused_kernels: the Triton linear_cross_entropy and the torch
    FusedLinearForPPO), captured before patch(fused_lm_head=True), and a count of the op's calls."""
    lce = pytest.importorskip("verl.utils.kernel.linear_cross_entropy", reason="verl not installed")
    functional = pytest.importorskip("verl.utils.experimental.torch_functional")
    from rlhf_kernels.ops import linear

    original = {"lce": lce.linear_cross_entropy, "ppo": functional.FusedLinearForPPOFunction}
    calls = []
    op = linear.linear_token_logprobs
    monkeypatch.setattr(linear, "linear_token_logprobs", lambda *a, **k: calls.append(1) or op(*a, **k))
    where = rk_verl.patch("auto", fused_lm_head=True)
    assert {"verl.utils.kernel.linear_cross_entropy.linear_cross_entropy",
            "verl.utils.experimental.torch_functional.FusedLinearForPPOFunction"} <= set(where)  # fmt: skip
    try:
        yield lce, functional, original, calls
    finally:
        rk_verl.unpatch()
        assert lce.linear_cross_entropy is original["lce"]
        assert functional.FusedLinearForPPOFunction is original["ppo"]
        assert not rk_verl.is_head_patched()


def _head_step(fn, hidden, weight, ids, temperature):
    h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    logp, entropy = fn(h, w, ids, temperature)
    g = torch.Generator().manual_seed(9)
    (logp.double() * torch.randn(logp.shape, generator=g, dtype=torch.float64)).sum().add(
        entropy.double().sum() * 0.3).backward()  # fmt: skip
    return logp, entropy, h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 9), (13,)], ids=["BxT", "T"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_verl_fused_heads(verl_heads, dtype, shape, temperature):
    """patch(fused_lm_head=True): verl's FusedLinearForPPO (torch backend) and linear_cross_entropy
    go through linear_token_logprobs, with verl's outputs (log-probs float32; entropy in the hidden
    dtype for the former, float32 for the latter; flat for linear_cross_entropy) and gradients;
    compared with verl's FusedLinearForPPOFunction (float32; bfloat16 against it in float64).
    verl's Triton linear_cross_entropy itself needs a GPU."""
    lce, functional, original, calls = verl_heads
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(*shape, 24, generator=g).to(dtype)
    weight = (torch.randn(301, 24, generator=g) * 0.3).to(dtype)
    ids = torch.randint(0, 301, shape, generator=g)
    want = _head_step(lambda *a: original["ppo"].apply(*a, 512), *_wide(dtype, hidden, weight), ids, temperature)
    got = _head_step(lambda *a: functional.FusedLinearForPPO().forward(*a), hidden, weight, ids, temperature)
    flat = _head_step(lambda h, w, i, t: lce.linear_cross_entropy(h, w, i, t, "none"), hidden, weight, ids,
                      temperature)  # fmt: skip
    assert len(calls) == 2
    assert got[0].dtype == flat[0].dtype == flat[1].dtype == torch.float32 and got[1].dtype == dtype
    assert got[0].shape == got[1].shape == ids.shape and flat[0].shape == flat[1].shape == (ids.numel(),)
    for result in (got, flat):
        _close([x.reshape(y.shape) for x, y in zip(result[:2], want[:2], strict=True)], want[:2], _tol(dtype))
        for a, b in zip(result[2:], want[2:], strict=True):  # gradients: bfloat16 matmuls, relative to their scale
            scale = b.abs().max().item()
            tol = dict(atol=3e-2 * scale, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=2e-5 * scale, rtol=2e-5)
            _close(a, b, tol)


def test_verl_fused_heads_uncovered_calls_stay_verls(verl_heads):
    """A process group (vocab-parallel), another reduction, an int temperature (verl asserts a
    float), the "torch" backend: verl's own linear_cross_entropy; 4-D hidden states and the
    "torch" backend: verl's own FusedLinearForPPOFunction."""
    lce, functional, original, calls = verl_heads
    seen = []
    fake = rk_verl._make_linear_cross_entropy(lambda *a: seen.append(a) or "verl's")
    h, w, ids = torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))
    assert fake(h, w, ids, 1.0, "none", object()) == "verl's"
    assert fake(h, w, ids, 1.0, "mean") == "verl's"
    assert fake(h, w, ids, 1, "none") == "verl's"
    assert len(seen) == 3 and not calls
    got = fake(h, w, ids, 1.0, "none")
    assert len(calls) == 1 and got[0].shape == (6,)
    with rk_verl.patched("torch", fused_lm_head=True):  # (the torch composition would build the logits)
        assert fake(h, w, ids, 1.0, "none") == "verl's"
        got = functional.FusedLinearForPPOFunction.apply(h, w, ids, 1.0, 512)
    want = original["ppo"].apply(h, w, ids, 1.0, 512)
    _close(got, want, dict(atol=0, rtol=0))
    assert len(calls) == 1
    assert functional.FusedLinearForPPOFunction is not original["ppo"] and rk_verl.is_head_patched()


def test_verl_fused_heads_labels_groups_and_refusals(verl_heads, monkeypatch):
    """No ignore index (a -100 label gives NaN, not a silent 0); a process group of one rank
    (Megatron's tensor-parallel group without tensor parallelism) is covered; a verl whose head
    has another parameter list, or an unknown backend, is refused with nothing changed."""
    import torch.distributed as dist

    lce, functional, original, calls = verl_heads
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    ids = torch.randint(0, 11, (2, 3))
    ids[0, 1] = -100
    logp, entropy = functional.FusedLinearForPPOFunction.apply(h, w, ids, 1.0, 512)
    assert torch.isnan(logp[0, 1]) and torch.isfinite(logp[1]).all() and len(calls) == 1
    ids[0, 1] = 3
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    try:
        logp, _ = lce.linear_cross_entropy(h, w, ids, 1.0, "none", dist.group.WORLD)
        assert len(calls) == 2 and logp.shape == (6,)
    finally:
        dist.destroy_process_group()
    rk_verl.unpatch()

    class Other(original["ppo"]):  # a release that added a parameter
        @staticmethod
        def forward(ctx, hidden_states, vocab_weights, input_ids, temperature=1.0, chunk_size=512, extra=None):
            raise AssertionError("not called")

    monkeypatch.setattr(functional, "FusedLinearForPPOFunction", Other)
    with pytest.raises(RuntimeError, match="FusedLinearForPPOFunction.*does not have the expected parameters"):
        rk_verl.patch(fused_lm_head=True)
    assert not rk_verl.is_patched() and not rk_verl.is_head_patched() and functional.FusedLinearForPPOFunction is Other
    monkeypatch.undo()
    with pytest.raises(ValueError, match="backend: unknown backend None"):
        rk_verl.patch(None, fused_lm_head=True)
    assert not rk_verl.is_patched() and not rk_verl.is_head_patched()


# --- OpenRLHF ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["ones", "gaps", "prefix"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0)])
def test_openrlhf_gae(openrlhf, dtype, mask_kind, gamma, lam):
    _, maker, original, calls = openrlhf
    rewards, values, _, _, mask = _inputs(dtype, mask_kind, seed=6)
    got = maker.RemoteExperienceMaker.get_advantages_and_returns(None, values, rewards, mask.to(dtype), gamma, lam)
    want = original["gae"](None, *_wide(dtype, values, rewards, mask), gamma, lam)
    assert calls["gae"] == 1
    _close(got, want, _tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_approx_kl(openrlhf, dtype, estimator):
    utils, _, original, calls = openrlhf
    logp, base, old, _, _ = _inputs(dtype, "ones", seed=7)
    a, b = (logp * 4).requires_grad_(True), (logp * 4).double().requires_grad_(True)
    got = utils.compute_approx_kl(a, base, kl_estimator=estimator)
    want = original["compute_approx_kl"](b, *_wide(dtype, base), kl_estimator=estimator)
    got.sum().backward()
    want.sum().backward()
    _close(got, want, _tol(dtype))
    _close(a.grad, b.grad, _tol(dtype))
    # the importance-weighted gradient of 0.11 is OpenRLHF's own
    _close(utils.compute_approx_kl(logp, base, old, estimator, True),
           original["compute_approx_kl"](*_wide(dtype, logp, base, old), estimator, True), _tol(dtype))  # fmt: skip
    assert calls["kl_penalty"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_openrlhf_logprobs(openrlhf, dtype, temperature):
    utils, _, original, calls = openrlhf
    g = torch.Generator().manual_seed(8)
    logits, labels = (torch.randn(3, 5, 1000, generator=g) * 2).to(dtype), torch.randint(0, 1000, (3, 5), generator=g)
    mine, theirs = logits.clone(), logits.clone()
    got = utils.log_probs_from_logits(mine, labels, temperature)
    want = original["log_probs_from_logits"](theirs, labels, temperature)
    assert calls["token_logprobs"] == 1 and got.dtype == want.dtype
    _close(got, want, _tol(dtype))
    assert torch.equal(mine, theirs)  # the logits divided in place, as OpenRLHF does


# the global counts as OpenRLHF's actors pass them (0.11: float32 tensors), as plain numbers, or none
OPENRLHF_COUNTS = {"local": {}, "tensors": dict(dp_size=2, batch_num_tokens=torch.tensor(300.0),
                                                  global_batch_size=torch.tensor(14.0)),
                   "numbers": dict(dp_size=1, batch_num_tokens=150, global_batch_size=7)}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_level", [True, False], ids=["token", "sample"])
@pytest.mark.parametrize("counts", list(OPENRLHF_COUNTS))
@pytest.mark.parametrize("clip", [dict(), dict(clip_eps_low=0.1, clip_eps_high=0.28, dual_clip=3.0)],
                         ids=["symmetric", "clip-higher-dual"])  # fmt: skip
@pytest.mark.parametrize("mask_kind", ["gaps", "empty-row"])
def test_openrlhf_policy_and_value_loss(openrlhf, dtype, token_level, counts, clip, mask_kind):
    """PolicyLoss and ValueLoss modules as OpenRLHF's actor and critic build and call them:
    loss, metrics (clip ratio, ppo_kl; the importance-correction slots None), gradients."""
    from openrlhf.models.loss import PolicyLoss, ValueLoss

    _, _, original, calls = openrlhf
    logp, old, adv, vpred, mask = _inputs(dtype, mask_kind, seed=11)
    mask = mask.bool()  # (OpenRLHF's action masks are bool)
    info, tol = OPENRLHF_COUNTS[counts], _tol(dtype)

    def run(forward, module, x, *others, wide=False):
        xs = _wide(dtype, x, *others) if wide else [x, *others]
        xg = xs[0].clone().requires_grad_(True)
        out = forward(module, xg, *xs[1:], action_mask=mask, **info)
        (out[0] if isinstance(out, tuple) else out).backward()
        return out, xg.grad

    policy = PolicyLoss(**clip, token_level_loss=token_level)
    (got, got_grad), (want, want_grad) = (run(PolicyLoss.forward, policy, logp, old, adv),
                                          run(original["PolicyLoss"], policy, logp, old, adv, wide=True))  # fmt: skip
    assert calls["ppo_policy_loss"] == 1 and len(got) == len(want) == 5 and got[3:] == want[3:] == (None, None)
    assert got[1].dtype == want[1].dtype == torch.float32  # OpenRLHF's clip ratio is float32 at every input dtype
    if dtype == torch.float32:
        assert [t.dtype for t in got[:3]] == [t.dtype for t in want[:3]]
    _close(got[:3], want[:3], tol)
    _close(got_grad, want_grad, tol)

    value = ValueLoss(0.2, token_level_loss=token_level)
    (got, got_grad), (want, want_grad) = (run(ValueLoss.forward, value, vpred, old, adv),
                                          run(original["ValueLoss"], value, vpred, old, adv, wide=True))  # fmt: skip
    assert calls["ppo_value_loss"] == 1
    if dtype == torch.float32:
        assert got.dtype == want.dtype
    _close(got, want, tol)
    _close(got_grad, want_grad, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("counts", list(OPENRLHF_COUNTS))
@pytest.mark.parametrize("clip", [dict(clip_eps_low=0.05, clip_eps_high=0.06),
                                  dict(clip_eps_low=0.03, clip_eps_high=0.03, dual_clip=1.5)],
                         ids=["clip-higher", "dual"])  # fmt: skip
@pytest.mark.parametrize("mask_kind", ["gaps", "empty-row"])
def test_openrlhf_gspo_policy_loss(openrlhf, dtype, counts, clip, mask_kind):
    """PolicyLoss(policy_loss_type="gspo") with GRPO's advantages (one a sequence) on the op's
    sequence level: OpenRLHF's loss, metrics and gradient (its ratio's gradient goes through the
    sequence's mean log-ratio, the op's to each token: the same with one advantage a sequence)."""
    from openrlhf.models.loss import PolicyLoss

    _, _, original, calls = openrlhf
    logp, old, adv, _, mask = _inputs(dtype, mask_kind, seed=13)
    mask, adv = mask.bool(), adv[:, :1].expand_as(adv).contiguous()
    info, tol = OPENRLHF_COUNTS[counts], _tol(dtype)
    module = PolicyLoss(**clip, policy_loss_type="gspo")

    def run(forward, x, *others, wide=False):
        xs = _wide(dtype, x, *others) if wide else [x, *others]
        xg = xs[0].clone().requires_grad_(True)
        out = forward(module, xg, *xs[1:], action_mask=mask, **info)
        out[0].backward()
        return out, xg.grad

    (got, got_grad), (want, want_grad) = (run(PolicyLoss.forward, logp, old, adv),
                                          run(original["PolicyLoss"], logp, old, adv, wide=True))  # fmt: skip
    assert calls["ppo_policy_loss"] == 1 and got[3:] == want[3:] == (None, None)
    assert 0 < float(want[1]) < 1  # some sequences clip, some not
    _close(got[:3], want[:3], tol)
    _close(got_grad, want_grad, tol)


def test_openrlhf_losses_empty_and_uncovered(openrlhf):
    """A micro-batch without a valid token gives OpenRLHF's NaN (0 / 0) loss and metrics, with
    a gradient of 0 (OpenRLHF's is NaN); a GSPO loss stays OpenRLHF's; an unclipped value loss
    (clip_eps None) runs on the op."""
    from openrlhf.models.loss import PolicyLoss, ValueLoss

    _, _, original, calls = openrlhf
    logp, old, adv, vpred, _ = _inputs(torch.float32, "ones", seed=12)
    empty = torch.zeros_like(logp, dtype=torch.bool)
    for token_level in (True, False):
        module = PolicyLoss(token_level_loss=token_level)
        x = logp.clone().requires_grad_(True)
        got = PolicyLoss.forward(module, x, old, adv, action_mask=empty)
        want = original["PolicyLoss"](module, logp, old, adv, action_mask=empty)
        for g, w in zip(got[:3], want[:3], strict=True):
            torch.testing.assert_close(g, w, equal_nan=True)
        got[0].backward()
        assert torch.equal(x.grad, torch.zeros_like(logp))
    assert calls["ppo_policy_loss"] == 2
    gspo = PolicyLoss(policy_loss_type="gspo")
    torch.testing.assert_close(PolicyLoss.forward(gspo, logp, old, adv, action_mask=empty | True)[0],
                               original["PolicyLoss"](gspo, logp, old, adv, action_mask=empty | True)[0])  # fmt: skip
    assert calls["ppo_policy_loss"] == 2  # GSPO with per-token advantages stays OpenRLHF's
    data = adv.clone().requires_grad_(True)  # advantages that require grad: OpenRLHF differentiates them
    got = PolicyLoss.forward(PolicyLoss(), logp, old, data, action_mask=~empty)[0]
    got.backward()
    assert calls["ppo_policy_loss"] == 2 and data.grad is not None
    unclipped = ValueLoss(None)
    _close(ValueLoss.forward(unclipped, vpred, old, adv, action_mask=~empty),
           original["ValueLoss"](unclipped, vpred, old, adv, action_mask=~empty), _tol(torch.float32))  # fmt: skip
    assert calls["ppo_value_loss"] == 1
    # bf16 losses with a float32, bool or float64 mask: OpenRLHF's dtypes (the mask's product promotes)
    for token_level, mask in itertools.product((True, False), (~empty * 1.0, ~empty, (~empty).double())):
        module = PolicyLoss(token_level_loss=token_level)
        args = [t.bfloat16() for t in (logp, old, adv)]
        got = PolicyLoss.forward(module, *args, action_mask=mask)[:3]
        want = original["PolicyLoss"](module, *args, action_mask=mask)[:3]
        assert [t.dtype for t in got] == [t.dtype for t in want], (token_level, mask.dtype)
        assert ValueLoss.forward(ValueLoss(0.2), *args, action_mask=mask).dtype == original["ValueLoss"](
            ValueLoss(0.2), *args, action_mask=mask).dtype
    used = calls["ppo_policy_loss"]
    flat = [t.flatten() for t in (logp, old, adv)]  # 1-D: OpenRLHF's arithmetic takes it, the ops' layout is [B, T]
    module = PolicyLoss()
    _close(PolicyLoss.forward(module, *flat, action_mask=~empty.flatten())[:3],
           original["PolicyLoss"](module, *flat, action_mask=~empty.flatten())[:3], _tol(torch.float32))  # fmt: skip
    assert calls["ppo_policy_loss"] == used
