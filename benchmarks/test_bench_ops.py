"""pytest-benchmark suite: every op's providers (our backends and the baselines), side by side.

Run with ``make bench-pytest`` (or ``pytest benchmarks --benchmark-only``); the
``rlhf-kernels bench`` driver adds memory, bandwidth and plots. Shapes are the
driver's quick set: CPU-sized without a GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch

from rlhf_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_MAKERS = bench.default_problems(DEVICE, quick=True)


def _params():
    params = []
    for index, make in enumerate(_MAKERS):
        problem = make()
        for provider in problem.providers:
            for mode in ("fwd", "fwd+bwd"):
                params.append(pytest.param(index, provider, mode, id=f"{problem.op}-{problem.shape}-{provider}-{mode}"))
        del problem
    return params


@functools.lru_cache(maxsize=1)  # one problem's inputs alive at a time
def _problem(index):
    return _MAKERS[index]()


@pytest.mark.parametrize("index,provider,mode", _params())
def test_op(benchmark, index, provider, mode):
    problem = _problem(index)
    case = next(c for c in bench.cases(problem, [provider]) if c.provider == provider and c.mode == mode)

    def step(state):
        case.step(state)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(op=problem.op, shape=problem.shape, provider=provider, mode=mode)
    benchmark.pedantic(step, setup=lambda: ((case.setup(),), {}), rounds=10, warmup_rounds=1)
