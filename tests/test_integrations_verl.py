"""rlhf_kernels.integrations.verl against a stand-in verl package.

verl itself is not installed here (it needs ray, omegaconf, tensordict ...), so these tests
build the modules the patch touches (``verl.trainer.ppo.core_algos``,
``verl.utils.torch_functional``, and an actor module holding ``from ... import`` copies)
with plain float64 implementations of verl's semantics, written out from its documented
behaviour: GAE that skips masked positions and then whitens, GRPO over equal ``index``
values, the clipped / dual-clipped policy loss with its aggregation modes, the clipped
value loss, the KL estimators, log-probs and entropy from logits. The patched functions
must give their results, leave verl's own function to the calls they do not cover, and
put everything back on unpatch.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import counted

from rlhf_kernels.integrations import verl as rk_verl

CALLS: dict[str, int] = {}


_counted = counted(CALLS)


# --- verl's semantics, plainly --------------------------------------------------------------------
def masked_mean(x, m):
    return (x * m).sum() / m.sum().clamp(min=1)


# verl 0.7 and earlier sum the sequences for seq-mean-token-sum-norm, 0.8 on average them
SUM_NORM = {"rule": "mean"}


def agg_loss(loss, m, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """With verl 0.8's global-batch arguments: dp_size ranks, the global batch's valid tokens
    and sequences, a constant in place of T."""
    m = m.to(loss.dtype)
    if mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = m.sum()
        return (loss * m).sum() / batch_num_tokens * dp_size
    if mode == "token-sum":
        return (loss * m).sum() * dp_size
    rows = [(loss[i] * m[i]).sum() / (m[i].sum() if mode == "seq-mean-token-mean" else 1)
            for i in range(loss.shape[0]) if m[i].sum() > 0]  # fmt: skip
    horizon = loss.shape[-1] if loss_scale_factor is None else loss_scale_factor
    if mode == "seq-mean-token-sum-norm" and SUM_NORM["rule"] == "sum":
        return sum(rows) / horizon
    if mode not in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        raise NotImplementedError(mode)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = len(rows)
    loss = sum(rows) / global_batch_size * dp_size
    return loss / horizon if mode == "seq-mean-token-sum-norm" else loss


@_counted
def masked_whiten(values, mask, shift_mean=True):
    m = mask.to(values.dtype)
    n = m.sum()
    if n < 2:
        raise ValueError("At least two valid values are needed")
    mean = (values * m).sum() / n
    var = (((values - mean) ** 2) * m).sum() / n * (n / (n - 1))
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


@_counted
def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    with torch.no_grad():
        next_value = torch.zeros_like(values[:, 0])
        last = torch.zeros_like(values[:, 0])
        out = []
        for t in reversed(range(values.shape[1])):
            m = response_mask[:, t].to(values.dtype)
            delta = token_level_rewards[:, t] + gamma * next_value - values[:, t]
            candidate = delta + gamma * lam * last
            next_value = values[:, t] * m + (1 - m) * next_value
            last = candidate * m + (1 - m) * last
            out.append(last)
        advantages = torch.stack(out[::-1], dim=1)
        returns = advantages + values
        return masked_whiten(advantages, response_mask), returns


@_counted
def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True, config=None):  # fmt: skip
    scores = token_level_rewards.sum(-1)
    groups: dict = {}
    for i, key in enumerate(index):
        groups.setdefault(key, []).append(i)
    out = torch.empty_like(scores)
    for members in groups.values():
        s = scores[members]
        mean, std = (s.mean(), s.std()) if len(members) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        out[members] = (s - mean) / (std + epsilon) if norm_adv_by_std_in_grpo else s - mean
    adv = out.unsqueeze(-1) * response_mask
    return adv, adv


def _pg(old, logp, adv, mask, low, high, c, mode, weights=None, **global_batch):
    d = torch.clamp(logp - old, -20, 20)
    ratio = torch.exp(d)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    c1 = torch.maximum(l1, l2)
    l3 = -adv * c
    loss = torch.where(adv < 0, torch.minimum(l3, c1), c1)
    m = mask.to(logp.dtype)
    agg = agg_loss(loss * (m if weights is None else weights.to(m.dtype)), mask, mode, **global_batch)
    return (agg, masked_mean((l2 > l1).to(m.dtype), m), masked_mean(-d, m),
            masked_mean(((c1 > l3) & (adv < 0)).to(m.dtype), m))  # fmt: skip


@_counted
def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):  # fmt: skip
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _pg(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode)


@_counted
def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                       dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):  # fmt: skip
    vclip = torch.clamp(vpreds, values - cliprange_value, values + cliprange_value)
    l1, l2 = (vpreds - returns) ** 2, (vclip - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(l1, l2), response_mask, loss_agg_mode, dp_size, batch_num_tokens,
                          global_batch_size, loss_scale_factor)  # fmt: skip
    return loss, masked_mean((l2 > l1).to(vpreds.dtype), response_mask.to(vpreds.dtype))


@_counted
def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):  # fmt: skip
    """verl 0.9's registry loss: clip ranges from the actor config, (loss, metrics of floats)."""
    low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
    weights = response_mask if rollout_is_weights is None else response_mask * rollout_is_weights
    pg = _pg(old_log_prob, log_prob, advantages, response_mask, low, high, config.get("clip_ratio_c", 3.0),
             loss_agg_mode, weights=weights, **config.global_batch_info)  # fmt: skip
    return pg[0], dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"),
                           (v.item() for v in pg[1:]), strict=True))  # fmt: skip


