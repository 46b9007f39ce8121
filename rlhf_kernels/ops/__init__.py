"""Public ops, one module per op family."""

from rlhf_kernels.ops.logprobs import token_logprobs

__all__ = ["token_logprobs"]
