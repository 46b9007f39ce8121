"""Time the Triton log-prob kernels over vocab tile sizes, warp counts and prefetch, on a GPU.

    PYTHONPATH=. python benchmarks/triton_sweep.py [--rows 16384] [--vocab 128256] [--budget 90]

The launchers pick one configuration (``rlhf_kernels.triton.logprobs._block_v``: 8 KiB of
logits per loop step, 16 elements a thread; the forward's one-tile-ahead load off by
default). On the H200 they reached 59-69% of the data sheet's bandwidth against 89% for the
CUDA forward, and the bytes a program keeps in flight are the likely cause; this times
the alternatives side by side so that one GPU session can choose (``benchmarks/gpu_session.sh
sweep``). One line per configuration: median ms of 10 runs (L2 flushed before each) and
TB/s for the forward (logits read) and the backward (logits read, gradient written);
configurations that fail to compile or run say so. Stops starting new configurations when
``--budget`` seconds have passed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import triton

import rlhf_kernels
from rlhf_kernels.bench import _time
from rlhf_kernels.triton import logprobs as triton_logprobs


def median_ms(fn, setup, device) -> float:
    times = sorted(_time(fn, setup, device, warmup=2, repeat=10, budget_s=20.0))
    return times[len(times) // 2]


def sweep_parser(doc: str, budget: float) -> argparse.ArgumentParser:
    """The sweeps' common options (benchmarks/bwd_sweep.py shares them)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--budget", type=float, default=budget, help="seconds; no new configuration after it")
    parser.add_argument("--device", default="cuda", help="cpu only for a smoke run under TRITON_INTERPRET=1")
    return parser


def sweep_inputs(args) -> tuple[torch.device, torch.Tensor, torch.Tensor]:
    """(device, bf16 logits [rows, vocab], labels) for a sweep, the same bits every run."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(torch.bfloat16).to(device)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g).to(device)
    return device, logits, labels


def main() -> None:
    args = sweep_parser(__doc__, 90.0).parse_args()
    device, logits, labels = sweep_inputs(args)
    nbytes = logits.numel() * logits.element_size()
    chosen = triton_logprobs._block_v
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}: token_logprobs triton, {args.rows} x {args.vocab} bf16; "
          f"default tile {chosen(args.vocab, 2)}")  # fmt: skip

    def forward(_):
        with torch.no_grad():
            rlhf_kernels.token_logprobs(logits, labels, check_labels=False, backend="triton")

    def backward_setup():
        x = logits.detach().requires_grad_(True)
        lp = rlhf_kernels.token_logprobs(x, labels, check_labels=False, backend="triton")
        return lp

    def backward(lp):
        lp.backward(torch.ones_like(lp))

    started = time.time()
    try:
        configs = itertools.product((4096, 8192, 16384), (4, 8, 16), (False, True))
        for n, (tile_bytes, warps, prefetch) in enumerate(configs):
            if n and time.time() - started > args.budget:  # the first one always runs
                print("(budget spent: later configurations not run)")
                break
            block = min(triton.next_power_of_2(args.vocab), tile_bytes // 2)
            triton_logprobs._block_v = lambda vocab, itemsize, b=block, w=warps: (b, w)
            os.environ["RLHF_KERNELS_LOGPROBS_PREFETCH"] = "1" if prefetch else "0"
            label = f"tile {tile_bytes:5d} B ({block} bf16), {warps:2d} warps, prefetch {int(prefetch)}"
            try:
                fwd = median_ms(forward, lambda: None, device)
                line = f"{label}: fwd {fwd:.3f} ms {nbytes / fwd / 1e9:.2f} TB/s"
                if not prefetch:  # the backward has no prefetch switch
                    bwd = median_ms(backward, backward_setup, device)
                    line += f", bwd {bwd:.3f} ms {2 * nbytes / bwd / 1e9:.2f} TB/s"
                print(line, flush=True)
            except Exception as exc:  # a configuration that does not compile or run: report, go on
                print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
    finally:
        triton_logprobs._block_v = chosen
        os.environ.pop("RLHF_KERNELS_LOGPROBS_PREFETCH", None)


if __name__ == "__main__":
    main()
