"""Microbenchmarks: every backend of every op next to the baselines people use today.

``rlhf-kernels bench`` runs them and writes a table, JSON and a PNG plot.
Times are medians over repeated runs with the 25th-75th percentile spread;
memory is the peak extra memory of the measured step (CUDA: the rise of
``max_memory_allocated``; CPU: the peak of the allocations the profiler sees)
and the bytes autograd saves for backward besides the logits; on CUDA the
achieved bandwidth is reported against the card's peak.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import rlhf_kernels
from rlhf_kernels import _dispatch

# Peak HBM bandwidth by device name fragment, in TB/s (vendor data sheets).
PEAK_TBPS = {
    "H200": 4.8,
    "H100 SXM": 3.35,
    "H100 80GB HBM3": 3.35,
    "H100 PCIe": 2.0,
    "H100 NVL": 3.9,
    "H100": 3.35,
    "A100-SXM4-80GB": 2.039,
    "A100 80GB PCIe": 1.935,
    "A100": 1.555,
    "L40S": 0.864,
    "L4": 0.3,
    "RTX 4090": 1.008,
}


def peak_tbps(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TBPS.items():
        if key in device_name:
            return value
    return None


@dataclasses.dataclass
class Result:
    op: str
    provider: str
    mode: str  # fwd | bwd | fwd+bwd
    shape: str
    dtype: str
    device: str
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    runs: int
    peak_mem_mb: float | None
    saved_mb: float | None
    bytes_moved: int
    tbps: float | None = None
    frac_peak: float | None = None
    error: str | None = None


# --- the providers: how people compute per-token log-probs today, and ours ---------


def eager_logprobs(logits, labels, temperature=1.0):
    """What most RLHF code writes: a float32 log_softmax of the whole [N, V], then gather."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def rowloop_logprobs(logits, labels, temperature=1.0):
    """A row-by-row loop in the style of TRL's selective_log_softmax (bounds the
    float32 temporary to one row at a time, at the price of a Python loop)."""
    out = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logp = torch.log_softmax(row_logits.float() / temperature, dim=-1)
        out.append(row_logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


_compiled_eager = None


def compiled_logprobs(logits, labels, temperature=1.0):
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(eager_logprobs, dynamic=False)
    return _compiled_eager(logits, labels, temperature)


def providers(device: torch.device, include_compile: bool = True) -> dict[str, Callable]:
    table: dict[str, Callable] = {}
    for backend in _dispatch.available_backends(device):
        if backend == "triton" and device.type != "cuda":
            continue  # the interpreter is a test vehicle, not something to time
        table[f"rlhf_kernels[{backend}]"] = lambda x, y, t=1.0, b=backend: rlhf_kernels.token_logprobs(
            x, y, temperature=t, backend=b
        )
    table["eager"] = eager_logprobs
    if include_compile:
        table["torch.compile"] = compiled_logprobs
    table["row_loop"] = rowloop_logprobs
    return table


# --- measurement ------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], setup: Callable[[], object], device, *, warmup: int, repeat: int, budget_s: float):
    """Per-run wall times in ms of fn(setup()); setup is excluded."""
    for _ in range(warmup):
        fn(setup())
    _sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(repeat):
        state = setup()
        _sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > budget_s and len(times) >= 3:
            break
    return times


def _peak_bytes(fn: Callable[[], object], setup: Callable[[], object], device) -> int:
    """Peak bytes allocated by fn(setup()) beyond what existed before it ran.

    CUDA: the caching allocator's peak. CPU: the running sum of the
    profiler's allocation and free events (every allocation through torch's
    CPU allocator, the native ops' included), at its highest.
    """
    state = setup()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(state)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(state)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _saved_bytes(fn: Callable, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> int:
    """Bytes autograd keeps for backward, not counting the logits themselves."""
    x = logits.detach().requires_grad_(True)
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, labels, temperature)
    return total


@dataclasses.dataclass
class Case:
    """One measured step: a provider in one mode on one input."""

    provider: str
    mode: str
    fn: Callable
    setup: Callable[[], object]
    step: Callable[[object], object]


def token_logprobs_cases(logits, labels, temperature, include=None, log=print) -> list[Case]:
    cases = []
    n_tokens = logits.shape[0]
    for name, fn in providers(logits.device).items():
        if include and not any(key in name for key in include):
            continue
        if name == "row_loop" and n_tokens > 4096:
            log(f"  skip {name}: a Python loop over {n_tokens} rows")
            continue

        def fwd(x, fn=fn):
            with torch.no_grad():
                return fn(x, labels, temperature)

        def bwd_setup(fn=fn):
            x = logits.detach().requires_grad_(True)
            return x, fn(x, labels, temperature)

        def bwd(state):
            x, out = state
            out.backward(torch.ones_like(out))
            return x.grad

        def fwd_bwd(x, fn=fn):
            out = fn(x, labels, temperature)
            out.backward(torch.ones_like(out))
            return x.grad

        cases += [
            Case(name, "fwd", fn, lambda: logits, fwd),
            Case(name, "bwd", fn, bwd_setup, bwd),
            Case(name, "fwd+bwd", fn, lambda: logits.detach().requires_grad_(True), fwd_bwd),
        ]
    return cases


def _inputs(n_tokens, vocab, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n_tokens, vocab, generator=g) * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (n_tokens,), generator=g).to(device)
    return logits, labels


