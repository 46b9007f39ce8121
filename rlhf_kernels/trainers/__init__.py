"""Reference trainers built on the ops: SFT, reward modelling (Bradley-Terry), DPO, PPO, GRPO.

They take a Hugging Face ``transformers`` model and tokenizer, a
``datasets.Dataset`` with the usual columns and a :class:`TrainerConfig`.
Every loss and log-prob goes through ``rlhf_kernels`` ops. ``toy`` holds the
built-in sorting task (data, tokenizer, tiny Llama models).
"""

from rlhf_kernels.trainers.base import Trainer, TrainerConfig
from rlhf_kernels.trainers.dpo import DPOTrainer
from rlhf_kernels.trainers.grpo import GRPOConfig, GRPOTrainer
from rlhf_kernels.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_kernels.trainers.reward import RewardTrainer
from rlhf_kernels.trainers.sampling import exact_match, generate, ranked_pairs
from rlhf_kernels.trainers.sft import SFTTrainer

__all__ = [
    "Trainer",
    "TrainerConfig",
    "SFTTrainer",
    "RewardTrainer",
    "DPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "exact_match",
    "generate",
    "ranked_pairs",
]
