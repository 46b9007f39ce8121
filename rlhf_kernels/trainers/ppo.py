"""PPO with a KL penalty to a frozen reference (Ziegler et al. 2019; Ouyang et al. 2022).

One training step is one rollout followed by ``ppo_epochs`` passes over it in
mini-batches:

1. sample responses to ``rollout_batch_size`` prompts from the policy;
2. score them with a reward model or a Python function, and compute the
   policy's, the reference's and the value model's per-token outputs;
3. per-token rewards ``-kl_coef * KL_t`` plus the score on the last response
   token; ``gae`` gives advantages and returns, whitened over the response;
4. clipped surrogate from the logits (``ppo_loss_from_logits``, entropy bonus
   optional; with ``fused_lm_head``, ``linear_ppo_loss`` from the last hidden
   state, never holding the logits) plus ``vf_coef`` times the clipped value loss;
5. with ``kl_target`` the KL coefficient adapts (Ziegler et al.'s controller).

Sampling, scoring and the epochs of mini-batch updates are :class:`RolloutTrainer`'s,
which GRPO (:mod:`grpo`) shares.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import torch

import rlhf_kernels
from rlhf_kernels._checks import check_real
from rlhf_kernels.trainers.base import Trainer, TrainerConfig, disable_dropout, last_hidden_and_head, unwrap
from rlhf_kernels.trainers.sampling import encode_prompts, pure_sampling


@dataclasses.dataclass
class RolloutConfig(TrainerConfig):
    """What PPO and GRPO share: sampling, the clipped policy step and its mini-batches."""

    output_dir: str = "runs/rollout"
    learning_rate: float = 1e-4
    rollout_batch_size: int = 32  # prompts a step (the data rows of one rollout)
    mini_batch_size: int = 16  # responses an optimiser step (PPO: one response a prompt)
    ppo_epochs: int = 2
    max_new_tokens: int = 12
    temperature: float = 1.0
    kl_coef: float = 0.05
    kl_kind: str = "k1"
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None  # DAPO's clip-higher: the upper bound 1 + this (None: clip_ratio)
    # With several reward functions (reward_fn a list): the score is their weighted sum (None:
    # weights of 1), as TRL's reward_weights; each function's mean is logged as reward/<name>.
    reward_weights: list[float] | None = None
    entropy_coef: float = 0.0
    # TRL's missing_eos_penalty: subtracted from the score of a response that ran out of
    # max_new_tokens before its eos (the reward model is still shown it with an eos appended,
    # and a reward function sees the text), so that cut-off answers are not scored as finished.
    missing_eos_penalty: float | None = None
    # How the policy (and value) losses average over tokens (rlhf_kernels.ops.ppo.LOSS_AGG_MODES):
    # token-mean, as TRL and verl default to; seq-mean-token-sum-norm is Dr. GRPO's.
    loss_agg_mode: str = "token-mean"
    # "sequence": GSPO's per-sequence importance ratio (ops.ppo.ppo_policy_loss), with which the
    # paper clips at 3e-4 / 4e-4 and aggregates by seq-mean-token-mean (set those too).
    importance_sampling_level: str = "token"
    # The policy step from logits (ppo_loss_from_logits; not with fused_lm_head): write the
    # logits' gradient into their own buffer (the LM head's output, which nothing else keeps:
    # one [B, T, V] tensor less at the peak), and compute it in the forward sweep (one read of
    # the logits instead of two; on a GPU the faster path with the CUDA kernels).
    inplace_backward: bool = True
    grad_in_forward: bool = False


@dataclasses.dataclass
class PPOConfig(RolloutConfig):
    output_dir: str = "runs/ppo"
    kl_target: float | None = None  # adaptive KL controller when set
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range_value: float = 0.2
    vf_coef: float = 0.5
    whiten_advantages: bool = True


RewardFn = Callable[[list[str], list[str]], list[float]]


def _reward_functions(reward_fn, weights) -> list[RewardFn]:
    """``reward_fn`` as a list of callables (empty for none), checked against ``reward_weights``."""
    if reward_fn is None:
        fns = []
    elif callable(reward_fn):
        fns = [reward_fn]
    else:
        fns = list(reward_fn)
        if not fns or not all(callable(fn) for fn in fns):
            raise ValueError("reward_fn: expected a callable or a non-empty list of callables")
    if weights is not None:
        if len(weights) != len(fns):
            raise ValueError(f"config: reward_weights has {len(weights)} weights for {len(fns)} reward function(s)")
        for w in weights:
            check_real("config: reward_weights", w, finite=True)
    return fns


def _unique_names(fns: list[RewardFn]) -> list[str]:
    """Metric names of the reward functions: their ``__name__`` (``reward_<i>`` for lambdas), made unique."""
    names: list[str] = []
    for i, fn in enumerate(fns):
        name = getattr(fn, "__name__", "") or ""
        name = base = name if name.isidentifier() else f"reward_{i}"
        k = i
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def _call_reward(fn: RewardFn, name: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """One reward function's scores, checked: one a response, each a finite number or ``None``
    / NaN where the function does not apply to that response (TRL's convention)."""
    raw = fn(prompts, responses)
    if isinstance(raw, torch.Tensor):
        scores = raw.detach().to("cpu", torch.float32).flatten()
    else:
        scores = torch.tensor([math.nan if v is None else float(v) for v in raw], dtype=torch.float32)
    if scores.numel() != len(responses):
        raise ValueError(f"reward_fn {name}: returned {scores.numel()} scores for {len(responses)} responses")
    if torch.isinf(scores).any():
        raise ValueError(f"reward_fn {name}: returned an infinite score")
    return scores


def _agg_counts(mask: torch.Tensor) -> tuple[float, float]:
    """(valid tokens, sequences with one) of a response mask, each at least 1: the denominators
    of the token and sequence means (one host sync, as the metrics take anyway)."""
    valid = mask != 0
    tokens, seqs = torch.stack([valid.sum(), valid.any(-1).sum()]).tolist()
    return float(max(tokens, 1)), float(max(seqs, 1))


class ValueHead(torch.nn.Module):
    """A scalar value per token on the policy's last hidden state: the critic shares
    the policy's backbone (one forward for both) instead of being a second model."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.summary.weight)  # start at V = 0: no spurious advantages
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)


class RolloutTrainer(Trainer):
    """What PPO and GRPO share: a step samples responses to ``rollout_batch_size`` prompts
    (``rows_per_prompt`` each), scores them, and runs ``ppo_epochs`` passes of clipped policy
    updates over them in mini-batches of ``mini_batch_size`` responses, each one optimiser step
    accumulated over ``gradient_accumulation_steps`` micro-batches. A subclass fills the
    rollout (:meth:`_rollout`) and the loss of a micro-batch (:meth:`_micro_step`)."""

    required_columns = ("prompt",)
    rows_per_prompt = 1
    grad_norm_names = ("grad_norm",)  # the logged norm of each clip group

    def __init__(self, model, ref_model, tokenizer, dataset, config: RolloutConfig, *, reward_model=None,
                 reward_fn: RewardFn | Sequence[RewardFn] | None = None):  # fmt: skip
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("reward_model / reward_fn: give exactly one")
        self.reward_fns = _reward_functions(reward_fn, config.reward_weights)
        rows = config.rollout_batch_size * self.rows_per_prompt
        if config.mini_batch_size < 1 or rows % config.mini_batch_size:
            raise ValueError(
                f"config: the rollout's {rows} responses (rollout_batch_size={config.rollout_batch_size}"
                + (f" x {self.rows_per_prompt}" if self.rows_per_prompt > 1 else "")
                + f") are not divisible by mini_batch_size={config.mini_batch_size}"
            )
        if config.kl_kind not in rlhf_kernels.ops.ppo.KL_KINDS:
            raise ValueError(f"config: kl_kind must be one of {rlhf_kernels.ops.ppo.KL_KINDS}")
        if config.loss_agg_mode not in rlhf_kernels.ops.ppo.LOSS_AGG_MODES:
            raise ValueError(f"config: loss_agg_mode must be one of {rlhf_kernels.ops.ppo.LOSS_AGG_MODES}")
        if config.missing_eos_penalty is not None:
            check_real("config: missing_eos_penalty", config.missing_eos_penalty, finite=True)
        if config.importance_sampling_level not in rlhf_kernels.ops.ppo.IS_LEVELS:
            raise ValueError(f"config: importance_sampling_level must be one of {rlhf_kernels.ops.ppo.IS_LEVELS}")
        check_real("config: kl_coef", config.kl_coef, finite=True)
        if config.kl_coef < 0:
            raise ValueError(f"config: kl_coef must be >= 0, got {config.kl_coef}")
        if config.clip_ratio_high is not None:
            check_real("config: clip_ratio_high", config.clip_ratio_high, finite=True)
            if config.clip_ratio_high < 0:
                raise ValueError(f"config: clip_ratio_high must be >= 0, got {config.clip_ratio_high}")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model: is the policy itself (it would be frozen); pass a copy (copy.deepcopy(model))")
        config = dataclasses.replace(config, batch_size=config.rollout_batch_size)
        super().__init__(model, tokenizer, dataset, config)
        if config.mini_batch_size % self.world_size:
            raise ValueError(
                f"config: mini_batch_size={config.mini_batch_size} is not divisible by the {self.world_size} processes"
            )
        if config.mini_batch_size // self.world_size < config.gradient_accumulation_steps:
            raise ValueError(
                f"config: gradient_accumulation_steps={config.gradient_accumulation_steps} is more micro-batches than "
                f"the {config.mini_batch_size // self.world_size} responses of a rank's mini-batch"
            )
        self.ref_model = None if ref_model is None else ref_model.eval().requires_grad_(False)
        self.reward_model = None if reward_model is None else reward_model.eval().requires_grad_(False)
        if self.reward_model is not None:  # it reads the last token that is not the tokenizer's padding
            self.reward_model.config.pad_token_id = tokenizer.pad_token_id
        if config.disable_dropout:
            for module in (self.ref_model, self.reward_model):
                if module is not None:
                    disable_dropout(module)
        self.reward_names = _unique_names(self.reward_fns)

    def rollout_modules(self) -> list[torch.nn.Module]:
        """The trained modules, put in eval mode while the rollout samples and scores."""
        return list(self.checkpointed_modules().values())

    # --- rollout ---------------------------------------------------------------------------
    @staticmethod
    def _positions(attention: torch.Tensor) -> torch.Tensor:
        return (attention.cumsum(-1) - 1).clamp(min=0)

    def _response_logits(self, model, sequences, attention, prompt_width):
        out = model(input_ids=sequences, attention_mask=attention, position_ids=self._positions(attention))
        return out.logits[:, prompt_width - 1 : -1]

    def _policy(self, model, sequences, attention, width):
        """``model``'s response logits, or with ``fused_lm_head`` its response hidden states and
        LM head: ``(x, head)``, head None for logits."""
        if self.config.fused_lm_head:
            hidden, head = last_hidden_and_head(model, input_ids=sequences, attention_mask=attention,
                                                position_ids=self._positions(attention))  # fmt: skip
            return hidden[:, width - 1 : -1], head
        return self._response_logits(model, sequences, attention, width), None

    def _logprobs(self, x, head, response, mask):
        """Log-probs of the sampled tokens under logits / temperature, as generate sampled them
        (from the logits as the model returns them: the kernels accumulate in float32, and a
        float32 copy of the rollout's [B, T, V] logits is what they exist to avoid)."""
        cfg = self.config
        if head is None:
            return rlhf_kernels.token_logprobs(x, response, mask, temperature=cfg.temperature,
                                               backend=cfg.backend)  # fmt: skip
        return rlhf_kernels.linear_token_logprobs(x, head.weight, response, mask, bias=head.bias,
                                                  temperature=cfg.temperature, backend=cfg.backend)  # fmt: skip

    @torch.no_grad()
    def rollout(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        # Sampling and scoring in eval mode (the sampling policy is the one scored) and
        # under the updates' autocast (so the first update recomputes the same function).
        modules = self.rollout_modules()
        for module in modules:
            module.eval()
        try:
            with self.autocast():
                return self._rollout(prompts, self._sample(prompts))
        finally:
            for module in modules:
                module.train()

    def _sample(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``rows_per_prompt`` responses to each prompt (consecutive rows), cut after their first
        eos, with their scores (``missing_eos_penalty`` applied)."""
        tok, cfg = self.tokenizer, self.config
        prompt_ids, prompt_attention = encode_prompts(tok, prompts, self.device)
        width = prompt_ids.shape[1]
        if self.rows_per_prompt > 1:
            prompt_ids = prompt_ids.repeat_interleave(self.rows_per_prompt, 0)
            prompt_attention = prompt_attention.repeat_interleave(self.rows_per_prompt, 0)
        generated = unwrap(self.model).generate(  # DDP has no generate; sampling needs no gradient sync
            prompt_ids, attention_mask=prompt_attention, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **pure_sampling(cfg.temperature),
        )  # fmt: skip
        response = generated[:, width:]
        if cfg.loss_agg_mode == "seq-mean-token-sum-norm" and response.shape[1] < cfg.max_new_tokens:
            # Dr. GRPO's normaliser is the generation budget: generate stops when every row has its
            # eos, and the mode divides by the response width, so that width must not vary
            response = torch.nn.functional.pad(response, (0, cfg.max_new_tokens - response.shape[1]),
                                               value=tok.pad_token_id)  # fmt: skip
        # response tokens up to and including the first eos
        is_eos = response == tok.eos_token_id
        after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
        response_mask = ~after_eos
        attention = torch.cat([prompt_attention, response_mask.long()], dim=1)
        sequences = torch.cat([prompt_ids, torch.where(response_mask, response, tok.pad_token_id)], dim=1)
        texts = tok.batch_decode(torch.where(response_mask, response, tok.pad_token_id), skip_special_tokens=True)
        row_prompts = [p for p in prompts for _ in range(self.rows_per_prompt)]
        scores, per_function = self._scores(row_prompts, texts)
        scores = scores.to(self.device)
        finished = is_eos.any(-1)
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~finished).to(scores.dtype)
        return {
            "sequences": sequences, "attention": attention, "response": response, "response_mask": response_mask,
            "scores": scores, "width": torch.tensor(width), "response_length": response_mask.sum(-1).float().mean(),
            "finished": finished, "truncated": (~finished).float().mean(), "reward_means": per_function.nanmean(-1),
        }  # fmt: skip

    def _rollout(self, prompts: list[str], sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sample with what the updates need: ``old_logprobs`` and ``advantages`` at least."""
        raise NotImplementedError

    def _scores(self, prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
        """Each response's score (on the CPU), and each reward function's scores (``[functions,
        responses]``; none for a reward model)."""
        if self.reward_fns:
            named = zip(self.reward_fns, self.reward_names, strict=True)
            per_function = torch.stack([_call_reward(fn, name, prompts, responses) for fn, name in named])
            weights = torch.tensor(self.config.reward_weights or [1.0] * len(self.reward_fns), dtype=torch.float32)
            unscored = per_function.isnan().all(0)
            if unscored.any():  # TRL's convention: such a response scores 0, with a warning
                warnings.warn(f"reward_fn: no reward function scored {int(unscored.sum())} of {len(responses)} "
                              "responses (all returned None / NaN); they score 0", stacklevel=3)  # fmt: skip
            return (weights[:, None] * per_function).nansum(0), per_function
        tok = self.tokenizer
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        ids = [[*bos, *tok(p, add_special_tokens=False).input_ids,
                *tok(r, add_special_tokens=False).input_ids, tok.eos_token_id] for p, r in zip(prompts, responses,
                                                                                              strict=True)]  # fmt: skip
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            attention[i, : len(x)] = 1
        with torch.no_grad():
            out = self.reward_model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device))
        return out.logits.squeeze(-1).float().cpu(), torch.zeros(0, len(prompts))

    # --- optimisation ----------------------------------------------------------------------------
    def _shares(self, mask, totals) -> tuple[float, float]:
        """A micro-batch's share of its mini-batch's aggregate (``totals``: the mini-batch's
        (tokens, responses)), by loss_agg_mode (token-sum: plain sums), and its token share.
        The op's sequence means are over the micro-batch's sequences with a token; weighted by
        their count over the mini-batch's responses they sum to the mean over all of those."""
        tokens, seqs = _agg_counts(mask)
        share = {"token-mean": tokens / totals[0], "token-sum": 1.0}.get(self.config.loss_agg_mode, seqs / totals[1])
        return share, tokens / totals[0]

    def _policy_loss(self, x, head, per_token, **extra):
        """The clipped policy loss of ``per_token`` (response, old log-probs, advantages, mask)
        from logits (``head`` None) or hidden states and the LM head."""
        cfg = self.config
        step = dict(temperature=cfg.temperature, clip_ratio=cfg.clip_ratio, clip_ratio_high=cfg.clip_ratio_high,
                    entropy_coef=cfg.entropy_coef, loss_agg_mode=cfg.loss_agg_mode, backend=cfg.backend,
                    importance_sampling_level=cfg.importance_sampling_level, **extra)  # fmt: skip
        if head is None:
            return rlhf_kernels.ppo_loss_from_logits(x, *per_token, **step, inplace_backward=cfg.inplace_backward,
                                                     grad_in_forward=cfg.grad_in_forward)  # fmt: skip
        # from the hidden states: the [B, T, V] logits are never held
        return rlhf_kernels.linear_ppo_loss(x, head.weight, *per_token, bias=head.bias, **step)

    def _micro_step(self, batch, idx, width, totals) -> dict[str, tuple[torch.Tensor, float]]:
        """Forward and backward of the rollout rows ``idx`` (a micro-batch of a mini-batch whose
        (tokens, sequences) are ``totals``), under autocast and DDP's sync choice; returns the
        metrics as ``{name: (value, weight)}``."""
        raise NotImplementedError

    def _update(self, batch) -> dict[str, float]:
        """``ppo_epochs`` passes over the rollout in mini-batches; the metrics averaged over them."""
        cfg = self.config
        rows = len(batch["response_mask"])
        width = int(batch["width"])
        sums: dict[str, float] = {}
        n_updates = 0
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=g).to(self.device)
            mini_batch = cfg.mini_batch_size // self.world_size  # responses: this rank's share of the rollout
            for start in range(0, rows, mini_batch):
                # One optimiser step a mini-batch, its gradient accumulated over micro-batches: each
                # micro-batch's aggregated loss weighted by its share of the mini-batch's aggregate
                # (tokens or sequences, by loss_agg_mode), so that their sum is the mini-batch's loss.
                idx = order[start : start + mini_batch]
                micro_batches = idx.tensor_split(cfg.gradient_accumulation_steps)
                # The sequence means' denominator is every response of the mini-batch: a response
                # with no token left in the loss (mask_truncated_completions) counts as a 0, as in
                # TRL, and each rank divides by as many (DDP's mean over ranks stays exact).
                totals = (_agg_counts(batch["response_mask"][idx])[0], float(len(idx)))
                for j, micro in enumerate(micro_batches):
                    with self._grad_sync(j == len(micro_batches) - 1):  # DDP all-reduces at the last
                        shares = self._micro_step(batch, micro, width, totals)
                    for k, (v, share) in shares.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * share
                self.optimizer_step(step_schedule=False)  # the schedule moves per rollout
                n_updates += 1
                for name, norm in zip(self.grad_norm_names, self.group_grad_norms, strict=True):
                    sums[name] = sums.get(name, 0.0) + norm
        self.scheduler.step()
        return {k: v / n_updates for k, v in sums.items()}

    def _rollout_metrics(self, batch) -> dict[str, float]:
        metrics = {"score": float(batch["scores"].mean()), "response_length": float(batch["response_length"]),
                   "truncated": float(batch["truncated"])}  # fmt: skip
        if len(self.reward_names) > 1:
            metrics.update({f"reward/{name}": float(v) for name, v in zip(self.reward_names, batch["reward_means"],
                                                                         strict=True)})  # fmt: skip
        return metrics


class PPOTrainer(RolloutTrainer):
    """``value_model``: a separate critic (e.g. a token-classification model, often
    initialised from the reward model), or ``None`` for a :class:`ValueHead` on the
    policy's backbone, trained through the same forward pass."""

    grad_norm_names = ("grad_norm", "critic_grad_norm")

    def __init__(
        self, model, ref_model, value_model, tokenizer, dataset, config: PPOConfig | None = None, *,
        reward_model=None, reward_fn: RewardFn | Sequence[RewardFn] | None = None,
    ):  # fmt: skip
        config = config or PPOConfig()
        if ref_model is None:
            raise ValueError("ref_model: PPO needs the reference model (its KL penalty is in the reward)")
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            if hidden is None:
                raise ValueError("value_model: None needs a model whose config has hidden_size (for the value head)")
            weight = next(model.parameters())
            self.value_head = ValueHead(hidden).to(weight.device, weight.dtype)
        if config.disable_dropout and value_model is not None:
            disable_dropout(value_model)
        super().__init__(model, ref_model, tokenizer, dataset, config, reward_model=reward_model, reward_fn=reward_fn)
        self.kl_coef = config.kl_coef

    @property
    def critic(self) -> torch.nn.Module:
        return self.value_model if self.value_head is None else self.value_head

    def trainable_parameters(self):
        return itertools.chain(self.model.parameters(), self.critic.parameters())

    def clip_groups(self):
        # Clipped apart: the value loss's gradient is often 10x the policy's, and one joint
        # norm would shrink the policy's step by that factor. With a value head the value
        # loss also reaches the shared backbone, which stays in the policy's group.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return [trainable, [p for p in self.critic.parameters() if p.requires_grad]]

    def checkpointed_modules(self):
        if self.value_head is not None:
            return {"model": self.model, "value_head": self.value_head}
        return {"model": self.model, "value_model": self.value_model}

    def extra_state(self):
        return {"kl_coef": self.kl_coef}

    def load_extra_state(self, state):
        self.kl_coef = state.get("kl_coef", self.kl_coef)

    # --- rollout ---------------------------------------------------------------------------
    def _policy_and_values(self, sequences, attention, width):
        """The policy's ``(x, head)`` (:meth:`_policy`) and the critic's values: one forward
        with a value head, two with a separate value model."""
        if self.value_head is None:  # the critic first: the order dropout (if on) draws its masks in
            values = self._values(sequences, attention, width)
            return self._policy(self.model, sequences, attention, width), values
        if self.config.fused_lm_head:  # the response hidden states feed both heads
            x, head = self._policy(self.model, sequences, attention, width)
            return (x, head), self.value_head(x).float()
        out = self.model(input_ids=sequences, attention_mask=attention, position_ids=self._positions(attention),
                         output_hidden_states=True)  # fmt: skip
        return (out.logits[:, width - 1 : -1], None), self.value_head(out.hidden_states[-1][:, width - 1 : -1]).float()

    def _rollout(self, prompts, sample):
        cfg = self.config
        sequences, attention, width = sample["sequences"], sample["attention"], int(sample["width"])
        response, response_mask = sample["response"], sample["response_mask"]
        (x, head), values = self._policy_and_values(sequences, attention, width)
        old_logprobs = self._logprobs(x, head, response, response_mask)
        ref_logprobs = self._logprobs(*self._policy(self.ref_model, sequences, attention, width), response,
                                      response_mask)  # fmt: skip

        kl = rlhf_kernels.kl_penalty(old_logprobs, ref_logprobs, cfg.kl_kind, backend=cfg.backend) * response_mask
        rewards = -self.kl_coef * kl
        last = (response_mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(prompts), device=self.device), last] += sample["scores"]
        advantages, returns = rlhf_kernels.gae(rewards, values, response_mask, gamma=cfg.gamma, lam=cfg.lam,
                                               backend=cfg.backend)  # fmt: skip
        if cfg.whiten_advantages:
            advantages = rlhf_kernels.masked_whiten(advantages, response_mask)
        return {**sample, "old_logprobs": old_logprobs, "values": values, "advantages": advantages,
                "returns": returns, "kl": (kl.sum(-1)).mean()}  # fmt: skip

    def _values(self, sequences, attention, width):
        out = self.value_model(input_ids=sequences, attention_mask=attention, position_ids=self._positions(attention))
        return out.logits[:, width - 1 : -1, 0].float()

    # --- optimisation ----------------------------------------------------------------------------
    def _micro_step(self, batch, idx, width, totals):
        cfg = self.config
        mask = batch["response_mask"][idx]
        share, token_share = self._shares(mask, totals)
        with self.autocast():
            (x, head), values = self._policy_and_values(batch["sequences"][idx], batch["attention"][idx], width)
            per_token = (batch["response"][idx], batch["old_logprobs"][idx], batch["advantages"][idx], mask)
            pg_loss, m = self._policy_loss(x, head, per_token)
            vf = rlhf_kernels.ppo_value_loss(
                values, batch["values"][idx], batch["returns"][idx], mask,
                clip_range_value=cfg.clip_range_value, loss_agg_mode=cfg.loss_agg_mode, backend=cfg.backend,
            )  # fmt: skip
            loss = pg_loss + cfg.vf_coef * vf.loss
        (loss * share if share != 1.0 else loss).backward()
        return {"pg_loss": (m.pg_loss, share), "entropy": (m.entropy, share), "clipfrac": (m.clipfrac, token_share),
                "approx_kl": (m.approx_kl, token_share), "value_loss": (vf.loss.detach(), share),
                "value_clipfrac": (vf.clipfrac, token_share)}  # fmt: skip

    def training_step(self):
        cfg = self.config
        batch = self.rollout(self.dataset[self._batch_indices(self.step)]["prompt"])
        metrics = self._update(batch)
        kl = self.all_reduce_mean({"kl": float(batch["kl"])})["kl"]  # one controller state on every rank
        if cfg.kl_target:
            error = max(-0.2, min(0.2, kl / cfg.kl_target - 1))
            self.kl_coef *= 1 + error * cfg.rollout_batch_size / cfg.kl_horizon
        metrics.update(self._rollout_metrics(batch), kl=kl, kl_coef=self.kl_coef)
        return metrics
