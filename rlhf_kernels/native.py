"""Loads the compiled extension ``rlhf_kernels._C`` and reports how it was built.

Importing ``_C`` registers the native ops (``torch.ops.rlhf_kernels.*_native``)
for the CPU and, when compiled with nvcc, CUDA dispatch keys.
"""

from __future__ import annotations

from typing import Any

try:
    from rlhf_kernels import _C  # noqa: F401  (registers the ops)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

# Read once: dispatch asks on every call, also inside torch.compile, which cannot trace a pybind function.
_HAS_CUDA = _C is not None and bool(_C.build_info()["cuda"])


def available() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _HAS_CUDA


def info() -> dict[str, Any]:
    """What the extension was compiled with (empty with ``error`` when it is absent)."""
    if _C is None:
        return {"built": False, "error": LOAD_ERROR}
    return {"built": True, **_C.build_info()}
