"""Helpers shared by the Triton kernel families."""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

from rlhf_kernels import _dispatch

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()


def wrap_triton(kernel):
    """How a Triton op (``torch.library.triton_op``) launches ``kernel``: through
    ``torch.library.wrap_triton`` when the call is traced or watched (torch.compile, fake
    tensors, a dispatch mode or the profiler: ``_dispatch._observed``), which is what lets
    them see the kernel; launched directly otherwise. wrap_triton's eager launch goes
    through a higher-order op that flattens the arguments with pytree: about 60 us a launch
    on this repository's CPU, against under 1 us for the launch itself, host time that on a
    GPU delays the kernel. A kernel run by the Triton interpreter (``TRITON_INTERPRET=1``)
    is launched as it is either way: torch >= 2.12 does the same, older torch (2.11, on the
    lent GPU machines) refuses interpreted kernels. A GPU launch runs on the device of its
    first tensor argument (see :class:`_OnTensorDevice`)."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    if torch.compiler.is_compiling() or _dispatch._observed():
        return _OnTensorDevice(_torch_wrap_triton(kernel))
    return _OnTensorDevice(kernel)


class _OnTensorDevice:
    """``kernel[grid](*args)`` under ``torch.cuda.device`` of the first tensor argument.

    Triton launches on the current CUDA device. Tensors elsewhere (a model split over GPUs
    with ``device_map="auto"`` keeps the LM head's logits on the last GPU while cuda:0 stays
    current) would be read by a kernel on the wrong GPU; the native backend guards its
    launches the same way (csrc/bindings.cpp: run_kernel). Costs a device query per launch."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            if device is None or device.type != "cuda" or device.index in (None, torch.cuda.current_device()):
                return launch(*args, **kwargs)
            with torch.cuda.device(device):
                return launch(*args, **kwargs)

        return run


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grids: ``triton.cdiv`` is a constexpr function in Triton
    3.8, whose call wrapper costs microseconds of host time per launch (as next_power_of_2's)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2``, without its call
    wrapper (see :func:`cdiv`)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def split_float(value: float) -> tuple[float, float]:
    """``value = hi + lo`` with both parts exact float32, to ~2^-48 relative.

    Triton passes Python float arguments as float32; kernels that compute in
    float64 rebuild the double with :func:`join_float`.
    """
    hi = to_float32(value)
    return hi, to_float32(value - hi)


_F32 = struct.Struct("<f")


def to_float32(value: float) -> float:
    """``value`` rounded to float32 (to nearest even; past float32's range, +-inf), as
    ``float(torch.tensor(value, dtype=torch.float32))`` gives, without a tensor: every
    Triton launch splits its float arguments, and a tensor each cost a few us a call."""
    try:
        return _F32.unpack(_F32.pack(float(value)))[0]
    except (OverflowError, struct.error):  # finite (a float, or an int past float's range), past float32's
        return math.inf if value > 0 else -math.inf


@triton.jit
def join_float(hi, lo, acc_ty: tl.constexpr):
    """The value that :func:`split_float` split, in ``acc_ty``. In float32 that is ``hi``
    itself, the value rounded once to float32 (``hi + lo`` rounds to it, or, on a rare
    tie, one ulp off), used straight from the kernel's parameters: no register holds a
    loop-invariant sum."""
    if acc_ty == tl.float64:
        return tl.cast(hi, acc_ty) + tl.cast(lo, acc_ty)
    return tl.cast(hi, acc_ty)


def with_ones(entry, names):
    """A compile-check entry ``(kernel, signature, constexprs, num_warps)`` with the int
    arguments in ``names`` set to 1 the way the JIT passes an int equal to 1: as a constant,
    which has no tensor methods (``.to``) and can change the kernel's types."""
    kernel, signature, constexprs, num_warps = entry
    signature, constexprs = dict(signature), dict(constexprs)
    for name in names:
        if name in signature:
            signature[name] = "constexpr"
            constexprs[name] = 1
    return kernel, signature, constexprs, num_warps
