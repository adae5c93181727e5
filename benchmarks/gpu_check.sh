#!/usr/bin/env bash
# The GPU check, from a clean checkout, in < 10 minutes on one H100:
#   install (editable, no deps), build the C++/CUDA extension (in the background, niced), the kernel
#   microbenchmarks, then (with the extension) the 8-bit GEMM microbenchmarks, the 1.3B end-to-end benchmark
#   (14B with --with-14b) and the `gpu` tests, then one summary.json and a short table, printed last.
#
#   bash benchmarks/gpu_check.sh [--stages install,kernels,quant,e2e,tests,compile,profile,summary] [bench_e2e args...]
#
# "profile" (not in the default stages): where one DiT step's GPU time goes, by kernel (profile_step.py),
# for the 1.3B and 14B presets, bf16 and fp8 linears + 8-bit attention, into profile.log.
# "compile" (not in the default stages; ~150 s): diffusers' torch.compile'd 1.3B step (and its eager step)
# in a bench_e2e run of its own, into $OUT/compile/ (summarize.py merges it: diffusers_step_ms_1.3b_compiled).
#
# Results (CSV, JSON, logs) go to $OUT when set, else benchmarks/out/. Wheels of missing packages
# (diffusers, as the baseline) are installed from .whl/ when that folder exists (benchmarks/fetch_wheels.sh
# downloads them on a machine with an index; carry .whl to the GPU machine).
#
# Time: the whole script keeps within GPU_CHECK_BUDGET seconds (default 540), the summary included. Each
# stage runs under `timeout` at the smaller of its own cap and the time left; a stage with under 30 s left
# is skipped (GPU_CHECK_E2E_CAP: bench_e2e's cap, default 240 s). Cut or skipped stages are listed in $OUT/stages_cut.txt and named in the summary's absent
# figures; the benchmarks write their outputs after every section, so a cut stage keeps what it measured.
#
# LX2V_COMMIT=<hash> names the measured code in every output where the checkout's git metadata may be stale
# (a working tree copied to the GPU machine printed an older commit twice).
#
# GPU_CHECK_PACK=1 (for a transfer that brings back few files, e.g. 8): at the end every file under $OUT goes
# into $OUT/all.tar.gz, and only what a reader needs first stays beside it, flat: summary.json,
# summary_table.txt (the table printed last), the tuned-defaults file (tuned_<device>.json), gpu_tests.log,
# gpu_test_times.txt (seconds per test, written as they finish) and stages_cut.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=install,kernels,quant,e2e,tests,summary  # (run in this order whatever the list says)
if [ "${1:-}" = "--stages" ]; then STAGES=$2; shift 2; fi
E2E_ARGS=("$@")
has() { [[ ",$STAGES," == *",$1,"* ]]; }
stage() { echo "=== $1 ($(date -u +%T))"; }
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-540}
SUMMARY_RESERVE=20
MIN_STAGE=${GPU_CHECK_MIN_STAGE:-30}  # (lowered by the tests only)
: >"$OUT/stages_cut.txt"

