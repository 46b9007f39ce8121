"""Where a large step's wall time goes: its kernels' own durations against the step's time.

    PYTHONPATH=. python benchmarks/timeline.py [--rows 16384] [--vocab 128256] [--runs 3]

The benchmark's wall time of a step (CUDA events around the call) includes the host's work
before the first launch (Python, checks, the autograd engine) and the device's idle gaps
between launches; Nsight Compute gives a kernel's own time, on a smaller shape. This records
the benchmark's own cases (``rlhf_kernels.bench``: token_logprobs forward and backward of each
kernel backend at the issue's shape, the fused PPO step, its two-pass form and the read + write
floor) with torch.profiler (CUPTI), set up and flushed as the benchmark times them, and prints
per step the median over runs of:

  * ``lead``: from the step's start on the host to its first kernel's start (host time that
    the events count while the device idles);
  * ``span``: from the first kernel's start to the last one's end;
  * ``busy``: the sum of the kernel durations (``span - busy``: idle gaps between kernels);
  * the largest kernel's duration, name and TB/s at the step's bytes (what the kernel alone
    reaches; the issue's targets are about this rate);
  * with ``--host`` (the default; ``--no-host`` leaves it out), for the last run, where the host
    time went: the step's top-level host ops on each thread (the autograd engine runs backward on
    a thread of its own) with their start after the step's, duration and kernels launched,
    and the CUDA runtime calls (launches, allocations, synchronisations, copies) counted and
    summed, so that a lead or a gap can be pinned on the calls that make it.

Without CUDA it runs the steps on CPU and reports that no kernels were recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from rlhf_kernels import bench

_MARK = "timeline.step"


def _kernels(events, start_us: float, end_us: float):
    """Device kernels of the profile whose start lies in [start_us, end_us]."""
    out = []
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if e.name == _MARK:  # the annotation's device-side copy
            continue
        if start_us <= e.time_range.start <= end_us:
            out.append(e)
    return out


def record(case: bench.Case, device, runs: int) -> list[dict]:
    """Per run: the step's host start and end and its kernels (name, start, end), in us."""
    case.step(case.setup())  # warm: compiled kernels, a cached allocator
    bench._sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            state = case.setup()
            if device.type == "cuda":
                bench._flush_l2(device)
            bench._sync(device)
            with record_function(_MARK):
                case.step(state)
            bench._sync(device)
    events = prof.events()
    marks = sorted((e for e in events if e.name == _MARK and e.device_type == torch.autograd.DeviceType.CPU),
                   key=lambda e: e.time_range.start)  # fmt: skip
    result = []
    for n, mark in enumerate(marks):
        # a step's kernels may end after its host range: up to the next step's start
        until = marks[n + 1].time_range.start if n + 1 < len(marks) else float("inf")
        kernels = _kernels(events, mark.time_range.start, until)
        result.append({"start": mark.time_range.start, "end": mark.time_range.end,
                       "kernels": [(k.name, k.time_range.start, k.time_range.end) for k in kernels],
                       "host": _host_ops(events, mark)})  # fmt: skip
    return result


# CUDA runtime / driver calls worth counting on the host (prefixes of the profiler's names)
_RUNTIME = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelEx", "cudaMalloc", "cudaFree", "cudaMemcpy",
            "cudaMemset", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
            "cudaEventQuery", "cudaStreamWaitEvent", "cudaFuncSetAttribute", "cudaOccupancy", "cudaGetDevice",
            "cudaDeviceGetAttribute", "cudaStreamIsCapturing", "cudaPeekAtLastError", "cudaGetLastError")


def _host_ops(events, mark) -> dict:
    """The step's host side: top-level ops per thread inside the step's host range (the mark's
    children on its thread; ops without a parent on the others: the autograd engine's device
    thread), as (offset from the step's start, duration, name, kernels launched), and the CUDA
    runtime calls in that range, {name: (count, total us)}."""
    start, end = mark.time_range.start, mark.time_range.end
    inside = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e is not mark
              and start <= e.time_range.start <= end]  # fmt: skip
    tops = []
    for e in inside:
        parent = e.cpu_parent
        if parent is mark or (parent is None and e.thread != mark.thread):
            tops.append((e.time_range.start - start, e.time_range.end - e.time_range.start, e.name,
                         _kernels_under(e)))  # fmt: skip
    runtime: dict[str, list[float]] = {}
    for e in inside:
        if e.name.startswith(_RUNTIME):
            c = runtime.setdefault(e.name, [0, 0.0])
            c[0] += 1
            c[1] += e.time_range.end - e.time_range.start
    return {"tops": sorted(tops), "runtime": runtime}


def _kernels_under(event) -> int:
    """Device kernels launched inside a host op (the profiler attaches each to the innermost op
    that launched it, so an op's own list misses its children's)."""
    return len(getattr(event, "kernels", ())) + sum(_kernels_under(c) for c in event.cpu_children)


def print_host(host: dict, limit: int = 24) -> None:
    """The host breakdown of one run (see _host_ops), longest top-level ops first past ``limit``."""
    tops = host["tops"]
    if len(tops) > limit:  # keep the longest, shown in start order
        keep = sorted(sorted(tops, key=lambda t: -t[1])[:limit])
        print(f"    host ops ({len(tops)} top-level, the {limit} longest):")
    else:
        keep = tops
        print(f"    host ops ({len(tops)} top-level):")
    for offset, dur, name, n_kernels in keep:
        launched = f"  [{n_kernels} kernel{'s' if n_kernels != 1 else ''}]" if n_kernels else ""
        print(f"      +{offset:8.1f} us {dur:8.1f} us  {name[:70]}{launched}")
    if host["runtime"]:
        calls = ", ".join(f"{name} x{n} {us:.0f} us"
                          for name, (n, us) in sorted(host["runtime"].items(), key=lambda kv: -kv[1][1]))  # fmt: skip
        print(f"    runtime calls: {calls}")


