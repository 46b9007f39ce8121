"""Run each kernel that is furthest from its target once, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight ... \\
        python benchmarks/profile_kernels.py

(``benchmarks/gpu_session.sh profile`` does this and writes ncu.log.) Each step is run
once before the profiled range (cudaProfilerStart .. Stop), so that the Triton kernels are
compiled and the allocator is warm; every kernel launched in the range is profiled, the
small ones around the big kernels included (a kernel-name filter on an earlier run caught
only the backward kernels). Steps: the log-prob forward and backward of both backends, the
fused PPO step's cluster kernel, and the DPO loss of a 64-pair batch (forward and backward,
both backends: latency-bound one-block kernels). Shapes of the log-prob steps are smaller
than the benchmark's (2048 rows of 128256 bf16 logits, 0.5 GB) because Nsight Compute
saves and restores the memory a kernel writes for each of its replays.
"""

from __future__ import annotations

import torch

import rlhf_kernels


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

    def sweep():
        x = logits.view(1, rows, vocab).detach().requires_grad_(True)
        loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels.view(1, rows), old, adv, mask, check_labels=False,
                                                    grad_in_forward=True, backend="native")  # fmt: skip
        loss.backward()

    pairs = [(torch.randn(64, generator=g) - 50).to(device) for _ in range(4)]

    def dpo(backend):
        pc, pr = (t.detach().requires_grad_(True) for t in pairs[:2])
        out = rlhf_kernels.dpo_loss(pc, pr, *pairs[2:], beta=0.1, return_metrics=True, backend=backend)
        out.losses.mean().backward()

    steps = [lambda: logprobs("native"), lambda: logprobs("triton"), sweep]
    steps += [lambda: dpo("native"), lambda: dpo("triton")]
    for step in steps:  # compile and warm up outside the profiled launches
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for step in steps:
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled: log-prob fwd+bwd (native, triton), fused PPO step (native), DPO loss fwd+bwd (native, triton)")


if __name__ == "__main__":
    main()
