"""Reward modelling on paired preferences with the Bradley-Terry loss."""

from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_kernels.trainers.base import Trainer, TrainerConfig


class RewardTrainer(Trainer):
    """Trains a scalar-head model (``AutoModelForSequenceClassification`` with one
    label) so that ``r(prompt, chosen) > r(prompt, rejected)``:
    ``bradley_terry_loss`` with optional centring; logs accuracy and margin."""

    required_columns = ("prompt", "chosen", "rejected")

    def __init__(self, model, tokenizer, dataset, config: TrainerConfig | None = None,
                 center_rewards_coefficient: float = 0.0):  # fmt: skip
        is_classifier = type(model).__name__.endswith("ForSequenceClassification")
        if not is_classifier or getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"model: expected an AutoModelForSequenceClassification-style model with num_labels=1 (a scalar "
                f"head), got {type(model).__name__} with num_labels={getattr(model.config, 'num_labels', None)}"
            )
        # The head reads the last token that is not padding, found by the config's pad id:
        # it must be the tokenizer's, which pads the batches (as TRL's RewardTrainer sets it).
        model.config.pad_token_id = tokenizer.pad_token_id
        super().__init__(model, tokenizer, dataset, config or TrainerConfig(output_dir="runs/reward"))
        self.center_rewards_coefficient = center_rewards_coefficient

    def collate(self, rows):
        prompts = rows["prompt"] + rows["prompt"]
        ids, attention, _ = self.encode_pairs(prompts, rows["chosen"] + rows["rejected"], paired=True)
        return {"input_ids": ids, "attention_mask": attention}

    def rewards(self, input_ids, attention_mask) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def compute_loss(self, batch):
        r = self.rewards(batch["input_ids"], batch["attention_mask"])
        half = r.shape[0] // 2
        loss, accuracy = rlhf_kernels.bradley_terry_loss(
            r[:half], r[half:], center_rewards_coefficient=self.center_rewards_coefficient, backend=self.config.backend
        )
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "margin": (r[:half] - r[half:]).mean().detach()}

    @torch.no_grad()
    def evaluate(self, dataset) -> dict[str, float]:
        """Accuracy and mean margin on held-out pairs."""
        was_training = self.model.training
        self.model.eval()
        hits, margins, n = 0.0, 0.0, 0
        for start in range(0, len(dataset), self.config.batch_size):
            rows = dataset[start : start + self.config.batch_size]
            batch = self.collate(rows)
            with self.autocast():  # the function trained (bf16 autocast on a GPU)
                r = self.rewards(batch["input_ids"], batch["attention_mask"])
            half = r.shape[0] // 2
            hits += float((r[:half] > r[half:]).sum())
            margins += float((r[:half] - r[half:]).sum())
            n += half
        self.model.train(was_training)
        return {"accuracy": hits / max(n, 1), "margin": margins / max(n, 1)}
