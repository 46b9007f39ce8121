"""rlhf_kernels: fused Triton and CUDA C++ kernels for RLHF training.

Every op takes ``backend="auto" | "torch" | "triton" | "native"``; see
:mod:`rlhf_kernels._dispatch` for how ``"auto"`` chooses.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_kernels import _dispatch, native, ops
from rlhf_kernels.ops import *  # noqa: F403  (the public ops)

__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """Which backends are available, how the extension was built, and library versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": _dispatch.triton_interpreted(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native": native.info(),
        "backends": {d: _dispatch.available_backends(d) for d in devices},
        "auto": {d: _dispatch.resolve("auto", torch.device(d)) for d in devices},
    }


__all__ = [*ops.__all__, "build_info", "__version__"]
