"""Instructions in the hot loops of the GPU kernels, from their SASS (no GPU needed).

    PYTHONPATH=. python benchmarks/sass_loops.py cuda csrc/logprobs.cu [--kernel bwd_kernelI13__nv_bfloat16Lb0]
    PYTHONPATH=. python benchmarks/sass_loops.py triton logprobs _logprobs_bwd_kernel bf16 \\
        'HAS_ENTROPY=False,BLOCK_V=4096' [--arch 90]

A bandwidth-bound row kernel is also bounded by how many instructions it issues per
element: an SM issues 4 warp-instructions (128 thread-instructions) a cycle, and at the
H100/H200 copy rate it must move ~16 bytes a cycle, i.e. 8 bf16 elements read (a
forward) or 4 read and 4 written (a backward): a budget of 16 or 32 instructions per
element, all included. And by the bytes in flight: at full occupancy a thread must keep
about two 16-byte loads in flight (``in-flight``: the loads issued before the data of any
of them is used; ``rlhf_kernels.compile_check`` requires 2 of the log-prob kernels).

This compiles a kernel for sm_90 (CUDA: nvcc; Triton: as the JIT specializes it for a
[16384, 128256] contiguous problem, ``compile_check.specialize``), disassembles it with the
cuobjdump that Triton ships, and prints every loop (a backward branch) with its static
instruction count, its 16-byte loads and stores, the loads in flight and its commonest
opcodes. Static: a loop body that holds a rarely taken branch (the label's vector, a
rescale) counts both sides; read the SASS (--dump) to take the cold blocks out.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_kernels import compile_check  # noqa: E402


def loops(sass: str, name_filter: str = "") -> list[str]:
    """One line per loop of every function whose name contains ``name_filter``."""
    out = []
    for name, count, found in compile_check.sass_loops(sass, name_filter):
        out.append(f"{name[:110]}  ({count} instructions)")
        for loop in found:
            ops = collections.Counter(o.split(".")[0] for _, o, _ in loop.body)
            top = " ".join(f"{k}:{v}" for k, v in ops.most_common(10))
            out.append(f"   loop of {len(loop.body):4d}  ld128={loop.ld128} st128={loop.st128} "
                       f"in-flight={loop.in_flight} | {top}")  # fmt: skip
    return out


def cuda_sass(source: Path, arch: int) -> str:
    nvcc = compile_check.find_nvcc()
    if nvcc is None:
        raise SystemExit("nvcc not found (set CUDA_HOME)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-cubin",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-I", str(ROOT / "csrc"), str(source),
               "-o", str(cubin)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return compile_check.disassemble(cubin)


def _constexpr_value(text: str):
    return {"True": True, "False": False}.get(text, int(text) if text.lstrip("-").isdigit() else text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    cu = sub.add_parser("cuda")
    cu.add_argument("source", type=Path)
    cu.add_argument("--kernel", default="", help="substring of the mangled kernel name")
    tr = sub.add_parser("triton")
    tr.add_argument("module", help="logprobs, ppo or preference")
    tr.add_argument("kernel")
    tr.add_argument("dtype", help="the first pointer's element type: fp32, bf16, fp16")
    tr.add_argument("constexprs", help="as compile_check names them, e.g. HAS_ENTROPY=False,BLOCK_V=4096")
    tr.add_argument("--plain", action="store_true", help="nothing known of pointers and sizes (an odd vocabulary)")
    for p in (cu, tr):
        p.add_argument("--arch", type=int, default=90)
        p.add_argument("--dump", action="store_true", help="print the whole SASS as well")
    args = parser.parse_args()
    if args.kind == "cuda":
        sass, name = cuda_sass(args.source, args.arch), args.kernel
    else:
        import os

        os.environ.pop("TRITON_INTERPRET", None)
        const = dict(item.split("=", 1) for item in args.constexprs.split(",") if item)
        const = {k: _constexpr_value(v) for k, v in const.items()}
        try:
            config = compile_check.find_triton_config(args.module, args.kernel, args.dtype, const)
        except KeyError as exc:
            raise SystemExit(str(exc)) from None
        sass, report = compile_check.triton_sass(*config, cc=args.arch, aligned=not args.plain)
        print(" ".join(line.strip() for line in report.splitlines() if "Used" in line or "spill" in line))
        name = ""
    if args.dump:
        print(sass)
    print("\n".join(loops(sass, name)))


if __name__ == "__main__":
    main()
