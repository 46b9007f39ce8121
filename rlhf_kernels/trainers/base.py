"""What every reference trainer shares: config, optimisation loop, logging, checkpoints.

A trainer subclass implements ``compute_loss(batch) -> (loss, metrics)`` and
``collate(rows) -> batch``; the base class owns the rest: seeded data order
(so that a resumed run sees exactly the batches the uninterrupted one would),
AdamW with linear warmup/decay, gradient accumulation, clipping, bf16
autocast on CUDA, a progress line, metrics as JSON lines, and checkpoints
that restore model, optimiser, scheduler, RNG states and step.

Multi-process training: under ``torchrun --nproc_per_node=N`` (``WORLD_SIZE`` >
1 in the environment) the trainer joins the process group (gloo for CPU models,
nccl for CUDA ones; or uses the one already initialised), wraps the trained
modules in ``DistributedDataParallel`` and gives each rank a contiguous
``batch_size / N`` slice of every global micro-batch. ``batch_size`` stays the
global batch, so N processes follow the same data order, schedule and
optimiser steps as one process with the same config. What is exact:

- DDP averages gradients over ranks. A loss that is a mean over samples
  (DPO and its loss types, the RPO term, Bradley-Terry) has, with equal
  shards, mean over ranks of per-rank means = the global mean, so gradients,
  clipping and updates equal the single-process ones up to float summation
  order.
- A token mean (SFT) is made exact by dividing each rank's token sum by
  :meth:`Trainer.per_rank_share` of the global token count (one all-reduce of
  a scalar per micro-batch), not by its own count.
- Logged metrics are averaged over ranks: exact for the sample means above
  and the token-mean loss; a per-rank ratio metric is a mean of per-rank
  ratios. Rank 0 alone writes metrics, progress and checkpoints; all ranks
  wait at a barrier after each save; resuming reads the checkpoint on every
  rank (a path all ranks can see).
- Random streams: rank r seeds torch and ``random`` with ``seed + r`` (rank 0's
  stream is the single-process one); checkpoints keep every rank's RNG state.
- PPO: each rank samples responses for its share of the prompts and does its
  share of every mini-batch; advantage whitening and the policy and value
  losses' token means are per rank (as in most PPO implementations), so a
  multi-process PPO run is the same algorithm but not bit-equal to one
  process. The KL controller sees the KL averaged over ranks.
- GRPO: a rank samples every response of its prompts' groups, so the group
  advantages are exact; its sequence means too (every rank divides by as many
  responses), its token means per rank as PPO's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import rlhf_kernels


@dataclasses.dataclass
class TrainerConfig:
    output_dir: str = "runs/trainer"
    learning_rate: float = 1e-3
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    logging_steps: int = 10
    save_steps: int = 0  # 0: save only at the end
    bf16: bool = True  # autocast on CUDA; CPU runs stay float32
    progress: bool = True
    backend: str = "auto"  # rlhf_kernels backend for the ops
    # Log-probs from the last hidden state and the LM head with linear_token_logprobs (chunked:
    # the [B, T, V] logits are never held) instead of from the model's logits; see next_token_logprobs.
    fused_lm_head: bool = False
    # Dropout off in the trained and frozen models (TRL's disable_dropout): log-probs that
    # depend on a dropout mask make DPO rewards and PPO's ratio (old log-probs scored in
    # one mode, updates in another) noisy from the first step.
    disable_dropout: bool = True


def init_distributed(device_type: str = "cpu") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR`` ...) unless one exists; returns ``(rank, world_size)``,
    ``(0, 1)`` outside ``torchrun``. gloo for CPU training, nccl for CUDA."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size}, but this torch build has no torch.distributed")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def disable_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout rate in ``module``: ``nn.Dropout`` layers and the float rates that
    attention implementations read from their module (``attention_dropout``, ``dropout``,
    ``attn_pdrop`` ...), so that train and eval mode compute the same function."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd):
            sub.p = 0.0
        for name, value in list(vars(sub).items()):
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(sub, name, 0.0)
    return module


def next_token_logprobs(model, input_ids, attention_mask, mask, *, fused_lm_head=False, temperature=1.0,
                        backend="auto") -> torch.Tensor:
    """``[B, T-1]`` log-probs of ``input_ids[:, 1:]`` under a causal LM (0 where ``mask[:, 1:]`` is 0).

    From the model's logits with :func:`rlhf_kernels.token_logprobs`, or with
    ``fused_lm_head`` from its last hidden state and output embedding (see
    :func:`last_hidden_and_head`) with :func:`rlhf_kernels.linear_token_logprobs`,
    which never holds the ``[B, T, V]`` logits.
    """
    labels, mask = input_ids[:, 1:], mask[:, 1:]
    if not fused_lm_head:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return rlhf_kernels.token_logprobs(logits[:, :-1], labels, mask, temperature=temperature, backend=backend)
    hidden, head = last_hidden_and_head(model, input_ids=input_ids, attention_mask=attention_mask)
    return rlhf_kernels.linear_token_logprobs(hidden[:, :-1], head.weight, labels, mask, bias=head.bias,
                                              temperature=temperature, backend=backend)  # fmt: skip


def last_hidden_and_head(model, **inputs) -> tuple[torch.Tensor, torch.nn.Module]:
    """A causal LM's last hidden state ``[B, T, H]`` and its output embedding (the LM head).

    The model is called itself (so DDP's hooks run) with ``logits_to_keep=1``, so that it
    computes the logits of the last position only, and a forward hook on its decoder
    keeps the decoder's output (the final-normed hidden state): no other layer's output
    is kept alive, unlike ``output_hidden_states`` (the fallback for models without
    ``get_decoder``). The head must be a plain ``nn.Linear`` without hooks (an adapter
    such as LoRA on it would be bypassed), and once per model the last position's logits
    are checked against it: a model that scales or soft-caps its logits, or cannot skip
    them, fails with a clear error.
    """
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        raise ValueError("fused_lm_head: the output embedding is not a plain nn.Linear (an adapter or a hook "
                         f"changes its output: {type(head).__name__}); use fused_lm_head=False")  # fmt: skip
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    captured = []
    if decoder is not None and decoder is not inner:
        handle = decoder.register_forward_hook(
            lambda module, args, out: captured.append(out.last_hidden_state if hasattr(out, "last_hidden_state")
                                                      else out[0])  # fmt: skip
        )
        try:
            out = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
    if len(captured) == 1:
        hidden = captured[0]
    else:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
    if not getattr(head, "_rlhf_fused_head_checked", False):
        config = getattr(inner, "config", None)
        scaled = [n for n in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                  if getattr(config, n, None) not in (None, 1, 1.0)]  # fmt: skip
        with torch.no_grad():  # 1% tolerance: under bf16 autocast the two products may round differently
            last = torch.nn.functional.linear(hidden[:, -1], head.weight, head.bias).float()
            want = out.logits[:, -1].float()
            same = out.logits.shape[1] == 1 and torch.allclose(last, want, rtol=1e-2, atol=1e-2 * want.abs().max())
        if scaled or not same:
            raise ValueError(
                "fused_lm_head: this model's logits are not its output embedding applied to its last hidden state "
                f"({', '.join(scaled) or 'they differ, or logits_to_keep is not supported'}); use fused_lm_head=False"
            )
        head._rlhf_fused_head_checked = True
    return hidden, head


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (linear and embedding weights) only, none on
    biases and norm scales (vectors), as Hugging Face's Trainer and TRL group them. One group when
    there is no decay."""
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


def truncate_pair(bos: list[int], prompt: list[int], completion: list[int], max_length: int,
                  *, longest: int | None = None):  # fmt: skip
    """``(bos + prompt, completion)`` cut to ``max_length`` tokens in all: the prompt keeps
    its end (the tokens next to the completion), the completion its start, and each keeps
    at least ``max_length // 2`` tokens (with bos) when it has them.

    ``longest``: the length of the longest completion that shares this prompt (a preference
    pair's chosen and rejected): the prompt is cut for that one, so that every completion of
    the prompt is read after the same prompt tokens (as TRL cuts a pair's prompt once), and
    each completion is then cut to what remains."""
    longest = len(completion) if longest is None else max(longest, len(completion))
    if len(bos) + len(prompt) + longest <= max_length:
        return bos + prompt, completion
    keep_c = min(longest, max_length - min(len(bos) + len(prompt), max_length // 2))
    keep_p = max(0, max_length - keep_c - len(bos))
    return bos + prompt[len(prompt) - keep_p :], completion[: max_length - len(bos) - keep_p]


class Trainer:
    required_columns: tuple[str, ...] = ()

    def __init__(self, model, tokenizer, dataset, config: TrainerConfig):
        missing = [c for c in self.required_columns if c not in dataset.column_names]
        if missing:
            raise ValueError(f"dataset: missing column(s) {missing}; it has {dataset.column_names}")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer: has no pad token (set tokenizer.pad_token, e.g. to the eos token)")
        if config.batch_size < 1 or config.gradient_accumulation_steps < 1 or config.max_steps < 1:
            raise ValueError("config: batch_size, gradient_accumulation_steps and max_steps must be >= 1")
        if len(dataset) < config.batch_size:
            raise ValueError(f"dataset: {len(dataset)} rows is fewer than batch_size={config.batch_size}")
        self.device = next(model.parameters()).device
        self.rank, self.world_size = init_distributed(self.device.type)
        if config.batch_size % self.world_size:
            raise ValueError(
                f"config: batch_size={config.batch_size} (the global batch) is not divisible by the "
                f"{self.world_size} processes"
            )
        if config.disable_dropout:
            disable_dropout(model)
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.config = config
        self.step = 0
        self.output_dir = Path(config.output_dir)
        self.history: list[dict[str, float]] = []
        # per-rank streams (rank 0's is the single-process one): PPO's ranks sample different responses
        torch.manual_seed(config.seed + self.rank)
        random.seed(config.seed + self.rank)
        self.optimizer = torch.optim.AdamW(
            decay_groups([p for p in self.trainable_parameters() if p.requires_grad], config.weight_decay),
            lr=config.learning_rate,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.world_size > 1:
            self._wrap_for_ddp()

    # --- multi-process ------------------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return unwrap(self.model)

    def _wrap_for_ddp(self) -> None:
        """Wrap each trained module (``checkpointed_modules``) in DDP where the trainer holds
        it, so subclasses call ``self.model(...)`` as usual. DDP broadcasts rank 0's weights
        here. Buffers are synced then but not at every forward (``forward_sync_buffers=False``):
        the models' buffers (e.g. rotary frequencies) are not trained, and a broadcast per
        forward would make every rank's number of forwards a collective contract."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        # torch >= 2.14 renames the switch (and keeps the sync at construction)
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        no_buffer_sync = {key: False}
        for module in self.checkpointed_modules().values():
            if isinstance(module, DistributedDataParallel):
                continue
            wrapped = DistributedDataParallel(module, device_ids=device_ids, **no_buffer_sync)
            for attr, value in list(vars(self).items()):
                if value is module:
                    setattr(self, attr, wrapped)

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` on the trained modules unless ``enabled``: with gradient
        accumulation, gradients are all-reduced once, in the last micro-batch's backward."""
        stack = contextlib.ExitStack()
        if not enabled:
            for module in self.checkpointed_modules().values():
                if isinstance(module, DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def per_rank_share(self, count: torch.Tensor) -> torch.Tensor:
        """``sum over ranks of count / world_size`` (``count`` itself in one process).

        Dividing a rank's sum of per-token losses by this, instead of by its own token
        count, makes the mean over ranks that DDP applies to gradients equal the gradient
        of the global token mean: ``mean_r(S_r / (C / N)) = sum_r S_r / C``."""
        if self.world_size == 1:
            return count
        total = count.detach().to(device=self._comm_device(), dtype=torch.float64)
        dist.all_reduce(total)
        return (total / self.world_size).to(device=count.device, dtype=torch.float32)

    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics averaged over ranks (one all-reduce); unchanged in one process."""
        if self.world_size == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values.tolist(), strict=True)}

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # --- to override --------------------------------------------------------------------
    def trainable_parameters(self):
        return self.model.parameters()

    def checkpointed_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules whose weights a checkpoint holds."""
        return {"model": self.model}

    def collate(self, rows: dict[str, list]) -> dict[str, Any]:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # --- shared helpers ---------------------------------------------------------------------
    def encode_pairs(self, prompts: list[str], completions: list[str], *, paired: bool = False):
        """Token ids of ``<bos> prompt completion <eos>``, right-padded, with a mask
        that is 1 on completion tokens (the ones whose log-probs are trained).

        A pair longer than ``max_length`` loses tokens from the prompt's start (after
        bos) and the completion's end, each keeping at least half of ``max_length``
        when it is that long: a long prompt never crowds out its completion. ``paired``:
        the rows are preference pairs, the first half chosen and the second rejected (same
        prompts): both rows of a pair keep the same prompt tokens, cut for the longer of
        the two completions (a reward or DPO margin compares two answers to one prompt)."""
        tok = self.tokenizer
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        prompt_ids = [tok(prompt, add_special_tokens=False).input_ids for prompt in prompts]
        completion_ids = [[*tok(c, add_special_tokens=False).input_ids, tok.eos_token_id] for c in completions]
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"encode_pairs: {len(prompt_ids)} prompts for {len(completion_ids)} completions")
        half = len(completion_ids) // 2
        if paired and (len(completion_ids) % 2 or prompts[:half] != prompts[half:]):
            raise ValueError("encode_pairs: paired rows must be chosen then rejected, with the same prompts")
        ids, loss_mask = [], []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            longest = len(completion_ids[(i + half) % len(completion_ids)]) if paired else None
            p, c = truncate_pair(bos, p, c, self.config.max_length, longest=longest)
            ids.append(p + c)
            loss_mask.append([0] * len(p) + [1] * len(c))
        width = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        completion_mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, (seq, m) in enumerate(zip(ids, loss_mask, strict=True)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            completion_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        return input_ids.to(self.device), attention.to(self.device), completion_mask.to(self.device)

    def autocast(self):
        enabled = self.config.bf16 and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # --- the loop ------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (self.config.max_steps - step) / max(1, self.config.max_steps - warm))

    def extra_state(self) -> dict[str, Any]:
        """Trainer-specific state a checkpoint must restore (e.g. an adaptive KL coefficient)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def _batch_indices(self, micro_step: int) -> list[int]:
        """This rank's rows of the global micro-batch number ``micro_step``: epoch
        permutations seeded by (seed, epoch), so the order depends only on the position,
        not on history; rank r takes the r-th contiguous slice of ``batch_size / world_size``."""
        per_epoch = len(self.dataset) // self.config.batch_size
        epoch, slot = divmod(micro_step, per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g)
        local = self.config.batch_size // self.world_size
        start = slot * self.config.batch_size + self.rank * local
        return order[start : start + local].tolist()

    def train(self, resume_from: str | Path | None = None) -> list[dict[str, float]]:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        cfg = self.config
        main = self.is_main_process
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "metrics.jsonl"
        if self.world_size > 1:
            self._wrap_for_ddp()  # modules a subclass assigned after Trainer.__init__ (a no-op otherwise)
        started = time.time()
        self.model.train()
        while self.step < cfg.max_steps:
            sums = self.all_reduce_mean(self.training_step())
            self.step += 1
            record = {"step": self.step, **sums, "lr": self.scheduler.get_last_lr()[0]}
            self.history.append(record)
            if main and (self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps):
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.progress and main:
                self._progress(record, started)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                self.save_checkpoint(self.output_dir / f"checkpoint-{self.step}")
        if cfg.progress and main and sys.stderr.isatty():
            sys.stderr.write("\n")
        self.save_checkpoint(self.output_dir / "final")
        return self.history

    def _progress(self, record: dict[str, float], started: float) -> None:
        """A live line on a terminal (at most 10 updates a second); one line per
        logging step otherwise."""
        cfg = self.config
        shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("step", "lr"))
        line = f"[{type(self).__name__}] {self.step}/{cfg.max_steps} {shown} ({time.time() - started:.0f}s)"
        if sys.stderr.isatty():
            now = time.time()
            if now - getattr(self, "_last_progress", 0.0) > 0.1 or self.step == cfg.max_steps:
                self._last_progress = now
                sys.stderr.write("\r" + line)
        elif self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
            sys.stderr.write(line + "\n")

    def training_step(self) -> dict[str, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns metrics.

        The step's micro-batches are collated first and handed to :meth:`begin_step`, so
        that a loss normalised by a count (tokens) can use the whole step's count."""
        cfg = self.config
        n = cfg.gradient_accumulation_steps
        micro_batches = []
        for micro in range(n):
            indices = self._batch_indices(self.step * n + micro)
            micro_batches.append((indices, self.collate(self.dataset[indices])))
        self.begin_step([batch for _, batch in micro_batches])
        sums: dict[str, float] = {}
        for micro, (indices, batch) in enumerate(micro_batches):
            self.current_indices = indices  # the dataset rows of this micro-batch
            with self._grad_sync(micro == n - 1):
                with self.autocast():
                    loss, metrics = self.compute_loss(batch)
                (loss / n).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        sums["grad_norm"] = self.optimizer_step()
        return sums

    def begin_step(self, batches: list[dict[str, Any]]) -> None:
        """Called with the collated micro-batches of a step before the first forward."""

    def clip_groups(self) -> list[list[torch.nn.Parameter]]:
        """Parameter sets whose gradients are clipped to ``max_grad_norm`` each; the
        first one's norm is the logged ``grad_norm``."""
        return [[p for g in self.optimizer.param_groups for p in g["params"]]]

    def optimizer_step(self, step_schedule: bool = True) -> float:
        """Clip, step the optimiser (and the schedule), clear gradients; returns the gradient norm."""
        norms = [torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm) for params in self.clip_groups()]
        self.group_grad_norms = [float(n) for n in norms]  # per clip group, before clipping
        grad_norm = norms[0]
        self.optimizer.step()
        if step_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Rank 0 writes; every rank returns after the write (a barrier)."""
        path = Path(path)
        rng = self._rng_state()
        if self.world_size > 1:
            every_rank: list[Any] = [None] * self.world_size
            dist.all_gather_object(every_rank, rng)
        else:
            every_rank = [rng]
        if self.is_main_process:
            self._write_checkpoint(path, every_rank)
        self.barrier()
        return path

    @staticmethod
    def _rng_state() -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return rng

    def _write_checkpoint(self, path: Path, rng_per_rank: list[dict[str, Any]]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "modules": {name: unwrap(m).state_dict() for name, m in self.checkpointed_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_per_rank[0],
            "rng_per_rank": rng_per_rank,
            "config": dataclasses.asdict(self.config),
            "extra": self.extra_state(),
        }
        torch.save(state, path / "trainer_state.pt")

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(Path(path) / "trainer_state.pt", map_location=self.device, weights_only=False)
        for name, module in self.checkpointed_modules().items():
            unwrap(module).load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank") or []
        rng = per_rank[self.rank] if len(per_rank) == self.world_size else state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():  # generators take CPU byte tensors; map_location moved them
            torch.cuda.set_rng_state_all([generator.cpu() for generator in rng["cuda"]])
        self.load_extra_state(state.get("extra", {}))
        self.step = state["step"]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
