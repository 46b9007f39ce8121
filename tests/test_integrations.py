"""rlhf_kernels.integrations.trl: the patched TRL helpers match TRL's own, patch/unpatch
are idempotent and complete, and TRL training steps give the same losses either way."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch

try:
    import trl  # noqa: F401
    import trl.trainer.utils as trl_utils
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"trl is not importable ({exc}); pip install trl to run the TRL integration tests",
                allow_module_level=True)  # fmt: skip

from rlhf_kernels import native  # noqa: E402
from rlhf_kernels.integrations import trl as rk_trl  # noqa: E402
from rlhf_kernels.trainers import toy  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Tolerances per logits dtype, against TRL's own function on the same input. float32:
# both accumulate in float32 (different summation order). bfloat16: TRL's fallback
# returns bfloat16 rounded from a float32-accumulated log_softmax and so does the op,
# from its own float32 result; the two roundings can land one bf16 step apart
# (2**-7 relative), and TRL divides by the temperature in bfloat16 first.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2e-2),
       torch.float64: dict(rtol=1e-10, atol=1e-10)}  # fmt: skip


@pytest.fixture
def patched():
    rk_trl.patch()
    yield
    rk_trl.unpatch()


def _inputs(dtype, shape=(3, 7, 50), temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    row_mask = torch.rand(shape[:-1], generator=g) > 0.3
    return logits, index, row_mask


def _run(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    sum(
        (o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o.requires_grad
    ).backward()  # fmt: skip
    return outs, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_row_mask", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 50), (11, 33)], ids=["BTV", "NV"])
def test_selective_log_softmax_matches_trl(dtype, temperature, use_row_mask, shape):
    original = trl_utils.selective_log_softmax
    logits, index, row_mask = _inputs(dtype, shape)
    kw = dict(temperature=temperature, row_mask=row_mask if use_row_mask else None)
    (want,), want_grad = _run(original, logits, index, **kw)
    with rk_trl.patched():
        patched_fn = trl_utils.selective_log_softmax
        assert patched_fn is not original
        (got,), got_grad = _run(patched_fn, logits, index, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])
    if use_row_mask:
        assert (got[~row_mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [128, 2])
def test_entropy_from_logits_matches_trl(dtype, chunk_size):
    original = trl_utils.entropy_from_logits
    logits, _, _ = _inputs(dtype, (2, 9, 40))
    (want,), want_grad = _run(original, logits, chunk_size=chunk_size)
    with rk_trl.patched():
        (got,), got_grad = _run(trl_utils.entropy_from_logits, logits, chunk_size=chunk_size)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_logprobs_and_entropy_match_trl(dtype, entropy_requires_grad):
    original = trl_utils.selective_log_softmax_and_entropy
    logits, index, row_mask = _inputs(dtype, (2, 9, 40))
    kw = dict(entropy_requires_grad=entropy_requires_grad, temperature=0.9, row_mask=row_mask)
    want, want_grad = _run(original, logits, index, **kw)
    with rk_trl.patched():
        got, got_grad = _run(trl_utils.selective_log_softmax_and_entropy, logits, index, **kw)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.requires_grad == w.requires_grad
        torch.testing.assert_close(g, w, **TOL[dtype])
    torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])


def test_uncovered_calls_go_to_trl(patched):
    logits, _, _ = _inputs(torch.float32, (2, 5, 30))
    top_k = torch.randint(0, 30, (2, 5, 3))  # a [..., K] index: TRL's own function
    want = torch.gather(logits.log_softmax(-1), -1, top_k)
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits, top_k), want)
    with pytest.raises(ValueError, match="temperature must be positive"):
        trl_utils.selective_log_softmax(logits, top_k[..., 0], temperature=0.0)
    # a temperature tensor and a row mask that only broadcasts: TRL's arithmetic takes them, so TRL runs
    index = top_k[..., 0]
    want = torch.gather((logits / 0.7).log_softmax(-1), -1, index[..., None])[..., 0]
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits, index, temperature=torch.tensor(0.7)), want)
    row = torch.tensor([True, False, True, True, False])
    unpatched = trl_utils.selective_log_softmax.__rlhf_kernels_original__
    torch.testing.assert_close(trl_utils.selective_log_softmax(logits, index, row_mask=row),
                               unpatched(logits, index, row_mask=row))  # fmt: skip


def test_padding_labels_are_not_ignored(patched):
    """TRL's helpers have no ignore index: -100 is not a label, so it raises (TRL's gather
    raises too) instead of quietly scoring 0."""
    logits, index, _ = _inputs(torch.float32, (2, 5, 30))
    index[0, 0] = -100
    with pytest.raises(ValueError, match="outside"):
        trl_utils.selective_log_softmax(logits, index)
    with pytest.raises((RuntimeError, IndexError)):
        trl_utils.selective_log_softmax.__rlhf_kernels_original__(logits, index)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_float_row_mask_and_int32_index(backend):
    """What TRL accepts: a 0/1 float row mask, an int32 index (label 0 included: it must not
    be taken for the patch's no-ignore sentinel)."""
    if backend == "native" and not native.available():
        pytest.skip("extension not built")
    original = trl_utils.selective_log_softmax
    logits, index, row_mask = _inputs(torch.float32, (2, 6, 30))
    index[:, 0] = 0
    want = original(logits, index, row_mask=row_mask)
    with rk_trl.patched(backend=backend):
        got = trl_utils.selective_log_softmax(logits, index.int(), row_mask=row_mask.float())
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert (got[:, 0][row_mask[:, 0]] != 0).all()


def test_nested_patched_keeps_the_outer_backend():
    rk_trl.patch(backend="torch")
    try:
        with rk_trl.patched(backend="native"):
            assert rk_trl._patcher.backend == "native"
        assert rk_trl.is_patched() and rk_trl._patcher.backend == "torch"
    finally:
        rk_trl.unpatch()


def test_patch_unpatch_are_idempotent_and_reach_importers():
    from trl.experimental.cpo import cpo_trainer  # a `from trl.trainer.utils import selective_log_softmax` copy

    original = trl_utils.selective_log_softmax
    assert cpo_trainer.selective_log_softmax is original
    first = rk_trl.patch()
    try:
        assert rk_trl.patch() == first and rk_trl.is_patched()
        assert "trl.experimental.cpo.cpo_trainer.selective_log_softmax" in first
        assert cpo_trainer.selective_log_softmax is trl_utils.selective_log_softmax is not original
        sys.modules.pop("trl.experimental.orpo.orpo_trainer", None)
        from trl.experimental.orpo import orpo_trainer  # imported after patch(): gets the replacement

        assert orpo_trainer.selective_log_softmax is trl_utils.selective_log_softmax
    finally:
        restored = rk_trl.unpatch()
    assert "trl.experimental.orpo.orpo_trainer.selective_log_softmax" in restored
    assert rk_trl.unpatch() == [] and not rk_trl.is_patched()
    for module in (trl_utils, cpo_trainer, orpo_trainer):
        assert module.selective_log_softmax is original


def test_clear_error_when_trl_has_other_helpers(monkeypatch):
    monkeypatch.delattr(trl_utils, "entropy_from_logits")
    monkeypatch.setattr(trl_utils, "selective_log_softmax", lambda logits, labels: logits)
    with pytest.raises(RuntimeError, match=r"cannot patch trl .*selective_log_softmax\(logits, labels\) differs"
                                           r".*entropy_from_logits is missing.*nothing was changed"):  # fmt: skip
        rk_trl.patch()
    assert not rk_trl.is_patched()


def test_untested_version_warns(monkeypatch, patched):
    rk_trl.unpatch()
    monkeypatch.setattr(trl, "__version__", "9.0.0")
    with pytest.warns(UserWarning, match="trl 9.0.0 is not one of the tested releases"):
        rk_trl.patch()


# --- TRL training steps with and without the patch ------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    # TRL joins prompt and completion without a separator: start completions with a space
    data = toy.preference_dataset(8, seed=0)
    return data.map(lambda r: {"chosen": " " + r["chosen"], "rejected": " " + r["rejected"]})


def _train(trainer_cls, config_cls, tokenizer, pairs, tmp_path, with_ref, **kw):
    model = toy.build_model(tokenizer, seed=0)
    args = config_cls(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                      logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                      disable_tqdm=True, dataloader_num_workers=0, **kw)  # fmt: skip
    extra = {"ref_model": copy.deepcopy(model)} if with_ref else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, **extra)
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [h.get("grad_norm") for h in trainer.state.log_history if "loss" in h], model


