"""token_logprobs: every backend against the float64 reference, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA, backend_cases, graph_replay

import rlhf_kernels
from rlhf_kernels.reference.logprobs import token_logprobs as reference
from rlhf_kernels.triton import logprobs as triton_logprobs

# Tolerances per logits dtype, against the float64 reference evaluated on the
# same (already rounded) logits. Outputs are float32 for all three dtypes, so
# forward tolerances are float32 accumulation error over up to 128k terms;
# gradients are rounded to the logits dtype (bf16: 8 bits of mantissa).
FWD_TOL = {
    torch.float32: dict(atol=3e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=3e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-5, rtol=2e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
}
# Gradient atol is per unit of max|z| (z = logits / T): p = exp(z - lse) is
# computed from z and lse, each rounded to float32 at their own magnitude, so
# the absolute error of 1 - p near p = 1 grows with |z| (any float32 kernel).
GRAD_TOL = {
    torch.float32: dict(atol=5e-7, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-7, rtol=8e-3),
    torch.float16: dict(atol=5e-7, rtol=1e-3),
    torch.float64: dict(atol=1e-12, rtol=1e-9),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Vocab sizes: degenerate, tiny, small, prime (a multiple of no block), GPT-2, Llama-3.
VOCABS = [(4, 1), (6, 7), (5, 1000), (4, 5003), (2, 50257), (2, 128256)]


def make_batch(batch, seq, vocab, dtype, device, *, seed=0, scale=4.0):
    """Logits sliced like `model_out[:, :-1]` (non-contiguous), labels with
    ignored tokens, and a mask with one fully masked sequence."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(batch, seq + 1, vocab, generator=g) * scale).to(dtype)
    logits = full.to(device)[:, :-1]
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 0] = -100
    mask = torch.rand(batch, seq, generator=g) > 0.2
    if batch > 1:
        mask[-1] = False  # a fully masked sequence
    return logits, labels.to(device), mask.to(device)


def run(fn, logits, labels, mask, *, entropy_weight=0.37, seed=1, **kw):
    """Forward and backward with random upstream gradients; returns outputs and grad."""
    x = logits.detach().clone() if kw.get("inplace_backward") else logits.detach()
    x.requires_grad_(True)
    leaf = x
    if kw.get("inplace_backward"):
        x = x * 1  # in-place backward overwrites its input: give it a non-leaf to own
    out = fn(x, labels, mask, **kw)
    lp, ent = out if isinstance(out, tuple) else (out, None)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(lp.shape, generator=g, dtype=torch.float64).to(lp.device)
    loss = (lp.double() * w).sum()
    if ent is not None:
        loss = loss + entropy_weight * (ent.double() * w.flip(-1)).sum()
    loss.backward()
    return lp, ent, leaf.grad


def run_reference(logits, labels, mask, *, temperature=1.0, return_entropy=False, **_):
    return run(
        reference,
        logits.double(),
        labels,
        mask,
        temperature=temperature,
        return_entropy=return_entropy,
    )


def assert_matches(got, want, dtype, z_max=1.0):
    """Compare (logprobs, entropy, grad) with the reference; z_max = max |logits / T|."""
    lp, ent, grad = got
    lp_ref, ent_ref, grad_ref = want
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp.double(), lp_ref, **FWD_TOL[dtype])
    if ent_ref is not None:
        torch.testing.assert_close(ent.double(), ent_ref, **{k: 4 * v for k, v in FWD_TOL[dtype].items()})
    assert grad.dtype == dtype
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), grad_ref, atol=tol["atol"] * max(1.0, z_max), rtol=tol["rtol"])


def zmax(logits, temperature=1.0):
    finite = logits.double()[torch.isfinite(logits)]
    return float(finite.abs().max()) / temperature if finite.numel() else 1.0


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,vocab", VOCABS, ids=lambda v: str(v))
def test_matches_reference(device, backend, dtype, rows, vocab):
    if vocab > 10000 and backend == "torch" and device == "cpu" and dtype != torch.float32:
        pytest.skip("the torch backend is the reference itself; large-V half cases add nothing on CPU")
    batch, seq = (2, rows // 2) if rows > 2 else (1, rows)
    logits, labels, mask = make_batch(batch, seq, vocab, dtype, device, seed=vocab)
    kw = dict(temperature=0.7, return_entropy=True)
    got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, **kw)
    assert_matches(got, run_reference(logits, labels, mask, **kw), dtype, zmax(logits, 0.7))
    # masked and ignored tokens: exactly 0, and exactly 0 gradient
    lp, ent, grad = got
    dropped = ~mask | (labels == -100)
    assert torch.all(lp[dropped] == 0) and torch.all(ent[dropped] == 0)
    assert torch.all(grad[dropped] == 0)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [4096, 4097, 8192, 12289])
def test_whole_tiles_and_a_partial_tail(device, backend, dtype, vocab):
    """Vocabularies of whole tiles (the Triton tiles are 4096 bf16 or 2048 float32 elements:
    no partial tile) and of whole tiles and one more column (a partial tile of one element),
    with labels on the first column, the last one and the first of the last tile: the
    unmasked loads of whole tiles and the masked last tile of the row loops, and the
    label test relative to a tile's start."""
    logits, labels, mask = make_batch(2, 4, vocab, dtype, device, seed=vocab + 1)
    labels = torch.tensor([[0, vocab - 1, vocab // 4096 * 4096 % vocab, 5], [vocab - 1, 0, 1, vocab - 2]])
    labels = labels.to(device)
    mask = torch.ones_like(mask)
    kw = dict(temperature=0.9, return_entropy=True)
    got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, **kw)
    assert_matches(got, run_reference(logits, labels, mask, **kw), dtype, zmax(logits, 0.9))


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "offset"])
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["grad", "inplace"])
def test_rows_off_16_byte_boundaries(device, backend, dtype, layout, inplace_backward):
    """An odd vocabulary (4099) starts each row a different distance from a 16-byte boundary:
    the Triton kernels stream a row's first elements up to its boundary apart, then whole
    16-byte vectors, and the gradient counts its columns from there when the logits and
    gradient rows are equally misaligned (contiguous) and from the row start when they are
    not (sliced: the gradient is contiguous, the logits' rows lie further apart; offset: a
    view one element into its storage)."""
    g = torch.Generator().manual_seed(41)
    vocab = 4099
    full = (torch.randn(2, 5, vocab + 1, generator=g) * 3).to(dtype).to(device)
    logits = {"contiguous": full[..., :vocab].contiguous(), "sliced": full[:, :-1, :vocab],
              "offset": full[..., 1:]}[layout]  # fmt: skip
    labels = torch.randint(0, vocab, logits.shape[:-1], generator=g)
    labels[0, :3] = torch.tensor([0, vocab - 1, 3])  # the first column lies before a row's boundary
    labels, mask = labels.to(device), torch.ones(labels.shape, dtype=torch.bool, device=device)
    kw = dict(temperature=1.1, return_entropy=True)
    got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, inplace_backward=inplace_backward,
              **kw)  # fmt: skip
    assert_matches(got, run_reference(logits, labels, mask, **kw), dtype, zmax(logits, 1.1))


