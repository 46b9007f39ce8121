#!/usr/bin/env bash
# One call on a lent GPU machine (no network, its own torch and triton): build the
# extension in place, run the GPU tests, run the benchmarks, and leave the logs and
# results in $OUT (at most 8 files come back from a lent machine; this writes 6).
#
#   benchmarks/gpu_session.sh [phases]    phases: any of build tests bench (default: all three)
#
# Budget (the device tool stops a command at 10 minutes): build ~2 min for sm_90
# alone, tests under TEST_LIMIT (default 240 s, 8 xdist workers when pytest-xdist is
# there), benchmarks under BENCH_LIMIT (default 270 s). The benchmark driver rewrites
# its JSON and table after every problem, so a cut-short run still returns what it
# timed. Use OPS="gae ppo_step" (bench.OPS names) to benchmark a subset.
#
# Baselines that the machine lacks travel as wheels in .whl/ (ignored by git; name it in
# the device call's carry): `pip download --no-deps -d .whl liger-kernel cut-cross-entropy`
# (both pure Python); they are installed into /tmp/site here.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-session}
PY=${PYTHON:-python3}
PHASES=${*:-build tests bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

has() { [[ " $PHASES " == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} >>"$OUT/session.log" 2>&1

if has build; then
  log "build (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0})"
  export TORCH_CUDA_ARCH_LIST
  MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || {
    log "build failed (tail of build.log follows); the torch and triton backends still run"
    tail -30 "$OUT/build.log" | tee -a "$OUT/session.log"
  }
  "$PY" -m rlhf_kernels.cli info >>"$OUT/session.log" 2>&1
fi

if has tests; then
  log "GPU tests (limit ${TEST_LIMIT:=240} s)"
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider "${xdist[@]}" -rfE --maxfail=200 \
    tests >"$OUT/tests.log" 2>&1
  log "tests exit code $? (124: cut at the limit); summary:"
  tail -5 "$OUT/tests.log" | tee -a "$OUT/session.log"
fi

if has bench; then
  log "benchmarks (limit ${BENCH_LIMIT:=270} s)"
  ops=()
  for op in ${OPS:-}; do ops+=(--op "$op"); done
  timeout "$BENCH_LIMIT" "$PY" -m rlhf_kernels.cli bench --device cuda --out "$OUT" "${ops[@]}" >"$OUT/bench.log" 2>&1
  log "bench exit code $? (124: cut at the limit; the JSON holds every finished problem)"
fi
log "done"
