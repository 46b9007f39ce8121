"""Direct preference optimisation (and its loss-type relatives) against a frozen reference."""

from __future__ import annotations

import torch

import rlhf_kernels
from rlhf_kernels.trainers.base import Trainer, TrainerConfig, disable_dropout, next_token_logprobs


class DPOTrainer(Trainer):
    """Policy plus frozen reference on (prompt, chosen, rejected) rows.

    Chosen and rejected completions go through the model as one concatenated
    batch; ``sequence_logprobs`` sums completion-token log-probs (averages them
    for ``ipo``), and ``dpo_loss`` with any of ``rlhf_kernels.DPO_LOSS_TYPES``
    gives losses and rewards. With ``precompute_ref_logprobs`` the reference
    log-probs of the whole data set are computed once before training.
    ``rpo_alpha`` adds that weight times the chosen responses' per-token NLL
    (RPO, Pang et al. 2024), which keeps the chosen likelihood from falling.
    """

    required_columns = ("prompt", "chosen", "rejected")

    def __init__(self, model, ref_model, tokenizer, dataset, config: TrainerConfig | None = None, *,
                 beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 precompute_ref_logprobs: bool = False, rpo_alpha: float = 0.0):  # fmt: skip
        if loss_type not in rlhf_kernels.DPO_LOSS_TYPES:
            raise ValueError(f"loss_type: unknown {loss_type!r}; expected one of {rlhf_kernels.DPO_LOSS_TYPES}")
        super().__init__(model, tokenizer, dataset, config or TrainerConfig(output_dir="runs/dpo"))
        self.ref_model = ref_model.eval().requires_grad_(False)
        if self.config.disable_dropout:
            disable_dropout(self.ref_model)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.rpo_alpha = rpo_alpha
        self.average = loss_type == "ipo"
        self.ref_cache: torch.Tensor | None = None
        if precompute_ref_logprobs:
            self.ref_cache = self._precompute_reference()

    def collate(self, rows):
        n = len(rows["prompt"])
        ids, attention, mask = self.encode_pairs(rows["prompt"] * 2, rows["chosen"] + rows["rejected"], paired=True)
        return {"input_ids": ids, "attention_mask": attention, "completion_mask": mask, "n": n,
                "index": rows.get("__index__")}  # fmt: skip

    def begin_step(self, batches):
        if self.rpo_alpha:  # RPO's token mean over the whole step (see SFTTrainer.begin_step)
            tokens = sum(b["completion_mask"][: b["n"], 1:].sum() for b in batches)
            share = self.per_rank_share(tokens).clamp(min=1) / len(batches)
            for b in batches:
                b["chosen_tokens_per_micro_batch"] = share

    def sequence_logprobs(self, model, batch) -> torch.Tensor:
        if self.config.fused_lm_head:  # per-token from the hidden states, then the sum (mean) per sequence
            lp = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                     fused_lm_head=True, backend=self.config.backend).sum(-1)  # fmt: skip
            if self.average:
                lp = lp / batch["completion_mask"][:, 1:].sum(-1).clamp(min=1)
            return lp
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # (the gradient goes into the logits' own buffer: nothing else keeps the LM head's output)
        return rlhf_kernels.sequence_logprobs(
            logits[:, :-1], batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:], average=self.average,
            inplace_backward=True, backend=self.config.backend,
        )  # fmt: skip

    @torch.no_grad()
    def _precompute_reference(self) -> torch.Tensor:
        out = []
        for start in range(0, len(self.dataset), self.config.batch_size):
            rows = self.dataset[start : start + self.config.batch_size]
            with self.autocast():  # as compute_loss runs, so that both paths give the same rewards
                lp = self.sequence_logprobs(self.ref_model, self.collate(rows))
            n = len(rows["prompt"])
            out.append(torch.stack([lp[:n], lp[n:]], dim=1))
        return torch.cat(out)  # [len(dataset), 2]: chosen, rejected

    def compute_loss(self, batch):
        n = batch["n"]
        lp = self.sequence_logprobs(self.model, batch)
        if self.ref_cache is not None:
            ref = self.ref_cache[torch.tensor(self.current_indices, device=self.ref_cache.device)]
            ref_c, ref_r = ref[:, 0], ref[:, 1]
        else:
            with torch.no_grad():
                ref_lp = self.sequence_logprobs(self.ref_model, batch)
            ref_c, ref_r = ref_lp[:n], ref_lp[n:]
        out = rlhf_kernels.dpo_loss(
            lp[:n], lp[n:], ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, return_metrics=True, backend=self.config.backend,
        )  # fmt: skip
        loss = out.losses.mean()
        metrics = {"loss": loss.detach(), **{k: v.detach() for k, v in out.metrics.items() if k != "loss"}}
        if self.rpo_alpha:
            # RPO (Pang et al. 2024; TRL's rpo_alpha): the chosen responses' per-token NLL
            # keeps their likelihood from falling: one mean over all chosen tokens of the step (every
            # micro-batch and rank, as SFT's loss), as TRL's cross-entropy: a long chosen answer
            # weighs by its tokens, not as one sequence.
            counts = batch["completion_mask"][:n, 1:].sum(-1)
            sums = lp[:n] * counts if self.average else lp[:n]
            denominator = batch.get("chosen_tokens_per_micro_batch")
            if denominator is None:  # a batch from outside training_step: its own mean
                denominator = self.per_rank_share(counts.sum()).clamp(min=1)
            chosen_nll = -sums.sum() / denominator
            loss = loss + self.rpo_alpha * chosen_nll
            metrics["nll_chosen"] = chosen_nll.detach()
        return loss, metrics
