"""``rlhf-kernels info | bench | pipeline | train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _shape(text: str):
    import torch

    try:
        n, v, dtype = text.split("x") if text.count("x") == 2 else (*text.split("x"), "bf16")
        return int(n), int(v), getattr(torch, _DTYPES[dtype])
    except (ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f"expected NxV or NxVxDTYPE (dtype bf16|fp16|fp32), got {text!r}") from exc


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    from rlhf_kernels.bench import OPS

    parser = argparse.ArgumentParser(prog="rlhf-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="available backends, build configuration and versions (JSON)")
    bench = sub.add_parser("bench", help="microbenchmarks of every backend against the baselines")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for JSON, table and PNG")
    bench.add_argument("--quick", action="store_true",
                       help="one shape per op: a small one on CPU, the issue's target shape on CUDA")
    bench.add_argument("--shape", type=_shape, action="append", help="NxV[xDTYPE], repeatable")
    bench.add_argument("--only", action="append", help="only providers whose name contains this, repeatable")
    bench.add_argument("--repeat", type=_positive_int, default=10, help="timed runs per case (default: 10)")
    bench.add_argument(
        "--op",
        action="append",
        choices=OPS,
        help="ops to benchmark, repeatable (default: all)",
    )
    pipe = sub.add_parser("pipeline", help="SFT, reward model, PPO, GRPO and DPO on the built-in sorting task "
                                           "(with --model and --dataset: SFT, reward model, PPO and DPO)")  # fmt: skip
    pipe.add_argument("--out", type=Path, default=Path("pipeline-out"))
    pipe.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    pipe.add_argument("--seed", type=int, default=0)
    pipe.add_argument("--model", help="save_pretrained directory or hub id of a causal LM (with --dataset)")
    pipe.add_argument("--dataset", help="prompt/chosen/rejected data: save_to_disk directory, .jsonl/.json/.csv/"
                                        ".parquet file or hub id (with --model)")  # fmt: skip
    pipe.add_argument("--split", default="train")
    pipe.add_argument("--steps", type=int, default=100, help="steps per stage with --model (default: 100)")
    pipe.add_argument("--batch-size", type=int, default=16, help="with --model (default: 16)")
    from rlhf_kernels.trainers import run as train_run

    train = sub.add_parser("train", help="one trainer (sft, reward, dpo, ppo); also under torchrun",
                           description=train_run.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train_run.build_parser(train)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_run.execute(args)

    import torch

    import rlhf_kernels

    if args.command == "pipeline" and (args.model or args.dataset):
        if not (args.model and args.dataset):
            parser.error("pipeline: --model and --dataset go together (neither: the built-in sorting task)")
        return train_run.guarded(lambda: train_run.pipeline(
            args.model, args.dataset, args.out, steps=2 if args.quick else args.steps, batch_size=args.batch_size,
            split=args.split, seed=args.seed, quiet=args.quick,
        ))  # fmt: skip
    if args.command == "pipeline":
        from rlhf_kernels.trainers import pipeline

        make = pipeline.PipelineConfig.quick if args.quick else pipeline.PipelineConfig
        pipeline.run(make(out=str(args.out), seed=args.seed))
        return 0
    if args.command == "info":
        print(json.dumps(rlhf_kernels.build_info(), indent=2, default=str))
        return 0
    from rlhf_kernels import bench as bench_mod

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = tuple(args.op) if args.op else bench_mod.OPS
    if args.shape and "token_logprobs" not in ops:
        parser.error("bench: --shape sets token_logprobs shapes; add --op token_logprobs")
    bench_mod.run(device, args.out, quick=args.quick, include=args.only, repeat=args.repeat, ops=ops, shapes=args.shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
