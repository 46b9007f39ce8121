"""rlhf_kernels: fused Triton and CUDA C++ kernels for RLHF training.

Every op takes ``backend="auto" | "torch" | "triton" | "native"``; see
:mod:`rlhf_kernels._dispatch` for how ``"auto"`` chooses.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_kernels import _dispatch, native
from rlhf_kernels.ops import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    gae,
    grpo_advantages,
    kl_penalty,
    kto_loss,
    masked_whiten,
    orpo_loss,
    ppo_loss_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    simpo_loss,
    token_logprobs,
)

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


__all__ = [
    "token_logprobs",
    "sequence_logprobs",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "bradley_terry_loss",
    "DPO_LOSS_TYPES",
    "gae",
    "masked_whiten",
    "grpo_advantages",
    "ppo_policy_loss",
    "ppo_value_loss",
    "kl_penalty",
    "ppo_loss_from_logits",
    "build_info",
    "__version__",
]
