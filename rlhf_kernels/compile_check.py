"""Ahead-of-time compile checks of the GPU code, runnable without a GPU.

* Every Triton kernel configuration the launchers can pick is compiled with
  ``triton.compile`` for an explicit target (sm_80, sm_90), and the PTX is
  assembled with ``ptxas -v`` to read registers and spills.
* ``csrc/*.cu`` is compiled with nvcc for the same architectures with
  ``-Xptxas -v``.

* The streaming kernels (IN_FLIGHT_KERNELS) are also compiled for sm_100 (:func:`check_blackwell`).
* The streaming loops of the log-prob, fused PPO and GAE kernels (IN_FLIGHT_KERNELS) are disassembled
  (cuobjdump) and must issue two 16-byte loads per thread before using the data of
  either (:attr:`SassLoop.in_flight`). ptxas decides that order: the Triton forward
  had one in flight (2.49-2.88 TB/s on an H100 where the CUDA forward, with two,
  reached 2.97) until its whole tiles loaded without a mask.

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
import sys
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


def _triton_ptxas(cc: int = 90) -> str:
    """The ptxas Triton ships (for sm_100 and later its ptxas-blackwell, where there is one:
    the JIT's PTX for those targets is of a newer version than the other one reads)."""
    from triton.backends.nvidia import compiler

    bin_dir = Path(compiler.__file__).parent / "bin"
    for name in (("ptxas-blackwell", "ptxas") if cc >= 100 else ("ptxas",)):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return shutil.which("ptxas") or "ptxas"


def _triton_configs() -> list:
    """Every (kernel, signature, constexprs, num_warps) the Triton launchers can pick."""
    from rlhf_kernels.triton import logprobs, ppo, preference

    return logprobs.kernel_configs() + preference.kernel_configs() + ppo.kernel_configs()


# The integer arguments of a [16384, 128256] contiguous bf16 problem (the benchmarks' shape),
# as the launchers pass them: what the JIT specializes on (ints equal to 1 become constants,
# ints divisible by 16 carry tt.divisibility, as do the pointers of torch's allocations).
ALIGNED_PROBLEM = {"V": 128256, "size1": 1, "size2": 16384, "stride0": 0, "stride1": 0, "stride2": 128256,
                   "g_size1": 1, "g_size2": 16384, "g_stride0": 0, "g_stride1": 0, "g_stride2": 128256,
                   "rows": 16384, "ignore_index": -100, "parts": 8, "part_cols": 16384,
                   # GAE over [4096, 2048] rewards / values / mask
                   "B": 4096, "T": 2048, "r_stride": 2048, "v_stride": 2048, "m_stride": 2048}  # fmt: skip


def specialize(signature: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a configuration as the JIT compiles it for the
    ALIGNED_PROBLEM: its 16-byte aligned pointers and sizes give 16-byte vector loads,
    which the plain configuration (no divisibility known: a vocabulary such as 50257) does
    not have. Arguments outside ALIGNED_PROBLEM keep their plain type."""
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for i, (arg, ty) in enumerate(signature.items()):
        value = ALIGNED_PROBLEM.get(arg)
        if ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value is not None and ty in ("i32", "i64"):
            if value == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
                continue
            if -(2**31) <= value < 2**31:
                signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _compile_triton(kernel, signature, constexprs, num_warps, cc, attrs=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # the launch options its module gives the kernel beyond num_warps (LAUNCH_OPTIONS: e.g. maxnreg)
    fn = getattr(kernel, "fn", kernel)
    extra = getattr(sys.modules[fn.__module__], "LAUNCH_OPTIONS", {}).get(fn.__name__, {})
    extra = extra(constexprs) if callable(extra) else extra
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, **extra})


def _ptxas(ptx: str, cc: int, tmp: str, cubin: bool = False) -> tuple[str, Path | None]:
    """ptxas -v on PTX text: (its report, the cubin when asked for)."""
    path = Path(tmp) / "k.ptx"
    path.write_text(ptx)
    out_file = Path(tmp) / "k.cubin" if cubin else None
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    out = subprocess.run(
        [_triton_ptxas(cc), "-v", f"-arch={arch}", str(path), "-o", str(out_file or os.devnull)],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stderr + out.stdout, out_file


# ---------------------------------------------------------------------------
# SASS: the loops of a kernel and the 16-byte loads a thread keeps in flight
# ---------------------------------------------------------------------------

_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


@dataclass
class SassLoop:
    """A loop of a kernel's SASS (the instructions from a backward branch's target to it)."""

    body: list  # (address, opcode, operands)

    @property
    def ld128(self) -> int:
        return sum(op.startswith(("LDG", "LDS", "LD.")) and ".128" in op for _, op, _ in self.body)

    @property
    def st128(self) -> int:
        return sum(op.startswith(("STG", "STS", "ST.")) and ".128" in op for _, op, _ in self.body)

    @property
    def in_flight(self) -> int:
        """The most 16-byte global loads issued before the data of any of them is used: the
        loads a thread keeps in flight, which with the resident threads bounds the bytes an
        SM has in flight (a streaming kernel needs two per thread at full occupancy).
        Straight-line order, one pass over the body; a load whose data the body never uses
        (a prefetch for the next iteration) counts as in flight from its issue to the end."""
        pending: list[set[int]] = []
        best = 0
        for _, op, rest in self.body:
            operands = rest.split(",")
            is_store = op.startswith(("STG", "ST."))
            sources = set().union(*(_sass_registers(o) for o in (operands if is_store else operands[1:])))
            pending = [p for p in pending if not p & sources]
            if op.startswith("LDG") and ".128" in op:
                first = min(_sass_registers(operands[0]), default=None)
                if first is not None:
                    pending.append(set(range(first, first + 4)))
                    best = max(best, len(pending))
        return best


def _sass_registers(operand: str) -> set[int]:
    """General registers an operand names: R4, R4.reuse, [R2.64+0x10] (a pair)."""
    regs = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?", operand):
        regs.update(range(int(m.group(1)), int(m.group(1)) + (2 if m.group(2) else 1)))
    return regs


def disassemble(cubin: Path) -> str:
    """cuobjdump -sass of a cubin (the cuobjdump that Triton ships)."""
    cuobjdump = str(Path(_triton_ptxas()).with_name("cuobjdump"))
    return subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def sass_loops(sass: str, name_filter: str = "") -> list[tuple[str, int, list[SassLoop]]]:
    """(function name, instruction count, loops) of every function whose name contains
    ``name_filter``, in the order cuobjdump lists them."""
    out = []
    for func in re.split(r"\n\s*Function : ", sass)[1:]:
        name = func.split("\n", 1)[0].strip()
        if name_filter not in name:
            continue
        ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _SASS_INSTR.finditer(func)]
        index = {addr: i for i, (addr, _, _) in enumerate(ins)}
        found = []
        for i, (addr, op, rest) in enumerate(ins):
            target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
            if target is None or int(target.group(1), 16) >= addr or int(target.group(1), 16) not in index:
                continue
            found.append(SassLoop(ins[index[int(target.group(1), 16)] : i + 1]))
        out.append((name, len(ins), found))
    return out


def triton_sass(kernel, signature, constexprs, num_warps, cc: int = 90, aligned: bool = True) -> tuple[str, str]:
    """(SASS, ptxas report) of a Triton configuration as the JIT compiles it for the
    ALIGNED_PROBLEM (:func:`specialize`), or with aligned=False as it is listed (nothing
    known of the pointers and sizes)."""
    signature, constexprs, attrs = specialize(signature, constexprs) if aligned else (signature, constexprs, None)
    compiled = _compile_triton(kernel, signature, constexprs, num_warps, cc, attrs)
    with tempfile.TemporaryDirectory() as tmp:
        report, cubin = _ptxas(compiled.asm["ptx"], cc, tmp, cubin=True)
        return disassemble(cubin), report


# The streaming loops that must keep two 16-byte loads in flight per thread: (module, first
# pointer's type, kernel, constexprs, aligned) of the configurations the launchers pick, as the JIT
# compiles them for aligned rows (V = 128256) or for rows it cannot prove aligned (an odd
# vocabulary such as 50257, where the kernels find each row's 16-byte boundary at run time).
IN_FLIGHT_KERNELS = (
    ("logprobs", "bf16", "_logprobs_fwd_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 4096, "PREFETCH": False}, True),
    ("logprobs", "bf16", "_logprobs_fwd_kernel", {"HAS_ENTROPY": True, "BLOCK_V": 4096, "PREFETCH": False}, True),
    ("logprobs", "bf16", "_logprobs_fwd_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 4096, "PREFETCH": False}, False),
    ("logprobs", "bf16", "_logprobs_bwd_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 4096, "ROW_ALIGNED": True}, True),
    ("logprobs", "bf16", "_logprobs_bwd_kernel", {"HAS_ENTROPY": True, "BLOCK_V": 4096, "ROW_ALIGNED": True}, True),
    ("logprobs", "bf16", "_logprobs_bwd_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 4096, "ROW_ALIGNED": False}, False),
    # the fused PPO sweep, a program per row: its first pass (and, with the gradient, the second)
    ("ppo", "bf16", "_ppo_logits_kernel", {"HAS_DUAL": True, "HAS_REF": True, "KL_KIND": 3, "HAS_ENTROPY_GRAD": True,
                                           "WRITE_GRAD": False, "BLOCK_V": 4096, "PREFETCH": False,
                                           "ROW_ALIGNED": True, "PERSISTENT": False}, True),  # fmt: skip
    ("ppo", "bf16", "_ppo_logits_kernel", {"HAS_DUAL": True, "HAS_REF": True, "KL_KIND": 3, "HAS_ENTROPY_GRAD": True,
                                           "WRITE_GRAD": True, "BLOCK_V": 4096, "PREFETCH": False,
                                           "ROW_ALIGNED": True, "PERSISTENT": False}, True),  # fmt: skip
    # the GAE kernel's chunk loop with its vector loads (rewards and values, [4096, 2048])
    ("ppo", "fp32", "_gae_kernel", {"HAS_MASK": True, "ROWS": 1, "LANES": 32, "VEC": True}, True),
)


def find_triton_config(module: str, kernel_name: str, dtype: str, constexprs: dict):
    """The (kernel, signature, constexprs, num_warps) of rlhf_kernels.triton.<module>'s
    kernel_configs() with that kernel, first pointer type and constexprs."""
    import importlib

    mod = importlib.import_module(f"rlhf_kernels.triton.{module}")
    for kernel, signature, const, num_warps in mod.kernel_configs():
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        ptr_type = next(v for k, v in signature.items() if k.endswith("_ptr")).lstrip("*")
        if (name, ptr_type, const) == (kernel_name, dtype, constexprs):
            return kernel, signature, const, num_warps
    names = sorted({(e[0].fn.__name__ if hasattr(e[0], "fn") else e[0].__name__) for e in mod.kernel_configs()})
    raise KeyError(f"no configuration {kernel_name}[{dtype}, {constexprs}] in rlhf_kernels.triton.{module}: {names}")


def _flags(constexprs: dict, aligned: bool) -> str:
    """A configuration's constexprs (and whether compiled for aligned rows), as reports name it."""
    return ",".join(f"{k}={v}" for k, v in constexprs.items()) + (",aligned" if aligned else "")


def check_in_flight(cc: int = 90) -> list[tuple[str, SassLoop]]:
    """(configuration, its streaming loop) for IN_FLIGHT_KERNELS: of the loops with the most
    16-byte loads (the whole-tile loops of a row: a kernel that reads its row twice has two),
    the one with the fewest in flight."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    out = []
    for module, dtype, name, const, aligned in IN_FLIGHT_KERNELS:
        sass, _ = triton_sass(*find_triton_config(module, name, dtype, const), cc=cc, aligned=aligned)
        loops = [loop for _, _, found in sass_loops(sass) for loop in found]
        label = f"{name}[{dtype},{_flags(const, aligned)}]"
        if not loops:
            raise RuntimeError(f"{label}: no loop found in its SASS (sass_loops no longer reads it?)")
        top = max(lp.ld128 for lp in loops)
        out.append((label, min((lp for lp in loops if lp.ld128 == top), key=lambda lp: (lp.in_flight, -len(lp.body)))))
    return out


def check_blackwell(cc: int = 100) -> list[KernelReport]:
    """The streaming kernels (IN_FLIGHT_KERNELS, as the JIT compiles them) for sm_100: their
    registers and spills (the issues ask for sm_80 and sm_90; this keeps the kernels that
    carry the bandwidth from spilling on a B200 as well)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for module, dtype, name, const, aligned in IN_FLIGHT_KERNELS:
            kernel, signature, constexprs, num_warps = find_triton_config(module, name, dtype, const)
            sig, const2, attrs = specialize(signature, constexprs) if aligned else (signature, constexprs, None)
            report, _ = _ptxas(_compile_triton(kernel, sig, const2, num_warps, cc, attrs).asm["ptx"], cc, tmp)
            for r in parse_ptxas(report):
                r.name = f"{name}[{dtype},{_flags(const, aligned)},warps={num_warps}]"
                reports.append(r)
    return reports


def check_triton(archs=ARCHS) -> list[KernelReport]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that are compiled here")

    reports = []
    seen = set()
    configs = [(*entry, False) for entry in _triton_configs()]
    # bf16 configurations also as the JIT compiles them for aligned rows (16-byte vector
    # loads: other registers than the plain ones).
    configs += [(*entry, True) for entry in _triton_configs() if entry[1].get("logits_ptr") == "*bf16"]
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, signature, constexprs, num_warps, aligned in configs:
            key = (
                kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                tuple(signature.values()),
                tuple(constexprs.items()),
                num_warps,
                aligned,
            )
            if key in seen:
                continue
            seen.add(key)
            sig, const, attrs = specialize(signature, constexprs) if aligned else (signature, constexprs, None)
            for cc in archs:
                compiled = _compile_triton(kernel, sig, const, num_warps, cc, attrs)
                report, _ = _ptxas(compiled.asm["ptx"], cc, tmp)
                for r in parse_ptxas(report):
                    dtype = next(v for k, v in signature.items() if k.endswith("_ptr")).lstrip("*")
                    flags = _flags(constexprs, aligned)
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
    try:
        reports = check_blackwell()
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:  # no ptxas that reads the JIT's sm_100 PTX
        print(f"triton sm_100: skipped ({type(exc).__name__})")
    else:
        print(format_reports("triton sm_100 (the streaming kernels)", reports))
        failed |= any(r.spills for r in reports) or not reports
    try:
        loops = check_in_flight()
    except FileNotFoundError as exc:
        print(f"loads in flight: skipped ({exc})")
        loops = []
    if loops:
        print("loads in flight (sm_90, 16-byte loads per thread issued before the first use; want 2):")
    for label, loop in loops:
        flag = "" if loop.in_flight >= 2 else "  TOO FEW"
        print(f"  {loop.in_flight} of {loop.ld128}, loop of {len(loop.body)} instructions  {label}{flag}")
        failed |= loop.in_flight < 2
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
