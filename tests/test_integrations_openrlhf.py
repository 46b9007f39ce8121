"""rlhf_kernels.integrations.openrlhf against a stand-in OpenRLHF package.

OpenRLHF is not installed here (it needs ray, deepspeed, vllm ...), so these tests build
the modules the patch touches with plain implementations of OpenRLHF's semantics, written
out from its documented behaviour: the k1 / k2 / k3 KL estimators (float32, clamped to
+-10 as current releases do), log-probs from logits with the temperature divided into the
logits in place, and GAE that zeroes masked positions and runs the plain recursion. The
patched functions must give their results, leave OpenRLHF's own function to the calls
they do not cover, and put everything back on unpatch.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import counted

from rlhf_kernels.integrations import openrlhf as rk_openrlhf

CALLS: dict[str, int] = {}


_counted = counted(CALLS)


# Which estimators the stand-in clamps to +-10 (OpenRLHF 0.11: all of them; releases differ)
KL_CLAMP = {"k1": True, "k2": True, "k3": True}


@_counted
def compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1"):
    x = log_probs.float() - log_probs_base.float()
    if kl_estimator == "k1":
        kl = x
    elif kl_estimator == "k2":
        kl = x**2 / 2
    elif kl_estimator == "k3":
        kl = torch.exp(-x) - 1 + x
    else:
        raise ValueError(kl_estimator)
    return kl.clamp(min=-10, max=10) if KL_CLAMP[kl_estimator] else kl


@_counted
def log_probs_from_logits(logits, labels, temperature=1.0):
    if temperature != 1.0:
        logits.div_(temperature)
    out = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return out.to(logits.dtype)


class RemoteExperienceMaker:
    __module__ = "openrlhf.trainer.ppo_utils.experience_maker"  # where OpenRLHF defines it

    @torch.no_grad()
    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        CALLS["get_advantages_and_returns"] = CALLS.get("get_advantages_and_returns", 0) + 1
        if action_mask is not None:
            values = values * action_mask
            rewards = rewards * action_mask
        last = 0
        out = []
        T = rewards.shape[1]
        for t in reversed(range(T)):
            next_value = values[:, t + 1] if t < T - 1 else 0.0
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            last = delta + gamma * lambd * last
            out.append(last)
        advantages = torch.stack(out[::-1], dim=1)
        return advantages.detach(), advantages + values


ORIGINAL_GAE = RemoteExperienceMaker.__dict__["get_advantages_and_returns"]


@pytest.fixture
def fake_openrlhf(monkeypatch):
    CALLS.clear()
    utils = ModuleType("openrlhf.models.utils")
    utils.compute_approx_kl = compute_approx_kl
    utils.log_probs_from_logits = log_probs_from_logits
    maker = ModuleType("openrlhf.trainer.ppo_utils.experience_maker")
    maker.RemoteExperienceMaker = RemoteExperienceMaker
    maker.compute_approx_kl = compute_approx_kl  # from-import copies, as OpenRLHF's modules hold them
    actor = ModuleType("openrlhf.trainer.ppo_actor")
    actor.compute_approx_kl = compute_approx_kl
    names = ["openrlhf", "openrlhf.models", "openrlhf.trainer", "openrlhf.trainer.ppo_utils"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    for module in (utils, maker, actor):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    yield SimpleNamespace(utils=utils, maker=maker, actor=actor)
    rk_openrlhf.unpatch()
    assert RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is ORIGINAL_GAE


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def _data(seed=0, B=4, T=10, V=41):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False
    return SimpleNamespace(
        logp=torch.randn(B, T, generator=g) * 0.5 - 3, base=torch.randn(B, T, generator=g) * 0.5 - 3,
        values=torch.randn(B, T, generator=g), rewards=torch.randn(B, T, generator=g), mask=mask,
        logits=torch.randn(B, T, V, generator=g) * 3, labels=torch.randint(0, V, (B, T), generator=g),
    )  # fmt: skip


def test_patch_reaches_copies_and_methods_and_unpatch_restores(fake_openrlhf):
    locations = rk_openrlhf.patch()
    for where in ("openrlhf.models.utils.compute_approx_kl", "openrlhf.trainer.ppo_actor.compute_approx_kl",
                  "openrlhf.trainer.ppo_utils.experience_maker.compute_approx_kl",
                  "openrlhf.models.utils.log_probs_from_logits",
                  "openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker.get_advantages_and_returns"):
        assert where in locations, (where, locations)  # fmt: skip
    assert fake_openrlhf.actor.compute_approx_kl is fake_openrlhf.utils.compute_approx_kl is not compute_approx_kl
    assert RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is not ORIGINAL_GAE
    assert rk_openrlhf.patch() == locations
    assert sorted(rk_openrlhf.unpatch()) == sorted(locations) and not rk_openrlhf.is_patched()
    assert fake_openrlhf.actor.compute_approx_kl is compute_approx_kl
    assert RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is ORIGINAL_GAE


def test_results_match_openrlhf(fake_openrlhf, cpu_backend):
    x = _data()
    kl_want = {k: compute_approx_kl(x.logp, x.base, kl_estimator=k) for k in ("k1", "k2", "k3")}
    y = x.logits.clone().requires_grad_(True)
    lp_want = log_probs_from_logits(y * 1.0, x.labels, temperature=0.7)
    lp_want.sum().backward()
    gae_want = RemoteExperienceMaker().get_advantages_and_returns(x.values, x.rewards, x.mask, 0.99, 0.95)
    gae_nomask = RemoteExperienceMaker().get_advantages_and_returns(x.values, x.rewards, None, 1.0, 0.9)
    rk_openrlhf.patch(cpu_backend)
    CALLS.clear()
    for k, want in kl_want.items():
        got = fake_openrlhf.actor.compute_approx_kl(x.logp, x.base, kl_estimator=k)
        assert got.dtype == torch.float32
        _close(got, want)
    z = x.logits.clone().requires_grad_(True)
    scaled = z * 1.0
    got = fake_openrlhf.utils.log_probs_from_logits(scaled, x.labels, temperature=0.7)
    _close(scaled, x.logits / 0.7)  # divided in place, as OpenRLHF does
    _close(got, lp_want, 1e-5)
    got.sum().backward()
    _close(z.grad, y.grad, 1e-5)
    for (args, want) in (((x.values, x.rewards, x.mask, 0.99, 0.95), gae_want),
                         ((x.values, x.rewards, None, 1.0, 0.9), gae_nomask)):  # fmt: skip
        got = RemoteExperienceMaker().get_advantages_and_returns(*args)
        for a, b in zip(got, want, strict=True):
            _close(a, b, 1e-5)
    assert CALLS == {}


def test_uncovered_calls_go_to_openrlhf(fake_openrlhf):
    x = _data(seed=1)
    rk_openrlhf.patch()
    CALLS.clear()
    with pytest.raises(ValueError):
        fake_openrlhf.utils.compute_approx_kl(x.logp, x.base, kl_estimator="k4")
    RemoteExperienceMaker().get_advantages_and_returns(x.values, x.rewards, x.mask.float() * 0.5, 0.99, 0.95)
    RemoteExperienceMaker().get_advantages_and_returns(x.values, x.rewards, x.mask, 1.5, 0.95)
    assert CALLS == {"compute_approx_kl": 1, "get_advantages_and_returns": 2}


@pytest.mark.parametrize("unclamped", [(), ("k2",), ("k3",)], ids=["all-clamped", "k2-unclamped", "k3-unclamped"])
def test_kl_clamp_follows_the_release(fake_openrlhf, monkeypatch, unclamped):
    """Log-ratios past the +-10 clamp: the patch asked the installed function once which
    estimators it clamps and does the same without looking at the values; where it cannot
    tell (here: an unclamped k3, which the op clamps) such values go to OpenRLHF."""
    for name in unclamped:
        monkeypatch.setitem(KL_CLAMP, name, False)
    x = _data(seed=2)
    rk_openrlhf.patch()
    for estimator in ("k1", "k2", "k3"):
        for shift in (0.0, 30.0, -30.0):
            logp = (x.logp + shift).requires_grad_(True)
            want_logp = logp.detach().clone().requires_grad_(True)
            CALLS.clear()
            got = fake_openrlhf.utils.compute_approx_kl(logp, x.base, kl_estimator=estimator)
            went = CALLS.get("compute_approx_kl", 0)
            want = compute_approx_kl(want_logp, x.base, kl_estimator=estimator)
            _close(got, want, 1e-5)
            got.sum().backward()
            want.sum().backward()
            _close(logp.grad, want_logp.grad, 1e-5)
            far = bool((want.abs() >= 10).any()) if estimator == "k3" else shift != 0
            assert went == int(estimator == "k3" and "k3" in unclamped and far)


def test_signature_mismatch_changes_nothing(fake_openrlhf):
    def get_advantages_and_returns(self, rewards, values, action_mask, gamma, lambd):  # reordered
        raise AssertionError("not to be called")

    RemoteExperienceMaker.get_advantages_and_returns = get_advantages_and_returns
    try:
        with pytest.raises(RuntimeError, match="get_advantages_and_returns"):
            rk_openrlhf.patch()
        assert not rk_openrlhf.is_patched()
        assert fake_openrlhf.utils.compute_approx_kl is compute_approx_kl  # checked before, swapped never
    finally:
        RemoteExperienceMaker.get_advantages_and_returns = ORIGINAL_GAE


def test_missing_experience_maker_warns(fake_openrlhf, monkeypatch):
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ppo_utils.experience_maker", None)  # import fails
    with pytest.warns(UserWarning, match="GAE is not patched"):
        locations = rk_openrlhf.patch()
    assert "openrlhf.models.utils.compute_approx_kl" in locations
    assert RemoteExperienceMaker.__dict__["get_advantages_and_returns"] is ORIGINAL_GAE


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_dtypes_match_openrlhf(fake_openrlhf, dtype, mask_dtype):
    """Output dtypes as OpenRLHF's arithmetic gives them, for its mask and value dtypes."""
    x = _data(seed=2)
    values, rewards, mask = x.values.to(dtype), x.rewards.to(dtype), x.mask.to(mask_dtype)
    logits = x.logits.to(dtype)
    want = [RemoteExperienceMaker().get_advantages_and_returns(values, rewards, mask, 0.99, 0.95),
            (log_probs_from_logits(logits.clone(), x.labels),),
            (compute_approx_kl(x.logp.to(dtype), x.base.to(dtype), kl_estimator="k3"),)]  # fmt: skip
    rk_openrlhf.patch()
    CALLS.clear()
    got = [RemoteExperienceMaker().get_advantages_and_returns(values, rewards, mask, 0.99, 0.95),
           (fake_openrlhf.utils.log_probs_from_logits(logits.clone(), x.labels),),
           (fake_openrlhf.utils.compute_approx_kl(x.logp.to(dtype), x.base.to(dtype), kl_estimator="k3"),)]  # fmt: skip
    assert CALLS == {}
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.dtype == b.dtype
            _close(a, b, tol)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


