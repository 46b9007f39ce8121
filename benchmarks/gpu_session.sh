#!/usr/bin/env bash
# One call on a lent GPU machine (no network, its own torch and triton): build the
# extension in place, run the GPU tests, run the benchmarks, and leave the logs and
# results in $OUT (at most 8 files come back from a lent machine; this writes 7).
#
#   benchmarks/gpu_session.sh [phases]    phases: any of build tests overhead sweep bwdsweep
#                                         timeline profile bench (default: build tests timeline
#                                         bwdsweep bench)
#
# Everything runs against one deadline, TOTAL seconds from the start (default 585: the
# device tool stops a command at 600). The build gets at most BUILD_LIMIT (170 s; about
# 1.5 min for sm_90 alone on 16 cores); the tests (12 xdist workers when pytest-xdist is
# there, -v so that a run cut short still lists every result it reached, SIGINT at the
# limit so that pytest prints its failure summary) get TEST_LIMIT (200 s) but always leave
# BENCH_MIN (190 s; the H200 run of all ops took 170) to the benchmarks, which get the rest.
# The benchmark driver rewrites its JSON and table after every problem, so a cut-short run
# still returns what it timed.
#
# BENCH_ARGS defaults to --quick (on CUDA: each op's target shape from its issue) over
# OPS in priority order (bench.OPS names); BENCH_ARGS="" OPS="..." runs every shape.
# TEST_K is a pytest -k filter; by default the plain-PyTorch backend on CUDA is left out
# (it is the reference, run on CPU by CI; the kernels are what a GPU session must test).
# ISOLATED_K (default "bulk": the cluster kernel's bulk-copy mode) names tests of kernels never
# run on a GPU yet, run after the others in a pytest of their own ("" runs them with the rest).
#
# Baselines that the machine lacks travel as wheels in .whl/ (ignored by git; name it in
# the device call's carry): `pip download --no-deps -d .whl liger-kernel cut-cross-entropy trl`
# (all pure Python; of TRL the bench imports only trl.kernels, which needs torch, transformers
# and triton); they are installed into /tmp/site here.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON:-python3}
PHASES=${*:-build tests timeline bwdsweep bench}
# sweep: the Triton log-prob kernels over tile sizes, warp counts and prefetch
# (benchmarks/triton_sweep.py, into session.log; at most SWEEP_LIMIT, 100 s).
# bwdsweep: the log-prob backward of both kernel backends with rows cut into column parts
# (RLHF_KERNELS_BWD_PART_COLS), then the fused PPO step's cluster kernel settings beside
# the read + write floor (benchmarks/bwd_sweep.py; into session.log; at most BWDSWEEP_LIMIT, 70 s;
# it took 37 s on the H200).
# timeline: the large steps' kernels recorded with torch.profiler at the benchmark's shapes (time
# before the first kernel, idle gaps, the largest kernel's own TB/s; benchmarks/timeline.py, into
# session.log; at most TIMELINE_LIMIT, 75 s).
# profile: Nsight Compute on the kernels furthest from their targets (benchmarks/profile_kernels.py),
# every kernel of its profiled range, sections as text in ncu.log (about a minute; the 8th file
# that comes back). It runs last; the benchmarks leave it PROFILE_MIN (90 s).
TOTAL=${TOTAL:-585}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

has() { [[ " $PHASES " == *" $1 "* ]]; }
left() { echo $((START + TOTAL - $(date +%s))); }
min() { echo $(($1 < $2 ? $1 : $2)); }
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  # the copy ceiling the bandwidth figures can be read against (bytes read + written)
  "$PY" - <<'EOF'
import torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
ts = []
for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); y.copy_(x); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
ts.sort()
print(f"device copy of 2 GiB: median {ts[5]:.3f} ms, {2 * x.numel() / ts[5] / 1e9:.2f} TB/s read+written "
      f"(min {ts[0]:.3f}, max {ts[-1]:.3f} ms)")
EOF
} >>"$OUT/session.log" 2>&1

if has build; then
  log "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0}, limit ${BUILD_LIMIT:=170} s)"
  export TORCH_CUDA_ARCH_LIST
  MAX_JOBS=${MAX_JOBS:-16} timeout "$(min "$BUILD_LIMIT" "$(left)")" "$PY" setup.py build_ext --inplace \
    >"$OUT/build.log" 2>&1 || {
    log "build failed (tail of build.log follows); the torch and triton backends still run"
    tail -30 "$OUT/build.log" | tee -a "$OUT/session.log"
  }
  "$PY" -m rlhf_kernels.cli info >>"$OUT/session.log" 2>&1
fi

