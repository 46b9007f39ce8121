"""linear_token_logprobs: chunked LM head + log-prob kernel against the float64 composition."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_cases

import rlhf_kernels
from rlhf_kernels.ops import linear as linear_ops
from rlhf_kernels.reference.logprobs import token_logprobs as reference

# The chunking and recomputation are checked exactly in float64 (the kernels run in
# float64 too). In float32 / bf16 / fp16 the logits are rounded by the matmul as in
# any eager LM head, so those tests compare with the float64 composition on the same
# rounded inputs with a norm-relative tolerance per dtype: forward rows of log-probs
# and each gradient (hidden, weight, bias) as a whole.
NORM_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(params=["rows", "vocab"])
def cut(request, monkeypatch):
    """linear_token_logprobs' backward by token chunks or by vocab slices (its "auto" picks by shape)."""
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", request.param)
    return request.param


def make_inputs(shape, hidden_size, vocab, dtype, *, seed=0, bias=False, scale=1.0):
    """Hidden states sliced like ``h[:, :-1]`` (non-contiguous), an LM head scaled so that
    logits are O(scale), labels with an ignored token, and a mask with a fully masked row."""
    g = torch.Generator().manual_seed(seed)
    batch, seq = shape
    hidden = torch.randn(batch, seq + 1, hidden_size, generator=g, dtype=torch.float64)[:, :-1]
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64) * (scale / hidden_size**0.5)
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, 0] = -100
    mask = torch.rand(shape, generator=g) > 0.2
    mask[-1] = False
    to = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return to(hidden), to(weight), to(b), labels, mask