def test_rows_aligned_reads_storage_offset_and_strides():
    """The Triton gradient sweeps' choice of their no-search variant: every row of every tensor
    given provably 16-byte aligned to the JIT (storage offset in bytes, strides in elements)."""
    x = torch.empty(4, 6, 1024, dtype=torch.bfloat16)
    assert triton_logprobs.rows_aligned(x, x[:, :-1], x[:, 1:], x[1:], x.view(24, 1024), x[..., 8:])
    assert not triton_logprobs.rows_aligned(x[..., 1:])  # one element into the storage
    y = torch.empty(4, 6, 1001, dtype=torch.bfloat16)
    assert not triton_logprobs.rows_aligned(y) and not triton_logprobs.rows_aligned(x, y)
    assert triton_logprobs.rows_aligned(y[0, :1]) and triton_logprobs.rows_aligned(y[:1, :1, :7])  # one row
    # 16-byte rows whose stride the JIT cannot prove a multiple of 16 bytes (it records only
    # "divisible by 16" of an int): the runtime search instead
    assert not triton_logprobs.rows_aligned(torch.empty(3, 50264, dtype=torch.bfloat16))
    assert not triton_logprobs.rows_aligned(torch.empty(3, 1004, dtype=torch.float32))
    assert triton_logprobs.rows_aligned(torch.empty(3, 1008, dtype=torch.float32))
    # a view of memory 4 bytes past a 16-byte boundary, at storage offset 0 (foreign memory)
    shifted = torch.empty(0, dtype=torch.bfloat16).set_(x.untyped_storage()[4:], 0, (4, 1024), (1024, 1))
    assert shifted.storage_offset() == 0 and not triton_logprobs.rows_aligned(shifted)
    with torch._subclasses.FakeTensorMode():  # torch.compile's tracing: no address, offsets and strides only
        fake = torch.empty(4, 6, 1024, dtype=torch.bfloat16)
        assert triton_logprobs.rows_aligned(fake) and not triton_logprobs.rows_aligned(fake[..., 1:])


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("return_entropy", [False, True], ids=["lp", "lp+entropy"])
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["grad", "inplace"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_options(device, backend, return_entropy, inplace_backward, temperature):
    logits, labels, mask = make_batch(3, 5, 333, torch.float32, device, seed=7)
    kw = dict(temperature=temperature, return_entropy=return_entropy)
    got = run(
        rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, inplace_backward=inplace_backward, **kw
    )
    assert_matches(got, run_reference(logits, labels, mask, **kw), torch.float32, zmax(logits, temperature))
    assert isinstance(rlhf_kernels.token_logprobs(logits, labels, backend=backend, **kw), tuple) == return_entropy


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
def test_inplace_backward_reuses_logits_buffer(device, backend, sliced):
    """The gradient lands in the logits' own memory, also for ``logits[:, :-1]`` (a view
    whose rows torch cannot prove disjoint)."""
    if backend == "torch":
        pytest.skip("the torch backend ignores inplace_backward")
    logits, labels, mask = make_batch(2, 4 if sliced else 3, 100, torch.float32, device)
    x = logits.detach().clone().requires_grad_(True)
    h = x * 1
    if sliced:
        h, labels, mask = h[:, :-1], labels[:, :-1], mask[:, :-1]
    captured = {}
    h.register_hook(lambda grad: captured.setdefault("grad", grad))
    ptr = h.data_ptr()
    rlhf_kernels.token_logprobs(h, labels, mask, inplace_backward=True, backend=backend).sum().backward()
    assert captured["grad"].data_ptr() == ptr
    xr = logits.detach().double().requires_grad_(True)
    reference(xr[:, :-1] if sliced else xr, labels, mask).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("make,overlap", [
    (lambda: torch.empty(2, 5, 7)[:, :-1], False),
    (lambda: torch.empty(5, 2, 7).transpose(0, 1)[:, 1:], False),
    (lambda: torch.empty(3, 4, 5, 9)[:, ::2, 1:, :7], False),
    (lambda: torch.empty(1, 7).expand(3, 7), True),
    (lambda: torch.empty(40).as_strided((4, 7), (5, 1)), True),
    (lambda: torch.empty(2, 7), False),
])  # fmt: skip
def test_rows_may_overlap(make, overlap):
    from rlhf_kernels._layout import rows_may_overlap

    assert rows_may_overlap(make()) is overlap


LAYOUTS = ["contiguous", "slice_time", "time_major", "three_dims", "four_dims_copy", "flat"]


def layout_logits(layout, vocab, device):
    g = torch.Generator().manual_seed(3)
    if layout == "contiguous":
        return torch.randn(2, 5, vocab, generator=g).to(device)
    if layout == "slice_time":  # logits[:, :-1] of a model's output
        return torch.randn(2, 6, vocab, generator=g).to(device)[:, :-1]
    if layout == "time_major":  # [T, B, V] viewed as [B, T, V]
        return torch.randn(5, 2, vocab, generator=g).to(device).transpose(0, 1)
    if layout == "three_dims":  # three leading dims, none mergeable
        return torch.randn(3, 4, 5, vocab + 3, generator=g).to(device)[:, ::2, 1:, :vocab]
    if layout == "four_dims_copy":  # four non-mergeable dims: the one case that copies
        return torch.randn(2, 3, 3, 4, vocab + 1, generator=g).to(device)[:, :, ::2, 1:, :vocab].transpose(0, 1)
    return torch.randn(7, vocab, generator=g).to(device)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_logits(device, backend, layout):
    logits = layout_logits(layout, 77, device)
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 77, logits.shape[:-1], generator=g).to(device)
    mask = (torch.rand(logits.shape[:-1], generator=g) > 0.3).to(device)
    kw = dict(temperature=0.9, return_entropy=True)
    got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, **kw)
    assert got[2].shape == logits.shape
    assert_matches(got, run_reference(logits, labels, mask, **kw), torch.float32, zmax(logits, 0.9))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_forward_saves_only_what_backward_needs(device, backend):
    """The logits are saved by reference (no copy), the rest is O(N)."""
    if backend == "torch":
        pytest.skip("the torch backend saves log_softmax's output, by design of the oracle")
    logits, labels, mask = make_batch(2, 4, 1000, torch.bfloat16, device)
    x = logits.detach().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rlhf_kernels.token_logprobs(x, labels, mask, return_entropy=True, backend=backend)
    big = [(ptr, n) for ptr, n in saved if n >= 1000]
    assert big == [(x.data_ptr(), x.numel())], saved
    assert sum(n for _, n in saved if n < 1000) <= 3 * labels.numel()


