"""What every reference trainer shares: config, optimisation loop, logging, checkpoints.

A trainer subclass implements ``compute_loss(batch) -> (loss, metrics)`` and
``collate(rows) -> batch``; the base class owns the rest: seeded data order
(so that a resumed run sees exactly the batches the uninterrupted one would),
AdamW with linear warmup/decay, gradient accumulation, clipping, bf16
autocast on CUDA, a progress line, metrics as JSON lines, and checkpoints
that restore model, optimiser, scheduler, RNG states and step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch


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
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.config = config
        self.device = next(model.parameters()).device
        self.step = 0
        self.output_dir = Path(config.output_dir)
        self.history: list[dict[str, float]] = []
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.trainable_parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

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
    def encode_pairs(self, prompts: list[str], completions: list[str]):
        """Token ids of ``<bos> prompt completion <eos>``, right-padded, with a mask
        that is 1 on completion tokens (the ones whose log-probs are trained)."""
        tok = self.tokenizer
        ids, loss_mask = [], []
        for prompt, completion in zip(prompts, completions, strict=True):
            p = [tok.bos_token_id, *tok(prompt, add_special_tokens=False).input_ids]
            c = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
            seq = (p + c)[: self.config.max_length]
            ids.append(seq)
            loss_mask.append(([0] * len(p) + [1] * len(c))[: self.config.max_length])
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
        """Rows of the micro-batch number ``micro_step``: epoch permutations seeded by
        (seed, epoch), so the order depends only on the position, not on history."""
        per_epoch = len(self.dataset) // self.config.batch_size
        epoch, slot = divmod(micro_step, per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g)
        start = slot * self.config.batch_size
        return order[start : start + self.config.batch_size].tolist()

    def train(self, resume_from: str | Path | None = None) -> list[dict[str, float]]:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.output_dir / "metrics.jsonl"
        started = time.time()
        self.model.train()
        while self.step < cfg.max_steps:
            sums = self.training_step()
            self.step += 1
            record = {"step": self.step, **sums, "lr": self.scheduler.get_last_lr()[0]}
            self.history.append(record)
            if self.step % cfg.logging_steps == 0 or self.step == cfg.max_steps:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.progress:
                self._progress(record, started)
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                self.save_checkpoint(self.output_dir / f"checkpoint-{self.step}")
        if cfg.progress and sys.stderr.isatty():
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
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns metrics."""
        cfg = self.config
        sums: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            rows = self.dataset[self._batch_indices(self.step * cfg.gradient_accumulation_steps + micro)]
            with self.autocast():
                loss, metrics = self.compute_loss(self.collate(rows))
            (loss / cfg.gradient_accumulation_steps).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / cfg.gradient_accumulation_steps
        sums["grad_norm"] = self.optimizer_step()
        return sums

    def optimizer_step(self, step_schedule: bool = True) -> float:
        """Clip, step the optimiser (and the schedule), clear gradients; returns the gradient norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        if step_schedule:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "modules": {name: m.state_dict() for name, m in self.checkpointed_modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "config": dataclasses.asdict(self.config),
            "extra": self.extra_state(),
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, path / "trainer_state.pt")
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(Path(path) / "trainer_state.pt", map_location=self.device, weights_only=False)
        for name, module in self.checkpointed_modules().items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.load_extra_state(state.get("extra", {}))
        self.step = state["step"]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan
