"""The GPU code compiles for sm_80 and sm_90 without register spills (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_kernels import compile_check

PTXAS_SAMPLE = """
ptxas info    : Compiling entry function 'good_kernel' for 'sm_90'
ptxas info    : Function properties for good_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'bad_kernel' for 'sm_80'
ptxas info    : Function properties for bad_kernel
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_ptxas_parser_finds_spills():
    reports = {r.name: r for r in compile_check.parse_ptxas(PTXAS_SAMPLE)}
    assert set(reports) == {"good_kernel", "bad_kernel"}
    assert not reports["good_kernel"].spills and reports["good_kernel"].registers == 32
    assert reports["bad_kernel"].spills and (reports["bad_kernel"].spill_stores, reports["bad_kernel"].spill_loads) == (
        8,
        12,
    )


@pytest.mark.nvcc
@pytest.mark.skipif(compile_check.find_nvcc() is None, reason="no CUDA toolkit")
def test_gpu_code_compiles_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_kernels.compile_check"], capture_output=True, text=True, env=env, timeout=900
    )
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    for title in ("triton", "cuda"):
        assert f"{title}: " in out.stdout and "skipped" not in out.stdout.split(f"{title}: ")[1].splitlines()[0]
    for arch in ("sm_80", "sm_90"):
        assert arch in out.stdout


SASS_SAMPLE = """
        Function : row_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FFMA R8, R4, R5, R6 ;
        /*0030*/                   MUFU.EX2 R8, R8 ;
        /*0040*/                   STG.E.128 desc[UR4][R2.64], R8 ;
        /*0050*/               @!P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
        Function : other_kernel
        /*0000*/                   EXIT ;
"""


def test_sass_loop_counter_finds_the_loop():
    """benchmarks/sass_loops.py (the no-GPU instruction count of hot loops) parses cuobjdump's SASS:
    one loop of five instructions with one 16-byte load and store, only in the function asked for."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sass_loops

    lines = sass_loops.loops(SASS_SAMPLE, "row_kernel")
    assert lines[0].startswith("row_kernel  (7 instructions)")
    assert len(lines) == 2 and "loop of    5  ld128=1 st128=1" in lines[1] and "MUFU:1" in lines[1]
    assert sass_loops.loops(SASS_SAMPLE, "missing") == []


def test_triton_sweep_runs(monkeypatch, capsys):
    """benchmarks/triton_sweep.py (the `sweep` phase of a GPU session) runs end to end, here on CPU
    tensors through the Triton interpreter: one configuration, timed forward and backward, and
    the launcher's tile choice restored afterwards."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter for CPU tensors")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import triton_sweep

    from rlhf_kernels.triton import logprobs as triton_logprobs

    chosen = triton_logprobs._block_v
    monkeypatch.setattr(sys, "argv", ["triton_sweep.py", "--device", "cpu", "--rows", "2", "--vocab", "300",
                                      "--budget", "0"])  # fmt: skip
    triton_sweep.main()
    out = capsys.readouterr().out
    assert "fwd" in out and "bwd" in out and "TB/s" in out and "budget spent" in out, out
    assert triton_logprobs._block_v is chosen and "RLHF_KERNELS_LOGPROBS_PREFETCH" not in os.environ