class ActorConfig(SimpleNamespace):
    def get(self, key, default=None):
        return getattr(self, key, default)


@_counted
def kl_penalty(logprob, ref_logprob, kl_penalty):
    x = logprob - ref_logprob
    if kl_penalty in ("kl", "k1"):
        return x
    if kl_penalty == "abs":
        return x.abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * x**2
    if kl_penalty in ("low_var_kl", "k3"):
        k = torch.clamp(-x, -20, 20)
        return torch.clamp(torch.exp(k) - k - 1, -10, 10)
    if kl_penalty.endswith("+"):
        return kl_penalty_forward_plus(logprob, ref_logprob, kl_penalty[:-1])
    raise NotImplementedError(kl_penalty)


def kl_penalty_forward_plus(logprob, ref_logprob, kind):
    k2 = 0.5 * (logprob - ref_logprob) ** 2
    return k2 - k2.detach() + kl_penalty(logprob, ref_logprob, kind).detach()


@_counted
def logprobs_from_logits(logits, labels, inplace_backward=True):
    return torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()


@_counted
def entropy_from_logits(logits):
    z = logits.double()
    return (torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)).to(logits.dtype)


@pytest.fixture
def fake_verl(monkeypatch):
    """The verl modules the patch reads, as sys.modules entries (removed afterwards)."""
    CALLS.clear()
    core = ModuleType("verl.trainer.ppo.core_algos")
    for fn in (compute_gae_advantage_return, compute_grpo_outcome_advantage, compute_policy_loss,
               compute_value_loss, kl_penalty):  # fmt: skip
        setattr(core, fn.__name__, fn)
    core.ADV_ESTIMATOR_REGISTRY = {"gae": compute_gae_advantage_return}  # as verl's register_adv_est fills it
    core.compute_policy_loss_vanilla = compute_policy_loss_vanilla
    core.POLICY_LOSS_REGISTRY = {"vanilla": compute_policy_loss_vanilla}
    core.agg_loss = agg_loss
    functional = ModuleType("verl.utils.torch_functional")
    for fn in (logprobs_from_logits, entropy_from_logits, masked_whiten):
        setattr(functional, fn.__name__, fn)
    actor = ModuleType("verl.workers.actor.dp_actor")  # holds from-import copies, as verl's actor does
    actor.kl_penalty = kl_penalty
    actor.logprobs_from_logits = logprobs_from_logits
    actor.compute_policy_loss = compute_policy_loss
    names = ["verl", "verl.trainer", "verl.trainer.ppo", "verl.utils", "verl.workers", "verl.workers.actor"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, ModuleType(name))
    for module in (core, functional, actor):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    yield SimpleNamespace(core=core, functional=functional, actor=actor)
    rk_verl.unpatch()


