"""Supervised fine-tuning on (prompt, completion) pairs: the NLL of completion tokens."""

from __future__ import annotations

from rlhf_kernels.trainers.base import Trainer, TrainerConfig, next_token_logprobs


class SFTTrainer(Trainer):
    """Minimises ``-mean token_logprobs`` over completion tokens (prompt and padding masked)."""

    required_columns = ("prompt", "completion")

    def __init__(self, model, tokenizer, dataset, config: TrainerConfig | None = None):
        super().__init__(model, tokenizer, dataset, config or TrainerConfig(output_dir="runs/sft"))

    def collate(self, rows):
        ids, attention, mask = self.encode_pairs(rows["prompt"], rows["completion"])
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}

    def compute_loss(self, batch):
        mask = batch["completion_mask"][:, 1:]
        logprobs = next_token_logprobs(self.model, batch["input_ids"], batch["attention_mask"],
                                       batch["completion_mask"], fused_lm_head=self.config.fused_lm_head,
                                       backend=self.config.backend)  # fmt: skip
        # the global token mean, also across DDP ranks (see Trainer.per_rank_share)
        loss = -logprobs.sum() / self.per_rank_share(mask.sum()).clamp(min=1)
        return loss, {"loss": loss.detach()}
