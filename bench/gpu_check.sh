#!/usr/bin/env bash
# The GPU check, one script: versions, install (the prebuilt wheel), CUDA tests, compute-sanitizer memcheck, GPU benchmarks
# (the mixture NLL's schedules, the correlated-component ops at B = 1M, bench/run.py's sweep), an Nsight
# Compute profile of the kernels (when time is left), summary.
#
#   bash bench/gpu_check.sh                  # on the GPU machine (no package registry needed), < 8 minutes
#   bash bench/gpu_check.sh --dry-run        # on a CPU: every step's plumbing with tiny sizes, no build
#
# The GPU machine runs its own torch (2.11) and Python (3.12): the script installs a wheel built beforehand on a CPU
# machine for that Python, carried with the working tree in dist/ (one wheel serves every torch >= 2.11):
#   PHYSMDN_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0 PHYSMDN_VENV=/path/to/py312-venv \
#     PHYSMDN_WHEEL_ARGS=-Ccmake.define.PHYSMDN_CUDA_LANES=ON bash scripts/build_wheel.sh
# (any torch >= 2.11 in that venv, a CPU-only one too), then carry dist/ to the GPU machine.
# Without a matching wheel in dist/ it compiles physmdn there (minutes of device time).
#   options: --budget SECONDS (default 470, the whole script), --copy-to DIR (also copy the outputs there)
#            PYTHON=python3.12 bash bench/gpu_check.sh   (the interpreter; default python3, else python)
#
# Steps run in order; a failing step is recorded and the next one runs anyway. Each step gets a hard timeout,
# the smaller of its own cap and what is left of the budget. The summary table (step, status, seconds, key
# numbers) is printed last. Outputs: bench/out/gpu_check_<UTC stamp>.log (everything printed) and .keys.txt
# (the benchmark's key numbers); bench/run.py appends its tables to bench/out/<gpu>.md and .csv.
# A dry run writes under bench/out/dry-run/ instead. bench/out/ is ignored by git: curated baselines are
# copied to bench/baselines/ by hand.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DRY=0
BUDGET=470
COPY_TO=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --copy-to) COPY_TO=$2; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)"; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-$(command -v python3 || command -v python)}
case "$PY" in  # absolute (steps run from other directories); a venv's python stays the venv's (no symlink resolving)
  */*) [ "${PY#/}" = "$PY" ] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *) PY=$(command -v "$PY" || echo "$PY") ;;
esac
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$DRY" = 1 ]; then OUTDIR=bench/out/dry-run; DEVICE=cpu; else OUTDIR=bench/out; DEVICE=cuda; fi
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check_$STAMP.log"
KEYS="$OUTDIR/gpu_check_$STAMP.keys.txt"
STEPDIR=$(mktemp -d)
touch "$STEPDIR/.start"  # outputs newer than this are this run's (--copy-to)
T0=$(date +%s)

STEP_NAMES=(); STEP_STATUS=(); STEP_SECS=(); STEP_NOTES=()

record() {  # name status seconds note
  STEP_NAMES+=("$1"); STEP_STATUS+=("$2"); STEP_SECS+=("$3"); STEP_NOTES+=("$4")
}

# run_step NAME CAP_SECONDS COMMAND... : runs COMMAND under a timeout (min of CAP and the budget left, keeping
# RESERVE seconds for the summary), output to the terminal/log and to $STEPDIR/NAME.out. Sets STEP_RC.
RESERVE=10
run_step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) - RESERVE ))
  local limit=$(( cap < left ? cap : left ))
  echo
  local shown="$*"
  echo "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: ${shown:0:160}$([ ${#shown} -gt 160 ] && echo ' ...')"
  STEP_SECONDS=0
  if [ "$limit" -lt 5 ]; then
    STEP_RC=125
    record "$name" "SKIP" 0 "no time left in the ${BUDGET}s budget"
    return
  fi
  local t=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$STEPDIR/$name.out"
  STEP_RC=${PIPESTATUS[0]}
  STEP_SECONDS=$(( $(date +%s) - t ))
  echo "=== [$name] exit $STEP_RC after ${STEP_SECONDS}s"
}

status_of() {  # exit code -> status word
  case "$1" in
    0) echo PASS ;;
    124|137) echo TIMEOUT ;;
    *) echo "FAIL(rc=$1)" ;;
  esac
}

main() {
  echo "physmdn GPU check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), repo $ROOT"
  echo "mode: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, tiny sizes, no build)' || echo GPU), budget ${BUDGET}s, python $PY"

  # 1. versions ------------------------------------------------------------------------------------------
  run_step versions 60 bash -c '
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv;
    else echo "nvidia-smi: not found"; fi
    for tool in nvcc cmake ninja compute-sanitizer; do
      p=$(command -v $tool || ls ${CUDA_HOME:-/usr/local/cuda}/bin/$tool 2>/dev/null || true)
      if [ -n "$p" ]; then echo "$tool: $p: $($p --version 2>&1 | grep -iE "release|version|^[0-9]" | head -1)"; else echo "$tool: not found"; fi
    done
    "$0" -c "
import sys, platform, torch
print(\"python\", platform.python_version(), sys.executable)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else \"\")
for mod in (\"pybind11\", \"scikit_build_core\", \"pytest\", \"numpy\"):
    try:
        m = __import__(mod); print(mod, getattr(m, \"__version__\", \"?\"))
    except ImportError as exc:
        print(mod, \"MISSING:\", exc)
"' "$PY"
  record versions "$(status_of $STEP_RC)" "${STEP_SECONDS:-0}" "$(grep -m1 '^GPU 0' "$STEPDIR/versions.out" 2>/dev/null | cut -c1-60)"

  # 2. build ---------------------------------------------------------------------------------------------
  wheel=$("$PY" -c "
import glob, sys
tag = 'cp%d%d' % sys.version_info[:2]
found = sorted(glob.glob('dist/physmdn-*-%s-%s-*linux*.whl' % (tag, tag)))
print(found[-1] if found else '')
")
  if [ "$DRY" = 1 ]; then
    echo
    if [ -n "$wheel" ]; then
      echo "=== [build] dry run: would install the prebuilt wheel: $PY -m pip install --no-deps --no-index --force-reinstall $wheel"
      record build "SKIP(dry-run)" 0 "would install $(basename "$wheel"); the installed physmdn is used"
    else
      echo "=== [build] dry run: no prebuilt wheel for this Python in dist/; would compile: PHYSMDN_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0 $PY -m pip install --no-build-isolation --no-deps -Ccmake.define.PHYSMDN_CUDA_LANES=ON ."
      record build "SKIP(dry-run)" 0 "no prebuilt wheel in dist/ (would compile); the installed physmdn is used"
    fi
  elif [ -n "$wheel" ]; then
    # the prebuilt wheel (stable ABI: built with another torch, loads under this one), no compiling here
    run_step build 120 "$PY" -m pip install --no-deps --no-index --force-reinstall --no-input \
      --disable-pip-version-check "$wheel"
    record build "$(status_of $STEP_RC)" "$STEP_SECONDS" "installed $(basename "$wheel")"
  else
    export PHYSMDN_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    # with the lane-per-element schedule compiled in: its tests and the schedule benchmark time it against the tiled one
    run_step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-input --disable-pip-version-check \
      -Ccmake.define.PHYSMDN_CUDA_LANES=ON .
    record build "$(status_of $STEP_RC)" "$STEP_SECONDS" "TORCH_CUDA_ARCH_LIST=9.0 PHYSMDN_CUDA=ON PHYSMDN_CUDA_LANES=ON"
  fi
  # the build the following steps use (run from bench/ so that the installed package, not the tree, is imported)
  run_step build_info 60 bash -c 'cd bench && "$0" -c "
import sys, torch, physmdn
info = physmdn.build_info(); print(info)
ok = info[\"cuda_kernels\"] and torch.cuda.is_available()
print(\"CUDA kernels:\", info[\"cuda_kernels\"], \"| GPU visible:\", torch.cuda.is_available(), \"| arch:\", info.get(\"cuda_arch_list\"))
sys.exit(0 if ok or $1 else 3)
"' "$PY" "$DRY"
  record build_info "$(status_of $STEP_RC)" "$STEP_SECONDS" "$(grep -m1 '^CUDA kernels' "$STEPDIR/build_info.out" 2>/dev/null)"

  # 3. CUDA tests (the device-parametrized tests: ids contain "cuda"; plus the device-mismatch check) --------
  # (the lane-per-element schedule's tests run in their own step below, without -x: a failure there must not hide
  # the others; tests/cuda/test_cuda_sim.py, the CUDA code under the CPU simulator, and tests/cuda/test_cuda_static.py,
  # its SASS read without a GPU (a 2-minute compile), are CI's and not run here)
  run_step tests 150 "$PY" -m pytest -q -x -rs -p no:cacheprovider tests --ignore=tests/cuda/test_cuda_sim.py \
    --ignore=tests/cuda/test_cuda_static.py \
    -k "(cuda or device_mismatch) and not lanes"
  local summary; summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$STEPDIR/tests.out" | tail -1 | sed 's/=//g; s/^ *//')
  local st; st=$(status_of $STEP_RC)
  if [ "$DRY" = 0 ] && [ "$STEP_RC" = 0 ] && ! grep -qE '[1-9][0-9]* passed' <<<"$summary"; then
    st="FAIL(no test ran)"  # every CUDA test skipped: no GPU or no CUDA kernels
  fi
  record tests "$st" "$STEP_SECONDS" "$summary"

  # 3b. the lane-per-element schedule of the CUDA mixture NLL (off by default until it passes here) -------------
  run_step lanes_tests 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/cuda/test_cuda_lanes.py
  summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$STEPDIR/lanes_tests.out" | tail -1 | sed 's/=//g; s/^ *//')
  st=$(status_of $STEP_RC)
  if [ "$DRY" = 0 ] && [ "$STEP_RC" = 0 ] && ! grep -qE '[1-9][0-9]* passed' <<<"$summary"; then
    st="FAIL(no test ran)"
  fi
  LANES_TESTS_RC=$STEP_RC
  record lanes_tests "$st" "$STEP_SECONDS" "$summary"

  # 4. compute-sanitizer memcheck on a tiny fwd+bwd of every kernel ------------------------------------------
  local sanitizer; sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1 || true)
  if [ "$DRY" = 1 ]; then
    run_step sanitizer 120 "$PY" bench/sanitizer_case.py --device cpu
    record sanitizer "$(status_of $STEP_RC)" "$STEP_SECONDS" "dry run: the case on the CPU, no sanitizer ($( [ -n "$sanitizer" ] && echo "found $sanitizer" || echo 'compute-sanitizer not found'))"
  elif [ -n "$sanitizer" ]; then
    # Without the caching allocator memcheck sees each tensor's own bounds.
    run_step sanitizer 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 99 \
      --print-limit 20 "$PY" bench/sanitizer_case.py --device cuda
    record sanitizer "$(status_of $STEP_RC)" "$STEP_SECONDS" \
      "$(grep -m1 'ERROR SUMMARY' "$STEPDIR/sanitizer.out" | sed 's/^=* *//'); $(tail -1 "$STEPDIR/sanitizer.out" | cut -c1-50)"
  else
    run_step sanitizer_case 90 "$PY" bench/sanitizer_case.py --device cuda
    record sanitizer "SKIP(no compute-sanitizer)" "$STEP_SECONDS" "the case without it: $(status_of $STEP_RC)"
  fi

  # 5a. the lane-per-element schedule of the CUDA mixture NLL (off by default until measured) against the default
  # schedules, interleaved, after checking that both agree; exits non-zero on a disagreement (bench_cuda_schedules.py)
  if [ "$DRY" = 1 ]; then
    run_step schedules 90 "$PY" bench/bench_cuda_schedules.py --device cpu --quick --repeat 3 --no-save
  else
    run_step schedules 90 bash -c 'cd bench && "$0" bench_cuda_schedules.py --device cuda --quick --repeat 15 --results-dir "$1"' "$PY" "$ROOT/$OUTDIR"
  fi
  SCHEDULES_RC=$STEP_RC
  record schedules "$(status_of $STEP_RC)" "$STEP_SECONDS" \
    "lanes speedup (default / lanes), GB/s, % copy: $(awk -F'|' '/\| B=[0-9]+ K=[0-9]+ D=[0-9]+ \| float32 \| (fwd\+grads|train) \|/ && !seen[$0]++ {gsub(/^ +| +$/, "", $2); gsub(/^ +| +$/, "", $4); gsub(/ /, "", $9); gsub(/ /, "", $10); gsub(/ /, "", $11); printf "%s %s %sx %sGB/s %s%%; ", $2, $4, $9, $10, $11}' "$STEPDIR/schedules.out" 2>/dev/null | head -c 600)"

  # 5b. the correlated-component ops at B = 1M, K = 8 (bench/correlated_nll.py: the fused CUDA kernels of
  # mixture_nll_tril, D = 8, and mixture_nll_lowrank, D = 32, R = 4, against the same math under autograd and eager
  # torch.distributions; GB/s and % of the copy bandwidth)
  if [ "$DRY" = 1 ]; then
    run_step correlated 150 bash -c 'cd bench && "$0" correlated_nll.py --device cpu --B 2048 --K 8 --tril-D 8 \
      --lowrank-D 32 --R 4 --kinds tril,lowrank --repeat 3 --no-compile --results-dir "$1"' "$PY" "$ROOT/$OUTDIR"
  else
    run_step correlated 150 bash -c 'cd bench && "$0" correlated_nll.py --device cuda --B 1048576 --K 8 --tril-D 8 \
      --lowrank-D 32 --R 4 --kinds tril,lowrank --repeat 5 --no-compile --results-dir "$1"' "$PY" "$ROOT/$OUTDIR"
  fi
  record correlated "$(status_of $STEP_RC)" "$STEP_SECONDS" \
    "$(grep '^key: ' "$STEPDIR/correlated.out" 2>/dev/null | sed 's/^key: //; s/ (.*//' | awk '{printf "%s; ", $0}' | head -c 400)"

  # 5c. the physics penalty of correlated components (bench/correlated_physics.py: the fused CUDA kernel of
  # correlated_penalty, a thread per sample and component, against its torch formulas under autograd), B = 128k, K = 8
  if [ "$DRY" = 1 ]; then
    run_step correlated_physics 120 bash -c 'cd bench && "$0" correlated_physics.py --device cpu --B 512 --K 8 \
      --repeat 3 --no-compile --no-memory --results-dir "$1"' "$PY" "$ROOT/$OUTDIR"
  else
    run_step correlated_physics 120 bash -c 'cd bench && "$0" correlated_physics.py --device cuda --B 131072 --K 8 \
      --repeat 5 --no-compile --results-dir "$1"' "$PY" "$ROOT/$OUTDIR"
  fi
  record correlated_physics "$(status_of $STEP_RC)" "$STEP_SECONDS" \
    "$(grep '^key: ' "$STEPDIR/correlated_physics.out" 2>/dev/null | sed 's/^key: //; s/ (.*//' | awk '{printf "%s; ", $0}' | head -c 400)"

  # 5. benchmarks ----------------------------------------------------------------------------------------
  local left=$(( BUDGET - ($(date +%s) - T0) - RESERVE ))
  local bench_args=(--gpu-check --device "$DEVICE" --key-numbers "$KEYS" --results-dir "$OUTDIR")
  [ "$DRY" = 1 ] && bench_args+=(--dry-run)
  # soft budget: stop starting new op points 45 s before the hard timeout (run.py also saves what it has on SIGTERM)
  bench_args+=(--budget-s $(( left > 60 ? left - 45 : 15 )))
  # with the lane-per-element schedule on when its tests and its agreement check passed (the numbers the default
  # would give if it were turned on; the schedules step has the ratio to the default schedules)
  local lanes_env=0
  [ "$DRY" = 0 ] && [ "${LANES_TESTS_RC:-1}" = 0 ] && [ "${SCHEDULES_RC:-1}" = 0 ] && lanes_env=1
  run_step bench 600 env PHYSMDN_CUDA_LANES=$lanes_env "$PY" bench/run.py "${bench_args[@]}"
  record bench "$(status_of $STEP_RC)" "$STEP_SECONDS" "$(head -1 "$KEYS" 2>/dev/null) (key numbers below; lanes schedule $([ $lanes_env = 1 ] && echo ON || echo off))"
  # the correlated ops' key lines (with their speedups) join the benchmark's key numbers
  grep '^key: ' "$STEPDIR/correlated.out" 2>/dev/null | sed 's/^key: /correlated /' >> "$KEYS"
  grep '^key: ' "$STEPDIR/correlated_physics.out" 2>/dev/null | sed 's/^key: /correlated physics /' >> "$KEYS"

  # 6. kernel profile (Nsight Compute), with what is left of the budget: memory throughput, occupancy, registers
  # and shared memory of each physmdn kernel in one fwd+bwd at B = 1M (bench/profile_case.py)
  local ncu; ncu=$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" 2>/dev/null | head -1 || true)
  if [ "$DRY" = 1 ]; then
    run_step profile 60 "$PY" bench/profile_case.py --device cpu --B 4096
    record profile "$(status_of $STEP_RC)" "$STEP_SECONDS" "dry run: the case on the CPU ($( [ -n "$ncu" ] && echo "found $ncu" || echo 'ncu not found'))"
  elif [ -n "$ncu" ]; then
    run_step profile 120 "$ncu" --profile-from-start off --target-processes all -k 'regex:nll|tiled|warp|sample|scale_by' \
      --launch-count 18 --csv --page raw --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__shared_mem_per_block_dynamic \
      "$PY" bench/profile_case.py --device cuda
    record profile "$(status_of $STEP_RC)" "$STEP_SECONDS" "ncu: $(grep -c '"' "$STEPDIR/profile.out" 2>/dev/null) csv lines (in the log)"
  else
    record profile "SKIP(no ncu)" 0 "Nsight Compute not found"
  fi
}