def _rollout(B=5, T=9, seed=0, dtype=torch.float64, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[:, -1] = 1
    if empty_row:
        mask[1] = 0  # a row with no valid token
    mask[2, :3] = 0  # a masked gap at the start
    old = r(B, T) * 0.5 - 2
    logp = old + r(B, T) * 0.3
    return SimpleNamespace(mask=mask, old=old, logp=logp, adv=r(B, T), rewards=r(B, T), values=r(B, T),
                           returns=r(B, T), vpreds=r(B, T))  # fmt: skip


def _close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)  # fmt: skip


def test_patch_reaches_every_copy_and_registry_and_unpatch_restores(fake_verl):
    originals = {"core": dict(vars(fake_verl.core)), "actor": dict(vars(fake_verl.actor))}
    locations = rk_verl.patch()
    assert rk_verl.is_patched()
    for where in ("verl.trainer.ppo.core_algos.compute_gae_advantage_return",
                  "verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY['gae']",
                  "verl.workers.actor.dp_actor.kl_penalty", "verl.workers.actor.dp_actor.logprobs_from_logits",
                  "verl.workers.actor.dp_actor.compute_policy_loss", "verl.utils.torch_functional.masked_whiten"):
        assert where in locations, (where, locations)  # fmt: skip
    assert fake_verl.core.ADV_ESTIMATOR_REGISTRY["gae"] is fake_verl.core.compute_gae_advantage_return
    assert fake_verl.core.compute_gae_advantage_return is not compute_gae_advantage_return
    assert fake_verl.actor.kl_penalty is fake_verl.core.kl_penalty is not kl_penalty
    assert rk_verl.patch() == locations  # idempotent
    late = ModuleType("verl.late")  # imported after the patch, with its own copy of verl's function
    late.kl_penalty = kl_penalty
    sys.modules["verl.late"] = late
    try:
        assert "verl.late.kl_penalty" in rk_verl.patch() and late.kl_penalty is fake_verl.core.kl_penalty
        assert "verl.late.kl_penalty" in rk_verl.unpatch() and late.kl_penalty is kl_penalty
    finally:
        del sys.modules["verl.late"]
    locations = rk_verl.patch()
    assert sorted(rk_verl.unpatch()) == sorted(locations)
    assert not rk_verl.is_patched() and rk_verl.unpatch() == []
    assert fake_verl.core.ADV_ESTIMATOR_REGISTRY["gae"] is compute_gae_advantage_return
    for name in ("core", "actor"):
        for attr, value in vars(getattr(fake_verl, name)).items():
            if callable(value):
                assert value is originals[name][attr], attr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_advantages_match_verl(fake_verl, cpu_backend, dtype):
    x = _rollout(dtype=dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    want = compute_gae_advantage_return(x.rewards, x.values, x.mask, gamma=0.99, lam=0.95)
    rk_verl.patch(cpu_backend)
    CALLS.clear()
    got = fake_verl.core.ADV_ESTIMATOR_REGISTRY["gae"](x.rewards, x.values, x.mask, gamma=0.99, lam=0.95)
    assert CALLS == {}
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        _close(a, b, tol)
    uids = np.array(["a", "b", "a", "c", "b"], dtype=object)  # c: a group of one
    for norm in (True, False):
        want = compute_grpo_outcome_advantage(x.rewards, x.mask, uids, norm_adv_by_std_in_grpo=norm)
        CALLS.clear()
        got = fake_verl.core.compute_grpo_outcome_advantage(x.rewards, x.mask, uids, norm_adv_by_std_in_grpo=norm)
        assert CALLS == {}
        for a, b in zip(got, want, strict=True):
            # (verl's group of one divides by 1 + eps formed in float32: 5e-8 relative apart)
            _close(a, b, max(tol, 1e-7))


@pytest.mark.parametrize(("mode", "rule"), [
    ("token-mean", "mean"), ("seq-mean-token-sum", "mean"), ("seq-mean-token-mean", "mean"), ("token-sum", "mean"),
    ("seq-mean-token-sum-norm", "mean"), ("seq-mean-token-sum-norm", "sum"),  # verl 0.8 on / 0.7 and earlier
])  # fmt: skip
def test_losses_match_verl_with_gradients(fake_verl, cpu_backend, monkeypatch, mode, rule):
    monkeypatch.setitem(SUM_NORM, "rule", rule)  # the patch reads it from agg_loss when it patches
    x = _rollout(seed=1, empty_row=False)  # (with one, the seq-mean modes go to verl: test_uncovered_calls_go_to_verl)

    def run(fn, **kw):
        logp = x.logp.clone().requires_grad_(True)
        out = fn(x.old, logp, x.adv, x.mask, cliprange=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
                 loss_agg_mode=mode, **kw)  # fmt: skip
        out[0].backward()
        return out, logp.grad

    want, want_grad = run(compute_policy_loss)
    rk_verl.patch(cpu_backend)
    CALLS.clear()
    got, got_grad = run(fake_verl.actor.compute_policy_loss)  # through the actor's from-import copy
    assert CALLS == {}
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    _close(got_grad, want_grad)

    vpreds = x.vpreds.clone().requires_grad_(True)
    want = compute_value_loss(vpreds, x.returns, x.values, x.mask, 0.3, mode)
    (want_grad,) = torch.autograd.grad(want[0], vpreds)
    CALLS.clear()
    got = fake_verl.core.compute_value_loss(vpreds, x.returns, x.values, x.mask, 0.3, mode)
    (got_grad,) = torch.autograd.grad(got[0], vpreds)
    assert CALLS == {}
    for a, b in zip(got, want, strict=True):
        _close(a, b)
    _close(got_grad, want_grad)


GLOBAL_BATCH = [{}, dict(dp_size=2, batch_num_tokens=60, global_batch_size=9),
                dict(dp_size=4, batch_num_tokens=100, global_batch_size=20, loss_scale_factor=32)]  # fmt: skip


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                                  "token-sum"])  # fmt: skip
@pytest.mark.parametrize("info", range(len(GLOBAL_BATCH)), ids=["local", "dp2", "dp4-norm"])
@pytest.mark.parametrize("rule", ["mean", "sum"])
def test_vanilla_loss_and_global_batch_match_verl(fake_verl, cpu_backend, monkeypatch, mode, info, rule):
    """The registry's vanilla loss (verl 0.9: clip ranges and global-batch sizes from the actor
    config, a metrics dict) and the value loss with the global-batch arguments a data-parallel
    actor passes, through the op: the plan (scale of token-sum / seq-mean-token-mean) the patch
    checked against the installed agg_loss; either seq-mean-token-sum-norm rule."""
    monkeypatch.setitem(SUM_NORM, "rule", rule)
    x = _rollout(seed=6, empty_row=False)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         global_batch_info=GLOBAL_BATCH[info])  # fmt: skip

    def run(fn):
        logp = x.logp.clone().requires_grad_(True)
        loss, metrics = fn(x.old, logp, x.adv, x.mask, mode, config)
        loss.backward()
        return loss, metrics, logp.grad

    want = run(compute_policy_loss_vanilla)
    want_value = compute_value_loss(x.vpreds, x.returns, x.values, x.mask, 0.3, mode, **GLOBAL_BATCH[info])
    rk_verl.patch(cpu_backend)
    CALLS.clear()
    got = run(fake_verl.core.POLICY_LOSS_REGISTRY["vanilla"])
    got_value = fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, x.mask, 0.3, mode,
                                                  **GLOBAL_BATCH[info])  # fmt: skip
    assert CALLS == {}
    assert fake_verl.core.compute_policy_loss_vanilla is fake_verl.core.POLICY_LOSS_REGISTRY["vanilla"]
    assert set(got[1]) == set(want[1]) and all(isinstance(v, float) for v in got[1].values())
    _close(got[0], want[0])
    _close([got[1][k] for k in sorted(want[1])], [want[1][k] for k in sorted(want[1])])
    _close(got[2], want[2])
    for a, b in zip(got_value, want_value, strict=True):
        _close(a, b)