# capped NAME CAP LOG TAIL CMD...: CMD under `timeout` at min(CAP, seconds left before the summary's
# reserve), its output in $OUT/LOG and its last TAIL lines on the terminal; returns CMD's exit code
# (124 or 137: cut at the cap), or 125 when the budget has no room left for the stage.
capped() {
  local name=$1 cap=$2 log=$3 tailn=$4
  shift 4
  local left=$(( T0 + BUDGET - SUMMARY_RESERVE - $(date +%s) ))
  (( left < cap )) && cap=$left
  if (( cap < MIN_STAGE )); then
    echo "$name: skipped, ${left} s of the ${BUDGET} s budget left" | tee -a "$OUT/stages_cut.txt"
    return 125
  fi
  timeout -k 10 "$cap" "$@" 2>&1 | tee "$OUT/$log" | tail -n "$tailn"
  local rc=${PIPESTATUS[0]}
  # (137: still running 10 s after the cut's TERM, so killed; a cut all the same)
  if (( rc == 124 || rc == 137 )); then echo "$name: cut at ${cap} s" | tee -a "$OUT/stages_cut.txt"; fi
  return "$rc"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

if has install; then
  stage install
  LX2V_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
    || echo "install failed: see $OUT/install.log"
  stage "build extension (background, log in build.log)"
  # (niced: it runs beside the kernel timings, whose launches it must not delay)
  (LX2V_REQUIRE_CUDA_BUILD=1 MAX_JOBS=8 NVCC_THREADS=4 nice -n 15 timeout -k 10 300 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
   echo $? >"$OUT/build.rc") &
  BUILD_PID=$!
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/env.txt"

# The Gluon attention kernel was written without a GPU: its first run is a smoke test in its own process,
# cut at 90 s. On an error or a hang the kernel is switched off for everything that follows (the benchmarks
# skip it, its tests skip, the "gluon" backend falls back to the Triton kernel).
if has kernels || has tests || has e2e || has profile; then
  stage "gluon attention smoke test"
  capped gluon_smoke 90 gluon_smoke.log 1000 $PY benchmarks/gluon_smoke.py
  rc=$?
  if [ "$rc" != 0 ]; then
    export LX2V_ATTN_GLUON_OFF=1
    echo "Gluon attention switched off for this run (smoke test exit code $rc; 124: it hung; 125: no time left for it)"
  fi
fi

KRC=125
if has kernels; then
  stage "bench_kernels"
  capped bench_kernels 300 bench_kernels.log 40 $PY benchmarks/bench_kernels.py --quick --out "$OUT"
  KRC=$?
fi

# The fastest correct kernels measured above (in this run: not a summary left in $OUT by an earlier one)
# become this GPU's tuned defaults ($OUT/tuned/<device>.json, the format of kernels/tuned/): the end-to-end
# run uses them, before the package's file (variables set by hand still win); copying the file into
# kernels/tuned/ makes them the card's defaults. Only from a whole run: a cut one may lack the configs timed
# last (Gluon), and its choice would override the package's better default.
KS="$OUT/kernels_summary.json"
if has kernels && (( KRC == 0 )) && [ -f "$KS" ] && (( $(stat -c %Y "$KS") >= T0 )) \
    && $PY benchmarks/summarize.py --write-tuned "$KS" "$OUT/tuned"; then
  export LX2V_TUNED="$OUT/tuned"
elif has kernels; then
  echo "no tuned file from this run (bench_kernels exit code $KRC): the package's defaults stay"
fi

# the extension before the 8-bit GEMM and end-to-end figures, the tests and the profile (their quantization
# is its kernel); a stage list without them (e.g. install,compile) does not wait for it. The wait counts
# against the budget: past the time left the build is stopped and those stages run with the fallback.
if [ -n "${BUILD_PID:-}" ] && { has quant || has e2e || has tests || has profile; }; then
  left=$(( T0 + BUDGET - SUMMARY_RESERVE - $(date +%s) ))
  waited=0
  while kill -0 "$BUILD_PID" 2>/dev/null && (( waited < left )); do sleep 1; waited=$(( waited + 1 )); done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    pkill -P "$BUILD_PID" 2>/dev/null; kill "$BUILD_PID" 2>/dev/null
    echo "extension build: stopped after ${waited} s (the budget's time left); the fallback quantization runs" \
      | tee -a "$OUT/stages_cut.txt"
  fi
  wait "$BUILD_PID" 2>/dev/null
  echo "extension build exit code: $(cat "$OUT/build.rc" 2>/dev/null || echo none) (log: build.log)"
  tail -3 "$OUT/build.log"
  $PY -c "from lightx2v_engine.csrc_ops import csrc_status; print('csrc:', csrc_status())"
fi

# bench_quant before e2e and the tests: its three required figures were lost to the budget before
if has quant; then
  stage "bench_quant"
  capped bench_quant 120 bench_quant.log 25 $PY benchmarks/bench_quant.py --out "$OUT"
fi

if has e2e; then
  stage "bench_e2e"
  capped bench_e2e "${GPU_CHECK_E2E_CAP:-240}" bench_e2e.log 45 $PY benchmarks/bench_e2e.py --out "$OUT" --offload \
    --lora-switch "${E2E_ARGS[@]}"
fi

if has tests; then
  stage "gpu tests"
  : >"$OUT/gpu_test_times.txt"
  # With pytest-xdist (carried in .whl/ by fetch_wheels.sh), GPU_TEST_WORKERS processes share the GPU: the
  # tests' Triton compiles (CPU-bound) and small launches overlap. "--dist load" hands tests out in run order,
  # so the `last`-marked ones still come last. GPU_TEST_WORKERS=0 (or no xdist): one process.
  XDIST=()
  if (( ${GPU_TEST_WORKERS:-4} > 0 )) && $PY -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${GPU_TEST_WORKERS:-4}" --dist load)
  fi
  echo "gpu tests: ${XDIST[*]:-one process}"
  capped gpu_tests 300 gpu_tests.log 25 env LX2V_TEST_TIMES="$(realpath "$OUT")/gpu_test_times.txt" \
    $PY -m pytest -q -m gpu -p no:cacheprovider --durations=25 "${XDIST[@]}" tests
fi

if has compile; then
  stage "diffusers torch.compile baseline"
  capped compile 240 compile.log 20 $PY benchmarks/bench_e2e.py --out "$OUT/compile" --presets 1.3b \
    --skip dit text vae distill --diffusers-compile
fi

if has profile; then
  stage "profile_step"
  capped profile 200 profile.log 60 bash -c "for p in wan2.1-t2v-1.3b wan2.1-t2v-14b; do
      $PY benchmarks/profile_step.py --preset \$p --top 20; $PY benchmarks/profile_step.py --preset \$p --attn8 --top 20
    done"
fi

if [ -n "${BUILD_PID:-}" ] && kill -0 "$BUILD_PID" 2>/dev/null; then  # (no stage run needed it)
  pkill -P "$BUILD_PID" 2>/dev/null; kill "$BUILD_PID" 2>/dev/null; wait "$BUILD_PID" 2>/dev/null
  echo "extension build stopped: no stage of this run needed it"
fi
echo "total $(( $(date +%s) - T0 )) s"
if has summary; then
  stage summary
  # (--since: summaries an earlier run left in $OUT are named stale, not merged as this run's figures)
  $PY benchmarks/summarize.py "$OUT" --since "$T0" | tee "$OUT/summary_table.txt"
fi

if [ "${GPU_CHECK_PACK:-0}" = 1 ]; then
  # everything into one archive; the first-read files stay beside it, flat (at most 7 files in all)
  # (tar's exit code 1, "file changed as we read it", still made a whole archive)
  tar -czf /tmp/lx2v_all.tar.gz -C "$OUT" .
  if (( $? <= 1 )); then
    rm -rf "${OUT:?}"/.[!.]* "${OUT:?}"/* 2>/dev/null
    mv /tmp/lx2v_all.tar.gz "$OUT/all.tar.gz"
  fi
  for f in summary.json stages_cut.txt gpu_tests.log gpu_test_times.txt summary_table.txt; do
    tar -xzf "$OUT/all.tar.gz" -C "$OUT" "./$f" 2>/dev/null
  done
  for t in $(tar -tzf "$OUT/all.tar.gz" | grep '^\./tuned/.*\.json$'); do
    tar -xzOf "$OUT/all.tar.gz" "$t" >"$OUT/tuned_$(basename "$t")"
  done
  echo "packed: $(ls "$OUT" | tr '\n' ' ')"
  if has summary && [ -f "$OUT/summary_table.txt" ]; then cat "$OUT/summary_table.txt"; fi  # (the table last)
fi
