"""The classic RLHF pipeline on one command: SFT, reward model, PPO against it, GRPO and DPO.

Default: the built-in sorting task with tiny Llama models on CPU, following
InstructGPT's recipe at toy scale:

1. SFT on (prompt, sorted answer) pairs;
2. comparisons: k samples per prompt from the SFT model, ranked by the task's
   scorer (the labeller), plus hand-made near misses;
3. a Bradley-Terry reward model initialised from the SFT model;
4. PPO against the reward model with a KL penalty to the SFT model, the critic
   initialised from the reward model; with ``ppo_rounds > 1`` the reward model is
   refreshed on labelled samples of the current policy between rounds (iterated
   RLHF, Bai et al. 2022), which stops PPO from exploiting its blind spots;
5. GRPO from the SFT model on the task's scorer itself (a verifiable reward: no reward
   model), groups of samples per prompt, KL to the SFT model in the loss;
6. DPO (with an RPO term) from the SFT model on ranked SFT samples.

Writes a report folder: per-stage metrics (JSON lines), PNG curves,
``report.json`` and ``report.md`` with held-out exact-match success (greedy)
after SFT, PPO, GRPO and DPO and the reward model's held-out accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from datasets import concatenate_datasets

from rlhf_kernels.trainers import toy
from rlhf_kernels.trainers.base import TrainerConfig
from rlhf_kernels.trainers.dpo import DPOTrainer
from rlhf_kernels.trainers.grpo import GRPOConfig, GRPOTrainer
from rlhf_kernels.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_kernels.trainers.reward import RewardTrainer
from rlhf_kernels.trainers.sampling import exact_match, generate, ranked_pairs
from rlhf_kernels.trainers.sft import SFTTrainer


@dataclasses.dataclass
class PipelineConfig:
    out: str = "pipeline-out"
    seed: int = 0
    # A short SFT (300 steps reach ~0.88 held-out exact match) leaves the RL stages room to show.
    sft_steps: int = 150
    eval_prompts: int = 200
    batch_size: int = 32  # SFT, reward model and DPO
    comparison_prompts: int = 2000
    samples_per_prompt: int = 8
    rm_steps: int = 1500
    rm_update_steps: int = 400
    ppo_steps: int = 120
    ppo_rounds: int = 3  # > 1: iterated RLHF, the RM is refreshed on the policy's samples between rounds
    ppo_rollout_batch_size: int = 64
    ppo_mini_batch_size: int = 16
    ppo_epochs: int = 4
    ppo_kl_coef: float = 0.2
    ppo_learning_rate: float = 1e-4
    # GRPO on the task's own scorer (0 steps: skip): prompts x generations a rollout
    grpo_steps: int = 200
    grpo_prompts: int = 16
    grpo_generations: int = 8
    grpo_mini_batch_size: int = 32
    grpo_kl_coef: float = 0.02
    grpo_learning_rate: float = 1e-4
    dpo_steps: int = 200
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 1.0
    dpo_loss_type: str = "sigmoid"
    dpo_learning_rate: float = 1e-4
    # Control: the SFT model trained on for this many more SFT steps (0: skip), to tell what the RL
    # stages add beyond more supervised training on this task.
    sft_control_steps: int = 200
    progress: bool = True

    def __post_init__(self):
        if not 1 <= self.ppo_rounds <= self.ppo_steps:
            raise ValueError(f"ppo_rounds: expected 1 <= ppo_rounds <= ppo_steps={self.ppo_steps}, "
                             f"got {self.ppo_rounds}")

    @classmethod
    def quick(cls, **kw) -> PipelineConfig:
        """Seconds, for smoke tests: too short to learn much."""
        small = dict(sft_steps=20, eval_prompts=16, batch_size=8, comparison_prompts=64, samples_per_prompt=4,
                     rm_steps=10, rm_update_steps=4, ppo_steps=4, ppo_rounds=2, ppo_rollout_batch_size=8,
                     ppo_mini_batch_size=4, ppo_epochs=1, grpo_steps=2, grpo_prompts=4, grpo_generations=4,
                     grpo_mini_batch_size=8, dpo_steps=5, sft_control_steps=5)  # fmt: skip
        return cls(**{**small, **kw})


def _plot(histories: dict[str, list[dict]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = {"sft": ["loss"], "reward": ["loss", "accuracy"], "ppo": ["score", "kl", "value_loss"],
            "grpo": ["score", "kl", "frac_zero_std"],
            "dpo": ["loss", "rewards/accuracies", "rewards/margins"]}  # fmt: skip
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.4), squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items(), strict=True):
        for key in keys.get(stage, []):
            ax.plot([h["step"] for h in history], [h.get(key, float("nan")) for h in history], label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load_backbone(target, source) -> None:
    """Copy ``source``'s backbone into ``target``; only the output heads may differ."""
    result = target.load_state_dict(source.state_dict(), strict=False)
    stray = [k for k in [*result.missing_keys, *result.unexpected_keys] if not k.startswith(("score.", "lm_head."))]
    if stray:
        raise ValueError(f"backbones do not match: {stray[:5]}")


