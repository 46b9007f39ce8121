"""Supervised fine-tuning on (prompt, completion) pairs: the NLL of completion tokens."""

from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_kernels.trainers.base import Trainer, TrainerConfig


class SFTTrainer(Trainer):
    """Minimises ``-mean token_logprobs`` over completion tokens (prompt and padding masked)."""

    required_columns = ("prompt", "completion")

    def __init__(self, model, tokenizer, dataset, config: TrainerConfig | None = None):
        super().__init__(model, tokenizer, dataset, config or TrainerConfig(output_dir="runs/sft"))

    def collate(self, rows):
        ids, attention, mask = self.encode_pairs(rows["prompt"], rows["completion"])
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask}

    def compute_loss(self, batch):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["completion_mask"][:, 1:]
        logprobs = rlhf_kernels.token_logprobs(
            logits[:, :-1], batch["input_ids"][:, 1:], mask, backend=self.config.backend
        )
        # the global token mean, also across DDP ranks (see Trainer.per_rank_share)
        loss = -logprobs.sum() / self.per_rank_share(mask.sum()).clamp(min=1)
        return loss, {"loss": loss.detach()}


@torch.no_grad()
def exact_match(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: int = 12) -> float:
    """Greedy-decode each prompt and count exact matches with the answer."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
        x = torch.tensor([ids], device=device)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        hits += text.split() == answer.split()
    model.train(was_training)
    return hits / max(len(prompts), 1)
