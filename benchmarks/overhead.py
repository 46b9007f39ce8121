"""Per-call host overhead of each backend on tiny inputs, and where it goes.

    PYTHONPATH=. python benchmarks/overhead.py [--device cuda] [--profile]

Small problems (a DPO batch of 64 pairs, a PPO batch of 8 x 64 tokens) are bound by
what the host does per call, not by the kernels: this times calls back to back
(forward, and forward + backward) with one synchronisation at the end, so the
figure is host microseconds per call, and with --profile prints cProfile's top
entries for the kernel backends.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import rlhf_kernels
from rlhf_kernels import _dispatch


def problems(device):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = [(torch.randn(64, generator=g) - 50).to(device) for _ in range(4)]
    logp = (-torch.rand(8, 64, generator=g) * 3).to(device)
    old = logp + 0.1 * torch.randn(8, 64, generator=g).to(device)
    adv = torch.randn(8, 64, generator=g).to(device)
    mask = torch.ones(8, 64, dtype=torch.bool, device=device)
    rewards, values = torch.randn(8, 64, generator=g).to(device), torch.randn(8, 64, generator=g).to(device)

    def dpo(backend, grad):
        x = pc.detach().requires_grad_(grad)
        out = rlhf_kernels.dpo_loss(x, pr, rc, rr, backend=backend).losses.mean()
        if grad:
            out.backward()

    def ppo(backend, grad):
        x = logp.detach().requires_grad_(grad)
        out = rlhf_kernels.ppo_policy_loss(x, old, adv, mask, backend=backend).loss
        if grad:
            out.backward()

    def gae(backend, grad):
        rlhf_kernels.gae(rewards, values, mask, backend=backend)

    # the fused policy step from logits (grad_in_forward): on a GPU, the host time before its sweep's
    # launch is time the device idles even for large logits (the wall time minus the device time of
    # bench's ppo_step rows)
    logits = torch.randn(8, 64, 512, generator=g).to(device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, 512, (8, 64), generator=g).to(device)
    ref = old + 0.05

    def ppo_step(backend, grad):
        x = logits.detach().requires_grad_(grad)
        loss, _ = rlhf_kernels.ppo_loss_from_logits(x, labels, old, adv, mask, ref_logprobs=ref, kl_coef=0.05,
                                                    entropy_coef=0.01, check_labels=False, grad_in_forward=True,
                                                    backend=backend)  # fmt: skip
        if grad:
            loss.backward()

    return {"dpo_loss[64]": (dpo, "preference_fwd_native"), "ppo_policy_loss[8x64]": (ppo, "ppo_loss_fwd_native"),
            "gae[8x64]": (gae, "gae_native"),
            "ppo_step fused[8x64x512]": (ppo_step, "ppo_logits_fused_native")}  # fmt: skip


def per_call_us(fn, device, n=200):
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"per-call host time in us on {device} (torch {torch.__version__})")
    for name, (fn, native_op) in problems(device).items():
        for backend in _dispatch.BACKENDS:
            if _dispatch.unavailable_reason(backend, device, native_op) is not None:
                continue
            fwd = per_call_us(lambda fn=fn, backend=backend: fn(backend, False), device)
            both = per_call_us(lambda fn=fn, backend=backend: fn(backend, True), device)
            print(f"  {name:24s} {backend:7s} fwd {fwd:8.1f}   fwd+bwd {both:8.1f}")
            if args.profile and backend != "torch":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(100):
                    fn(backend, True)
                prof.disable()
                stats = pstats.Stats(prof).sort_stats("tottime")
                stats.print_stats(12)


if __name__ == "__main__":
    main()