def summarize(runs: list[dict]) -> dict | None:
    """Medians over runs of lead, span, busy and the largest kernel's duration (us); None without kernels."""
    rows = []
    for r in runs:
        ks = r["kernels"]
        if not ks:
            continue
        first = min(k[1] for k in ks)
        last = max(k[2] for k in ks)
        big = max(ks, key=lambda k: k[2] - k[1])
        rows.append({"lead": first - r["start"], "span": last - first, "busy": sum(k[2] - k[1] for k in ks),
                     "big": big[2] - big[1], "name": big[0], "kernels": len(ks)})  # fmt: skip
    if not rows:
        return None
    out = {key: statistics.median(r[key] for r in rows) for key in ("lead", "span", "busy", "big", "kernels")}
    out["name"] = rows[0]["name"]
    return out


def _on_calling_thread(case: bench.Case) -> bench.Case:
    """``case`` with its step under ``torch.autograd.set_multithreading_enabled(False)``: the
    autograd engine runs a backward on the thread that calls it instead of handing it to its
    device thread (PyTorch's default for CUDA tensors; the handover's wake-ups are host time
    before the backward's first kernel)."""

    def step(state, inner=case.step):
        with torch.autograd.set_multithreading_enabled(False):
            return inner(state)

    return bench.Case(case.provider, f"{case.mode}, calling thread", case.setup, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds; later steps are skipped past it")
    parser.add_argument("--host", action=argparse.BooleanOptionalAction, default=True,
                        help="print where the host time of each step's last run went")  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    tok = bench.token_logprobs_problem(args.rows, args.vocab, torch.bfloat16, device)
    ppo = bench.ppo_step_problem(8, args.rows // 8, args.vocab, torch.bfloat16, device)
    # (problem, provider, mode) in the order they are recorded, the open targets' first: the
    # budget may stop the run before the end (a Triton kernel's first call compiles it)
    order = [(tok, "rlhf_kernels[native]", "bwd"), (tok, "rlhf_kernels[native]", "bwd, calling thread"),
             (ppo, "rlhf_kernels[native,fused]", "fwd+bwd"),
             (ppo, "floor: read+write", "fwd+bwd"), (tok, "rlhf_kernels[native]", "fwd"),
             (tok, "rlhf_kernels[triton]", "fwd"), (tok, "rlhf_kernels[triton]", "bwd"),
             (ppo, "rlhf_kernels[native,fused]", "fwd"), (ppo, "rlhf_kernels[native,fused]", "bwd"),
             (ppo, "rlhf_kernels[native,two-pass]", "fwd+bwd"), (ppo, "rlhf_kernels[triton,fused]", "fwd+bwd")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: kernel timeline of the benchmark's steps (torch {torch.__version__}), medians of {args.runs} runs")
    print(f"{'step':58s} {'lead us':>8s} {'span us':>9s} {'busy us':>9s} {'n':>3s} {'largest us':>10s} {'TB/s':>6s}")
    # the autograd engine's own lead, for reference: a backward through one PyTorch op on 1024
    # floats, as it is (the backward of CUDA tensors runs on the engine's device thread, handed
    # over from the calling one) and with torch.autograd.set_multithreading_enabled(False) (on the
    # calling thread)
    tiny = torch.randn(1024, device=device)
    engine = bench.Case("torch", "bwd", lambda: tiny.detach().requires_grad_(True).exp().sum(), bench._backward)
    for label, case in (("reference: x.exp().sum() backward, 1024 floats", engine),
                        ("  the same on the calling thread", _on_calling_thread(engine))):  # fmt: skip
        runs = record(case, device, args.runs)
        s = summarize(runs)
        lead = f"{s['lead']:8.1f} {s['span']:9.1f} {s['busy']:9.1f} {s['kernels']:3.0f}" if s else "(no kernels)"
        print(f"{label:58s} {lead}")
        if args.host and runs:
            print_host(runs[-1]["host"])
    all_cases = {id(p): {(c.provider, c.mode): c for c in bench.cases(p)} for p in (tok, ppo)}
    for cases in all_cases.values():  # each backward also with the engine on the calling thread
        for (provider, mode), c in list(cases.items()):
            if mode == "bwd":
                cases[(provider, "bwd, calling thread")] = _on_calling_thread(c)
    for problem, provider, mode in order:
        case = all_cases[id(problem)].get((provider, mode))
        if case is None:  # a provider this machine lacks
            continue
        if time.time() - started > args.budget:
            print("(budget spent: later steps not recorded)")
            return
        label = f"{problem.op} {problem.shape} {case.mode} {case.provider}"
        runs = record(case, device, args.runs)
        s = summarize(runs)
        if s is None:
            print(f"{label:58s} (no kernels recorded)")
        else:
            tbs = problem.bytes_moved[case.mode] / (s["big"] * 1e-6) / 1e12
            print(f"{label:58s} {s['lead']:8.1f} {s['span']:9.1f} {s['busy']:9.1f} {s['kernels']:3.0f} "
                  f"{s['big']:10.1f} {tbs:6.2f}  {s['name'][:60]}")  # fmt: skip
        if args.host and runs:
            print_host(runs[-1]["host"])
        sys.stdout.flush()


if __name__ == "__main__":
    main()
