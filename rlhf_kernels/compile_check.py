"""Ahead-of-time compile checks of the GPU code, runnable without a GPU.

* Every Triton kernel configuration the launchers can pick is compiled with
  ``triton.compile`` for an explicit target (sm_80, sm_90), and the PTX is
  assembled with ``ptxas -v`` to read registers and spills.
* ``csrc/*.cu`` is compiled with nvcc for the same architectures with
  ``-Xptxas -v``.

A kernel that spills registers fails the check. ``rlhf-kernels check-compile``
runs both and prints a report; the test suite runs it in a subprocess (the
Triton interpreter, used for the CPU tests, replaces the kernels' JIT objects).

:func:`check_writes` runs torch.compile's own analysis of which arguments a
``wrap_triton`` kernel writes on every configuration: a read-only input that it
takes for written makes AOT autograd copy results back into that input (a failed
compile when the input is a leaf that requires grad).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ARCHS = (80, 90)
_PTXAS_FUNC = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
_PTXAS_SPILL = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (?P<regs>\d+) registers")


@dataclass
class KernelReport:
    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(text: str) -> list[KernelReport]:
    """Per-kernel registers and spills from ``ptxas -v`` output."""
    reports, current, spill = [], None, None
    for line in text.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current, spill = (m["name"], m["arch"]), None
        elif (m := _PTXAS_SPILL.search(line)) and current:
            spill = (int(m["stores"]), int(m["loads"]))
        elif (m := _PTXAS_REGS.search(line)) and current and spill is not None:
            reports.append(KernelReport(current[0], current[1], int(m["regs"]), *spill))
            current = None
    return reports


def _triton_ptxas() -> str:
    from triton.backends.nvidia import compiler

    path = Path(compiler.__file__).parent / "bin" / "ptxas"
    return str(path) if path.exists() else (shutil.which("ptxas") or "ptxas")


def _triton_configs() -> list:
    """Every (kernel, signature, constexprs, num_warps) the Triton launchers can pick."""
    from rlhf_kernels.triton import logprobs, ppo, preference

    return logprobs.kernel_configs() + preference.kernel_configs() + ppo.kernel_configs()


def check_triton(archs=ARCHS) -> list[KernelReport]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = _triton_ptxas()
    reports = []
    seen = set()
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, signature, constexprs, num_warps in _triton_configs():
            key = (
                kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                tuple(signature.values()),
                tuple(constexprs.items()),
                num_warps,
            )
            if key in seen:
                continue
            seen.add(key)
            for cc in archs:
                src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps})
                ptx = Path(tmp) / "k.ptx"
                ptx.write_text(compiled.asm["ptx"])
                arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
                out = subprocess.run(
                    [ptxas, "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                for r in parse_ptxas(out.stderr + out.stdout):
                    dtype = next(v for k, v in signature.items() if k.endswith("_ptr")).lstrip("*")
                    flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
                    r.name = f"{key[0]}[{dtype},{flags},warps={num_warps}]"
                    reports.append(r)
    return reports


_TENSOR_TYPES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "i64": "int64", "i32": "int32", "i8": "int8", "u8": "uint8", "i1": "bool"}  # fmt: skip


class _Target:
    """A stand-in for triton's active driver where there is no GPU: torch's analysis asks it
    only for the compile target."""

    def __init__(self, cc: int):
        self.cc = cc

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)


def check_writes(cc: int = 90) -> dict[str, list[str]]:
    """Kernel name -> the pointer arguments that torch.compile's analysis of a wrap_triton
    launch (torch._higher_order_ops.triton_kernel_wrap, on the kernel's TTIR) takes as
    written, over every configuration the launchers can pick. When the analysis fails,
    torch takes every tensor argument as written, and so does this report."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that are analysed here")
    import torch
    import triton
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    def written(kernel, kwargs) -> set[str]:
        if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
            return {d.name for d in tkw.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
        return set(tkw.identify_mutated_tensors(kernel, kwargs, {}))

    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_Target(cc))
    writes: dict[str, set[str]] = {}
    try:
        for kernel, signature, constexprs, _ in _triton_configs():
            kwargs = dict(constexprs)
            for name, ty in signature.items():
                if ty.startswith("*"):
                    kwargs[name] = torch.zeros(4, dtype=getattr(torch, _TENSOR_TYPES[ty[1:]]))
                elif ty != "constexpr":
                    kwargs[name] = 0.5 if ty.startswith("fp") else 3
            name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
            writes.setdefault(name, set()).update(written(kernel, kwargs))
    finally:
        driver._active = previous
    return {name: sorted(w) for name, w in writes.items()}


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def check_cuda(archs=ARCHS, csrc: Path | None = None) -> list[KernelReport]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    csrc = csrc or Path(__file__).resolve().parent.parent / "csrc"
    sources = sorted(csrc.glob("*.cu"))
    if not sources:
        raise FileNotFoundError(f"no .cu files under {csrc}")
    gencode = [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in archs]
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [
                nvcc,
                "-std=c++17",
                "-O3",
                "-DNDEBUG",
                "--expt-relaxed-constexpr",
                "-Xptxas",
                "-v",
                *gencode,
                "-I",
                str(csrc),
                "-c",
                str(src),
                "-o",
                str(Path(tmp) / "k.o"),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{out.stderr[-4000:]}")
            reports += parse_ptxas(out.stderr + out.stdout)
    return reports


def format_reports(title: str, reports: list[KernelReport]) -> str:
    lines = [f"{title}: {len(reports)} kernels"]
    for r in sorted(reports, key=lambda r: (r.name, r.arch)):
        flag = "  SPILLS" if r.spills else ""
        lines.append(
            f"  {r.arch:7s} regs {r.registers:3d} spill st/ld {r.spill_stores}/{r.spill_loads}  {r.name}{flag}"
        )
    return "\n".join(lines)


def main() -> int:
    failed = False
    for title, fn in (("triton", check_triton), ("cuda", check_cuda)):
        try:
            reports = fn()
        except FileNotFoundError as exc:
            print(f"{title}: skipped ({exc})")
            continue
        print(format_reports(title, reports))
        archs_seen = {r.arch.rstrip("a") for r in reports}
        if archs_seen != {f"sm_{cc}" for cc in ARCHS}:
            print(f"{title}: expected kernels for {ARCHS}, got {sorted(archs_seen)}")
            failed = True
        if any(r.spills for r in reports):
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
