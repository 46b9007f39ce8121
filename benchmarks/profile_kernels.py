"""Run each kernel that is furthest from its bandwidth target once, for Nsight Compute.

    ncu --clock-control none -k regex:'<KERNELS>' --section SpeedOfLight ... \\
        python benchmarks/profile_kernels.py

(``benchmarks/gpu_session.sh profile`` does this and writes ncu.log.) Each step is run
once before the profiled run, so that the Triton kernels are compiled and the allocator is
warm; the printed regex names the kernels of the profiled run. Shapes are smaller than the
benchmark's (2048 rows of 128256 bf16 logits, 0.5 GB) because Nsight Compute saves and
restores the memory a kernel writes for each of its replays.
"""

from __future__ import annotations

import os

import torch

import rlhf_kernels

# CUDA C++ cluster sweep (both variants), CUDA C++ and Triton log-prob kernels.
KERNELS = "ppo_logits_cluster_kernel|logprobs_bwd_kernel|logprobs_fwd_kernel"  # (Triton names add a leading _)


def main() -> None:
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, vocab = 2048, 128256
    logits = (torch.randn(rows, vocab, generator=g) * 2).to(torch.bfloat16).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    old = (-torch.rand(1, rows, generator=g) * 3 - 9).to(device)
    adv = torch.randn(1, rows, generator=g).to(device)
    mask = torch.ones(1, rows, dtype=torch.bool, device=device)

    def logprobs(backend):
        x = logits.detach().requires_grad_(True)
        rlhf_kernels.token_logprobs(x, labels, check_labels=False, backend=backend).sum().backward()

    def sweep(pipeline):
        os.environ["RLHF_KERNELS_CLUSTER_PIPELINE"] = pipeline
        x = logits.view(1, rows, vocab).detach().requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels.view(1, rows), old, adv, mask, check_labels=False,
                                                    grad_in_forward=True, backend="native")  # fmt: skip
        loss.backward()

    steps = [lambda: logprobs("native"), lambda: logprobs("triton"), lambda: sweep("0"), lambda: sweep("1")]
    for step in steps:  # compile and warm up outside the profiled launches
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled kernels matching: {KERNELS}")


if __name__ == "__main__":
    main()