@pytest.mark.parametrize("device,backend", backend_cases(["triton"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_prefetch_matches(monkeypatch, device, backend, dtype):
    """The forward's one-tile-ahead load (RLHF_KERNELS_LOGPROBS_PREFETCH) changes the schedule,
    not the result, over several tiles with a partial last one, with entropy, an ignored and a
    -inf-led row: the same bits under the interpreter; on a GPU the compiler may contract a
    multiply-add into an FMA in one loop and not the other (an H200 run gave 1 ulp on one row
    of five in bf16), so there it is float32 rounding of the log-normalizer (about 13 here)."""
    g = torch.Generator().manual_seed(31)
    logits = (torch.randn(5, 9000, generator=g) * 3).to(dtype)
    logits[3, :5000] = float("-inf")
    labels = torch.randint(5000, 9000, (5,), generator=g)
    labels[1] = -100
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("RLHF_KERNELS_LOGPROBS_PREFETCH", flag)
        out.append(rlhf_kernels.token_logprobs(logits.to(device), labels.to(device), return_entropy=True,
                                               backend=backend))  # fmt: skip
    eps = torch.finfo(torch.float32).eps
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2 * eps, atol=16 * eps)  # 2 ulp of 8..16
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, **tol, equal_nan=True)
    torch.testing.assert_close(out[0][0].cpu().double(), reference(logits.double(), labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(["native"]))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_forward_load_hint_is_exact(monkeypatch, device, backend, dtype):
    """The CUDA forward's streaming loads (RLHF_KERNELS_LOAD_HINT=1: non-coherent, no L1
    allocation, 256-byte L2 fetches) change how the logits are read, not the arithmetic: the
    same bits, with entropy, an ignored row, a -inf-led row, a row whose start is not 16-byte
    aligned (scalar head) and a V with a scalar tail. (On CPU, and for float64 on CUDA, the knob
    is inert: the same check.)"""
    g = torch.Generator().manual_seed(41)
    full = (torch.randn(6, 9003, generator=g) * 3).to(dtype)
    full[3, :5000] = float("-inf")
    labels = torch.randint(5000, 9001, (6,), generator=g)
    labels[1] = -100
    logits = full.to(device)[:, 1:9002]  # rows start one element in: a head, a body, a tail
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("RLHF_KERNELS_LOAD_HINT", flag)
        out.append(rlhf_kernels.token_logprobs(logits, labels.to(device), return_entropy=True, backend=backend))
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    expected = reference(full[:, 1:9002].double(), labels)
    torch.testing.assert_close(out[1][0].cpu().double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["grad", "inplace"])
def test_backward_parts_are_exact(monkeypatch, device, backend, dtype, inplace_backward):
    """Rows cut into column parts (RLHF_KERNELS_BWD_PART_COLS, or its default; rounded up to
    whole tiles, the last part short) give the same gradient bits as a program per row: with entropy, an
    ignored row, an out-of-range label (NaN, with checks off), a -inf-led row and sliced
    (non-contiguous) rows. (The CPU kernel has no parts: there it checks the knob is inert.)"""
    g = torch.Generator().manual_seed(37)
    full = (torch.randn(3, 3, 9001, generator=g) * 3).to(dtype)
    full[1, 0, :5000] = float("-inf")
    labels = torch.randint(5000, 9001, (3, 2), generator=g)
    labels[0, 1], labels[2, 0] = -100, 9001
    grads = []
    for cols in ("0", None, "1000", "4096", "100000"):  # None: the default
        if cols is None:
            monkeypatch.delenv("RLHF_KERNELS_BWD_PART_COLS", raising=False)
        else:
            monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", cols)
        logits = full.clone().to(device)[:, :-1].requires_grad_(not inplace_backward)
        leaf = logits
        if inplace_backward:  # the gradient lands in the buffer of a non-leaf (logits * 1)
            leaf = full.clone().to(device).requires_grad_(True)
            logits = (leaf * 1)[:, :-1]
        lp, ent = rlhf_kernels.token_logprobs(logits, labels.to(device), return_entropy=True, check_labels=False,
                                              inplace_backward=inplace_backward, backend=backend)  # fmt: skip
        (lp.nan_to_num(0).sum() + 0.3 * ent.nan_to_num(0).sum()).backward()
        grads.append(leaf.grad)
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], rtol=0, atol=0, equal_nan=True)
    grad = grads[0]
    assert torch.all(grad[0, 1] == 0) and torch.all(grad[2, 0].isnan()) and torch.isfinite(grad[0, 0]).all()
    if backend == "triton":  # the settings above do cut these rows (3 to 9 parts) but the last
        block = triton_logprobs._block_v(9001, full.element_size())[0]
        monkeypatch.delenv("RLHF_KERNELS_BWD_PART_COLS")  # the default: whole rows this short, parts of longer ones
        assert triton_logprobs.bwd_parts(6, 9001, block)[0] == 1
        assert triton_logprobs.bwd_parts(6, 128256, block)[0] > 1
        monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", "1000")
        assert 3 <= triton_logprobs.bwd_parts(6, 9001, block)[0] <= 9
        monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", "100000")
        assert triton_logprobs.bwd_parts(6, 9001, block)[0] == 1


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
@pytest.mark.parametrize("dtype,vocab", [(torch.bfloat16, 4097), (torch.bfloat16, 4103), (torch.float32, 2049)],
                         ids=str)  # fmt: skip