def run(config: PipelineConfig, log=print) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(config.seed)
    tokenizer = toy.build_tokenizer()
    held_out = toy.prompt_dataset(config.eval_prompts, seed=config.seed + 10_000)

    def success(model) -> float:
        return exact_match(model, tokenizer, held_out["prompt"], held_out["answer"])

    def cfg(stage, steps, **kw):
        return TrainerConfig(
            output_dir=str(out / stage), max_steps=steps, batch_size=config.batch_size, seed=config.seed,
            progress=config.progress, logging_steps=max(1, steps // 20), **kw,
        )  # fmt: skip

    histories, results = {}, {}
    log("[pipeline] SFT")
    policy = toy.build_model(tokenizer, seed=config.seed)
    sft = SFTTrainer(policy, tokenizer, toy.sft_dataset(4000, seed=config.seed),
                     cfg("sft", config.sft_steps, learning_rate=3e-3, warmup_steps=20))  # fmt: skip
    histories["sft"] = sft.train()
    results["success_sft"] = success(policy)
    log(f"[pipeline] held-out exact match after SFT: {results['success_sft']:.3f}")

    def comparisons_from(model, n: int, seed: int, **kw):
        """Labelled comparisons of ``model``'s own samples: k per prompt, ranked by the
        task's scorer (the labeller); by default the best against every worse one."""
        prompts = toy.prompt_dataset(n, seed=seed)
        samples = generate(model, tokenizer, prompts["prompt"], num_samples=config.samples_per_prompt, do_sample=True)
        return ranked_pairs(prompts["prompt"], samples, toy.score, references=prompts["answer"],
                            **{"against": "all", **kw})  # fmt: skip

    log("[pipeline] comparisons: samples of the SFT model ranked by the task's scorer")
    comparisons = comparisons_from(policy, config.comparison_prompts, config.seed + 4)
    results["comparisons"] = len(comparisons)
    log(f"[pipeline] {len(comparisons)} comparisons from {config.comparison_prompts} prompts")

    log("[pipeline] reward model, initialised from the SFT model")
    reward_model = toy.build_model(tokenizer, kind="reward", seed=config.seed + 1)
    _load_backbone(reward_model, policy)
    rm_data = concatenate_datasets([comparisons, toy.preference_dataset(2 * config.comparison_prompts,
                                                                        seed=config.seed + 1)])  # fmt: skip
    rm = RewardTrainer(reward_model, tokenizer, rm_data.shuffle(seed=config.seed),
                       cfg("reward", config.rm_steps, learning_rate=1e-3, warmup_steps=20))  # fmt: skip
    histories["reward"] = rm.train()
    held_out_pairs = comparisons_from(policy, config.eval_prompts, config.seed + 20_000)
    results["rm_accuracy"] = rm.evaluate(held_out_pairs)["accuracy"]
    log(f"[pipeline] reward model held-out accuracy on ranked SFT samples: {results['rm_accuracy']:.3f}")

    log("[pipeline] PPO against the reward model")
    ppo_policy = copy.deepcopy(policy)
    value_model = toy.build_model(tokenizer, kind="value", seed=config.seed + 2)
    _load_backbone(value_model, reward_model)  # the critic starts from the RM
    histories["ppo"] = []
    steps = [config.ppo_steps // config.ppo_rounds + (r < config.ppo_steps % config.ppo_rounds)
             for r in range(config.ppo_rounds)]  # fmt: skip
    for r, round_steps in enumerate(steps):
        if r:  # iterated RLHF: label the current policy's samples and refresh the RM on them
            fresh = comparisons_from(ppo_policy, config.comparison_prompts // 2, config.seed + 30_000 + r)
            update = concatenate_datasets([fresh, comparisons, toy.preference_dataset(config.comparison_prompts,
                                                                                       seed=config.seed + 40_000 + r)])
            reward_model.requires_grad_(True)  # PPOTrainer froze it
            rm = RewardTrainer(reward_model, tokenizer, update.shuffle(seed=config.seed + r),
                               cfg(f"reward-{r}", config.rm_update_steps, learning_rate=5e-4, warmup_steps=10))
            rm.train()
            log(f"[pipeline] reward model refreshed on {len(fresh)} comparisons of the PPO policy's samples")
        ppo = PPOTrainer(
            ppo_policy, copy.deepcopy(policy), value_model, tokenizer,
            toy.prompt_dataset(4000, seed=config.seed + 50_000 + r),  # prompts no other stage saw
            PPOConfig(output_dir=str(out / "ppo" / f"round-{r}"), max_steps=round_steps,
                      rollout_batch_size=config.ppo_rollout_batch_size, mini_batch_size=config.ppo_mini_batch_size,
                      ppo_epochs=config.ppo_epochs, learning_rate=config.ppo_learning_rate, kl_coef=config.ppo_kl_coef,
                      seed=config.seed + r, progress=config.progress, logging_steps=max(1, round_steps // 10)),
            reward_model=reward_model,
        )  # fmt: skip
        done = len(histories["ppo"])
        histories["ppo"] += [{**h, "step": h["step"] + done} for h in ppo.train()]
    results["success_ppo"] = success(ppo_policy)
    log(f"[pipeline] held-out exact match after PPO: {results['success_ppo']:.3f}")

    if config.grpo_steps:
        log("[pipeline] GRPO from the SFT model on the task's scorer (a verifiable reward)")
        grpo_policy = copy.deepcopy(policy)
        grpo = GRPOTrainer(
            grpo_policy, copy.deepcopy(policy) if config.grpo_kl_coef else None, tokenizer,
            toy.prompt_dataset(4000, seed=config.seed + 60_000),  # prompts no other stage saw
            GRPOConfig(output_dir=str(out / "grpo"), max_steps=config.grpo_steps,
                       rollout_batch_size=config.grpo_prompts, num_generations=config.grpo_generations,
                       mini_batch_size=config.grpo_mini_batch_size, learning_rate=config.grpo_learning_rate,
                       kl_coef=config.grpo_kl_coef, seed=config.seed, progress=config.progress,
                       logging_steps=max(1, config.grpo_steps // 20)),
            reward_fn=toy.reward_fn,
        )  # fmt: skip
        histories["grpo"] = grpo.train()
        results["success_grpo"] = success(grpo_policy)
        log(f"[pipeline] held-out exact match after GRPO: {results['success_grpo']:.3f}")

    log("[pipeline] DPO from the SFT model on its own ranked samples")
    # chosen: a right answer (the reference when no sample is right); rejected: the worst sample
    preferences = comparisons_from(policy, config.comparison_prompts, config.seed + 3, against="worst",
                                   min_chosen_score=1.0)  # fmt: skip
    dpo_policy = copy.deepcopy(policy)
    dpo = DPOTrainer(dpo_policy, copy.deepcopy(policy), tokenizer, preferences,
                     cfg("dpo", config.dpo_steps, learning_rate=config.dpo_learning_rate), beta=config.dpo_beta,
                     loss_type=config.dpo_loss_type, precompute_ref_logprobs=True,
                     rpo_alpha=config.dpo_rpo_alpha)  # fmt: skip
    histories["dpo"] = dpo.train()
    results["success_dpo"] = success(dpo_policy)
    log(f"[pipeline] held-out exact match after DPO: {results['success_dpo']:.3f}")

    if config.sft_control_steps:
        log("[pipeline] control: the SFT model trained on with SFT")
        control = copy.deepcopy(policy)
        SFTTrainer(control, tokenizer, toy.sft_dataset(4000, seed=config.seed),
                   cfg("sft-control", config.sft_control_steps, learning_rate=3e-3)).train()  # fmt: skip
        results["success_sft_control"] = success(control)
        log(f"[pipeline] held-out exact match after {config.sft_control_steps} more SFT steps: "
            f"{results['success_sft_control']:.3f}")  # fmt: skip

    results["seconds"] = time.time() - started
    report = {"config": dataclasses.asdict(config), "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plotted = _plot(histories, out / "curves.png")
    table = "\n".join(
        [
            "| stage | held-out metric | value |",
            "|---|---|---|",
            f"| SFT | exact match | {results['success_sft']:.3f} |",
            f"| reward model (ranked SFT samples, best vs each worse) | pair accuracy | {results['rm_accuracy']:.3f} |",
            f"| PPO (from SFT, against the RM, {config.ppo_rounds} round(s)) | exact match | "
            f"{results['success_ppo']:.3f} |",
        ]
        + ([f"| GRPO (from SFT, on the task's scorer, {config.grpo_generations} samples a prompt) | exact match | "
            f"{results['success_grpo']:.3f} |"] if config.grpo_steps else [])
        + [
            f"| DPO (from SFT, {config.dpo_loss_type}, rpo_alpha={config.dpo_rpo_alpha}) | exact match | "
            f"{results['success_dpo']:.3f} |",
        ]
        + ([f"| control: SFT continued for {config.sft_control_steps} more steps | exact match | "
            f"{results['success_sft_control']:.3f} |"] if config.sft_control_steps else [])
    )  # fmt: skip
    (out / "report.md").write_text(
        f"# RLHF pipeline on the sorting task\n\n{table}\n\n{results['seconds']:.0f} s in all."
        + ("\n\n![curves](curves.png)\n" if plotted else "\n")
    )
    log("\n" + table + f"\n\nreport: {out / 'report.md'}")
    return report
