"""Backend selection: the one place that decides which implementation runs.

``"auto"`` picks the fastest available backend for the tensors' device:
``native`` on CUDA when the extension was built with nvcc (then ``triton``, then
``torch``), ``native`` on CPU when the extension is built (else ``torch``). On an
H200 the CUDA C++ kernels were as fast as or faster than the Triton ones for every
op's wall time (benchmarks/results/bench-NVIDIA_H200-20261127-115011.txt:
token_logprobs fwd+bwd 3.09 vs 3.24 ms, GAE 0.073 vs 0.125 ms, ppo_policy_loss
fwd+bwd 0.35 vs 0.80 ms; the fused-linear ops within 1%), so Triton is the default
only where the extension is absent or CPU-only. Triton runs
on CPU tensors only under ``TRITON_INTERPRET=1`` (how CI tests the kernels), and is
never picked by ``"auto"`` there.
"""

from __future__ import annotations

import functools
import os

import torch

from rlhf_kernels import native

BACKENDS = ("torch", "triton", "native")

try:
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:
    _TRITON_ERROR = f"{type(exc).__name__}: {exc}"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device, native_op: str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device``, or ``None`` when it can.

    ``native_op`` names the op the caller needs from the extension (an older
    build may lack a newer op family)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_ERROR is not None:
            return f"triton is not importable ({_TRITON_ERROR})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreted():
            return None
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"
    if backend == "native":
        if not native.available():
            return f"the rlhf_kernels._C extension is not built ({native.LOAD_ERROR})"
        if native_op is not None and not _has_native_op(native_op):
            return f"this build of rlhf_kernels._C has no {native_op} (rebuild the extension)"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            return None if native.has_cuda() else "rlhf_kernels._C was built without CUDA (no nvcc at build time)"
        return f"no native kernels for device {device}"
    raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


@functools.cache
def _has_native_op(name: str) -> bool:
    """Whether the loaded extension registered ``rlhf_kernels::<name>`` (fixed once it is loaded;
    a lookup in torch.ops costs microseconds on every call otherwise)."""
    return hasattr(torch.ops.rlhf_kernels, name)


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def resolve(backend: str, device: torch.device, native_op: str | None = None) -> str:
    """Map a user's ``backend`` argument to the backend that will run."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a string, got {type(backend).__name__}")
    if backend == "auto":
        order = ("native", "triton", "torch") if device.type == "cuda" else ("native", "torch")
        return next(b for b in order if unavailable_reason(b, device, native_op) is None)
    reason = unavailable_reason(backend, device, native_op)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is unavailable: {reason}")
    return backend


def kernel_ops(*names: str) -> dict[str, tuple]:
    """``{backend: (op, ...)}`` for each kernel backend (triton, native) that
    registered every ``rlhf_kernels::<name>_<backend>`` op in ``names``."""
    found = {}
    for backend in ("triton", "native"):
        ops = [getattr(torch.ops.rlhf_kernels, f"{name}_{backend}", None) for name in names]
        if all(op is not None for op in ops):
            found[backend] = tuple(op.default for op in ops)
    return found


# --- autograd: one registration, two entry points -----------------------------------
# torch.library's autograd wrapper re-reads the op's schema on every differentiable call
# (torch._library.utils.fill_defaults rebuilds the argument list once per argument:
# 20-60 us a call for these schemas, more than the kernels of a small batch), and even a
# call without grad passes through its Python autograd kernel (about 6 us). Eager calls
# go through an equivalent autograd.Function that runs the op below the autograd layer
# (as torch's own wrapper does), and eager calls without grad go straight below it;
# traced calls (torch.compile) go through the registered op.
#
# Below autograd, an op defined in Python (the Triton ops, torch.library.triton_op) costs
# another ~40 us a call in the dispatcher and custom_op's backend wrapper (argument
# conversion, output aliasing checks), against ~2 us for the launch itself: on this
# repository's CPU a 16-argument op took 49 us registered, 7 us called directly. Eager
# calls on plain tensors that nothing observes (_observed: no dispatch mode, functorch
# transform, profiler or tracer) call its Python function directly (the same function the
# op runs, launches unwrapped); anything else takes the registered op. The C++ ops
# (native) always go through the dispatcher, which is cheap for them.
_EAGER: dict = {}
_DIRECT: dict = {}  # op -> its Python function, or None for a C++ op
_UNKNOWN = object()


def _python_impl(op):
    """The Python function a functional torch.library op defined in Python runs, or None: a C++
    op, or one that writes an argument (the registered op bumps that tensor's version counter,
    which lets autograd catch a later use of values it overwrote)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover (a torch without custom_op)
        return None
    if any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments):
        return None
    opdef = OPDEFS.get(op._schema.name)
    return getattr(opdef, "_init_fn", None)


