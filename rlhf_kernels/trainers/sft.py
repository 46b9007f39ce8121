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

    def begin_step(self, batches):
        # The token mean over the whole step: every micro-batch of the gradient accumulation
        # and every DDP rank (see Trainer.per_rank_share), not a mean of per-batch means.
        # Trainer.training_step divides each micro-batch's loss by their number.
        tokens = sum(b["completion_mask"][:, 1:].sum() for b in batches)
        share = self.per_rank_share(tokens).clamp(min=1) / len(batches)
        for b in batches:
            b["tokens_per_micro_batch"] = share

    def compute_loss(self, batch):
        logprobs = next_token_logprobs(self.model, batch["input_ids"], batch["attention_mask"],
                                       batch["completion_mask"], fused_lm_head=self.config.fused_lm_head,
                                       backend=self.config.backend)  # fmt: skip
        denominator = batch.get("tokens_per_micro_batch")
        if denominator is None:  # a batch from outside training_step (e.g. an evaluation): its own mean
            denominator = self.per_rank_share(batch["completion_mask"][:, 1:].sum()).clamp(min=1)
        loss = -logprobs.sum() / denominator
        return loss, {"loss": loss.detach()}
