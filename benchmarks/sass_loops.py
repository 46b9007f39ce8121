"""Instructions in the hot loops of the GPU kernels, from their SASS (no GPU needed).

    PYTHONPATH=. python benchmarks/sass_loops.py cuda csrc/logprobs.cu [--kernel bwd_kernelI13__nv_bfloat16Lb0]
    PYTHONPATH=. python benchmarks/sass_loops.py triton logprobs _logprobs_bwd_kernel bf16 \\
        'HAS_ENTROPY=False,BLOCK_V=4096' [--arch 90]

A bandwidth-bound row kernel is also bounded by how many instructions it issues per
element: an SM issues 4 warp-instructions (128 thread-instructions) a cycle, and at the
H100/H200 copy rate it must move ~16 bytes a cycle, i.e. 8 bf16 elements read (a
forward) or 4 read and 4 written (a backward): a budget of 16 or 32 instructions per
element, all included. This compiles a kernel for sm_90 (CUDA: nvcc; Triton: as the JIT
specializes it for a [16384, 128256] contiguous problem, pointers and sizes divisible by 16
and V as int32), disassembles it with the cuobjdump that Triton ships, and prints every
loop (a backward branch) with its static instruction count, its 16-byte loads and
stores, and its commonest opcodes. Static: a loop body that holds a rarely taken branch
(the label's vector, a rescale) counts both sides; read the SASS (--dump) to take the
cold blocks out.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_kernels import compile_check  # noqa: E402

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")
_RUNTIME_INTS = {"V": 128256, "size1": 1, "size2": 16384, "stride0": 0, "stride1": 0, "stride2": 128256,
                 "g_size1": 1, "g_size2": 16384, "g_stride0": 0, "g_stride1": 0, "g_stride2": 128256,
                 "rows": 16384, "ignore_index": -100}  # fmt: skip


def _disassemble(cubin: Path) -> str:
    cuobjdump = str(Path(compile_check._triton_ptxas()).with_name("cuobjdump"))  # shipped with Triton
    return subprocess.run([cuobjdump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout


def loops(sass: str, name_filter: str = "") -> list[str]:
    """One line per loop of every function whose name contains ``name_filter``."""
    out = []
    for func in re.split(r"\n\s*Function : ", sass)[1:]:
        name = func.split("\n", 1)[0].strip()
        if name_filter not in name:
            continue
        ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(func)]
        index = {addr: i for i, (addr, _, _) in enumerate(ins)}
        out.append(f"{name[:110]}  ({len(ins)} instructions)")
        for i, (addr, op, rest) in enumerate(ins):
            target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
            if target is None or int(target.group(1), 16) >= addr or int(target.group(1), 16) not in index:
                continue
            body = ins[index[int(target.group(1), 16)] : i + 1]
            ops = collections.Counter(o.split(".")[0] for _, o, _ in body)
            ld = sum(o.startswith(("LDG", "LDS", "LD.")) and ".128" in o for _, o, _ in body)
            st = sum(o.startswith(("STG", "STS", "ST.")) and ".128" in o for _, o, _ in body)
            top = " ".join(f"{k}:{v}" for k, v in ops.most_common(10))
            out.append(f"   loop of {len(body):4d}  ld128={ld} st128={st} | {top}")
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
        return _disassemble(cubin)


def triton_sass(module: str, kernel_name: str, dtype: str, constexprs: str, arch: int) -> str:
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"rlhf_kernels.triton.{module}")
    for entry in mod.kernel_configs():
        kernel, signature, const, num_warps = entry[:4]
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        ptr_type = next(v for k, v in signature.items() if k.endswith("_ptr")).lstrip("*")
        flags = ",".join(f"{k}={v}" for k, v in const.items())
        if (name, ptr_type, flags) != (kernel_name, dtype, constexprs):
            continue
        signature, const, attrs = dict(signature), dict(const), {}
        for i, (arg, ty) in enumerate(signature.items()):
            value = _RUNTIME_INTS.get(arg)
            if ty.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif value is not None and ty in ("i32", "i64"):
                if value == 1:
                    signature[arg], const[arg] = "constexpr", 1
                    continue
                if -(2**31) <= value < 2**31:
                    signature[arg] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as tmp:
            ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
            ptx.write_text(compiled.asm["ptx"])
            sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            subprocess.run([compile_check._triton_ptxas(), f"-arch={sm}", str(ptx), "-o", str(cubin)], check=True)
            return _disassemble(cubin)
    choices = sorted({(e[0].fn.__name__ if hasattr(e[0], "fn") else e[0].__name__) for e in mod.kernel_configs()})
    raise SystemExit(f"no config {kernel_name}[{dtype}, {constexprs}] in rlhf_kernels.triton.{module}: {choices}")


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
    for p in (cu, tr):
        p.add_argument("--arch", type=int, default=90)
        p.add_argument("--dump", action="store_true", help="print the whole SASS as well")
    args = parser.parse_args()
    if args.kind == "cuda":
        sass, name = cuda_sass(args.source, args.arch), args.kernel
    else:
        sass, name = triton_sass(args.module, args.kernel, args.dtype, args.constexprs, args.arch), ""
    if args.dump:
        print(sass)
    print("\n".join(loops(sass, name)))


if __name__ == "__main__":
    main()