def oracle(hidden, weight, bias, labels, mask, *, temperature=1.0, return_entropy=False, seed=1):
    """The float64 composition on the (already rounded) inputs: outputs and gradients of
    sum(w * logprobs) (+ sum(w2 * entropy)) for random weights w, w2."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    out = reference(logits, labels, mask, temperature=temperature, return_entropy=return_entropy)
    return _loss_and_grads(out, leaves, seed)


def run(hidden, weight, bias, labels, mask, *, seed=1, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    out = rlhf_kernels.linear_token_logprobs(leaves[0], leaves[1], labels, mask, bias=leaves[2], **kw)
    return _loss_and_grads(out, leaves, seed)


def _loss_and_grads(out, leaves, seed):
    lp, ent = out if isinstance(out, tuple) else (out, None)
    g = torch.Generator().manual_seed(seed)
    weights = lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)  # noqa: E731
    loss = (lp.double() * weights(lp)).sum()
    if ent is not None:
        loss = loss + (ent.double() * weights(ent)).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves]
    return lp.detach(), None if ent is None else ent.detach(), grads


def assert_norm_close(got, want, tol, name):
    err = (got.double() - want).norm() / want.norm().clamp(min=1e-30)
    assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
@pytest.mark.parametrize("options", ["plain", "bias-entropy-temperature"])
def test_matches_reference_float64(device, backend, chunk_size, options, cut):
    """Chunks that do not divide N (21 tokens), one token per chunk, a single chunk."""
    extra = options != "plain"
    hidden, weight, bias, labels, mask = make_inputs((3, 7), 16, 1000, torch.float64, bias=extra, scale=4.0)
    kw = dict(temperature=0.7, return_entropy=True) if extra else {}
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = run(*map(to, (hidden, weight, bias, labels, mask)), chunk_size=chunk_size, backend=backend, **kw)
    want = oracle(hidden, weight, bias, labels, mask, **kw)
    for name, a, b in (("logprobs", got[0], want[0]), ("entropy", got[1], want[1])):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-10, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2], strict=True):
        if b is not None:
            torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9, msg=name)
    assert torch.all(got[0][~mask.to(device)] == 0)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision(device, backend, dtype, cut):
    """Matmul-dtype logits, an awkward vocab (5003), chunks of 8 over 30 tokens, bias and entropy."""
    hidden, weight, bias, labels, mask = make_inputs((3, 10), 64, 5003, dtype, bias=True, scale=3.0)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = run(*map(to, (hidden, weight, bias, labels, mask)), chunk_size=8, return_entropy=True, backend=backend)
    want = oracle(hidden, weight, bias, labels, mask, return_entropy=True)
    assert got[0].dtype == torch.float32 and got[2][0].dtype == dtype
    for name, a, b in zip(("logprobs", "entropy", "hidden", "weight", "bias"), got[:2] + tuple(got[2]),
                          want[:2] + tuple(want[2]), strict=True):  # fmt: skip
        assert_norm_close(a.cpu(), b, NORM_TOL[dtype], name)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_only_some_inputs_need_grad(device, backend, cut):
    """A frozen head (gradient to hidden only), frozen hidden (to the head only), and no grad at all."""
    hidden, weight, _, labels, mask = make_inputs((2, 5), 8, 50, torch.float64)
    hidden, weight, labels, mask = (t.to(device) for t in (hidden, weight, labels, mask))
    h = hidden.clone().requires_grad_(True)
    rlhf_kernels.linear_token_logprobs(h, weight, labels, mask, chunk_size=3, backend=backend).sum().backward()
    w = weight.clone().requires_grad_(True)
    rlhf_kernels.linear_token_logprobs(hidden, w, labels, mask, chunk_size=3, backend=backend).sum().backward()
    leaves = [hidden.detach().cpu().clone().requires_grad_(True), weight.detach().cpu().clone().requires_grad_(True)]
    reference(torch.nn.functional.linear(*leaves), labels.cpu(), mask.cpu()).sum().backward()
    torch.testing.assert_close(h.grad.cpu(), leaves[0].grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(w.grad.cpu(), leaves[1].grad, atol=1e-10, rtol=1e-9)
    with torch.no_grad():
        lp = rlhf_kernels.linear_token_logprobs(hidden, weight, labels, mask, backend=backend)
    assert not lp.requires_grad
    torch.testing.assert_close(lp.cpu(), reference(torch.nn.functional.linear(hidden, weight), labels, mask).cpu())


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_vocab_slices_labels_at_the_edges(device, backend):
    """Backward by vocab slices (8 words each, the last 2) against by token chunks and the float64
    oracle: labels on slice boundaries, an ignore_index inside [0, V) (so equal to slice-local
    columns), entropy and temperature; and, with check_labels=False, a label outside [0, V) gives
    the same NaN rows either way (its token's log-prob and hidden-state gradient row)."""
    g = torch.Generator().manual_seed(5)
    vocab, n = 50, 12
    hidden = torch.randn(n, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 7, 8, 15, 16, 49, 48, 8, 3, 40, 24, 31])
    kw = dict(ignore_index=8, temperature=0.8, return_entropy=True, chunk_size=2, backend=backend)  # 100 // 12: 8
    to = lambda t: t.to(device)  # noqa: E731
    results = {}
    for how in ("rows", "vocab"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", how)
            results[how] = run(*map(to, (hidden, weight, bias, labels)), None, **kw)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    out = reference(torch.nn.functional.linear(*leaves), labels, None, temperature=0.8, ignore_index=8,
                    return_entropy=True)  # fmt: skip
    want = _loss_and_grads(out, leaves, 1)
    for how, got in results.items():
        for name, a, b in zip(("hidden", "weight", "bias"), got[2], want[2], strict=True):
            torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9,
                                       msg=lambda m, name=name, how=how: f"{how} {name}: {m}")  # fmt: skip
    bad = labels.clone()
    bad[4] = vocab  # outside [0, V): NaN, never an out-of-bounds read
    nan = {}
    for how in ("rows", "vocab"):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", how)
            nan[how] = run(*map(to, (hidden, weight, bias, bad)), None, check_labels=False, **kw)
    for how, (lp, ent, grads) in nan.items():
        assert torch.isnan(lp[4]) and torch.isnan(ent[4]) and torch.isnan(grads[0][4]).all(), how
        keep = torch.arange(n, device=lp.device) != 4
        torch.testing.assert_close(grads[0][keep], nan["rows"][2][0][keep], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_vocab_slices_with_masked_words(device, backend, monkeypatch):
    """Forward by vocab slices merges each token's log-normaliser and entropy over the slices: a
    slice whose logits are all -inf (words masked by a -inf bias) adds nothing, and scattered -inf
    words neither; log-probs, entropies and gradients against the float64 oracle and the token
    chunks."""
    g = torch.Generator().manual_seed(6)
    vocab, n = 40, 10
    hidden = torch.randn(n, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    bias[8:16] = -math.inf  # the whole second slice (slices of 8: 2 * 40 // 10)
    bias[[3, 27, 39]] = -math.inf
    labels = torch.tensor([0, 1, 2, 4, 7, 16, 20, 26, 30, 38])
    labels_masked = labels.clone()
    labels_masked[3] = 9  # a masked word (its slice all -inf): log-prob -inf, as unsliced
    kw = dict(temperature=1.3, return_entropy=True, chunk_size=2, backend=backend)
    to = lambda t: t.to(device)  # noqa: E731
    got = {}
    for how in ("rows", "vocab"):
        monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", how)
        got[how] = run(*map(to, (hidden, weight)), to(bias).detach(), to(labels), None, **kw)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    out = reference(torch.nn.functional.linear(*leaves, bias), labels, None, temperature=1.3, return_entropy=True)
    want = _loss_and_grads(out, leaves, 1)
    for how, (lp, ent, grads) in got.items():
        torch.testing.assert_close(lp.cpu(), want[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ent.cpu(), want[1], atol=1e-10, rtol=1e-10)
        for name, a, b in zip(("hidden", "weight"), grads[:2], want[2], strict=True):
            torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-9,
                                       msg=lambda m, name=name, how=how: f"{how} {name}: {m}")  # fmt: skip
    want = reference(torch.nn.functional.linear(hidden, weight, bias), labels_masked, None, temperature=1.3,
                     return_entropy=True)  # fmt: skip
    assert want[0][3] == -math.inf
    for how in ("rows", "vocab"):
        monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", how)
        lp, ent, _ = run(*map(to, (hidden, weight)), to(bias), to(labels_masked), None, **kw)
        torch.testing.assert_close(lp.cpu(), want[0], atol=1e-10, rtol=1e-10, msg=how)
        torch.testing.assert_close(ent.cpu(), want[1], atol=1e-10, rtol=1e-10, msg=how)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_vocab_slices_entropy_precision_with_large_logits(device, backend, monkeypatch):
    """float32 logits around 300: the entropy merged over vocab slices keeps the token chunks'
    precision order (carried under the running log-normaliser; a merge through the mean logit
    lost ~eps * lse**2, 5e-3 here), and so does the gradient that uses it."""
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(12, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(64, 16, generator=g, dtype=torch.float64)
    bias = torch.randn(64, generator=g, dtype=torch.float64) + 300.0
    labels = torch.randint(0, 64, (12,), generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    want = _loss_and_grads(reference(torch.nn.functional.linear(*leaves, bias), labels, None, return_entropy=True),
                           leaves, 1)  # fmt: skip
    to = lambda t: t.float().to(device)  # noqa: E731
    errors = {}
    for how in ("rows", "vocab"):
        monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", how)
        lp, ent, grads = run(*map(to, (hidden, weight)), to(bias), labels.to(device), None, return_entropy=True,
                             chunk_size=3, backend=backend)  # fmt: skip
        errors[how] = (float((ent.cpu().double() - want[1]).abs().max()),
                       float((grads[0].cpu().double() - want[2][0]).norm() / want[2][0].norm()))  # fmt: skip
    assert errors["vocab"][0] < 2e-4 and errors["vocab"][1] < 2e-4, errors


def test_backward_cut_choice(monkeypatch):
    """"auto" slices the vocab when fewer tokens than words, in more than one chunk, need a weight
    gradient (and when only the weight's is wanted), and keeps token chunks otherwise (more tokens
    than words; a frozen head; a single chunk); the environment knob forces either."""
    monkeypatch.delenv("RLHF_KERNELS_LINEAR_BWD_CUT", raising=False)
    assert linear_ops._by_vocab(8192, 128256, True, True, 1024)
    assert linear_ops._by_vocab(200000, 128256, False, True, 1024)
    assert not linear_ops._by_vocab(200000, 128256, True, True, 1024)
    assert not linear_ops._by_vocab(100, 128256, True, False, 10)
    assert not linear_ops._by_vocab(1024, 128256, True, True, 1024)  # one chunk: nothing is accumulated
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", "vocab")
    assert linear_ops._by_vocab(200000, 128256, True, True, 1024)
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", "rows")
    assert not linear_ops._by_vocab(8192, 128256, True, True, 1024)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gradcheck_float64(device, backend, cut):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    bias = torch.randn(7, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 7, (2, 3), generator=g).to(device)
    labels[1, 2] = -100

    def fn(h, w, b):
        lp, ent = rlhf_kernels.linear_token_logprobs(h, w, labels, bias=b, temperature=1.3, return_entropy=True,
                                                     chunk_size=4, backend=backend)  # fmt: skip
        return lp, ent

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_forward_keeps_no_logits(device, backend):
    """What forward saves for backward: the inputs and one float per token (two with
    entropy), never a [N, V] tensor."""
    hidden, weight, _, labels, mask = make_inputs((4, 16), 32, 3000, torch.float32)
    hidden, weight = hidden.to(device).requires_grad_(True), weight.to(device).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rlhf_kernels.linear_token_logprobs(hidden, weight, labels.to(device), mask.to(device), chunk_size=16,
                                           return_entropy=True, backend=backend)  # fmt: skip
    n_tokens, vocab = labels.numel(), weight.shape[0]
    assert saved and max(t.numel() for t in saved) < n_tokens * vocab
    assert sum(t.numel() for t in saved if t.dim() == 1) <= 3 * n_tokens  # labels, lse, entropy


BAD = [
    ("hidden-weight", lambda h, w, b, y: (h, w[:, :-1], b, y), ValueError, "weight: expected shape"),
    ("dtype", lambda h, w, b, y: (h, w.double(), b, y), TypeError, "weight: dtype"),
    ("bias-shape", lambda h, w, b, y: (h, w, b[:-1], y), ValueError, "bias: expected shape"),
    ("labels-shape", lambda h, w, b, y: (h, w, b, y[:, :-1]), ValueError, "labels: expected shape"),
    ("labels-range", lambda h, w, b, y: (h, w, b, y + 50), ValueError, "labels: value"),
    ("int-hidden", lambda h, w, b, y: (h.long(), w, b, y), TypeError, "hidden: dtype"),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_bad_flags_and_autocast_weight(backend):
    """Flags must be bools ("no" would count as true); under autocast, which casts floating
    weights, an integer weight is still refused, as F.linear refuses it."""
    hidden, weight, bias, labels, _ = make_inputs((2, 3), 8, 50, torch.float32, bias=True)
    with pytest.raises(TypeError, match="return_entropy: expected a bool, got str"):
        rlhf_kernels.linear_token_logprobs(hidden, weight, labels, return_entropy="no", backend=backend)
    with pytest.raises(TypeError, match="check_labels: expected a bool, got int"):
        rlhf_kernels.linear_token_logprobs(hidden, weight, labels, check_labels=0, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="weight: dtype torch.int64"):
        rlhf_kernels.linear_token_logprobs(hidden, weight.long(), labels, backend=backend)


@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_bad_input(name, make, exc, match, backend):
    hidden, weight, bias, labels, _ = make_inputs((2, 3), 8, 50, torch.float32, bias=True)
    labels[0, 0] = 3
    h, w, b, y = make(hidden, weight, bias, labels)
    with pytest.raises(exc, match=match):
        rlhf_kernels.linear_token_logprobs(h, w, y, bias=b, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        rlhf_kernels.linear_token_logprobs(hidden, weight, labels, chunk_size=0, backend=backend)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_torch_compile_fullgraph(device, backend):
    """The chunk loop traces without graph breaks (labels unchecked: the check syncs)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    hidden, weight, _, labels, mask = make_inputs((2, 6), 16, 300, torch.float32)
    hidden, weight, labels, mask = (t.to(device) for t in (hidden, weight, labels, mask))

    def step(h, w):
        lp, ent = rlhf_kernels.linear_token_logprobs(h, w, labels, mask, return_entropy=True, chunk_size=5,
                                                     check_labels=False, backend=backend)  # fmt: skip
        return lp.sum() + 0.1 * ent.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    compiled_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    step(*eager_leaves).backward()
    out = compiled(*compiled_leaves)
    out.backward()
    torch.testing.assert_close(out, step(hidden, weight))
    for a, b in zip(compiled_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_autocast(device, backend):
    """Under bf16 autocast with float32 parameters (mixed-precision training), logits are
    bf16 as F.linear would make them, in forward and in backward's recomputation, and the
    gradients come back in float32."""
    hidden, weight, bias, labels, mask = make_inputs((2, 9), 32, 700, torch.float32, bias=True, scale=3.0)
    to = lambda t: t.to(device)  # noqa: E731
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run(*map(to, (hidden, weight, bias, labels, mask)), chunk_size=4, backend=backend)
    # the oracle on the bf16-rounded operands: what autocast's matmul multiplies
    rounded = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    want = oracle(*rounded, labels, mask)
    assert all(g.dtype == torch.float32 for g in got[2])
    for name, a, b in zip(("logprobs", "hidden", "weight", "bias"), (got[0], *got[2]), (want[0], *want[2]),
                          strict=True):  # fmt: skip
        assert_norm_close(a.cpu(), b, NORM_TOL[torch.bfloat16], name)
    # bf16 hidden states (a layer's autocast output) with the float32 head, as F.linear accepts them
    with torch.autocast(device, dtype=torch.bfloat16):
        mixed = run(*map(to, (rounded[0], weight, bias, labels, mask)), chunk_size=4, backend=backend)
    assert mixed[2][0].dtype == torch.bfloat16
    assert_norm_close(mixed[0].cpu(), want[0], NORM_TOL[torch.bfloat16], "logprobs, bf16 hidden")


# --- linear_ppo_loss ---------------------------------------------------------------------------

PPO_OPTIONS = {
    "plain": dict(),
    "dual-k3-entropy-T": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, kl_coef=0.05,
                              kl_kind="k3", entropy_coef=0.01, temperature=0.9),  # fmt: skip
    "seq-mean-token-mean-k1": dict(kl_coef=0.1, kl_kind="k1", loss_agg_mode="seq-mean-token-mean"),
    "gspo": dict(importance_sampling_level="sequence", clip_ratio_low=0.05, clip_ratio_high=0.06,
                 loss_agg_mode="seq-mean-token-mean"),  # the two-pass route
}


def ppo_inputs(dtype, *, seed=0, bias=True, with_ref=True):
    """Hidden states and head as make_inputs, old / ref log-probs near the policy's (so clipping
    binds for some tokens), advantages, and a mask with gaps and a fully masked row."""
    hidden, weight, b, labels, mask = make_inputs((3, 8), 16, 997, dtype, seed=seed, bias=bias, scale=4.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if b is None else b.double())
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64)).float()
    ref = (old + 0.2 * torch.randn(lp.shape, generator=g)).float() if with_ref else None
    adv = torch.randn(lp.shape, generator=g)
    return hidden, weight, b, labels, old, adv, mask, ref


def ppo_oracle(hidden, weight, bias, labels, old, adv, mask, ref, **kw):
    """The float64 composition: the LM head, then ppo_loss_from_logits' torch reference."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    loss, metrics = rlhf_kernels.ppo_loss_from_logits(logits, labels, old.double(), adv.double(), mask,
                                                      ref_logprobs=None if ref is None else ref.double(),
                                                      backend="torch", **kw)  # fmt: skip
    loss.backward()
    return loss.detach(), metrics, [None if t is None else t.grad for t in leaves]


def ppo_run(hidden, weight, bias, labels, old, adv, mask, ref, device, scale=1.0, **kw):
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    leaves = [None if t is None else t.detach().clone().to(device).requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = rlhf_kernels.linear_ppo_loss(leaves[0], leaves[1], to(labels), to(old), to(adv), to(mask),
                                                 bias=leaves[2], ref_logprobs=to(ref), **kw)  # fmt: skip
    (loss * scale).backward()
    return loss.detach(), metrics, [None if t is None else t.grad / scale for t in leaves]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("option", list(PPO_OPTIONS))
def test_ppo_matches_reference_float64(device, backend, chunk_size, option):
    """float64 against the float64 composition, with an upstream gradient other than 1 (kept
    in float64 when it scales the gradients)."""
    inputs = ppo_inputs(torch.float64)
    kw = PPO_OPTIONS[option]
    got_loss, got_metrics, got_grads = ppo_run(*inputs, device, scale=0.1, chunk_size=chunk_size, backend=backend,
                                               **kw)  # fmt: skip
    want_loss, want_metrics, want_grads = ppo_oracle(*inputs, **kw)
    torch.testing.assert_close(got_loss.cpu(), want_loss, atol=1e-10, rtol=1e-9)
    for name, a, b in zip(got_metrics._fields, got_metrics, want_metrics, strict=True):
        torch.testing.assert_close(a.cpu().double(), b.double(), atol=1e-10, rtol=1e-9, msg=name)
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_ppo_low_precision(device, backend, dtype):
    """bf16 / fp32 take the fused sweep, fp16 the two-pass route (a loss scale of 1024 as a
    GradScaler would apply: no gradient entry is lost to float16's range)."""
    inputs = ppo_inputs(dtype)
    kw = PPO_OPTIONS["dual-k3-entropy-T"]
    got_loss, got_metrics, got_grads = ppo_run(*inputs, device, scale=1024.0, chunk_size=7, backend=backend, **kw)
    want_loss, want_metrics, want_grads = ppo_oracle(*inputs, **kw)
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(got_loss.cpu().double(), want_loss, atol=tol, rtol=tol)
    assert got_grads[0].dtype == dtype
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads, strict=True):
        assert_norm_close(a.cpu(), b, tol, name)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_ppo_grad_modes(device, backend):
    """No grad: the same loss and metrics without gradients; a second backward raises;
    a frozen head gets no gradient."""
    hidden, weight, bias, labels, old, adv, mask, ref = (None if t is None else t.to(device)
                                                         for t in ppo_inputs(torch.float32))  # fmt: skip
    kw = dict(ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, backend=backend)
    h = hidden.clone().requires_grad_(True)
    loss, metrics = rlhf_kernels.linear_ppo_loss(h, weight, labels, old, adv, mask, bias=bias, **kw)
    with torch.no_grad():
        loss_ng, metrics_ng = rlhf_kernels.linear_ppo_loss(h, weight, labels, old, adv, mask, bias=bias, **kw)
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach(), rtol=1e-6, atol=0)
    loss.backward(retain_graph=True)
    assert h.grad is not None and weight.grad is None
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_double_backward_refused(device, backend):
    """create_graph=True through the fused linear ops raises: once_differentiable alone handed back
    constant gradients (a wrong second derivative) when the upstream gradient needs none."""
    hidden, weight, bias, labels, old, adv, mask, ref = ppo_inputs(torch.float64)
    w0 = weight.detach().clone().to(device).requires_grad_()
    to = lambda t: t.to(device)  # noqa: E731
    calls = {
        "linear_token_logprobs": lambda: rlhf_kernels.linear_token_logprobs(
            to(hidden), w0 * 1.0, to(labels), to(mask), backend=backend).sum(),
        "linear_ppo_loss": lambda: rlhf_kernels.linear_ppo_loss(
            to(hidden), w0 * 1.0, to(labels), to(old), to(adv), to(mask), backend=backend)[0],
    }  # fmt: skip
    for name, loss in calls.items():
        with pytest.raises(RuntimeError, match=f"{name}: double backward"):
            torch.autograd.grad(loss() + (w0**3).sum(), w0, create_graph=True)
        assert torch.autograd.grad(loss(), w0)[0].abs().sum() > 0


def test_ppo_bad_input():
    hidden, weight, bias, labels, old, adv, mask, ref = ppo_inputs(torch.float32)
    with pytest.raises(ValueError, match="hidden: expected shape"):
        rlhf_kernels.linear_ppo_loss(hidden[0], weight, labels[0], old[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="old_logprobs"):
        rlhf_kernels.linear_ppo_loss(hidden, weight, labels, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="ref_logprobs: required"):
        rlhf_kernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, kl_coef=0.1)
    with pytest.raises(TypeError, match="old_logprobs: expected a tensor, got NoneType"):
        rlhf_kernels.linear_ppo_loss(hidden, weight, labels, None, adv, mask)
    with pytest.raises(TypeError, match="advantages: expected a tensor, got NoneType"):
        rlhf_kernels.linear_ppo_loss(hidden, weight, labels, old, None, mask)
    with pytest.raises(TypeError, match="check_labels: expected a bool"):
        rlhf_kernels.linear_ppo_loss(hidden, weight, labels, old, adv, mask, check_labels=0)
    with pytest.raises(ValueError, match="ref_logprobs: requires grad"):
        rlhf_kernels.linear_ppo_loss(hidden.requires_grad_(True), weight, labels, old, adv, mask,
                                     ref_logprobs=ref.requires_grad_(True), backend="native")  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_weight_gradient_precision_does_not_grow_with_chunks(device, backend, monkeypatch):
    """bf16, backward by token chunks: the weight gradient summed over 128 chunks is as accurate
    as over one (the sum is kept in float32, not rounded to bf16 per chunk)."""
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", "rows")
    hidden, weight, _, labels, mask = make_inputs((16, 64), 32, 256, torch.bfloat16, scale=3.0)
    hidden, weight, labels, mask = (t.to(device) for t in (hidden, weight, labels, mask))
    want = oracle(*[t.cpu() for t in (hidden, weight)], None, labels.cpu(), mask.cpu())[2][1]
    errors = []
    for chunk_size in (labels.numel(), 8):
        got = run(hidden, weight, None, labels, mask, chunk_size=chunk_size, backend=backend)[2][1]
        errors.append(float((got.cpu().double() - want).norm() / want.norm()))
    assert errors[1] < 1.25 * errors[0], errors


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_hidden_gradient_precision_does_not_grow_with_slices(device, backend, monkeypatch):
    """bf16, backward by vocab slices: the hidden states' gradient summed over 32 slices is as
    accurate as over one (kept in float32), and the weight gradient, one product per slice,
    as accurate as by token chunks."""
    if device == "cpu" and backend == "triton":
        pytest.skip("a thousand interpreted programs; the native CPU kernel checks the slicing here, Triton on GPU")
    monkeypatch.setenv("RLHF_KERNELS_LINEAR_BWD_CUT", "vocab")
    hidden, weight, _, labels, mask = make_inputs((2, 16), 32, 512, torch.bfloat16, scale=3.0)
    hidden, weight, labels, mask = (t.to(device) for t in (hidden, weight, labels, mask))
    want = oracle(*[t.cpu() for t in (hidden, weight)], None, labels.cpu(), mask.cpu())[2]
    errors = []
    for chunk_size in (labels.numel(), 1):  # slices of 512 and of 16 words
        got = run(hidden, weight, None, labels, mask, chunk_size=chunk_size, backend=backend)[2]
        errors.append([float((a.cpu().double() - b).norm() / b.norm()) for a, b in zip(got[:2], want[:2], strict=True)])
    assert errors[1][0] < 1.25 * errors[0][0], errors
    assert errors[1][1] < 1.25 * errors[0][1], errors


@pytest.mark.parametrize("device,backend", backend_cases())
def test_ppo_torch_compile_fullgraph(device, backend):
    """Traced, linear_ppo_loss takes its two-pass route (the fused-in-forward Function gave
    zero gradients under dynamo on torch 2.11); same loss and gradients as eager."""
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    hidden, weight, bias, labels, old, adv, mask, _ = (None if t is None else t.to(device)
                                                       for t in ppo_inputs(torch.float32, with_ref=False))  # fmt: skip

    def step(h, w):
        loss, metrics = rlhf_kernels.linear_ppo_loss(h, w, labels, old, adv, mask, bias=bias, entropy_coef=0.01,
                                                     chunk_size=5, check_labels=False, backend=backend)  # fmt: skip
        return loss + 0 * metrics.clipfrac

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    compiled_leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    want = step(*eager_leaves)
    want.backward()
    got = compiled(*compiled_leaves)
    got.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
