"""GRPO: group-relative policy optimisation without a critic (Shao et al. 2024, DeepSeekMath).

One training step is one rollout followed by ``ppo_epochs`` passes over it in
mini-batches, as in :mod:`ppo` (the sampling and update loop are its
:class:`~rlhf_kernels.trainers.ppo.RolloutTrainer`):

1. sample ``num_generations`` responses to each of ``rollout_batch_size`` prompts;
2. score them (a reward model or a Python function); each response's advantage is its
   score against its group's, ``grpo_advantages``: ``(s - mean) / (std + eps)``, or
   ``s - mean`` with ``scale_rewards=False`` (Dr. GRPO), the same for all its tokens, and
   0 for every response of a group whose scores are all equal;
3. the clipped surrogate from the logits (``ppo_loss_from_logits``; with
   ``fused_lm_head``, ``linear_ppo_loss``) with the KL to the reference *in the loss*,
   ``kl_coef * agg(KL)`` with the ``k3`` estimator (not in the reward, as PPO has it),
   aggregated by ``loss_agg_mode``: ``seq-mean-token-mean`` is the paper's,
   ``token-mean`` DAPO's, ``seq-mean-token-sum-norm`` with ``scale_rewards=False``
   Dr. GRPO's (its token sums divided by ``max_new_tokens``: the rollout is padded to it).
   ``kl_coef=0`` skips the reference model altogether.

TRL's ``GRPOConfig`` in these terms: ``loss_type="grpo"`` is ``seq-mean-token-mean``,
``"bnpo"`` / ``"dapo"`` are ``token-mean`` (over the mini-batch, as ``dapo``), ``"dr_grpo"`` is
``seq-mean-token-sum-norm`` with ``scale_rewards=False``; ``beta`` is ``kl_coef``,
``epsilon`` / ``epsilon_high`` are ``clip_ratio`` / ``clip_ratio_high``, ``num_iterations`` is
``ppo_epochs``, ``max_completion_length`` is ``max_new_tokens``, ``importance_sampling_level``
and ``mask_truncated_completions`` keep their names (TRL's batch-level ``scale_rewards="batch"``
has no counterpart here).

A group never spans two processes (each rank samples all ``num_generations`` responses of
its prompts), so the advantages under ``torchrun`` are those of one process; the sequence
means divide by a rank's responses, as many on every rank, so DDP's mean over ranks is the
global one; a token mean is per rank, as in :mod:`ppo`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import rlhf_kernels
from rlhf_kernels.trainers.ppo import RewardFn, RolloutConfig, RolloutTrainer


@dataclasses.dataclass
class GRPOConfig(RolloutConfig):
    output_dir: str = "runs/grpo"
    rollout_batch_size: int = 8  # prompts a step, each sampled num_generations times
    num_generations: int = 8  # the group size G
    mini_batch_size: int = 32  # responses an optimiser step
    ppo_epochs: int = 1  # GRPO's mu: passes over each rollout
    kl_coef: float = 0.04  # beta, the paper's
    kl_kind: str = "k3"
    loss_agg_mode: str = "seq-mean-token-mean"
    scale_rewards: bool = True  # divide by the group's std (False: Dr. GRPO)
    advantage_eps: float = 1e-6
    # DAPO's overlong filtering (TRL's mask_truncated_completions): responses cut off by
    # max_new_tokens before their eos still count in their group's statistics, but their tokens
    # are left out of the loss (a cut answer is not a wrong one).
    mask_truncated_completions: bool = False


class GRPOTrainer(RolloutTrainer):
    """``ref_model`` may be ``None`` when ``kl_coef`` is 0."""

    def __init__(
        self, model, ref_model, tokenizer, dataset, config: GRPOConfig | None = None, *, reward_model=None,
        reward_fn: RewardFn | Sequence[RewardFn] | None = None,
    ):  # fmt: skip
        config = config or GRPOConfig()
        g = config.num_generations
        if isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 2:
            raise ValueError(f"config: num_generations must be an int >= 2 (a group to compare within), got {g!r}")
        for flag in ("scale_rewards", "mask_truncated_completions"):
            if not isinstance(getattr(config, flag), bool):
                raise ValueError(f"config: {flag} must be a bool, got {getattr(config, flag)!r}")
        if ref_model is None and config.kl_coef != 0:
            raise ValueError(f"ref_model: None, but kl_coef={config.kl_coef} needs the reference's log-probs")
        self.rows_per_prompt = int(g)
        super().__init__(model, ref_model, tokenizer, dataset, config, reward_model=reward_model, reward_fn=reward_fn)

    # --- rollout ---------------------------------------------------------------------------
    def _rollout(self, prompts, sample):
        cfg = self.config
        sequences, attention, width = sample["sequences"], sample["attention"], int(sample["width"])
        response, response_mask = sample["response"], sample["response_mask"]
        old_logprobs = self._logprobs(*self._policy(self.model, sequences, attention, width), response, response_mask)
        batch = {**sample, "old_logprobs": old_logprobs}
        if cfg.kl_coef != 0:
            batch["ref_logprobs"] = self._logprobs(*self._policy(self.ref_model, sequences, attention, width),
                                                   response, response_mask)  # fmt: skip
        scores = sample["scores"]
        advantages = rlhf_kernels.grpo_advantages(scores, self.rows_per_prompt, norm_by_std=cfg.scale_rewards,
                                                  eps=cfg.advantage_eps, backend=cfg.backend)  # fmt: skip
        # A group of equal scores teaches nothing: its advantages are 0 exactly. (The op gives
        # (s - mean) / eps there, and a float32 mean of G equal scores need not be the score:
        # 0.6 x 6 leaves 5.6e-8, which eps = 1e-6 makes a 0.056 advantage for every response.)
        grouped = scores.view(-1, self.rows_per_prompt)
        constant = grouped.amax(-1) == grouped.amin(-1)
        advantages = advantages.masked_fill(constant.repeat_interleave(self.rows_per_prompt), 0.0)
        batch["advantages"] = advantages[:, None].expand_as(old_logprobs).contiguous()
        if cfg.mask_truncated_completions:
            batch["response_mask"] = response_mask & sample["finished"][:, None]
        batch["score_std"] = grouped.double().std(-1).mean()
        batch["frac_zero_std"] = constant.double().mean()  # groups that teach nothing
        return batch

    # --- optimisation ----------------------------------------------------------------------------
    def _micro_step(self, batch, idx, width, totals):
        cfg = self.config
        mask = batch["response_mask"][idx]
        share, token_share = self._shares(mask, totals)
        kl = {}
        if "ref_logprobs" in batch:
            kl = dict(ref_logprobs=batch["ref_logprobs"][idx], kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind)
        with self.autocast():
            x, head = self._policy(self.model, batch["sequences"][idx], batch["attention"][idx], width)
            per_token = (batch["response"][idx], batch["old_logprobs"][idx], batch["advantages"][idx], mask)
            loss, m = self._policy_loss(x, head, per_token, **kl)
        (loss * share if share != 1.0 else loss).backward()
        metrics = {"loss": (loss.detach(), share), "pg_loss": (m.pg_loss, share), "entropy": (m.entropy, share),
                   "clipfrac": (m.clipfrac, token_share), "clipfrac_lower": (m.clipfrac_lower, token_share),
                   "approx_kl": (m.approx_kl, token_share)}  # fmt: skip
        if kl:
            metrics["kl"] = (m.kl, share)  # agg(KL) to the reference, as the loss has it
        return metrics

    def training_step(self):
        batch = self.rollout(self.dataset[self._batch_indices(self.step)]["prompt"])
        metrics = self._update(batch)
        metrics.update(self._rollout_metrics(batch), score_std=float(batch["score_std"]),
                       frac_zero_std=float(batch["frac_zero_std"]))  # fmt: skip
        return metrics