@pytest.fixture
def count_op_calls(monkeypatch):
    calls = []
    op = rk_trl.token_logprobs

    def spy(*args, **kw):
        calls.append(1)
        return op(*args, **kw)

    monkeypatch.setattr(rk_trl, "token_logprobs", spy)
    return calls


def _compare(trainer_cls, config_cls, tokenizer, pairs, tmp_path, calls, with_ref, tol, fused_lm_head=False):
    plain = _train(trainer_cls, config_cls, tokenizer, pairs, tmp_path / "plain", with_ref)
    assert not calls
    with rk_trl.patched(fused_lm_head=fused_lm_head):
        fused = _train(trainer_cls, config_cls, tokenizer, pairs, tmp_path / "patched", with_ref)
    assert len(plain[0]) == 2
    torch.testing.assert_close(fused[0], plain[0], **tol)  # the loss of both steps (step 2 after an update)
    torch.testing.assert_close(fused[1], plain[1], **tol)  # and the gradient norms
    for p, q in zip(plain[2].parameters(), fused[2].parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)  # so the gradients agree
    return fused


def test_trl_dpo_step_same_with_and_without_patch(tokenizer, pairs, tmp_path, count_op_calls):
    from trl import DPOConfig, DPOTrainer

    _compare(DPOTrainer, DPOConfig, tokenizer, pairs, tmp_path, count_op_calls, True, dict(rtol=0, atol=0))
    # trl 1.16's DPOTrainer scores tokens with its fused LM head, not through the helpers
    assert not count_op_calls


