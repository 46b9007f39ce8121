"""Helpers shared by the Triton kernel families."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton as _torch_wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()


def wrap_triton(kernel):
    """``torch.library.wrap_triton``, except that a kernel run by the Triton interpreter
    (``TRITON_INTERPRET=1``) is launched as it is: torch >= 2.12 does the same, older
    torch (2.11, on the lent GPU machines) refuses interpreted kernels."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return _torch_wrap_triton(kernel)


def split_float(value: float) -> tuple[float, float]:
    """``value = hi + lo`` with both parts exact float32, to ~2^-48 relative.

    Triton passes Python float arguments as float32; kernels that compute in
    float64 rebuild the double with :func:`join_float`.
    """
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


@triton.jit
def join_float(hi, lo, acc_ty: tl.constexpr):
    return tl.cast(hi, acc_ty) + tl.cast(lo, acc_ty)
