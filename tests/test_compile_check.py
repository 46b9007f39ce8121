"""The GPU code compiles for sm_80 and sm_90 without register spills (no GPU needed)."""

from __future__ import annotations

import json
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
    assert "sm_100a" in out.stdout or "triton sm_100: skipped" in out.stdout  # the streaming kernels on Blackwell


# What each Triton kernel writes (its outputs; the in-place backward passes the logits as
# grad_ptr). Anything else that torch.compile's analysis takes as written is a read-only
# input it would copy back into: the cuda-triton compile tests failed so on an H100 when a
# helper that took the logits pointer fed the gradient's store addresses.
KERNEL_OUTPUTS = {
    "_logprobs_fwd_kernel": {"logprobs_ptr", "lse_ptr", "entropy_ptr"},
    "_logprobs_fwd_part_kernel": {"states_ptr"},
    "_logprobs_fwd_merge_kernel": {"logprobs_ptr", "lse_ptr", "entropy_ptr"},
    "_seq_logprobs_fwd_kernel": {"partial_ptr", "count_ptr", "lse_ptr"},
    "_logprobs_bwd_kernel": {"grad_ptr"},
    "_pref_fwd_kernel": {"losses_ptr", "metrics_ptr", "chosen_rewards_ptr", "rejected_rewards_ptr"},
    "_pref_bwd_kernel": {"grad_a_ptr", "grad_b_ptr"},
    "_pref_fwd_partial_kernel": {"losses_ptr", "partials_ptr", "chosen_rewards_ptr", "rejected_rewards_ptr"},
    "_pref_bco_partial_kernel": {"partials_ptr"},
    "_pref_sum_partials_kernel": {"metrics_ptr"},
    "_gae_kernel": {"adv_ptr", "ret_ptr"},
    "_ppo_loss_fwd_kernel": {"rows_ptr"},
    "_ppo_loss_bwd_kernel": {"grad_x_ptr"},
    "_ppo_loss_agg_kernel": {"loss_ptr", "metrics_ptr"},
    "_kl_kernel": {"out_ptr"},
    "_ppo_logits_kernel": {"grad_ptr", "stats_ptr"},
    "_ppo_logits_parts_kernel": {"grad_ptr", "stats_ptr", "partial_ptr", "sync_ptr"},
    "_scale_unless_one_kernel": {"x_ptr"},
    "_whiten_partial_kernel": {"mean_ptr", "m2_ptr", "count_ptr"},
    "_whiten_apply_kernel": {"out_ptr"},
    "_whiten_merge_kernel": {"stats_ptr"},
    "_grpo_kernel": {"out_ptr"},
}


def test_torch_compile_sees_only_outputs_written():
    """torch.compile's analysis of each wrap_triton kernel (on its TTIR, for every launch
    configuration) takes only the kernel's outputs as written; a kernel it cannot analyse
    would count every argument. Compile-only: needs triton's compiler, not a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json; from rlhf_kernels import compile_check as c; print(json.dumps(c.check_writes()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    writes = {name: set(w) for name, w in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    assert set(writes) == set(KERNEL_OUTPUTS), "a new kernel needs its outputs in KERNEL_OUTPUTS"
    for name, w in writes.items():
        assert w and w <= KERNEL_OUTPUTS[name], f"{name}: taken as written: {sorted(w - KERNEL_OUTPUTS[name])}"


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


def _loop_sass(body: str) -> str:
    lines = [f"        /*{16 * i:04x}*/                   {ins} ;" for i, ins in enumerate(body.strip().splitlines())]
    lines.append(f"        /*{16 * len(lines):04x}*/               @!P0 BRA 0x0 ;")
    return "\n        Function : k\n" + "\n".join(lines) + "\n"


def test_sass_loads_in_flight():
    """compile_check's count of the 16-byte loads a loop issues before using any of their data
    (the check that the log-prob kernels keep two in flight per thread): two loads back to back
    count 2, a load whose data is used before the next load is issued 1, a prefetch whose data
    the body never uses stays in flight to the end, and a pair register ([R6.64]) or a store's
    data operand counts as a use."""

    def count(body):
        (_, _, loops), = compile_check.sass_loops(_loop_sass(body))
        (loop,) = loops
        return loop.in_flight, loop.ld128

    assert count("LDG.E.128 R4, desc[UR4][R2.64]\nLDG.E.128 R8, desc[UR4][R2.64+0x1000]\nFADD R12, R4, R8") == (2, 2)
    assert count("LDG.E.128 R4, desc[UR4][R2.64]\nFADD R12, R5, R1\nLDG.E.128 R4, desc[UR4][R2.64+0x10]\n"
                 "FADD R12, R4, R12") == (1, 2)  # fmt: skip
    assert count("LDG.E.128 R16, desc[UR4][R2.64]\nFADD R12, R4, R8\nLDG.E.128 R20, desc[UR4][R2.64+0x10]\n"
                 "FADD R12, R12, R1") == (2, 2)  # fmt: skip
    assert count("LDG.E.128 R4, desc[UR4][R2.64]\nIADD3 R3, R6, R1, RZ\nLDG.E.128 R8, desc[UR4][R2.64+0x10]") == (1, 2)
    assert count("LDG.E.128 R4, desc[UR4][R2.64]\nLDG.E.128 R8, desc[UR4][R6.64]") == (1, 2)
    assert count("LDG.E.128 R4, desc[UR4][R2.64]\nSTG.E.128 desc[UR4][R10.64], R4\n"
                 "LDG.E.128 R8, desc[UR4][R2.64+0x10]") == (1, 2)  # fmt: skip


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


def test_timeline_summary_and_cpu_run(monkeypatch, capsys):
    """benchmarks/timeline.py (the `timeline` phase of a GPU session): the per-step figures from
    recorded kernels (lead before the first kernel, span, busy time, the largest kernel), medians
    over runs; and an end-to-end run on CPU, where no kernels are recorded."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import timeline

    runs = [
        {"start": 0.0, "end": 50.0,
         "kernels": [("small", 40.0, 42.0), ("big", 45.0, 1045.0), ("tail", 1050.0, 1053.0)]},
        {"start": 2000.0, "end": 2040.0, "kernels": [("small", 2030.0, 2032.0), ("big", 2034.0, 3034.0)]},
        {"start": 4000.0, "end": 4060.0, "kernels": [("big", 4060.0, 5160.0)]},
        {"start": 6000.0, "end": 6010.0, "kernels": []},  # (a run without kernels is left out)
    ]
    s = timeline.summarize(runs)
    assert s["lead"] == 40.0 and s["span"] == 1013.0 and s["busy"] == 1005.0 and s["big"] == 1000.0
    assert s["kernels"] == 2 and s["name"] == "big"
    assert timeline.summarize([{"start": 0.0, "end": 1.0, "kernels": []}]) is None
    monkeypatch.setattr(sys, "argv", ["timeline.py", "--rows", "16", "--vocab", "300", "--runs", "2"])
    timeline.main()
    out = capsys.readouterr().out
    assert "token_logprobs 16x300 fwd" in out and "ppo_step 8x2x300 fwd+bwd" in out
    assert "floor: read+write" in out and "(no kernels recorded)" in out, out