def _observed() -> bool:
    """Whether something above the kernels watches or records op calls: a dispatch mode
    (FakeTensorMode, FlopCounterMode ...), a functorch transform (vmap's and grad's wrapped
    tensors look like plain tensors to type()), the profiler (its op names come from the
    dispatcher), the TorchScript tracer or make_fx's pre-dispatch tracing."""
    try:
        return bool(
            torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active()
            or torch.autograd._profiler_enabled()
            or torch._C._get_tracing_state() is not None
            or torch._C._dispatch_tls_local_include_set().has(torch._C.DispatchKey.PreDispatch)
        )
    except AttributeError:  # a torch without one of these hooks: assume watched, take the op
        return True


def _runner(op, args):
    """``op`` itself, or its Python function when nothing but plain tensors can see the call."""
    direct = _DIRECT.get(op, _UNKNOWN)
    if direct is _UNKNOWN:
        direct = _DIRECT[op] = _python_impl(op)
    if direct is None or _observed():
        return op
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) is not torch.Tensor:  # a subclass (DTensor, fake ...)
            return op
    return direct


def first_order(what: str, *, once_differentiable: bool = False):
    """A backward decorator: it raises when asked for a graph (``create_graph=True``, grad mode
    on in backward), since the kernels' gradients are not differentiable and a C++ op would hand
    back one that silently carries no graph (a second derivative of zeros). The check runs before
    ``once_differentiable`` (which switches grad mode off, and returns constants where the
    upstream gradient needs no grad) when that is asked for too."""

    def decorate(backward):
        inner = torch.autograd.function.once_differentiable(backward) if once_differentiable else backward

        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled() and not torch.compiler.is_compiling():
                raise RuntimeError(f"{what}: double backward (create_graph=True) is not supported by the kernel "
                                   "backends; use backend='torch' for higher-order gradients")  # fmt: skip
            return inner(ctx, *grads)

        return checked

    return decorate


def register_autograd(op, backward, setup_context, *, differentiable_backward: bool = False) -> None:
    """``torch.library.register_autograd(op, backward, setup_context=...)``, plus the
    same formula as an autograd.Function that :func:`call` uses in eager mode. Unless
    ``differentiable_backward`` (a backward written in differentiable PyTorch), the backward
    is :func:`first_order`."""
    if not differentiable_backward:
        backward = first_order(op._schema.name)(backward)

    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = _runner(op, args)(*args)
        setup_context(ctx, args, output)
        return output

    _EAGER[op] = type(f"{op.__name__}_eager", (torch.autograd.Function,),
                      {"forward": staticmethod(forward), "backward": staticmethod(backward)})  # fmt: skip


def call(op, *args):
    """Run a kernel op with its autograd formula: all arguments positional."""
    eager = _EAGER.get(op)
    if eager is None or torch.compiler.is_compiling():
        return op(*args)
    if torch.is_grad_enabled():
        return eager.apply(*args)
    # No graph to record: skip the op's Python autograd kernel, as torch's own no-grad
    # path does. Only functional ops (no mutated or aliased arguments) come through here.
    with torch._C._AutoDispatchBelowAutograd():
        return _runner(op, args)(*args)


def call_below_autograd(op, *args):
    """A kernel op that records no graph (a backward's own kernels, ops with no formula). A call
    that could be differentiated (create_graph) takes the registered op, which refuses it."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    ):
        return op(*args)
    return _runner(op, args)(*args)
