"""Time the token_logprobs backward with its rows cut into column parts, on a GPU.

    PYTHONPATH=. python benchmarks/bwd_sweep.py [--rows 16384] [--vocab 128256] [--budget 60]

The backward only streams: it reads each logit and writes its gradient. With a block (CUDA)
or program (Triton) per row, the ones in flight each stream their own row, about a thousand
sequential streams at once, where a copy kernel's blocks read and write one region of memory.
On the H100 the per-row backwards reached 2.63-2.71 (CUDA) and 2.50-2.60 TB/s (Triton)
against the device copy's 3.00, and the issue asks for 2.8. RLHF_KERNELS_BWD_PART_COLS
cuts each row into parts of that many columns, consecutive parts on consecutive blocks
(0: a block per row; unset: 8192 for CUDA, 16384 for Triton, the best of the H100 run in
benchmarks/results/gpu-session-NVIDIA_H100-20261126-1402). This times both backends at
each setting, side by side in one run: one line per setting and backend, median ms of 10
runs (L2 flushed before each) and TB/s (logits read + gradient written). (The budget's
share left after the two sweeps below.)

Then (CUDA; 15% of the budget) the forward of both backends with its rows cut into column
parts likewise (RLHF_KERNELS_FWD_PART_COLS, 0 and 4K-32K columns; wall and device time).

Last (CUDA, with the native extension; half the budget) the fused PPO step from logits (the
bench's ppo_step problem, 8 x 2048 x V bf16, forward with the gradient written in it plus
backward, as the bench's fwd+bwd) over settings of the sm_90 cluster kernel, beside the read + write floor in
the same run (the issue's target: 1.2x that floor):
  * the slice budget (RLHF_KERNELS_CLUSTER_SLICE_BYTES): a row of V = 128256 bf16 is cut for
    C = ceil(2 V / budget) blocks of a cluster; 64 KiB: C = 4, three blocks an SM by shared
    memory; 52 KiB: C = 5, four (also the register limit, 64 a thread); 86 KiB: C = 3, two;
    44 and 32 KiB: C = 6 and 8, still four;
  * the mode (RLHF_KERNELS_CLUSTER_PIPELINE): plain, pipelined (the next row copied while this
    one's gradient is written), double buffered (two slices a block, the next row's copy
    issued when this one starts; the budget is per buffer: 32 KiB: C = 8 and 36 KiB: C = 7,
    three blocks an SM; 44 KiB: C = 6, two; 64 KiB: C = 4, one; on the H200 it lost to the
    pipelined default at 32-44 KiB, 3.70-3.94 ms against 3.00), staged (pipelined, with the
    log-sum-exp waiting for the copies in up to four groups as it reaches them, not for all
    of them first; 72 registers a thread for 16-bit rows, so at 52 KiB three blocks an SM,
    not four) or bulk double buffered (as double buffered, each slice one bulk (TMA) copy
    that one thread issues on an mbarrier instead of every thread's 16-byte copies).
Each fused line gives the median wall time (the table's figure, which the target judges) and
the median device time with the host's enqueueing hidden (bench's queued run), so that a
setting's kernel can be told from the host time before it.

Stops starting new settings when ``--budget`` seconds have passed.
"""

from __future__ import annotations

import os
import time

import torch
from triton_sweep import sweep_inputs, sweep_parser

import rlhf_kernels
from rlhf_kernels import _dispatch, bench
from rlhf_kernels.bench import _time

PART_COLS = (0, 8192, 16384, 32768)  # (4K and 64K lost on the H100 for both backends)
FWD_PART_COLS = (0, 4096, 8192, 16384, 32768)  # the CUDA forward's (RLHF_KERNELS_FWD_PART_COLS)
# (slice budget in bytes (per buffer), RLHF_KERNELS_CLUSTER_PIPELINE: 0 plain, 1 pipelined, 2 double
# buffered, 3 staged, 4 double buffered with bulk copies): the default first, the bulk copies (new,
# never run: a fault would leave the process's CUDA context unusable) last
CLUSTER_SETTINGS = ((65536, "1"), (65536, "3"), (53248, "3"), (88064, "3"), (65536, "2"), (32768, "2"),
                    (53248, "1"), (45056, "1"), (65536, "0"), (65536, "4"), (32768, "4"), (45056, "4"))

_MODES = {"0": "plain", "1": "pipelined", "2": "double buffered", "3": "staged", "4": "bulk double buffered"}