if has tests; then
  reserve=$((${BENCH_MIN:-190} + 20))  # the benchmarks' share, and pytest's kill grace
  has overhead && reserve=$((reserve + 60))
  has sweep && reserve=$((reserve + ${SWEEP_LIMIT:-100}))
  has bwdsweep && reserve=$((reserve + ${BWDSWEEP_LIMIT:-70}))
  has timeline && reserve=$((reserve + ${TIMELINE_LIMIT:-75}))
  has profile && reserve=$((reserve + ${PROFILE_MIN:-90}))
  limit=$(min "${TEST_LIMIT:-200}" $(($(left) - reserve)))
  ((limit < 30)) && limit=30
  # Tests of kernels that have never run on a GPU (ISOLATED_K, a -k expression) go in a second
  # pytest run after the others, with a quarter of the limit, at most ISOLATED_LIMIT (40 s): a
  # kernel fault leaves its process's CUDA context unusable, which would fail every later test
  # of the same worker.
  TEST_K=${TEST_K-not cuda-torch}
  isolated=${ISOLATED_K-bulk}
  k_main=$TEST_K
  [[ -n $isolated ]] && k_main="${TEST_K:+($TEST_K) and }not ($isolated)"
  first=$limit
  [[ -n $isolated ]] && first=$((limit - $(min "${ISOLATED_LIMIT:-40}" $((limit / 4)))))
  log "GPU tests (limit $first s, -k '$k_main')"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-12}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout 120)  # a hung kernel fails its test only
  timeout -s INT -k 20 "$first" "$PY" -m pytest -m gpu ${k_main:+-k "$k_main"} -v -p no:cacheprovider \
    "${xdist[@]}" -rfE --maxfail=300 --durations=25 tests >"$OUT/tests.log" 2>&1
  log "tests exit code $? (124: cut at the limit)"
  tail -1 "$OUT/tests.log" | tee -a "$OUT/session.log"
  if [[ -n $isolated ]] && (($(left) - reserve > 20)); then
    k_new="${TEST_K:+($TEST_K) and }($isolated)"
    second=$(min "${ISOLATED_LIMIT:-40}" $(($(left) - reserve)))
    log "GPU tests of new kernels (limit $second s, -k '$k_new'; appended to tests.log)"
    timeout -s INT -k 20 "$second" "$PY" -m pytest -m gpu -k "$k_new" -v -p no:cacheprovider \
      "${xdist[@]}" -rfE --maxfail=300 tests >>"$OUT/tests.log" 2>&1
    log "new-kernel tests exit code $? (124: cut at the limit)"
  fi
  log "failures:"
  # the short summary's lines, or (cut before it) xdist's per-test lines: "[gw3] [ 12%] FAILED tests/..."
  grep -E "(^|\] )(FAILED|ERROR) tests/" "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] \[ *[0-9]+%\] //' |
    sort -u | head -60 | tee -a "$OUT/session.log"
  tail -3 "$OUT/tests.log" | tee -a "$OUT/session.log"
fi

if has overhead; then
  log "per-call host overhead (benchmarks/overhead.py --profile)"
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout 60 "$PY" benchmarks/overhead.py --device cuda --profile \
    >>"$OUT/session.log" 2>&1
fi

later=${BENCH_MIN:-190}  # what the sweeps leave to the benchmarks (and the profile after them)
has profile && later=$((later + ${PROFILE_MIN:-90}))

# sweep_phase PHASE SCRIPT LIMIT MIN_LIMIT MARGIN WHAT: run benchmarks/SCRIPT for at most LIMIT s
# (less where the later phases need it; not at all below MIN_LIMIT), told to stop starting new
# settings MARGIN s before its limit, its output into session.log.
sweep_phase() {
  has "$1" || return 0
  limit=$(min "$3" $(($(left) - later)))
  ((limit > $4)) || return 0
  log "$6 (benchmarks/$2, limit $limit s)"
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "$limit" "$PY" "benchmarks/$2" --budget $((limit - $5)) \
    >>"$OUT/session.log" 2>&1
  log "$1 exit code $?"
}
sweep_phase sweep triton_sweep.py "${SWEEP_LIMIT:-100}" 30 25 "Triton tile sweep"
sweep_phase bwdsweep bwd_sweep.py "${BWDSWEEP_LIMIT:-70}" 20 15 "backward column-part and fused-step cluster sweep"
sweep_phase timeline timeline.py "${TIMELINE_LIMIT:-75}" 30 20 "kernel timeline of the large steps"

limit=$(($(left) - 5))
has profile && limit=$((limit - ${PROFILE_MIN:-90}))  # the profile runs after the benchmarks
if has bench && ((limit > 15)); then
  ops=()
  for op in ${OPS:-ppo_step dpo_loss ppo_policy_loss token_logprobs gae dpo_step sequence_logprobs masked_whiten \
    grpo_advantages linear_logprobs linear_ppo_step}; do ops+=(--op "$op"); done
  log "benchmarks (limit $limit s): ${BENCH_ARGS=--quick} ${ops[*]}"
  # shellcheck disable=SC2086
  timeout -k 10 "$limit" "$PY" -m rlhf_kernels.cli bench --device cuda --out "$OUT" $BENCH_ARGS "${ops[@]}" \
    >"$OUT/bench.log" 2>&1
  log "bench exit code $? (124: cut at the limit; the JSON holds every finished problem)"
  for f in "$OUT"/bench-*.txt; do  # the rows the issues' targets name, against them
    [[ -e $f ]] && sed -n "/^Against the issues' targets:/,\$p" "$f" | tee -a "$OUT/session.log"
  done
fi
if has profile && (($(left) > 20)); then
  log "Nsight Compute (benchmarks/profile_kernels.py)"
  sections=()
  for s in SpeedOfLight MemoryWorkloadAnalysis ComputeWorkloadAnalysis Occupancy LaunchStats WarpStateStats \
    SchedulerStats; do
    sections+=(--section "$s")
  done
  PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "$(min 180 $(($(left) - 5)))" \
    ncu --clock-control none --profile-from-start off \
    "${sections[@]}" "$PY" benchmarks/profile_kernels.py >"$OUT/ncu.log" 2>&1
  log "ncu exit code $?"
fi
log "done"