def test_trl_orpo_step_same_with_and_without_patch(tokenizer, pairs, tmp_path, count_op_calls):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    _compare(ORPOTrainer, ORPOConfig, tokenizer, pairs, tmp_path, count_op_calls, False, dict(rtol=1e-5, atol=1e-6))
    assert count_op_calls  # this one does go through the op


@pytest.fixture
def count_linear_calls(monkeypatch):
    from rlhf_kernels.ops import linear

    calls = []
    op = linear.linear_token_logprobs

    def spy(*args, **kw):
        calls.append(kw.get("return_entropy", False))
        return op(*args, **kw)

    monkeypatch.setattr(linear, "linear_token_logprobs", spy)
    return calls


def test_trl_dpo_step_through_the_fused_head_patch(tokenizer, pairs, tmp_path, count_op_calls, count_linear_calls):
    """patch(fused_lm_head=True): trl 1.16's DPOTrainer scores its tokens through
    linear_token_logprobs, and both steps' losses, gradient norms and updated weights match
    TRL's own fused head (float32 sums in another order)."""
    from trl import DPOConfig, DPOTrainer

    _compare(DPOTrainer, DPOConfig, tokenizer, pairs, tmp_path, count_op_calls, True, dict(rtol=1e-4, atol=1e-5),
             fused_lm_head=True)  # fmt: skip
    assert count_linear_calls and not rk_trl.is_head_patched()


def _head_inputs(dtype, bias, seed=0, n=37, hidden=24, vocab=301):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype) if bias else None
    return h, w, b, torch.randint(0, vocab, (n,), generator=g)