@pytest.mark.parametrize("inplace_backward", [False, True], ids=["grad", "inplace"])
def test_backward_last_part_within_a_rows_head(monkeypatch, device, backend, dtype, vocab, inplace_backward):
    """Parts of a row that is off its 16-byte boundary by a few elements (contiguous rows of an
    odd vocabulary), its last part holding fewer columns than that head (V = 2 parts of
    4096 + 1..7 for bf16; 2048 + 1 for float32): the Triton sweep counts columns from the
    boundary, so there the last part has none, and must not redo the part before it."""
    g = torch.Generator().manual_seed(43)
    full = (torch.randn(8, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (8,), generator=g)
    labels[:3] = torch.tensor([0, vocab - 1, vocab - 2])
    want = None
    for cols in ("0", str(4096 if vocab > 4096 else 2048)):
        monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", cols)
        leaf = full.clone().to(device).requires_grad_(True)
        logits = leaf * 1 if inplace_backward else leaf  # in place: into a non-leaf's buffer
        lp, ent = rlhf_kernels.token_logprobs(logits, labels.to(device), return_entropy=True, backend=backend,
                                              inplace_backward=inplace_backward)  # fmt: skip
        (lp.sum() + 0.3 * ent.sum()).backward()
        if want is None:
            want = leaf.grad
            x = full.double().requires_grad_(True)
            ref_lp, ref_ent = rlhf_kernels.token_logprobs(x, labels, return_entropy=True, backend="torch")
            (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(want.cpu().double(), x.grad, rtol=tol, atol=tol)
        else:
            torch.testing.assert_close(leaf.grad, want, rtol=0, atol=0)


def test_cuda_forward_parts(monkeypatch):
    """The CUDA forward's cut (RLHF_KERNELS_FWD_PART_COLS; host code, so it runs wherever the
    extension was built with nvcc): whole rows unless set (the default until a GPU has timed
    the parts) and for float64; otherwise the backward's rounding (whole rounds of the block's
    two 16-byte vectors a thread) covering every vector of a row; a malformed setting raises."""
    native_c = pytest.importorskip("rlhf_kernels._C")
    if not hasattr(native_c, "logprobs_fwd_parts"):
        pytest.skip("extension built without CUDA")
    parts = native_c.logprobs_fwd_parts
    monkeypatch.delenv("RLHF_KERNELS_FWD_PART_COLS", raising=False)
    assert parts(16384, 128256, 2)[0] == 1
    monkeypatch.setenv("RLHF_KERNELS_FWD_PART_COLS", "8192")
    assert parts(16384, 128256, 2) == (16, 1024)
    assert parts(16384, 128256, 8)[0] == 1  # float64: whole rows
    for itemsize in (2, 4):
        kn = 16 // itemsize
        for cols, vocab in ((4096, 128256), (1000, 9001), (5000, 5001)):
            monkeypatch.setenv("RLHF_KERNELS_FWD_PART_COLS", str(cols))
            n, pv = parts(16384, vocab, itemsize)
            rounds = math.ceil(cols / (2 * 256 * kn))
            want = math.ceil(math.ceil(vocab / kn) / (rounds * 2 * 256))
            assert n == max(want, 1)
            if n > 1:
                assert n * pv * kn >= vocab > (n - 1) * pv * kn
    monkeypatch.setenv("RLHF_KERNELS_FWD_PART_COLS", "8k")
    with pytest.raises(RuntimeError, match="RLHF_KERNELS_FWD_PART_COLS"):
        parts(4, 128256, 2)


@pytest.mark.parametrize("device,backend", backend_cases(["native", "triton"]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [9001, 8193])
def test_forward_parts(monkeypatch, device, backend, dtype, vocab):
    """The forward with rows cut into column parts (RLHF_KERNELS_FWD_PART_COLS; CUDA: each
    part's state merged in part order by the block that finishes a row last; Triton: a second
    launch merges them): within float32 rounding of the whole-row kernel and of the float64
    reference, the same bits on every run whatever the parts' order of arrival, with entropy,
    an ignored row, an out-of-range label (NaN, checks off), a -inf-led row whose first parts
    hold only -inf, a row of -inf only (NaN, as the whole-row kernel gives), sliced
    (non-contiguous, unaligned) rows, and 2 to 5 parts (V = 9001: 16-bit rows in 3 parts at
    1000 and 4096 columns, 2 at 6000; float32 in 5, 3, 2; V = 8193 at 4096 columns, rows one
    element off their 16-byte boundary: a last part with no CUDA vector, only the tail). (The
    CPU kernel has no parts: there the knob is inert, the same check.)"""
    g = torch.Generator().manual_seed(43)
    full = (torch.randn(4, 3, vocab + 2, generator=g) * 3).to(dtype)
    full[1, 1, : vocab * 2 // 3] = float("-inf")
    full[3, 2, :] = float("-inf")
    labels = torch.randint(vocab * 2 // 3, vocab, (4, 2), generator=g)
    labels[0, 1], labels[2, 0] = -100, vocab
    logits = full.to(device)[:, 1:, 1 : vocab + 1]  # rows `vocab` long, starting one element in
    labels = labels.to(device)
    runs = {}
    for cols in ("0", "1000", "4096", "6000"):
        monkeypatch.setenv("RLHF_KERNELS_FWD_PART_COLS", cols)
        runs[cols] = [rlhf_kernels.token_logprobs(logits, labels, return_entropy=True, check_labels=False,
                                                  backend=backend) for _ in range(2)]  # fmt: skip
    eps = torch.finfo(torch.float32).eps
    whole = runs["0"][0]
    for first, again in runs.values():
        for a, b, w in zip(first, again, whole, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # deterministic
            torch.testing.assert_close(a, w, rtol=16 * eps, atol=64 * eps, equal_nan=True)  # parts vs whole
    lp, ent = whole
    assert lp[0, 1] == 0 and ent[0, 1] == 0 and lp[2, 0].isnan() and lp[3, 1].isnan()
    assert lp[1, 0].isfinite()
    kept = torch.ones(lp.shape, dtype=torch.bool)
    kept[0, 1] = kept[2, 0] = kept[3, 1] = False
    want = reference(full[:, 1:, 1 : vocab + 1].double(), labels.cpu().clamp(max=vocab - 1))
    for first, _ in runs.values():
        torch.testing.assert_close(first[0].cpu().double()[kept], want[kept], rtol=1e-5, atol=1e-5)
    for cols in ("1000", "4096", "6000"):  # the settings did cut these rows
        monkeypatch.setenv("RLHF_KERNELS_FWD_PART_COLS", cols)
        if backend == "triton":
            assert triton_logprobs.fwd_parts(8, vocab, triton_logprobs._block_v(vocab, full.element_size())[0])[0] >= 2
        elif device == "cuda":
            assert pytest.importorskip("rlhf_kernels._C").logprobs_fwd_parts(8, vocab, full.element_size())[0] >= 2


def test_cuda_backward_parts(monkeypatch):
    """The CUDA launcher's cut (host code, so it runs wherever the extension was built with nvcc):
    whole rows for a setting of 0, at or beyond V, or one the grid cannot hold; otherwise
    (8192 columns when unset) parts of whole rounds of the 256-thread block's two 16-byte
    vectors each, that together cover every vector of a row."""
    native_c = pytest.importorskip("rlhf_kernels._C")
    if not hasattr(native_c, "logprobs_bwd_parts"):
        pytest.skip("extension built without CUDA")
    parts = native_c.logprobs_bwd_parts
    monkeypatch.delenv("RLHF_KERNELS_BWD_PART_COLS", raising=False)
    assert parts(16384, 128256, 2) == (16, 1024)  # 8192 columns: 1024 bf16 vectors, 2 rounds of the block
    assert parts(16384, 1000, 2)[0] == 1  # a row shorter than a part
    for setting in ("0", "128256", "1000000"):
        monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", setting)
        assert parts(16384, 128256, 2)[0] == 1
    for itemsize in (2, 4, 8):
        kn = 16 // itemsize
        for cols, vocab in ((4096, 128256), (1000, 9001), (65536, 151936), (5000, 5001)):
            monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", str(cols))
            n, pv = parts(16384, vocab, itemsize)
            rounds = math.ceil(cols / (2 * 256 * kn))  # whole loop rounds, at least the columns asked
            want = math.ceil(math.ceil(vocab / kn) / (rounds * 2 * 256))
            if want <= 1:
                assert n == 1
                continue
            assert (n, pv) == (want, rounds * 2 * 256)
            assert n * pv * kn >= vocab > (n - 1) * pv * kn  # every vector covered, no part empty in every row
    monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", "4096")
    assert parts(2**31 // 8, 128256, 2)[0] == 1  # 2^28 rows x 32 parts would pass the grid limit
    monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", "4k")
    with pytest.raises(RuntimeError, match="RLHF_KERNELS_BWD_PART_COLS"):
        parts(4, 128256, 2)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_backward_parts_setting_must_be_a_number(monkeypatch, device, backend):
    """A malformed RLHF_KERNELS_BWD_PART_COLS is an error naming it (the CPU kernel has no
    parts and does not read it)."""
    monkeypatch.setenv("RLHF_KERNELS_BWD_PART_COLS", "4k")
    logits = torch.randn(2, 300, device=device, requires_grad=True)
    lp = rlhf_kernels.token_logprobs(logits, torch.tensor([1, 2], device=device), backend=backend)
    if device == "cpu" and backend == "native":
        lp.sum().backward()
        return
    with pytest.raises((ValueError, RuntimeError), match="RLHF_KERNELS_BWD_PART_COLS"):
        lp.sum().backward()


@pytest.mark.parametrize("device,backend", backend_cases())
def test_all_tokens_masked(device, backend):
    logits, labels, _ = make_batch(2, 3, 50, torch.float32, device)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    lp, ent, grad = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, return_entropy=True)
    assert torch.all(lp == 0) and torch.all(ent == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_negative_infinite_logits(device, backend):
    """Masked vocab entries at -inf, including a whole leading tile of them."""
    vocab = 20000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))
    logits[:, :9000] = float("-inf")
    logits[1, 12000:] = float("-inf")
    logits = logits.to(device)
    labels = torch.tensor([9000, 11999, 19999], device=device)
    kw = dict(return_entropy=True, temperature=1.3)
    got = run(rlhf_kernels.token_logprobs, logits, labels, None, backend=backend, **kw)
    want = run_reference(logits, labels, None, **kw)
    for t in got:
        assert torch.isfinite(t).all()
    assert_matches(got, want, torch.float32, zmax(logits, 1.3))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_row_of_only_negative_infinity(device, backend):
    """A row with every logit at -inf has no distribution: NaN log-prob, entropy and
    gradient row, as torch's log_softmax gives, on every backend and device; the other
    rows are untouched."""
    logits = torch.randn(3, 700, generator=torch.Generator().manual_seed(6))
    logits[1] = float("-inf")
    logits = logits.to(device)
    labels = torch.tensor([3, 5, 699], device=device)
    lp, ent, grad = run(rlhf_kernels.token_logprobs, logits, labels, None, backend=backend, return_entropy=True)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(grad[1]).all()
    want = run_reference(logits, labels, None, return_entropy=True)
    assert all(torch.isnan(t[1]).all() for t in want)  # the float64 oracle agrees
    keep = [0, 2]
    assert_matches(tuple(t[keep] for t in (lp, ent, grad)), tuple(t[keep] for t in want), torch.float32,
                   zmax(logits[keep], 1.0))  # fmt: skip


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_or_inf_logit_poisons_its_row(device, backend, dtype):
    """One NaN or +inf logit anywhere in a row (here mid-row, in a vector body) makes that row's
    log-prob, entropy and gradient NaN, as torch's log_softmax does (a max that skipped the NaN,
    or an exponent clamp that dropped it, would give a finite, wrong row); other rows are
    untouched."""
    logits = torch.randn(3, 3000, generator=torch.Generator().manual_seed(7)).to(dtype)
    logits[0, 1234] = float("nan")
    logits[2, 2001] = float("inf")
    logits = logits.to(device)
    labels = torch.tensor([3, 5, 2999], device=device)
    lp, ent, grad = run(rlhf_kernels.token_logprobs, logits, labels, None, backend=backend, return_entropy=True)
    for row in (0, 2):
        assert torch.isnan(lp[row]) and torch.isnan(ent[row]) and torch.isnan(grad[row]).all(), row
    assert torch.isfinite(lp[1]) and torch.isfinite(ent[1]) and torch.isfinite(grad[1]).all()


@pytest.mark.parametrize("device,backend", backend_cases())
def test_unchecked_out_of_range_label_is_nan(device, backend):
    logits, labels, _ = make_batch(1, 4, 30, torch.float32, device)
    labels = labels.clone()
    labels[0, 1] = 30
    labels[0, 2] = -7
    lp = rlhf_kernels.token_logprobs(logits, labels, check_labels=False, backend=backend)
    assert torch.isnan(lp[0, 1]) and torch.isnan(lp[0, 2])
    assert torch.isfinite(lp[0, 3])


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype,ignore_index", [(torch.int32, -(2**63)), (torch.uint8, -100), (torch.int16, 2**40)])
def test_ignore_index_outside_the_label_dtype(device, backend, dtype, ignore_index):
    # No label can equal such an ignore_index; a comparison in the labels' own dtype would
    # wrap it (int32 against -2**63 is 0, uint8 against -100 is 156) and drop real tokens.
    logits = torch.randn(2, 3, 200, dtype=torch.float64)
    labels = torch.tensor([[0, 156, 7], [0, 0, 199]], dtype=dtype)
    want = reference(logits, labels.long(), ignore_index=-1)
    lp = rlhf_kernels.token_logprobs(logits.float().to(device), labels.to(device), ignore_index=ignore_index,
                                     backend=backend)  # fmt: skip
    torch.testing.assert_close(lp.double().cpu(), want, atol=1e-5, rtol=1e-5)
    seq = rlhf_kernels.sequence_logprobs(logits.float().to(device), labels.to(device), ignore_index=ignore_index,
                                         average=True, backend=backend)  # fmt: skip
    torch.testing.assert_close(seq.double().cpu(), want.mean(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_label_check_bound_outside_the_label_dtype(device, backend):
    """check_labels compares with the vocab in int64: uint8 labels against V = 300 (a bound that
    wraps to 44 in uint8) and int8 against V = 200 are all in range, and 255 / -3 still are not."""
    for dtype, vocab, good, bad in ((torch.uint8, 300, [0, 156, 255], None), (torch.int8, 200, [0, 127, 5], -3)):
        logits = torch.randn(1, 3, vocab, dtype=torch.float64)
        labels = torch.tensor([good], dtype=dtype)
        lp = rlhf_kernels.token_logprobs(logits.float().to(device), labels.to(device), backend=backend)
        torch.testing.assert_close(lp.double().cpu(), reference(logits, labels.long()), atol=1e-5, rtol=1e-5)
        if bad is not None:
            labels[0, 2] = bad
            with pytest.raises(ValueError, match="labels: value -3 is outside"):
                rlhf_kernels.token_logprobs(logits.float().to(device), labels.to(device), backend=backend)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_int64_offsets(device, backend):
    """Rows that start past 2**31 elements. torch.empty does not touch pages, so
    the 4 GiB buffer costs only the two rows that are written."""
    vocab = 1000
    if device == "cpu" and backend == "torch":
        pytest.skip("nothing kernel-specific to test")
    base = torch.empty(2**31 + 2 * vocab, dtype=torch.bfloat16, device=device)
    logits = base.as_strided((2, vocab), (2**31, 1), storage_offset=vocab)
    logits.copy_(torch.randn(2, vocab, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16))
    labels = torch.tensor([3, vocab - 1], device=device)
    got = run(rlhf_kernels.token_logprobs, logits, labels, None, backend=backend)
    assert_matches(got, run_reference(logits, labels, None), torch.bfloat16)
    del base


@pytest.mark.parametrize("device,backend", backend_cases())
def test_gradcheck_float64(device, backend):
    logits, labels, mask = make_batch(2, 3, 17, torch.float64, device, scale=2.0)
    x = logits.detach().clone().requires_grad_(True)

    def fn(x):
        lp, ent = rlhf_kernels.token_logprobs(x, labels, mask, temperature=0.8, return_entropy=True, backend=backend)
        return lp, ent

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_non_finite_logits_of_skipped_tokens_get_no_gradient(device, backend):
    """Ignored or masked tokens get 0 and a zero gradient whatever their logits hold (the torch
    backend's log_softmax spread their NaN over the row's gradient)."""
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5)).to(device)
    x[0, 1, 2], x[1, 3, 0], x[2, 0, 5] = float("nan"), float("inf"), float("nan")
    labels = torch.tensor([[1, -100, 2, 3], [0, 1, 2, 3], [4, 4, 4, 4]], device=device)
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    mask[1, 3] = mask[2, 0] = False
    x.requires_grad_()
    lp, ent = rlhf_kernels.token_logprobs(x, labels, mask, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    skipped = (labels == -100) | ~mask
    assert lp.isfinite().all() and ent.isfinite().all() and x.grad.isfinite().all()
    assert (x.grad[skipped] == 0).all() and (lp[skipped] == 0).all() and (x.grad[~skipped] != 0).any()


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_double_backward_refused(device, backend, inplace):
    """create_graph=True through the kernels raises (the native op's gradient used to carry no graph:
    a second derivative of zeros, with only a warning); plain backward is unaffected."""
    logits, labels, mask = make_batch(2, 3, 17, torch.float64, device)
    calls = {
        "token_logprobs": lambda x: rlhf_kernels.token_logprobs(x, labels, mask, return_entropy=True,
                                                                inplace_backward=inplace, backend=backend)[1],
        "sequence_logprobs": lambda x: rlhf_kernels.sequence_logprobs(x, labels, mask, inplace_backward=inplace,
                                                                      backend=backend),
    }  # fmt: skip
    for name, fn in calls.items():
        x = logits.detach().clone().requires_grad_(True)
        with pytest.raises(RuntimeError, match="double backward .create_graph=True. is not supported"):
            torch.autograd.grad(fn(x * 1.0).sum(), x, create_graph=True)
        x = logits.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x * 1.0).sum(), x)
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("device,backend", backend_cases())
def test_float64_logits(device, backend):
    logits, labels, mask = make_batch(2, 3, 300, torch.float64, device)
    kw = dict(return_entropy=True)
    got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, **kw)
    assert_matches(got, run_reference(logits, labels, mask, **kw), torch.float64)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_empty_batch(device, backend):
    logits = torch.randn(0, 5, 11, device=device, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long, device=device)
    lp = rlhf_kernels.token_logprobs(logits, labels, backend=backend)
    assert lp.shape == (0, 5)
    lp.sum().backward()
    assert logits.grad.shape == logits.shape


# --- bad input -----------------------------------------------------------------

BAD_INPUTS = [
    ("rank", lambda x, y: (x[0, 0, 0], y[0, 0]), {}, ValueError, "logits"),
    ("labels_shape", lambda x, y: (x, y[:, :-1]), {}, ValueError, "labels"),
    ("float_labels", lambda x, y: (x, y.float()), {}, TypeError, "labels"),
    ("int_logits", lambda x, y: (x.long(), y), {}, TypeError, "logits"),
    ("last_dim_stride", lambda x, y: (x[..., ::2], y), {}, ValueError, "logits"),
    ("label_too_big", lambda x, y: (x, torch.full_like(y, 11)), {}, ValueError, "labels"),
    ("label_negative", lambda x, y: (x, torch.full_like(y, -1)), {}, ValueError, "labels"),
    ("zero_temperature", lambda x, y: (x, y), {"temperature": 0.0}, ValueError, "temperature"),
    ("negative_temperature", lambda x, y: (x, y), {"temperature": -1.0}, ValueError, "temperature"),
    ("nan_temperature", lambda x, y: (x, y), {"temperature": float("nan")}, ValueError, "temperature"),
    ("mask_shape", lambda x, y: (x, y), {"mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "mask"),
    ("float_mask", lambda x, y: (x, y), {"mask": torch.ones(2, 4)}, TypeError, "mask"),
    ("unknown_backend", lambda x, y: (x, y), {"backend": "cuda_graphs"}, ValueError, "backend"),
    ("empty_vocab", lambda x, y: (x[..., :0], y), {}, ValueError, "logits"),
    ("huge_temperature", lambda x, y: (x, y), {"temperature": 10**400}, ValueError, "temperature"),
    ("temperature_past_float32", lambda x, y: (x, y), {"temperature": 1e46}, ValueError, "temperature: must be in"),
    ("tiny_temperature", lambda x, y: (x, y), {"temperature": 1e-40}, ValueError, "temperature: must be in"),
    ("ignore_index_past_int64", lambda x, y: (x, y), {"ignore_index": 2**64}, ValueError, "ignore_index"),
    ("string_flag", lambda x, y: (x, y), {"return_entropy": "no"}, TypeError, "return_entropy"),
    ("int_flag", lambda x, y: (x, y), {"check_labels": 0}, TypeError, "check_labels"),
]


@pytest.mark.parametrize("name,make,kw,exc,arg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["torch", "triton", "native", "auto"])
def test_bad_input(name, make, kw, exc, arg, backend):
    x = torch.randn(2, 4, 11)
    y = torch.randint(0, 11, (2, 4))
    if "backend" not in kw:
        kw = {**kw, "backend": backend}
    logits, labels = make(x, y)
    with pytest.raises(exc, match=arg):
        rlhf_kernels.token_logprobs(logits, labels, **kw)


def test_label_check_ignores_masked_tokens():
    x = torch.randn(2, 4, 11)
    y = torch.randint(0, 11, (2, 4))
    y[1, 2] = 999
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2] = False
    lp = rlhf_kernels.token_logprobs(x, y, mask)
    assert lp[1, 2] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_mixed_devices():
    x = torch.randn(2, 4, 11, device="cuda")
    with pytest.raises(ValueError, match="labels"):
        rlhf_kernels.token_logprobs(x, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        rlhf_kernels.token_logprobs(
            x, torch.zeros(2, 4, dtype=torch.long, device="cuda"), torch.ones(2, 4, dtype=torch.bool)
        )


@pytest.mark.parametrize("device,backend", [c for c in backend_cases() if c.values[0] == "cuda"])
def test_cuda_graph_capture(device, backend):
    """Forward and backward record into a CUDA graph with the default check_labels=True (its
    host sync is skipped while capturing) and replays on new data match eager calls; a kept
    label outside [0, V) then gives NaN for its token, as with check_labels=False."""
    logits, labels, mask = make_batch(2, 6, 1003, torch.bfloat16, device)
    x = logits.detach().clone().requires_grad_(True)
    y, m, g = labels.clone(), mask.clone(), torch.randn(2, 6, device=device)

    def step(check_labels=True):
        x.grad = None
        lp, ent = rlhf_kernels.token_logprobs(x, y, m, return_entropy=True, check_labels=check_labels,
                                              backend=backend)  # fmt: skip
        torch.autograd.backward((lp, ent), (g, 0.37 * g))
        return lp, ent, x.grad

    new_logits, new_labels, _ = make_batch(2, 6, 1003, torch.bfloat16, device, seed=5)
    new_labels[1, 3], m[1, 3] = 1003, True  # out of range, kept
    replayed = graph_replay(step, [x, y], [new_logits, new_labels])
    with pytest.raises(ValueError, match="labels: value 1003"):
        step()  # eagerly, the check runs
    eager = step(check_labels=False)
    assert torch.isnan(replayed[0][1, 3]) and torch.isnan(eager[0][1, 3])
    for got, want in zip(replayed, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    keep = torch.ones_like(m)
    keep[1, 3] = False
    want = reference(new_logits.double(), new_labels.masked_fill(~keep, 0), m & keep)
    torch.testing.assert_close(replayed[0][keep], want.float()[keep], **FWD_TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_unavailable_backend_says_why(backend, monkeypatch):
    from rlhf_kernels import _dispatch

    monkeypatch.setattr(
        _dispatch, "unavailable_reason", lambda b, d, native_op=None: "because" if b == backend else None
    )
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is unavailable: because"):
        rlhf_kernels.token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), backend=backend)


# --- torch.library / torch.compile ----------------------------------------------------


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_opcheck(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("fake tensors have no data pointer for the Triton interpreter; checked on GPU")
    logits, labels, _ = make_batch(2, 3, 40, torch.float32, device)
    logits = logits.detach().requires_grad_(True)
    op = getattr(torch.ops.rlhf_kernels, f"token_logprobs_fwd_{backend}")
    for entropy in (False, True):
        torch.library.opcheck(op, (logits, labels, 0.9, -100, entropy, False))


@pytest.mark.parametrize("device,backend", backend_cases(["torch", "triton", "native"]))
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_torch_compile_fullgraph(device, backend, inplace):
    """Traced whole (fullgraph), also with the gradient written into a sliced non-leaf view of
    the logits (inplace_backward: its overlap check must not break the graph)."""
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile cannot trace interpreted Triton kernels; checked on GPU")
    logits, labels, mask = make_batch(2, 3, 64, torch.float32, device)
    logits = logits._base  # [B, T + 1, V]: the op takes [:, :-1] of it

    def step(x):
        lp, ent = rlhf_kernels.token_logprobs((x * 1)[:, :-1], labels, mask, return_entropy=True,
                                              inplace_backward=inplace, backend=backend)  # fmt: skip
        return (lp.sum(-1) + 0.1 * ent.mean(-1)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x1 = logits.detach().clone().requires_grad_(True)
    x2 = logits.detach().clone().requires_grad_(True)
    eager = step(x1)
    eager.backward()
    out = compiled(x2)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_labels_on_another_device():
    x = torch.randn(2, 4, 11)
    with pytest.raises(ValueError, match="labels"):
        rlhf_kernels.token_logprobs(x, torch.zeros(2, 4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="mask"):
        rlhf_kernels.token_logprobs(
            x, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool, device="meta")
        )


# --- property-based: random shapes, strides, dtypes, temperatures, masks ----------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

if given is not None:

    @st.composite
    def random_problem(draw):
        batch = draw(st.integers(1, 3))
        seq = draw(st.integers(1, 5))
        vocab = draw(st.integers(1, 700))
        dtype = draw(st.sampled_from(DTYPES))
        pad_t = draw(st.integers(0, 2))  # extra time steps sliced away
        pad_v = draw(st.integers(0, 9))  # row stride larger than V
        time_major = draw(st.booleans())
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        shape = (seq + pad_t, batch, vocab + pad_v) if time_major else (batch, seq + pad_t, vocab + pad_v)
        base = (torch.randn(shape, generator=g) * draw(st.sampled_from([0.1, 3.0, 20.0]))).to(dtype)
        logits = base.transpose(0, 1) if time_major else base
        logits = logits[:, :seq, :vocab]
        labels = torch.randint(0, vocab, (batch, seq), generator=g)
        labels[torch.rand(batch, seq, generator=g) < 0.2] = -100
        mask = torch.rand(batch, seq, generator=g) > draw(st.sampled_from([0.0, 0.3, 1.0]))
        temperature = draw(st.sampled_from([1.0, 0.5, 1.7]))
        return logits, labels, mask, temperature, dtype

    @pytest.mark.parametrize("backend", ["triton", "native"])
    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problem=random_problem())
    def test_random_problems_match_reference(backend, problem):
        reason = rlhf_kernels._dispatch.unavailable_reason(backend, torch.device("cpu"))
        if reason is not None:
            pytest.skip(reason)
        logits, labels, mask, temperature, dtype = problem
        kw = dict(temperature=temperature, return_entropy=True)
        got = run(rlhf_kernels.token_logprobs, logits, labels, mask, backend=backend, **kw)
        assert_matches(got, run_reference(logits, labels, mask, **kw), dtype, zmax(logits, temperature))


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_inplace_backward_is_caught_when_logits_are_saved_elsewhere(device, backend):
    """Another op saved the logits for its own backward: overwriting them must raise."""
    logits, labels, _ = make_batch(2, 3, 50, torch.float32, device)
    x = logits.detach().clone().requires_grad_(True)
    h = x * 1
    aux = (h**2).sum()  # saves h
    lp = rlhf_kernels.token_logprobs(h, labels, inplace_backward=True, backend=backend).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (aux + lp).backward()


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_inplace_backward_on_overlapping_rows_falls_back(device, backend):
    row = torch.randn(1, 1, 40, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.tensor([[3, 7, 9]], device=device)
    x = row.clone().requires_grad_(True)
    rlhf_kernels.token_logprobs(
        (x * 1).expand(1, 3, 40), labels, inplace_backward=True, backend=backend
    ).sum().backward()
    xr = row.double().clone().requires_grad_(True)
    reference(xr.expand(1, 3, 40), labels).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)


def test_meta_tensors_give_shapes():
    """On the meta device (shapes only, e.g. to plan memory) the ops run with their defaults:
    the label check, which would read data, is skipped; outputs and gradients have the
    shapes and dtypes of a real call."""
    x = torch.empty(2, 5, 100, dtype=torch.bfloat16, device="meta", requires_grad=True)
    y = torch.zeros(2, 5, dtype=torch.long, device="meta")
    lp, ent = rlhf_kernels.token_logprobs(x, y, return_entropy=True)
    assert lp.shape == ent.shape == (2, 5) and lp.dtype == torch.float32 and lp.device.type == "meta"
    (lp + ent).sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype
    seq = rlhf_kernels.sequence_logprobs(x, y)
    assert seq.shape == (2,) and seq.device.type == "meta"


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_inplace_ops_refuse_rows_that_share_memory(device, backend):
    """The registered in-place backward, called directly on rows that share memory (where the
    public op falls back, above), raises naming the logits instead of racing on them."""
    x = torch.randn(1, 40, device=device).expand(3, 40)
    labels, stats = torch.tensor([3, 7, 9], device=device), torch.zeros(3, device=device)
    op = getattr(torch.ops.rlhf_kernels, f"token_logprobs_bwd_inplace_{backend}")
    with pytest.raises(ValueError, match="logits: rows share memory"):
        op(x, torch.ones(3, device=device), None, labels, stats, stats, 1.0, -100)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_entropy_with_large_logits(device, backend):
    """Logits sharing a large offset with one dominant entry: a tiny entropy must not cancel to 0."""
    g = torch.Generator().manual_seed(9)
    logits = 30 + torch.randn(4, 32000, generator=g)
    logits[:, 5] = torch.tensor([50.0, 52.0, 55.0, 45.0])
    logits = logits.to(device)
    labels = torch.full((4,), 5, device=device)
    _, ent = rlhf_kernels.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    _, want = reference(logits.double(), labels, return_entropy=True)
    # float32 sums of terms far below 1 limit any backend (the torch one too) to ~1e-6 absolute;
    # a cancelling formula returns 0 or 1e-5-sized errors here
    assert want.min() < 1e-4
    torch.testing.assert_close(ent.double(), want, rtol=5e-2, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_cases(["triton", "native"]))
def test_eager_autograd_path_matches_the_registered_op(device, backend):
    """Eager differentiable calls go through the autograd.Function twin of the op's
    torch.library registration (no per-call schema walk); both give the same values and
    gradients."""
    from rlhf_kernels import _dispatch
    from rlhf_kernels.ops import logprobs as logprobs_ops

    logits, labels, _ = make_batch(2, 3, 50, torch.float32, device)
    op = logprobs_ops._FWD_OPS[backend]
    args = (labels.masked_fill(labels < 0, -100), 1.0, -100, True, False)
    x1 = logits.detach().clone().requires_grad_(True)
    x2 = logits.detach().clone().requires_grad_(True)
    eager = _dispatch.call(op, x1, *args)
    registered = op(x2, *args)
    assert type(eager[0].grad_fn).__name__.endswith("_eagerBackward")
    assert type(registered[0].grad_fn).__name__ != type(eager[0].grad_fn).__name__
    w = torch.randn(eager[0].shape, generator=torch.Generator().manual_seed(0)).to(device)
    ((eager[0] * w).sum() + eager[2].sum()).backward()
    ((registered[0] * w).sum() + registered[2].sum()).backward()
    for a, b in zip(eager, registered, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_float32_split_of_launch_scalars():
    """The Triton launchers' float arguments (1/T and the like) are rounded to float32 without a
    tensor (triton/_common.py to_float32): the same value as torch's rounding, sign of zero,
    subnormals, ties and values past float32's range (+-inf) included; hi + lo keeps a double."""
    common = pytest.importorskip("rlhf_kernels.triton._common")
    g = torch.Generator().manual_seed(41)
    values = (torch.rand(20000, generator=g, dtype=torch.float64) - 0.5) * 10 ** (
        torch.rand(20000, generator=g, dtype=torch.float64) * 90 - 50
    )
    edge = [0.0, -0.0, 1 / 3, 2.0**-149, 2.0**-150, 1.5 * 2.0**-149, 1 + 2.0**-24, 1 + 3 * 2.0**-24,
            3.4028234663852886e38, 3.4028235677973366e38, 3.402823669209385e38, 1e39, -1e300, math.inf, -math.inf]
    for v in [*values.tolist(), *edge]:
        want = float(torch.tensor(v, dtype=torch.float32))
        got = common.to_float32(v)
        assert got == want and math.copysign(1, got) == math.copysign(1, want), (v, got, want)
    hi, lo = common.split_float(0.7)
    assert common.to_float32(hi) == hi and common.to_float32(lo) == lo and abs(hi + lo - 0.7) < 1e-15
    assert all(x != x for x in common.split_float(float("nan")))
    assert common.to_float32(2**200) == math.inf and common.to_float32(-(2**2000)) == -math.inf  # ints past float