summary() {
  echo
  echo "================================ SUMMARY ================================"
  echo "physmdn GPU check $([ "$DRY" = 1 ] && echo '(DRY RUN on CPU: plumbing only, numbers meaningless)'), total $(( $(date +%s) - T0 ))s of ${BUDGET}s"
  printf '| %-11s | %-26s | %5s | %s\n' step status secs "key numbers"
  printf '|%s|%s|%s|%s\n' "-------------" "----------------------------" "-------" "------------"
  local i
  for i in "${!STEP_NAMES[@]}"; do
    printf '| %-11s | %-26s | %5s | %s\n' "${STEP_NAMES[$i]}" "${STEP_STATUS[$i]}" "${STEP_SECS[$i]}" "${STEP_NOTES[$i]}"
  done
  if [ -s "$KEYS" ]; then
    echo
    echo "benchmark key numbers (physmdn fwd+bwd; % of the measured copy bandwidth; speedup = other time / physmdn time):"
    sed 's/^/  /' "$KEYS"
  fi
  echo "log: $LOG"
}

# Everything goes to the terminal and the log; the summary comes last.
{
  main
  summary
} 2>&1 | tee "$LOG"

if [ -n "$COPY_TO" ]; then  # this run's outputs: the log, the key numbers, the results files it appended to
  mkdir -p "$COPY_TO" && find "$OUTDIR" -maxdepth 1 -type f -newer "$STEPDIR/.start" -exec cp {} "$COPY_TO"/ \;
fi
rm -rf "$STEPDIR"
if grep -qE '^\| [a-z_]+ +\| (FAIL|TIMEOUT)' "$LOG"; then exit 1; fi
exit 0
