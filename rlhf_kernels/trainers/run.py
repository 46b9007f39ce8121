"""Run one trainer from the command line, in one process or under ``torchrun``.

    python -m rlhf_kernels.trainers.run sft --steps 300 --batch-size 32
    torchrun --nproc_per_node=2 -m rlhf_kernels.trainers.run dpo --init-from runs/sft/model
    rlhf-kernels train reward --model ./my-model --dataset prefs.jsonl

Stages: ``sft``, ``reward``, ``dpo``, ``ppo``, ``grpo``. Without ``--model`` and
``--dataset`` it trains on the built-in sorting task (:mod:`toy`) with a tiny
Llama; ``--model`` takes a directory written by ``save_pretrained`` or a hub
id, ``--dataset`` a ``save_to_disk`` directory, a ``.jsonl`` / ``.json`` /
``.csv`` / ``.parquet`` file or a hub id. ``--batch-size`` is the global batch:
under ``torchrun --nproc_per_node=N`` each process takes ``batch_size / N`` rows
of it (see :mod:`rlhf_kernels.trainers.base` for what is exact). The output
folder gets ``metrics.jsonl``, ``final/trainer_state.pt`` and, with
``--save-model``, the trained model and tokenizer in ``model/``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from pathlib import Path

STAGES = ("sft", "reward", "dpo", "ppo", "grpo")
_COLUMNS = {"sft": ("prompt", "completion"), "reward": ("prompt", "chosen", "rejected"),
            "dpo": ("prompt", "chosen", "rejected"), "ppo": ("prompt",), "grpo": ("prompt",)}  # fmt: skip


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m rlhf_kernels.trainers.run", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--model", help="save_pretrained directory or hub id (default: a tiny Llama on the toy task)")
    parser.add_argument("--init-from", help="alias of --model, e.g. the model/ folder of an earlier stage")
    parser.add_argument("--dataset", help="save_to_disk directory, .jsonl/.json/.csv/.parquet file or hub id "
                                          "(default: the built-in sorting task)")  # fmt: skip
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--rows", type=int, default=4000, help="rows of the built-in task's data (default: 4000)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<stage>)")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps (default: 100)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch per micro-step (default: 16)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step (default: 1)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the stage's)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume-from", type=Path, help="a checkpoint folder of an earlier run")
    parser.add_argument("--save-model", action="store_true", help="save_pretrained the trained model to OUT/model")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU), cpu or cuda")
    parser.add_argument("--backend", default="auto", help="rlhf_kernels backend for the ops")
    parser.add_argument("--fused-lm-head", action="store_true",
                        help="sft/dpo/ppo/grpo: log-probs and the PPO loss from the last hidden state and the LM head, "
                        "never holding [B, T, V] logits")  # fmt: skip
    parser.add_argument("--importance-sampling-level", choices=("token", "sequence"), default="token",
                        help="ppo/grpo: the policy ratio per token (PPO) or per sequence (GSPO)")
    parser.add_argument("--missing-eos-penalty", type=float, default=None,
                        help="ppo/grpo: subtracted from the score of a response cut off before its eos (TRL's option)")
    parser.add_argument("--grad-in-forward", action="store_true",
                        help="ppo/grpo: the policy step as one sweep over the logits that writes their gradient "
                        "(ppo_loss_from_logits(grad_in_forward=True))")  # fmt: skip
    parser.add_argument("--beta", type=float, default=0.1, help="dpo: beta")
    parser.add_argument("--loss-type", default="sigmoid", help="dpo: loss type")
    parser.add_argument("--rpo-alpha", type=float, default=0.0, help="dpo: weight of the chosen NLL term")
    parser.add_argument("--num-generations", type=int, default=8,
                        help="grpo: responses sampled a prompt, the group its advantages compare within (default: 8)")
    parser.add_argument("--kl-coef", type=float,
                        help="ppo/grpo: the KL coefficient (default: the trainer's, 0.05 for PPO's reward penalty, "
                        "0.04 for GRPO's loss term)")  # fmt: skip
    parser.add_argument("--reward-model", help="ppo/grpo: reward model (save_pretrained directory or hub id); "
                                               "default on the toy task: its exact scoring function")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def main(argv: list[str] | None = None) -> int:
    return execute(build_parser().parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """:func:`run` through :func:`guarded`."""
    return guarded(lambda: run(args))


def guarded(fn) -> int:
    """Call ``fn()``; bad input (``ValueError``, ``OSError``) becomes ``error: ...`` on
    stderr and exit status 2; the process group, if any, is shut down either way."""
    import torch.distributed as dist

    try:
        fn()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while another still talks
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def run(args: argparse.Namespace):
    """Build model(s), data and trainer from parsed arguments, train, save; returns the trainer."""
    from rlhf_kernels.trainers import toy
    from rlhf_kernels.trainers.base import TrainerConfig

    stage = args.stage
    model_name = args.model or args.init_from
    if args.model and args.init_from:
        raise ValueError("--model and --init-from are the same option; give one")
    device = _device(args.device)
    toy_task = args.dataset is None

    if model_name is None:
        tokenizer = toy.build_tokenizer()
        kind = {"reward": "reward"}.get(stage, "causal")
        model = toy.build_model(tokenizer, kind=kind, seed=args.seed)
    else:
        tokenizer = load_tokenizer(model_name)
        model = load_model(model_name, "reward" if stage == "reward" else "causal")
    model.to(device)

    dataset = toy_dataset(stage, args.rows, args.seed) if toy_task else load_data(args.dataset, args.split, stage)
    defaults = {"sft": 3e-3, "reward": 2e-3, "dpo": 5e-5, "ppo": 1e-4, "grpo": 1e-4}
    if model_name is not None:
        defaults = {"sft": 2e-5, "reward": 1e-5, "dpo": 5e-7, "ppo": 1e-6, "grpo": 1e-6}  # pretrained models
    common = dict(
        output_dir=str(args.out or Path("runs") / stage), learning_rate=args.lr or defaults[stage],
        batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum, max_steps=args.steps,
        warmup_steps=args.warmup_steps, max_length=args.max_length, seed=args.seed,
        logging_steps=args.logging_steps, save_steps=args.save_steps, progress=not args.quiet, backend=args.backend,
        fused_lm_head=args.fused_lm_head,
    )  # fmt: skip

    if stage == "sft":
        from rlhf_kernels.trainers.sft import SFTTrainer

        trainer = SFTTrainer(model, tokenizer, dataset, TrainerConfig(**common))
    elif stage == "reward":
        from rlhf_kernels.trainers.reward import RewardTrainer

        trainer = RewardTrainer(model, tokenizer, dataset, TrainerConfig(**common))
    elif stage == "dpo":
        from rlhf_kernels.trainers.dpo import DPOTrainer

        trainer = DPOTrainer(model, copy.deepcopy(model), tokenizer, dataset, TrainerConfig(**common),
                             beta=args.beta, loss_type=args.loss_type, rpo_alpha=args.rpo_alpha)  # fmt: skip
    else:
        if args.reward_model:
            reward = {"reward_model": load_model(args.reward_model, "reward").to(device)}
        elif toy_task:
            reward = {"reward_fn": toy.reward_fn}
        else:
            raise ValueError(
                f"{stage}: --reward-model is needed with --dataset (the built-in scorer knows the toy task)"
            )
        common.pop("batch_size")
        rollout = dict(rollout_batch_size=args.batch_size, grad_in_forward=args.grad_in_forward,
                       missing_eos_penalty=args.missing_eos_penalty,
                       importance_sampling_level=args.importance_sampling_level)  # fmt: skip
        if args.kl_coef is not None:
            rollout["kl_coef"] = args.kl_coef
        # two mini-batches per rollout when its responses split evenly, else one
        rows = args.batch_size * (args.num_generations if stage == "grpo" else 1)
        rollout["mini_batch_size"] = rows // 2 if rows % 2 == 0 else rows
        if stage == "ppo":
            from rlhf_kernels.trainers.ppo import PPOConfig, PPOTrainer

            if model_name is None:
                value_model = toy.build_model(tokenizer, kind="value", seed=args.seed + 2)
            else:
                value_model = load_model(model_name, "value")
            trainer = PPOTrainer(model, copy.deepcopy(model), value_model.to(device), tokenizer, dataset,
                                 PPOConfig(**common, **rollout), **reward)  # fmt: skip
        else:
            from rlhf_kernels.trainers.grpo import GRPOConfig, GRPOTrainer

            config = GRPOConfig(**common, **rollout, num_generations=args.num_generations)
            ref_model = copy.deepcopy(model) if config.kl_coef != 0 else None
            trainer = GRPOTrainer(model, ref_model, tokenizer, dataset, config, **reward)
    trainer.train(resume_from=args.resume_from)
    if args.save_model and trainer.is_main_process:
        trainer.unwrapped_model.save_pretrained(trainer.output_dir / "model")
        tokenizer.save_pretrained(trainer.output_dir / "model")
    trainer.barrier()
    return trainer


def pipeline(model: str, dataset: str, out: str | Path, *, steps: int = 100, batch_size: int = 16,
             split: str = "train", seed: int = 0, quiet: bool = False, log=print) -> dict:  # fmt: skip
    """SFT on the chosen responses, a reward model, PPO from the SFT model against that
    reward model, and DPO from the SFT model, for a model and a
    ``prompt``/``chosen``/``rejected`` data set given by path or hub id (the
    ``rlhf-kernels pipeline --model ... --dataset ...`` path). Writes ``OUT/<stage>/``
    and ``OUT/report.json`` with each stage's last logged metrics."""
    import json

    out = Path(out)
    common = ["--dataset", dataset, "--split", split, "--steps", str(steps), "--batch-size", str(batch_size),
              "--seed", str(seed), "--logging-steps", str(max(1, steps // 20))]  # fmt: skip
    common += ["--quiet"] if quiet else []
    sft_model = str(out / "sft" / "model")
    stages = [("sft", ["--model", model, "--save-model"]), ("reward", ["--model", model, "--save-model"]),
              ("ppo", ["--init-from", sft_model, "--reward-model", str(out / "reward" / "model"), "--save-model"]),
              ("dpo", ["--init-from", sft_model, "--save-model"])]  # fmt: skip
    results = {}
    for stage, extra in stages:
        log(f"[pipeline] {stage}")
        trainer = run(build_parser().parse_args([stage, *common, *extra, "--out", str(out / stage)]))
        results[stage] = trainer.history[-1]
    report = {"model": model, "dataset": dataset, "split": split, "steps": steps, "batch_size": batch_size,
              "results": results}  # fmt: skip
    if trainer.is_main_process:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"[pipeline] report: {out / 'report.json'}")
    return report


# --- loading ---------------------------------------------------------------------------------
def _offline_hint(name: str, what: str, exc: Exception) -> OSError:
    local = Path(name).expanduser()
    if local.exists():
        return OSError(f"{what}: cannot load {name!r} from the local path: {exc}")
    return OSError(
        f"{what}: {name!r} is not a local path and could not be loaded from the Hugging Face Hub "
        f"(offline, or no such repository?). Pass a local directory written with save_pretrained / "
        f"save_to_disk or a data file, or download it first (with HF_HUB_OFFLINE=1, a cached copy is used). "
        f"Cause: {type(exc).__name__}: {exc}"
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens (``HF_ENDPOINT`` respected):
    checked once before hub downloads, so that an offline machine gets an error at once
    instead of after the hub clients' retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _from_local_or_hub(load, name: str, what: str):
    """``load(**kw)`` from a local directory, else from the local hub cache, else from the
    hub when it is reachable; one clear error otherwise."""
    if Path(name).expanduser().exists():
        try:
            return load()
        except (OSError, ValueError) as exc:
            raise OSError(f"{what}: cannot load {name!r} from the local path: {exc}") from exc
    try:
        return load(local_files_only=True)
    except (OSError, ValueError):
        pass
    if _offline_mode() or not hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline_mode() else "the Hub is unreachable (offline?)"
        raise OSError(
            f"{what}: {name!r} is not a local path, not in the Hugging Face cache, and {why}. "
            f"Pass a directory written with save_pretrained, or download it first."
        )
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise _offline_hint(name, what, exc) from exc


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = _from_local_or_hub(functools.partial(AutoTokenizer.from_pretrained, name), name, "--model (tokenizer)")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual choice; padding is masked everywhere
    return tokenizer


def load_model(name: str, kind: str):
    """``kind``: ``causal`` (policy), ``reward`` (one scalar per sequence), ``value`` (one per token)."""
    import transformers

    cls = {"causal": transformers.AutoModelForCausalLM, "reward": transformers.AutoModelForSequenceClassification,
           "value": transformers.AutoModelForTokenClassification}[kind]  # fmt: skip
    kw = {} if kind == "causal" else {"num_labels": 1}
    return _from_local_or_hub(functools.partial(cls.from_pretrained, name, **kw), name, "--model")


def load_data(spec: str, split: str, stage: str):
    """A ``datasets.Dataset`` with the stage's columns. For SFT, preference data
    (``prompt``/``chosen``/``rejected``) trains on the chosen responses."""
    import datasets

    path = Path(spec).expanduser()
    formats = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        elif path.suffix in formats and path.is_file():
            data = datasets.load_dataset(formats[path.suffix], data_files=str(path), split="train")
        elif path.suffix in formats:
            raise FileNotFoundError(f"--dataset: no such file {spec!r}")
        elif not _offline_mode() and not hub_reachable():  # offline mode: the datasets cache
            raise FileNotFoundError(
                f"--dataset: {spec!r} is not a local path and the Hugging Face Hub is unreachable (offline?). Pass a "
                f"directory written with save_to_disk or a .jsonl/.json/.csv/.parquet file (for a copy in the "
                f"datasets cache, set HF_HUB_OFFLINE=1)."
            )
        else:
            data = datasets.load_dataset(spec, split=split)
    except FileNotFoundError:
        raise
    except Exception as exc:  # the hub client raises many types when offline
        raise _offline_hint(spec, "--dataset", exc) from exc
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"--dataset: {spec!r} has splits {list(data)}, not {split!r} (use --split)")
        data = data[split]
    if stage == "sft" and "completion" not in data.column_names and "chosen" in data.column_names:
        data = data.rename_column("chosen", "completion")
    missing = [c for c in _COLUMNS[stage] if c not in data.column_names]
    if missing:
        raise ValueError(f"--dataset: {stage} needs column(s) {list(_COLUMNS[stage])}; {spec!r} lacks {missing} "
                         f"(it has {data.column_names})")  # fmt: skip
    return data


def toy_dataset(stage: str, rows: int, seed: int):
    from rlhf_kernels.trainers import toy

    make = {"sft": toy.sft_dataset, "reward": toy.preference_dataset, "dpo": toy.preference_dataset,
            "ppo": toy.prompt_dataset, "grpo": toy.prompt_dataset}[stage]  # fmt: skip
    return make(rows, seed=seed + STAGES.index(stage))


if __name__ == "__main__":
    sys.exit(main())