def test_vanilla_loss_left_to_verl(fake_verl, cpu_backend):
    """Calls the vanilla replacement does not cover reach verl's function: rollout importance
    weights, global-batch entries the plan does not know, a config without the clip fields;
    and no replacement at all where the installed vanilla loss is another release's (a 4-tuple
    return, other parameters)."""
    x = _rollout(seed=7, empty_row=False)
    rk_verl.patch(cpu_backend)
    vanilla = fake_verl.core.POLICY_LOSS_REGISTRY["vanilla"]
    assert vanilla is not compute_policy_loss_vanilla
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, global_batch_info={})
    CALLS.clear()
    vanilla(x.old, x.logp, x.adv, x.mask, "token-mean", config, rollout_is_weights=torch.ones_like(x.logp))
    with pytest.raises(TypeError):  # (verl's agg_loss does not know it either)
        vanilla(x.old, x.logp, x.adv, x.mask, "token-mean",
                ActorConfig(**{**vars(config), "global_batch_info": {"dp_size": 2, "new_arg": 1}}))  # fmt: skip
    with pytest.raises(AttributeError):  # verl's own error for an incomplete config
        vanilla(x.old, x.logp, x.adv, x.mask, "token-mean", SimpleNamespace(global_batch_info={}))
    for info in ({"dp_size": 1.0}, {"dp_size": 2, "batch_num_tokens": 0, "global_batch_size": 0}):
        # a rank count that is not an int; zero global counts (verl divides by them: inf)
        vanilla(x.old, x.logp, x.adv, x.mask, "token-mean", ActorConfig(**{**vars(config), "global_batch_info": info}))
    empty = torch.zeros_like(x.mask)  # no valid token: verl's local means are 0 / 0 (the op's loss times NaN)
    out = vanilla(x.old, x.logp, x.adv, empty, "token-mean", config)
    assert out[0].isnan()
    assert CALLS == {"compute_policy_loss_vanilla": 5}
    rk_verl.unpatch()

    def four_tuple(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                   rollout_is_weights=None):  # fmt: skip
        loss, _ = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config)
        return loss, 0, 0, 0

    def older(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
              rollout_log_probs=None):  # fmt: skip
        return compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config)

    for other in (four_tuple, older):
        fake_verl.core.compute_policy_loss_vanilla = fake_verl.core.POLICY_LOSS_REGISTRY["vanilla"] = other
        rk_verl.patch(cpu_backend)
        assert fake_verl.core.POLICY_LOSS_REGISTRY["vanilla"] is other
        assert rk_verl.is_patched()  # the rest is patched
        rk_verl.unpatch()


