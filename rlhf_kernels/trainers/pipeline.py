"""The classic RLHF pipeline on one command: SFT, reward model, PPO against it, and DPO.

Default: the built-in sorting task with tiny Llama models on CPU. Writes a
report folder: per-stage metrics (JSON lines), PNG curves, ``report.json``
and ``report.md`` with held-out exact-match success after SFT, PPO and DPO and
the reward model's held-out accuracy.
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
from rlhf_kernels.trainers.ppo import PPOConfig, PPOTrainer
from rlhf_kernels.trainers.reward import RewardTrainer
from rlhf_kernels.trainers.sampling import exact_match, generate, ranked_pairs
from rlhf_kernels.trainers.sft import SFTTrainer


@dataclasses.dataclass
class PipelineConfig:
    out: str = "pipeline-out"
    seed: int = 0
    sft_steps: int = 300
    rm_steps: int = 200
    ppo_steps: int = 40
    dpo_steps: int = 100
    eval_prompts: int = 200
    comparison_prompts: int = 2000
    samples_per_prompt: int = 4
    batch_size: int = 32
    dpo_beta: float = 0.1
    dpo_rpo_alpha: float = 1.0
    dpo_loss_type: str = "sigmoid"
    ppo_kl_coef: float = 0.2
    ppo_learning_rate: float = 1e-4
    dpo_learning_rate: float = 5e-5
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> PipelineConfig:
        """Seconds, for smoke tests: too short to learn much."""
        return cls(**{**dict(sft_steps=20, rm_steps=10, ppo_steps=2, dpo_steps=5, eval_prompts=16, batch_size=8,
                              comparison_prompts=64), **kw})


def _plot(histories: dict[str, list[dict]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = {"sft": ["loss"], "reward": ["loss", "accuracy"], "ppo": ["score", "kl", "value_loss"],
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

    log("[pipeline] comparisons: sampled from the SFT model, ranked by the task's scorer")
    compare = toy.prompt_dataset(config.comparison_prompts, seed=config.seed + 4)
    samples = generate(policy, tokenizer, compare["prompt"], num_samples=config.samples_per_prompt, do_sample=True)
    comparisons = ranked_pairs(compare["prompt"], samples, toy.score, references=compare["answer"])
    results["comparisons"] = len(comparisons)
    log(f"[pipeline] {len(comparisons)} on-policy comparisons from {len(compare)} prompts")

    log("[pipeline] reward model")
    reward_model = toy.build_model(tokenizer, kind="reward", seed=config.seed + 1)
    rm_data = concatenate_datasets([comparisons, toy.preference_dataset(config.comparison_prompts,
                                                                        seed=config.seed + 1)])  # fmt: skip
    rm = RewardTrainer(reward_model, tokenizer, rm_data.shuffle(seed=config.seed),
                       cfg("reward", config.rm_steps, learning_rate=2e-3, warmup_steps=10))  # fmt: skip
    histories["reward"] = rm.train()
    held_out_pairs = ranked_pairs(held_out["prompt"], generate(policy, tokenizer, held_out["prompt"],
                                                               num_samples=config.samples_per_prompt, do_sample=True),
                                  toy.score, references=held_out["answer"])  # fmt: skip
    results["rm_accuracy"] = rm.evaluate(held_out_pairs)["accuracy"]
    log(f"[pipeline] reward model held-out accuracy (SFT samples ranked by the scorer): {results['rm_accuracy']:.3f}")

    log("[pipeline] PPO against the reward model")
    ppo_policy = copy.deepcopy(policy)
    ppo = PPOTrainer(
        ppo_policy, copy.deepcopy(policy), toy.build_model(tokenizer, kind="value", seed=config.seed + 2), tokenizer,
        toy.prompt_dataset(4000, seed=config.seed + 2),
        PPOConfig(output_dir=str(out / "ppo"), max_steps=config.ppo_steps, rollout_batch_size=config.batch_size,
                  mini_batch_size=max(1, config.batch_size // 2), learning_rate=config.ppo_learning_rate,
                  kl_coef=config.ppo_kl_coef,
                  seed=config.seed, progress=config.progress, logging_steps=max(1, config.ppo_steps // 20)),
        reward_model=reward_model,
    )  # fmt: skip
    histories["ppo"] = ppo.train()
    results["success_ppo"] = success(ppo_policy)
    log(f"[pipeline] held-out exact match after PPO: {results['success_ppo']:.3f}")

    log("[pipeline] DPO from the SFT model")
    dpo_policy = copy.deepcopy(policy)
    dpo = DPOTrainer(dpo_policy, copy.deepcopy(policy), tokenizer, comparisons,
                     cfg("dpo", config.dpo_steps, learning_rate=config.dpo_learning_rate), beta=config.dpo_beta,
                     loss_type=config.dpo_loss_type, precompute_ref_logprobs=True,
                     rpo_alpha=config.dpo_rpo_alpha)  # fmt: skip
    histories["dpo"] = dpo.train()
    results["success_dpo"] = success(dpo_policy)
    log(f"[pipeline] held-out exact match after DPO: {results['success_dpo']:.3f}")

    results["seconds"] = time.time() - started
    report = {"config": dataclasses.asdict(config), "results": results}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plotted = _plot(histories, out / "curves.png")
    table = "\n".join(
        [
            "| stage | held-out metric | value |",
            "|---|---|---|",
            f"| SFT | exact match | {results['success_sft']:.3f} |",
            f"| reward model | pair accuracy | {results['rm_accuracy']:.3f} |",
            f"| PPO (from SFT, against the RM) | exact match | {results['success_ppo']:.3f} |",
            f"| DPO (from SFT, {config.dpo_loss_type}) | exact match | {results['success_dpo']:.3f} |",
        ]
    )
    (out / "report.md").write_text(
        f"# RLHF pipeline on the sorting task\n\n{table}\n\n{results['seconds']:.0f} s in all."
        + ("\n\n![curves](curves.png)\n" if plotted else "\n")
    )
    log("\n" + table + f"\n\nreport: {out / 'report.md'}")
    return report