def _median_line(label: str, times: list[float], nbytes: int, floor_ms: float | None = None) -> str:
    times = sorted(times)
    ms = times[len(times) // 2]
    vs = f", {ms / floor_ms:.3f}x the floor" if floor_ms else ""
    return (f"{label}: {ms:.3f} ms (min {times[0]:.3f}, max {times[-1]:.3f}) "
            f"{nbytes / ms / 1e9:.2f} TB/s{vs}")  # fmt: skip


def fused_sweep(args, device, deadline: float) -> None:
    """The native fused PPO step (fwd+bwd) at each cluster setting, beside the floor."""
    problem = bench.ppo_step_problem(8, 2048, args.vocab, torch.bfloat16, device)
    nbytes = problem.bytes_moved["fwd+bwd"]
    case = {c.provider: c for c in bench.cases(problem) if c.mode == "fwd+bwd"}
    print(f"fused PPO step, {problem.shape} bf16, fwd+bwd (logits read once, gradient written once)")

    def run(provider, env=None):
        c = case[provider]
        return bench._with_env(env or {}, lambda: _time(c.step, c.setup, device, warmup=2, repeat=10, budget_s=20.0))

    def queued(provider, wall_ms, env=None):
        c = case[provider]
        return bench._with_env(env or {}, lambda: bench._queued_ms(c, device, wall_ms))

    floor = sorted(run("floor: read+write"))
    floor_ms = floor[len(floor) // 2]
    floor_queued = queued("floor: read+write", floor_ms)
    print(_median_line("floor: read+write", floor, nbytes) + f"; queued {floor_queued:.3f} ms", flush=True)
    for n, (budget, pipe) in enumerate(CLUSTER_SETTINGS):
        if n and time.time() > deadline:
            print("(budget spent: later settings not run)")
            break
        env = {"RLHF_KERNELS_CLUSTER_SLICE_BYTES": str(budget), "RLHF_KERNELS_CLUSTER_PIPELINE": pipe}
        label = f"native fused, slice budget {budget:6d}, {_MODES[pipe]}"
        try:
            times = sorted(run("rlhf_kernels[native,fused]", env))
            dev_ms = queued("rlhf_kernels[native,fused]", times[len(times) // 2], env)
            print(_median_line(label, times, nbytes, floor_ms)
                  + f"; queued {dev_ms:.3f} ms, {dev_ms / floor_queued:.3f}x the floor's", flush=True)  # fmt: skip
        except Exception as exc:  # a setting that fails: report, go on
            print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)


def forward_sweep(logits, labels, device, backends, deadline: float) -> None:
    """The forward with its rows cut into column parts (RLHF_KERNELS_FWD_PART_COLS), a few
    seconds: median wall and device (queued) time of each setting and backend, TB/s of the
    logits read. Starts no setting after ``deadline`` (but the first)."""
    nbytes = logits.numel() * logits.element_size()
    for n, cols in enumerate(FWD_PART_COLS):
        if n and time.time() > deadline:
            print("(budget spent: later forward settings not run)")
            break
        for backend in backends:

            def step(_, backend=backend):
                with torch.no_grad():
                    rlhf_kernels.token_logprobs(logits, labels, check_labels=False, backend=backend)

            def timed(step=step):
                times = sorted(_time(step, lambda: None, device, warmup=2, repeat=10, budget_s=10.0))
                case = bench.Case("fwd part sweep", "fwd", lambda: None, step)
                return times, bench._queued_ms(case, device, times[len(times) // 2])

            label = f"fwd part cols {cols:6d} ({'a program per row' if cols == 0 else 'parts'}), {backend:6s}"
            try:
                times, dev_ms = bench._with_env({"RLHF_KERNELS_FWD_PART_COLS": str(cols)}, timed)
                print(_median_line(f"{label}: fwd", times, nbytes) + f"; queued {dev_ms:.3f} ms, "
                      f"{nbytes / dev_ms / 1e9:.2f} TB/s", flush=True)  # fmt: skip
            except Exception as exc:  # a setting that fails: report, go on
                print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)


def main() -> None:
    parser = sweep_parser(__doc__, 60.0)
    parser.add_argument("--backend", action="append", help="default: triton and native where available")
    parser.add_argument("--fused-share", type=float, default=0.5,
                        help="of the budget, kept for the fused sweep where it runs")  # fmt: skip
    parser.add_argument("--forward-share", type=float, default=0.15,
                        help="of the budget, kept for the forward's part sweep")  # fmt: skip
    args = parser.parse_args()
    device, logits, labels = sweep_inputs(args)
    nbytes = 2 * logits.numel() * logits.element_size()
    backends = args.backend or [b for b in ("native", "triton") if b in _dispatch.available_backends(device)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}: token_logprobs backward, {args.rows} x {args.vocab} bf16, backends {', '.join(backends)}")

    def setup(backend):
        def make():
            x = logits.detach().requires_grad_(True)
            return rlhf_kernels.token_logprobs(x, labels, check_labels=False, backend=backend)

        return make

    def backward(lp):
        lp.backward(torch.ones_like(lp))

    started = time.time()
    fused = device.type == "cuda" and _dispatch.unavailable_reason("native", device, "ppo_logits_fused_native") is None
    forward_budget = args.budget * args.forward_share if device.type == "cuda" else 0.0
    part_budget = args.budget - forward_budget - (args.budget * args.fused_share if fused else 0.0)
    before = os.environ.get("RLHF_KERNELS_BWD_PART_COLS")
    try:
        for n, cols in enumerate(PART_COLS):
            if n and time.time() - started > part_budget:  # the first one always runs
                print("(budget spent: later settings not run)")
                break
            os.environ["RLHF_KERNELS_BWD_PART_COLS"] = str(cols)
            for backend in backends:
                label = f"part cols {cols:6d} ({'a block per row' if cols == 0 else 'parts'}), {backend:6s}"
                try:
                    times = _time(backward, setup(backend), device, warmup=2, repeat=10, budget_s=20.0)
                    print(_median_line(f"{label}: bwd", times, nbytes), flush=True)
                except Exception as exc:  # a setting that fails: report, go on
                    print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
    finally:
        if before is None:
            os.environ.pop("RLHF_KERNELS_BWD_PART_COLS", None)
        else:
            os.environ["RLHF_KERNELS_BWD_PART_COLS"] = before
    # The forward sweep before the fused one, whose bulk-copy settings (new, run last) could leave
    # the process's CUDA context unusable.
    if device.type == "cuda":
        forward_sweep(logits, labels, device, backends, started + part_budget + forward_budget)
    if fused:
        del logits
        torch.cuda.empty_cache()
        fused_sweep(args, device, started + args.budget)


if __name__ == "__main__":
    main()