@pytest.mark.parametrize("agg", ["missing", "other rule"])
def test_sum_norm_goes_to_verl_when_its_rule_is_unknown(fake_verl, cpu_backend, agg):
    if agg == "missing":
        del fake_verl.core.agg_loss
    else:  # a rule that is neither (e.g. empty sequences counted): 3 / 3 / 2 on the probe
        fake_verl.core.agg_loss = lambda loss, m, mode: (loss * m).sum() / loss.shape[0] / loss.shape[-1]
    x = _rollout(seed=1, empty_row=False)
    rk_verl.patch(cpu_backend)
    CALLS.clear()
    fake_verl.core.compute_policy_loss(x.old, x.logp, x.adv, x.mask, cliprange=0.2,
                                       loss_agg_mode="seq-mean-token-sum-norm")  # fmt: skip
    fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, x.mask, 0.3, "seq-mean-token-sum-norm")
    fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, x.mask, 0.3, "token-mean")  # still covered
    assert CALLS == {"compute_policy_loss": 1, "compute_value_loss": 1}


def test_kl_logprobs_entropy_whiten_match_verl(fake_verl, cpu_backend):
    x = _rollout(seed=2)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 37, generator=g, dtype=torch.float32) * 3
    labels = torch.randint(0, 37, (2, 6), generator=g)
    kinds = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
    y = logits.clone().requires_grad_(True)
    want = {"kl": [kl_penalty(x.logp, x.old, kind) for kind in kinds], "logprobs": logprobs_from_logits(y, labels),
            "entropy": entropy_from_logits(logits),
            "whiten": [masked_whiten(x.values, x.mask, shift) for shift in (True, False)]}  # fmt: skip
    want["logprobs"].sum().backward()
    rk_verl.patch(cpu_backend)
    CALLS.clear()
    for kind, w in zip(kinds, want["kl"], strict=True):
        _close(fake_verl.actor.kl_penalty(x.logp, x.old, kind), w)
    for inplace in (False, True):
        z = logits.clone().requires_grad_(True)
        zz = z.clone() if inplace else z  # the in-place backward writes the gradient into its input
        got = fake_verl.functional.logprobs_from_logits(zz, labels, inplace_backward=inplace)
        _close(got, want["logprobs"], 1e-5)
        got.sum().backward()
        _close(z.grad, y.grad, 1e-5)
    _close(fake_verl.functional.entropy_from_logits(logits), want["entropy"], 1e-5)
    for shift, w in zip((True, False), want["whiten"], strict=True):
        _close(fake_verl.functional.masked_whiten(x.values, x.mask, shift), w)
    assert CALLS == {}


