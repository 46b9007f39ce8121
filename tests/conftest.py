"""Shared test setup: devices, backends, tolerances.

Without a CUDA device the Triton kernels run on CPU tensors through the Triton
interpreter; TRITON_INTERPRET must be set before triton is first imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rlhf_kernels import _dispatch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

try:  # HYPOTHESIS_PROFILE=thorough for a long property-based run
    from hypothesis import settings

    settings.register_profile("ci", max_examples=30)
    settings.register_profile("thorough", max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass

# Test on CPU always, and on CUDA (marked `gpu`) when a device is there.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")]),
]


def backend_cases(backends=_dispatch.BACKENDS, native_op=None):
    """(device, backend) pairs; the ones that cannot run here are skipped with the reason."""
    cases = []
    for dev in DEVICES:
        device = dev.values[0]
        for backend in backends:
            marks = list(dev.marks)
            if device == "cpu" or HAS_CUDA:
                reason = _dispatch.unavailable_reason(backend, torch.device(device), native_op)
                if reason is not None:
                    marks.append(pytest.mark.skip(reason=reason))
            cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


@pytest.fixture(params=list(_dispatch.BACKENDS))
def cpu_backend(request):
    """Each backend that runs on CPU here (the integration tests patch with it)."""
    reason = _dispatch.unavailable_reason(request.param, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    return request.param


def counted(calls: dict):
    """A decorator recording calls of a stand-in framework function in ``calls`` (name -> count),
    keeping its signature (the integrations bind arguments to it)."""
    import inspect

    def wrap(fn):
        def wrapper(*args, **kwargs):
            calls[fn.__name__] = calls.get(fn.__name__, 0) + 1
            return fn(*args, **kwargs)

        wrapper.__name__ = fn.__name__
        wrapper.__signature__ = inspect.signature(fn)
        return wrapper

    return wrap


def graph_replay(step, static: list, fresh: list):
    """Records ``step()`` (tensors out, reading the tensors of ``static``) into a CUDA graph,
    after the side-stream warm-up that capture asks for, then copies ``fresh`` into ``static``
    and replays. Returns the replay's outputs, cloned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
    graph.replay()
    return [t.clone() for t in captured]
