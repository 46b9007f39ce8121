"""pytest-benchmark suite for token_logprobs: every available backend and the baselines.

Run with ``make bench-pytest`` (or ``pytest benchmarks --benchmark-only``); the
``rlhf-kernels bench`` driver covers larger shapes, memory and bandwidth.
Shapes are kept CPU-sized unless a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(16384, 128256, torch.bfloat16)] if DEVICE.type == "cuda" else [(512, 32000, torch.bfloat16)]
PROVIDERS = list(bench.providers(DEVICE))


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_token_logprobs(benchmark, provider, mode, shape):
    n, v, dtype = shape
    if provider == "row_loop" and n > 4096:
        pytest.skip("Python loop over too many rows")
    logits, labels = bench._inputs(n, v, dtype, DEVICE)
    case = next(
        c
        for c in bench.token_logprobs_cases(logits, labels, 1.0, include=[provider], log=lambda _: None)
        if c.provider == provider and c.mode == mode
    )

    def run(state):
        out = case.step(state)
        _sync()
        return out

    benchmark.extra_info.update(provider=provider, mode=mode, shape=f"{n}x{v}", dtype=str(dtype))
    benchmark.pedantic(run, setup=lambda: ((case.setup(),), {}), rounds=10, warmup_rounds=1)
