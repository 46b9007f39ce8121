"""The row math of the CUDA log-prob kernels, run on the host against the float64 oracle.

CI has nvcc but no GPU, so the CUDA kernels themselves never run there. Their
per-element and per-row formulas live in ``csrc/common.cuh`` as
``__host__ __device__`` functions (the base-2 online log-sum-exp state, the
row results in nats, the folded gradient with its per-vector label test);
``tests/cuda_math_host.cu`` runs them on the CPU in float and in double,
simulating the 256 threads of a block, and this test compares what it prints
with ``rlhf_kernels.reference`` in float64, for the gradient from the saved lse
(token_logprobs' backward) and from the same pass (the fused PPO sweeps). On the
GPU the only differences are that 2^x, the NaN-keeping max and the rounding
multiply are single PTX instructions.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import torch

from rlhf_kernels import compile_check
from rlhf_kernels.reference import logprobs as ref

pytestmark = [
    pytest.mark.nvcc,
    pytest.mark.skipif(compile_check.find_nvcc() is None, reason="no CUDA toolkit"),
]

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def host_binary(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cuda_math") / "cuda_math_host"
    cmd = [compile_check.find_nvcc(), "-std=c++17", "-O2", "-I", str(ROOT / "csrc"),
           str(ROOT / "tests" / "cuda_math_host.cu"), "-o", str(exe)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return exe


def run_host(exe, logits, labels, g, gh, *, temperature, entropy, fused=False, acc=torch.float32):
    """(lse, logprob, entropy, grad) as the kernels compute them in ``acc``, as float64 tensors."""
    rows, vocab = logits.shape
    payload = b"".join([
        struct.pack("<qqqqqd", rows, vocab, int(entropy), int(fused), int(acc == torch.float64), 1.0 / temperature),
        logits.double().contiguous().numpy().tobytes(),
        labels.to(torch.int64).contiguous().numpy().tobytes(),
        g.double().contiguous().numpy().tobytes(),
        gh.double().contiguous().numpy().tobytes(),
    ])  # fmt: skip
    out = subprocess.run([str(exe)], input=payload, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    values = torch.frombuffer(bytearray(out.stdout), dtype=torch.float64)
    assert values.numel() == 3 * rows + rows * vocab
    lse, logprob, ent, grad = values.split([rows, rows, rows, rows * vocab])
    return lse, logprob, ent, grad.view(rows, vocab)


def oracle(logits, labels, g, gh, *, temperature, entropy):
    x = logits.double().requires_grad_(True)
    lp, ent = ref.token_logprobs(x, labels, temperature=temperature, return_entropy=True)
    loss = (g.double() * lp).sum() + ((gh.double() * ent).sum() if entropy else 0.0)
    (grad,) = torch.autograd.grad(loss, x)
    lse = torch.logsumexp(logits.double() / temperature, dim=-1)
    return lse, lp.detach(), ent.detach(), grad


def make_rows(pattern, vocab, gen):
    """Four rows of logits (bf16-representable, as the kernels mostly see) and labels."""
    x = (torch.randn(4, vocab, generator=gen) * 3).bfloat16().double()
    labels = torch.randint(0, vocab, (4,), generator=gen)
    if pattern == "masked_vocab":  # -inf entries, including a whole leading chunk and the label of row 1
        x[:, : min(vocab, 20)] = float("-inf")
        x[:, -1] = float("-inf")
        x[:, min(vocab - 1, 20)] = 1.0  # every row keeps a finite logit
        labels[1] = 0
    elif pattern == "confident":  # the label well above the rest: small log-prob and entropy
        x = torch.randn(4, vocab, generator=gen).bfloat16().double()
        x[torch.arange(4), labels] = 12.0
    elif pattern == "large":
        x = x * 300.0
    return x, labels


# float: the kernels' tolerances (tests/test_logprobs.py); double: near float64 rounding
FWD_TOL = {torch.float32: dict(atol=3e-6, rtol=2e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}
GRAD_ATOL = {torch.float32: 5e-7, torch.float64: 1e-14}  # per unit of max|z|


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fused", [False, True], ids=["saved-lse", "fused"])
@pytest.mark.parametrize("entropy", [False, True], ids=["noent", "ent"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab", [1, 7, 8, 17, 64, 1000, 5000])
@pytest.mark.parametrize("pattern", ["plain", "masked_vocab", "confident", "large"])
def test_row_math_matches_float64(host_binary, pattern, vocab, temperature, entropy, fused, acc):
    if pattern == "masked_vocab" and vocab < 8:
        pytest.skip("masked_vocab needs a few entries")
    gen = torch.Generator().manual_seed(vocab * 7 + len(pattern))
    x, labels = make_rows(pattern, vocab, gen)
    g = torch.randn(4, generator=gen)
    gh = torch.randn(4, generator=gen) if entropy else torch.zeros(4)
    lse, lp, ent, grad = run_host(host_binary, x, labels, g, gh, temperature=temperature, entropy=entropy,
                                  fused=fused, acc=acc)  # fmt: skip
    want_lse, want_lp, want_ent, want_grad = oracle(x, labels, g, gh, temperature=temperature, entropy=entropy)

    z_max = max(1.0, x[torch.isfinite(x)].abs().max().item() / temperature)
    tol = FWD_TOL[acc]
    torch.testing.assert_close(lse, want_lse, atol=tol["atol"] * z_max, rtol=tol["rtol"])
    torch.testing.assert_close(lp, want_lp, atol=tol["atol"] * z_max, rtol=tol["rtol"])
    if pattern == "confident" and acc == torch.float32:  # small log-probs to float ulps of the sum, not of z
        torch.testing.assert_close(lp, want_lp, atol=(4 + vocab / 256) * 2.0**-24, rtol=1e-4)
    if entropy:
        torch.testing.assert_close(ent, want_ent, atol=4 * tol["atol"] * z_max, rtol=4 * tol["rtol"])
    torch.testing.assert_close(
        grad, want_grad, atol=GRAD_ATOL[acc] * z_max, rtol=1e-4 if acc == torch.float32 else 1e-9
    )
    assert not grad.isnan().any()


@pytest.mark.parametrize("entropy", [False, True], ids=["noent", "ent"])
@pytest.mark.parametrize("fused", [False, True], ids=["saved-lse", "fused"])
def test_one_token_vocab(host_binary, entropy, fused):
    """log-prob and entropy exactly 0; the gradient g (1 - p) / T within a few ulp of z (the
    gradient's fma does not round x * c as the forward's multiply does, and the saved lse in
    nats need not round-trip to base 2)."""
    x = torch.tensor([[3.25], [-1e4], [0.0], [77.0]])
    labels = torch.zeros(4, dtype=torch.int64)
    g, gh = torch.full((4,), -2.0), torch.ones(4) if entropy else torch.zeros(4)
    lse, lp, ent, grad = run_host(host_binary, x, labels, g, gh, temperature=0.7, entropy=entropy, fused=fused)
    assert torch.equal(lp, torch.zeros(4, dtype=torch.float64))
    if entropy:
        assert torch.equal(ent, torch.zeros(4, dtype=torch.float64))
    z2 = x[:, 0].abs() * 1.4426950408889634 / 0.7
    assert (grad[:, 0].abs() <= 2.0**-21 * z2 * g.abs() / 0.7).all(), grad


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_huge_entropy_gradient_keeps_masked_vocab_finite(host_binary, acc):
    """A -inf logit gets exactly 0 gradient even when the entropy's upstream gradient is near
    the float range: its exponent is clamped to a value whose product with the coefficient
    stays finite (an exponent of -1e4 overflowed at |gH| / T ~ 5e34)."""
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(5))
    x[:, 3:9] = float("-inf")
    labels = torch.tensor([1, 20])
    gh = torch.tensor([1e35, -1e35])
    _, _, _, grad = run_host(host_binary, x, labels, torch.ones(2), gh, temperature=1.0, entropy=True, acc=acc)
    assert torch.equal(grad[:, 3:9], torch.zeros(2, 6, dtype=torch.float64))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fused", [False, True], ids=["saved-lse", "fused"])
@pytest.mark.parametrize("entropy", [False, True], ids=["noent", "ent"])
def test_dead_nan_and_inf_rows(host_binary, entropy, fused, acc):
    """A row of only -inf logits has no distribution (NaN everywhere, as torch); one NaN logit, or
    one +inf logit, poisons its row; the other rows are untouched."""
    vocab = 40
    x = torch.randn(4, vocab, generator=torch.Generator().manual_seed(6))
    x[0] = float("-inf")
    x[1, 17] = float("nan")
    x[2, 30] = float("inf")
    labels = torch.tensor([3, 5, 9, 11])
    g, gh = torch.ones(4), torch.ones(4)
    lse, lp, ent, grad = run_host(host_binary, x, labels, g, gh, temperature=1.0, entropy=entropy, fused=fused, acc=acc)
    for row in (0, 1, 2):
        assert lp[row].isnan() and grad[row].isnan().all(), row
        if entropy:
            assert ent[row].isnan(), row
    assert torch.isfinite(lp[3]) and torch.isfinite(grad[3]).all()