def test_uncovered_calls_go_to_verl(fake_verl):
    x = _rollout(seed=4)
    rk_verl.patch()
    CALLS.clear()
    with pytest.raises(NotImplementedError):
        fake_verl.core.kl_penalty(x.logp, x.old, "full")
    plus = fake_verl.core.kl_penalty(x.logp, x.old, "k3+")  # verl's straight-through variant
    _close(plus, kl_penalty(x.logp, x.old, "k3"))
    with pytest.raises(NotImplementedError):  # a mode the ops lack: verl's own (here: not implemented either)
        fake_verl.core.compute_policy_loss(x.old, x.logp, x.adv, x.mask, cliprange=0.2,
                                           loss_agg_mode="token-mean-unbiased")  # fmt: skip
    with pytest.raises(ValueError, match="batch_num_tokens"):  # two ranks without the global count: verl's error
        fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, x.mask, 0.3, dp_size=2)
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean"):  # with a sequence that has no valid token
        fake_verl.core.compute_policy_loss(x.old, x.logp, x.adv, x.mask, cliprange=0.2, loss_agg_mode=mode)
    weights = x.mask * 0.5  # a float mask with weights: verl multiplies by them
    fake_verl.core.compute_policy_loss(x.old, x.logp, x.adv, weights, cliprange=0.2)
    fake_verl.core.compute_gae_advantage_return(x.rewards, x.values, weights, gamma=1.0, lam=0.95)
    fake_verl.core.compute_gae_advantage_return(x.rewards, x.values, x.mask, gamma=1.01, lam=0.95)
    fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, x.mask, -0.1)
    fake_verl.core.compute_grpo_outcome_advantage(x.rewards, x.mask, [(0, 1), (0, 2), (0, 1), (1, 1), (1, 1)])
    one = torch.zeros_like(x.mask)
    one[0, 0] = 1
    with pytest.raises(ValueError, match="two valid"):
        fake_verl.functional.masked_whiten(x.values, one)
    assert CALLS == {"kl_penalty": 4, "compute_policy_loss": 4, "compute_value_loss": 2, "masked_whiten": 3,
                     "compute_gae_advantage_return": 2, "compute_grpo_outcome_advantage": 1}  # fmt: skip


def test_signature_mismatch_changes_nothing(fake_verl):
    def compute_value_loss(vpreds, values, returns, response_mask, cliprange_value):  # reordered
        raise AssertionError("not to be called")

    fake_verl.core.compute_value_loss = compute_value_loss
    with pytest.raises(RuntimeError, match="compute_value_loss"):
        rk_verl.patch()
    assert not rk_verl.is_patched() and fake_verl.core.kl_penalty is kl_penalty


def test_patch_needs_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", None)
    with pytest.raises(ImportError, match="verl"):
        rk_verl.patch()
    assert not rk_verl.is_patched()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32, torch.float64], ids=str)
def test_mask_dtypes_of_zeros_and_ones_stay_covered(fake_verl, mask_dtype):
    """verl's response masks come as integers, floats or bools; 0/1 values in any of them are
    what the ops read, so those calls stay with the ops (and match verl)."""
    x = _rollout(seed=5, empty_row=False)
    mask = x.mask.to(mask_dtype)
    want = [compute_gae_advantage_return(x.rewards, x.values, mask, 0.99, 0.95),
            compute_policy_loss(x.old, x.logp, x.adv, mask, cliprange=0.2),
            compute_value_loss(x.vpreds, x.returns, x.values, mask, 0.3)]  # fmt: skip
    rk_verl.patch()
    CALLS.clear()
    got = [fake_verl.core.compute_gae_advantage_return(x.rewards, x.values, mask, 0.99, 0.95),
           fake_verl.core.compute_policy_loss(x.old, x.logp, x.adv, mask, cliprange=0.2),
           fake_verl.core.compute_value_loss(x.vpreds, x.returns, x.values, mask, 0.3)]  # fmt: skip
    assert CALLS == {}
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            _close(a, b)
