"""Public ops, one module per op family."""

from rlhf_kernels.ops.linear import linear_ppo_loss, linear_token_logprobs
from rlhf_kernels.ops.logprobs import sequence_logprobs, token_logprobs
from rlhf_kernels.ops.ppo import (
    gae,
    grpo_advantages,
    kl_penalty,
    masked_whiten,
    ppo_loss_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_kernels.ops.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

__all__ = [
    "token_logprobs",
    "sequence_logprobs",
    "linear_token_logprobs",
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
    "linear_ppo_loss",
]
