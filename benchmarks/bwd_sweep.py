"""Time the token_logprobs backward with its rows cut into column parts, on a GPU.

    PYTHONPATH=. python benchmarks/bwd_sweep.py [--rows 16384] [--vocab 128256] [--budget 60]

The backward only streams: it reads each logit and writes its gradient. With a block (CUDA)
or program (Triton) per row, the ones in flight each stream their own row, about a thousand
sequential streams at once, where a copy kernel's blocks read and write one region of memory.
On the H100 the per-row backwards reached 2.63-2.71 (CUDA) and 2.50-2.60 TB/s (Triton)
against the device copy's 3.00, and the issue asks for 2.8. RLHF_KERNELS_BWD_PART_COLS
cuts each row into parts of that many columns, consecutive parts on consecutive blocks
(0: a block per row, the default). This times both backends at each setting, side by side
in one run, so that one GPU session can choose: one line per setting and backend, median
ms of 10 runs (L2 flushed before each) and TB/s (logits read + gradient written). Stops
starting new settings when ``--budget`` seconds have passed.
"""

from __future__ import annotations

import os
import time

import torch
from triton_sweep import sweep_inputs, sweep_parser

import rlhf_kernels
from rlhf_kernels import _dispatch
from rlhf_kernels.bench import _time

PART_COLS = (0, 4096, 8192, 16384, 32768, 65536)


def main() -> None:
    parser = sweep_parser(__doc__, 60.0)
    parser.add_argument("--backend", action="append", help="default: triton and native where available")
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
    before = os.environ.get("RLHF_KERNELS_BWD_PART_COLS")
    try:
        for n, cols in enumerate(PART_COLS):
            if n and time.time() - started > args.budget:  # the first one always runs
                print("(budget spent: later settings not run)")
                break
            os.environ["RLHF_KERNELS_BWD_PART_COLS"] = str(cols)
            for backend in backends:
                label = f"part cols {cols:6d} ({'a block per row' if cols == 0 else 'parts'}), {backend:6s}"
                try:
                    times = sorted(_time(backward, setup(backend), device, warmup=2, repeat=10, budget_s=20.0))
                    ms = times[len(times) // 2]
                    print(f"{label}: bwd {ms:.3f} ms (min {times[0]:.3f}, max {times[-1]:.3f}) "
                          f"{nbytes / ms / 1e9:.2f} TB/s", flush=True)  # fmt: skip
                except Exception as exc:  # a setting that fails: report, go on
                    print(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
    finally:
        if before is None:
            os.environ.pop("RLHF_KERNELS_BWD_PART_COLS", None)
        else:
            os.environ["RLHF_KERNELS_BWD_PART_COLS"] = before


if __name__ == "__main__":
    main()