def _head_run(fn, h, w, b, targets, *args):
    leaves = [t.detach().clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    outs = fn(*leaves[:2], leaves[2] if b is not None else None, targets, *args)
    g = torch.Generator().manual_seed(1)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs if o is not None and o.requires_grad
        ).backward()  # fmt: skip
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_matches_trl(dtype, outputs, temperature, bias):
    """The replacement of TRL's ChunkedLogProbFunction against TRL's own, outputs and the
    gradients of hidden states, weight and bias; float32 outputs as TRL's."""
    original = trl_utils._ChunkedLogProbFunction
    inputs = _head_inputs(dtype, bias)
    args = (temperature, 32768, None, 1.0, outputs)
    want, want_grads = _head_run(original.apply, *inputs, *args)
    with rk_trl.patched(fused_lm_head=True):
        replacement = trl_utils._ChunkedLogProbFunction
        assert replacement is not original and issubclass(replacement, original)
        got, got_grads = _head_run(replacement.apply, *inputs, *args)
    assert trl_utils._ChunkedLogProbFunction is original
    assert len(got) == 5 and all(x is None for x in got[2:]) and (got[1] is None) == ("entropy" not in outputs)
    assert all(a.dtype == torch.float32 for a in got[:2] if a is not None)
    assert [a.dtype for a in got_grads] == [a.dtype for a in want_grads]
    got, want = [x for x in got[:2] if x is not None], [x for x in want[:2] if x is not None]
    if dtype == torch.float32:  # the same sums in another order
        for a, b in zip(got + got_grads, want + want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
        return
    # bfloat16: both round the logits and their gradient to bfloat16 (each its own way); against
    # float64 the op is at least as close as TRL's function
    exact, exact_grads = _head_run(_head_reference, *[None if t is None else t.double() for t in inputs[:3]],
                                   inputs[3], *args)  # fmt: skip
    exact = [x for x in exact[:2] if x is not None]
    names = ("log_probs", "entropy")[: len(got)] + ("hidden", "weight", "bias")[: len(got_grads)]
    for name, a, b, c in zip(names, got + got_grads, want + want_grads, exact + exact_grads, strict=True):
        ours, theirs = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
        assert ours <= 1.25 * theirs + 1e-3 * c.abs().max().item(), (name, ours, theirs)


def _head_reference(h, w, b, targets, temperature, chunk_size, softcap, logit_scale, outputs):
    """TRL's fused head in plain float64 PyTorch: log-probs (and entropy when asked) of
    softmax((h w^T + b) / T)."""
    logp = torch.log_softmax((h @ w.T + (0 if b is None else b)) / temperature, -1)
    entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
    return logp.gather(-1, targets[:, None])[:, 0], entropy, None, None, None


def _ran_the_op(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name.startswith("rlhf_kernels::") for e in prof.events())


@pytest.mark.skipif(not native.available(), reason="the head is covered only where a kernel backend runs")
def test_fused_head_uncovered_calls_go_to_trl():
    """Soft-capping, a logit scale, outputs the op does not compute, a DeepSpeed ZeRO-3 weight,
    a bias of another dtype, a temperature <= 0, the "torch" backend (which would build the
    logits): TRL's own function (the same results bit for bit, the same error)."""
    original = trl_utils._ChunkedLogProbFunction
    h, w, b, targets = _head_inputs(torch.float32, True)
    zero3 = torch.nn.Parameter(w.clone())
    zero3.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    plain = (1.0, 32768, None, 1.0, ("log_probs",))
    cases = [((h, w, b), (1.0, 32768, 30.0, 1.0, ("log_probs",))), ((h, w, b), (1.0, 32768, None, 2.0, ("log_probs",))),
             ((h, w, b), (1.0, 32768, None, 1.0, ("log_probs", "mean_logits", "is_top1"))),
             ((h, zero3, b), plain), ((h, w, b.double()), plain), ((h, w, b), (-0.5, *plain[1:]))]  # fmt: skip
    with rk_trl.patched(fused_lm_head=True):
        replacement = trl_utils._ChunkedLogProbFunction
        for tensors, args in cases:
            got = []
            assert not _ran_the_op(lambda t=tensors, a=args, out=got: out.extend(replacement.apply(*t, targets, *a)))
            want = original.apply(*tensors, targets, *args)
            for x, y in zip(got, want, strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    torch.testing.assert_close(x, y, rtol=0, atol=0)
        with pytest.raises(ZeroDivisionError):  # as TRL's own (1 / temperature)
            replacement.apply(h, w, b, targets, 0.0, *plain[1:])
        assert _ran_the_op(lambda: replacement.apply(h, w, b, targets, *plain))
    with rk_trl.patched(backend="torch", fused_lm_head=True):
        assert not _ran_the_op(lambda: trl_utils._ChunkedLogProbFunction.apply(h, w, b, targets, *plain))


def test_fused_head_patch_is_opt_in_and_restored():
    original = trl_utils._ChunkedLogProbFunction
    from trl.kernels import chunked_logprob

    try:
        rk_trl.patch()
        assert trl_utils._ChunkedLogProbFunction is original and not rk_trl.is_head_patched()
        where = rk_trl.patch(fused_lm_head=True)
        assert "trl.trainer.utils._ChunkedLogProbFunction" in where and rk_trl.is_head_patched()
        assert chunked_logprob.ChunkedLogProbFunction is trl_utils._ChunkedLogProbFunction is not original
        with rk_trl.patched(backend="torch"):  # a nested block without the head, then back
            assert trl_utils._ChunkedLogProbFunction is original
        assert trl_utils._ChunkedLogProbFunction is not original and rk_trl._head_patcher.backend == "auto"
        again = rk_trl.patch(fused_lm_head=True)  # twice: the same places, nothing else swapped
        assert again == where and trl_utils._ChunkedLogProbFunction.__mro__[1] is original
        rk_trl.patch()  # again without the flag: the head goes back to TRL's
        assert trl_utils._ChunkedLogProbFunction is original and rk_trl.is_patched()
        with pytest.raises(TypeError, match="fused_lm_head: expected a bool"):
            rk_trl.patch(fused_lm_head="yes")
    finally:
        rk_trl.unpatch()
    assert trl_utils._ChunkedLogProbFunction is chunked_logprob.ChunkedLogProbFunction is original
    assert not rk_trl.is_patched() and not rk_trl.is_head_patched()


def test_fused_head_patch_refused_leaves_nothing_patched(monkeypatch):
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    with pytest.raises(RuntimeError, match="has no _ChunkedLogProbFunction"):
        rk_trl.patch(fused_lm_head=True)
    assert not rk_trl.is_patched() and not rk_trl.is_head_patched()