def bench_token_logprobs(
    n_tokens: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    include: list[str] | None = None,
    warmup: int = 2,
    repeat: int = 10,
    budget_s: float = 20.0,
    temperature: float = 1.0,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Time every provider and mode on one shape (memory is measured separately,
    see measure_memory, because measuring it on CPU changes the allocator)."""
    logits, labels = _inputs(n_tokens, vocab, dtype, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tbps(device_name) if device.type == "cuda" else None
    itemsize = logits.element_size()
    bytes_moved = {"fwd": n_tokens * vocab * itemsize, "bwd": 2 * n_tokens * vocab * itemsize}
    bytes_moved["fwd+bwd"] = bytes_moved["fwd"] + bytes_moved["bwd"]
    common = dict(
        op="token_logprobs", shape=f"{n_tokens}x{vocab}", dtype=str(dtype).replace("torch.", ""), device=device_name
    )
    results = []
    for case in token_logprobs_cases(logits, labels, temperature, include, log):
        label = f"{case.provider:24s} {case.mode:8s}"
        try:
            times = _time(case.step, case.setup, device, warmup=warmup, repeat=repeat, budget_s=budget_s)
            saved = _saved_bytes(case.fn, logits, labels, temperature) if case.mode != "bwd" else None
        except Exception as exc:  # report, keep benchmarking the others
            log(f"  {label} failed: {type(exc).__name__}: {exc}")
            results.append(
                Result(
                    provider=case.provider,
                    mode=case.mode,
                    median_ms=math.nan,
                    p25_ms=math.nan,
                    p75_ms=math.nan,
                    min_ms=math.nan,
                    runs=0,
                    peak_mem_mb=None,
                    saved_mb=None,
                    bytes_moved=bytes_moved[case.mode],
                    error=f"{type(exc).__name__}: {exc}",
                    **common,
                )
            )
            continue
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        med = statistics.median(times)
        tbps = bytes_moved[case.mode] / (med * 1e-3) / 1e12 if device.type == "cuda" else None
        r = Result(
            provider=case.provider,
            mode=case.mode,
            median_ms=med,
            p25_ms=q[0],
            p75_ms=q[2],
            min_ms=min(times),
            runs=len(times),
            peak_mem_mb=None,
            saved_mb=None if saved is None else saved / 2**20,
            bytes_moved=bytes_moved[case.mode],
            tbps=tbps,
            frac_peak=(tbps / peak) if (tbps and peak) else None,
            **common,
        )
        log(f"  {label} {med:9.3f} ms  [{q[0]:.3f}, {q[2]:.3f}]" + (f"  {tbps:5.2f} TB/s" if tbps else ""))
        results.append(r)
    return results


def measure_memory(
    results: list[Result], n_tokens, vocab, dtype, device, *, include=None, temperature=1.0, log=print
) -> None:
    """Fill in peak_mem_mb of the results for one shape."""
    logits, labels = _inputs(n_tokens, vocab, dtype, device)
    by_key = {
        (r.provider, r.mode): r
        for r in results
        if r.shape == f"{n_tokens}x{vocab}" and r.dtype == str(dtype).replace("torch.", "") and not r.error
    }
    for case in token_logprobs_cases(logits, labels, temperature, include, log=lambda _: None):
        r = by_key.get((case.provider, case.mode))
        if r is None:
            continue
        case.step(case.setup())  # warm: compiled graphs, allocator pools
        mem = _peak_bytes(case.step, case.setup, device)
        r.peak_mem_mb = None if mem is None else mem / 2**20
        log(f"  {case.provider:24s} {case.mode:8s} peak +{_mib(r.peak_mem_mb)} MiB")


def default_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, torch.dtype]]:
    if device.type == "cuda":
        shapes = [
            (16384, 128256, torch.bfloat16),
            (8192, 151936, torch.bfloat16),
            (16384, 32000, torch.bfloat16),
            (4096, 128256, torch.float32),
        ]
        return shapes[:1] if quick else shapes
    shapes = [(1024, 32000, torch.bfloat16), (256, 128256, torch.bfloat16), (1024, 32000, torch.float32)]
    return [(256, 32000, torch.bfloat16)] if quick else shapes


def _mib(v: float | None) -> str:
    return f"{v:9.1f}" if v is not None else f"{'-':>9}"


def format_table(results: list[Result]) -> str:
    head = (
        f"{'shape':>13} {'dtype':>8} {'mode':>7} {'provider':>24} {'median ms':>10} {'p25-p75 ms':>17} "
        f"{'peak MiB':>9} {'saved MiB':>9} {'TB/s':>6} {'%peak':>6} {'vs eager':>8}"
    )
    lines = [head, "-" * len(head)]
    eager = {(r.shape, r.dtype, r.mode): r.median_ms for r in results if r.provider == "eager"}
    for r in results:
        if r.error:
            lines.append(f"{r.shape:>13} {r.dtype:>8} {r.mode:>7} {r.provider:>24}  failed: {r.error[:60]}")
            continue
        base = eager.get((r.shape, r.dtype, r.mode))
        speedup = f"{base / r.median_ms:7.2f}x" if base else ""
        lines.append(
            f"{r.shape:>13} {r.dtype:>8} {r.mode:>7} {r.provider:>24} {r.median_ms:10.3f} "
            f"{r.p25_ms:8.3f}-{r.p75_ms:<8.3f} {_mib(r.peak_mem_mb)} {_mib(r.saved_mb)} "
            f"{(f'{r.tbps:6.2f}' if r.tbps else ''):>6} {(f'{100 * r.frac_peak:5.1f}%' if r.frac_peak else ''):>6} "
            f"{speedup:>8}"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = sorted({(r.shape, r.dtype) for r in results})
    modes = ["fwd", "bwd", "fwd+bwd"]
    provs = list(dict.fromkeys(r.provider for r in results))
    fig, axes = plt.subplots(len(cases), 2, figsize=(13, 3.6 * len(cases)), squeeze=False)
    for row, (shape, dtype) in enumerate(cases):
        for col, metric in enumerate(("median_ms", "peak_mem_mb")):
            ax = axes[row][col]
            width = 0.8 / max(1, len(provs))
            for i, prov in enumerate(provs):
                vals, errs = [], []
                for mode in modes:
                    r = next(
                        (
                            r
                            for r in results
                            if (r.shape, r.dtype, r.provider, r.mode) == (shape, dtype, prov, mode) and not r.error
                        ),
                        None,
                    )
                    vals.append((getattr(r, metric) or 0.0) if r else 0.0)
                    errs.append(
                        (r.median_ms - r.p25_ms, r.p75_ms - r.median_ms) if (r and metric == "median_ms") else (0, 0)
                    )
                xs = [m + (i - (len(provs) - 1) / 2) * width for m in range(len(modes))]
                yerr = list(zip(*errs, strict=True)) if metric == "median_ms" else None
                ax.bar(xs, vals, width, label=prov, yerr=yerr, capsize=2)
            ax.set_xticks(range(len(modes)), modes)
            what = "time (ms, median, p25-p75)" if col == 0 else "peak extra memory (MiB)"
            ax.set_title(f"token_logprobs {shape} {dtype}: {what}")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def environment() -> dict:
    info = rlhf_kernels.build_info()
    info["platform"] = platform.platform()
    info["cpu"] = platform.processor()
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = props.total_memory / 2**30
        info["gpu_peak_tbps"] = peak_tbps(props.name)
    return info


def run(
    device: str,
    out_dir: Path,
    *,
    quick: bool = False,
    include=None,
    repeat: int = 10,
    shapes: list[tuple[int, int, torch.dtype]] | None = None,
    log=print,
) -> list[Result]:
    dev = torch.device(device)
    shapes = shapes or default_shapes(dev, quick)
    results: list[Result] = []
    for n, v, dtype in shapes:
        log(f"token_logprobs N={n} V={v} {str(dtype).replace('torch.', '')} on {device}: time")
        results += bench_token_logprobs(n, v, dtype, dev, include=include, repeat=repeat, log=log)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for n, v, dtype in shapes:
        log(f"token_logprobs N={n} V={v} {str(dtype).replace('torch.', '')} on {device}: peak memory")
        measure_memory(results, n, v, dtype, dev, include=include, log=log)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {"environment": environment(), "results": [dataclasses.asdict(r) for r in results]}
    json_path = out_dir / f"token_logprobs-{dev.type}-{stamp}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    table = format_table(results)
    (out_dir / f"token_logprobs-{dev.type}-{stamp}.txt").write_text(table + "\n")
    log("\n" + table)
    png = out_dir / f"token_logprobs-{dev.type}-{stamp}.png"
    log(f"\nwrote {json_path}" + (f" and {png}" if plot(results, png) else " (no matplotlib: no plot)"))
    return results