class PolicyLoss:
    """A PolicyLoss whose forward returns four values (an older layout than 0.11's five)."""

    __module__ = "openrlhf.models.loss"

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True):
        self.clip_eps_low, self.clip_eps_high, self.dual_clip = clip_eps_low, clip_eps_high, dual_clip
        self.token_level_loss = token_level_loss

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None):
        ratio = (log_probs - old_log_probs).clamp(-20, 20).exp()
        surr1 = ratio * advantages
        surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
        loss = _masked_mean(-torch.min(surr1, surr2), action_mask)
        return loss, _masked_mean((surr2 < surr1).float(), action_mask), _masked_mean(old_log_probs - log_probs,
                                                                                     action_mask), None  # fmt: skip


class ValueLoss:
    """A ValueLoss without the global counts (an older signature), per token or per sequence."""

    __module__ = "openrlhf.models.loss"

    def __init__(self, clip_eps=None, token_level_loss=True):
        self.clip_eps, self.token_level_loss = clip_eps, token_level_loss

    def forward(self, values, old_values, returns, action_mask=None):
        loss = (values - returns) ** 2
        if self.clip_eps is not None:
            clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
            loss = torch.max(loss, (clipped - returns) ** 2)
        if self.token_level_loss:
            return 0.5 * _masked_mean(loss, action_mask)
        counts = action_mask.sum(-1)
        seq = (loss * action_mask).sum(-1) / (counts + 1e-8)
        return 0.5 * _masked_mean(seq, (counts > 0).float())


ORIGINAL_LOSSES = (PolicyLoss.forward, ValueLoss.forward)


def test_losses_only_where_the_probe_agrees(fake_openrlhf, monkeypatch, cpu_backend):
    """The loss modules are replaced only where a probe call gives the release's own results,
    return layout included: a PolicyLoss with another layout stays OpenRLHF's, a ValueLoss
    without the global counts runs on the op (per token and per sequence) and is restored."""
    loss = ModuleType("openrlhf.models.loss")
    loss.PolicyLoss, loss.ValueLoss = PolicyLoss, ValueLoss
    monkeypatch.setitem(sys.modules, loss.__name__, loss)
    calls = {"ppo_value_loss": 0}
    op = rk_openrlhf.ppo_value_loss

    def counted(*args, **kwargs):
        calls["ppo_value_loss"] += 1
        return op(*args, **kwargs)

    monkeypatch.setattr(rk_openrlhf, "ppo_value_loss", counted)
    locations = rk_openrlhf.patch(cpu_backend)
    calls["ppo_value_loss"] = 0  # (the probe's calls)
    assert "openrlhf.models.loss.ValueLoss.forward" in locations
    assert "openrlhf.models.loss.PolicyLoss.forward" not in locations
    assert PolicyLoss.forward is ORIGINAL_LOSSES[0] and ValueLoss.forward is not ORIGINAL_LOSSES[1]
    x = _data(seed=4)
    for token_level in (True, False):
        module = ValueLoss(0.2, token_level_loss=token_level)
        got = module.forward(x.values, x.base, x.rewards, action_mask=x.mask)
        want = ORIGINAL_LOSSES[1](module, x.values, x.base, x.rewards, action_mask=x.mask)
        _close(got, want, 1e-5)
    assert calls["ppo_value_loss"] == 2
    rk_openrlhf.unpatch()
    assert ValueLoss.forward is ORIGINAL_LOSSES[1]
