#!/usr/bin/env bash
# The whole first GPU run in ONE call of at most 8 minutes, priority-ordered, every step time-boxed and
# writing its result file as soon as it finishes (a kill mid-way leaves everything that finished):
#
#   1. environment.txt  GPU, driver, versions, load (nvidia-smi, load average, other GPU processes)
#   2. install.log      pip install -e . (no network, no build isolation): FATAL on failure; then the
#                       Inf-CL / memeff wheels from .whl/ when carried ("not carried" otherwise)
#   3. cuda_build.log   the CUDA extension, built for this GPU only (TORCH_CUDA_ARCH_LIST from its
#                       capability) in the background while steps 4 runs; waited for before step 5
#   4. smoke.txt        bench/gpu_smoke.py: every loss x triton/chunked x fp32/bf16/fp16 x N 1/127/4099 x
#                       temperature 0.01/0.5 against float64, one line per case, a summary line
#   5. smoke.txt        the same for cuda, appended
#   6. headline.md/json bench/headline.py: bf16 GEMM rate, SupCon and CLIP headline timings, largest N
#   7. tests.txt        the GPU-marked tests, stopped by SIGINT at their time box (pytest still writes
#                       its summary)
#   8. suite.log        everything printed, and one "step NAME: exit CODE (SECONDS s)" line per step
# Eight files: what a lent GPU machine sends back from $OUT at most.
#
# THE CALL, for the next session with a GPU (the device tool's `run`, from the repository root):
#   command:   bash bench/gpu_suite.sh "$OUT"
#   carry:     [".whl", ".compat_libs"]
#                           (.whl/ holds inf_cl-1.2.1-py3-none-any.whl and memeff-0.3.1-py3-none-any.whl;
#                            fetch them with `make gpu-wheels`; absent, the suite says "not carried";
#                            .compat_libs/open_clip/loss.py is open_clip's, for the SigLIP comparison:
#                            make setup installs it there; absent, that provider is "skipped")
#   timeout_s: 540          (the suite budgets 450 s and ends by about 480 s even when a step must be
#                            killed; the rest is margin for the transfers)
# Then copy the eight returned files (files_at) to bench/results/gpu_<date>/ and commit them.
#
# CI rehearses this script on CPU (tests/test_gpu_suite.py; REHEARSAL=1: TRITON_INTERPRET=1, tiny sizes,
# the providers that exist on CPU, no nvidia-smi, pip --dry-run) so that it cannot rot between GPU runs.
#
#   bash bench/gpu_suite.sh [OUT_DIR]      (default: bench/results/gpu_<date>)
#   env: PYTHON (default python3), REHEARSAL=1, SUITE_BUDGET_S (default 450; 85 in rehearsal)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/results/gpu_$(date -u +%Y-%m-%d)}
REHEARSAL=${REHEARSAL:-0}
BUDGET=${SUITE_BUDGET_S:-$([[ "$REHEARSAL" == 1 ]] && echo 85 || echo 450)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/suite.log"
exec > >(tee -a "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1
START=$SECONDS
FAILED=()
STEPS=()

if [[ "$REHEARSAL" == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  # Tiny sizes: the same code paths, in seconds.
  SMOKE_ARGS=(--sizes 1,3 --dtypes bfloat16 --temperatures 0.01 --dim 8 --workers 1)
  SMOKE_CUDA_ARGS=(--losses supcon,clip --workers 0)
  HEADLINE_ARGS=(--rehearsal --largest-box 4)
  TEST_PATHS=(tests/test_gpu.py)  # every gpu-marked test is there; collecting all of tests/ costs CI seconds
  # CI's boxes for its 85 s budget; a larger budget (a loaded machine) stretches them alike.
  stretch() { echo $(($1 * (BUDGET > 85 ? BUDGET : 85) / 85)); }
  BOX_ENV=$(stretch 20) BOX_INSTALL=$(stretch 60) BOX_BUILD=$(stretch 60) BOX_SMOKE=$(stretch 30) BOX_SMOKE_CUDA=$(stretch 15) BOX_HEADLINE=$(stretch 45)
  BOX_TESTS=$(stretch 40)
  DRY_RUN=(--dry-run)  # the install is checked (metadata, setup.py) without touching the environment
else
  SMOKE_ARGS=()
  SMOKE_CUDA_ARGS=()
  HEADLINE_ARGS=()
  TEST_PATHS=(tests)
  BOX_ENV=30 BOX_INSTALL=120 BOX_BUILD=300 BOX_SMOKE=110 BOX_SMOKE_CUDA=45 BOX_HEADLINE=210 BOX_TESTS=170
  DRY_RUN=()
fi

left() { echo $((BUDGET - (SECONDS - START))); }
# box N: N seconds, or what the suite's budget still allows (less 10 s for the closing summary); at
# least 1, since `timeout 0` would mean no limit at all.
box() { local l; l=$(($(left) - 10)); l=$(($1 < l ? $1 : l)); echo $((l < 1 ? 1 : l)); }
step_end() {  # step_end NAME EXIT STARTED
  STEPS+=("step $1: exit $2 ($((SECONDS - $3)) s)")
  echo "${STEPS[-1]}"
  [[ "$2" == 0 ]] || FAILED+=("$1")
}

echo "== gpu_suite: $(date -u +%FT%TZ), out $OUT, budget ${BUDGET} s, rehearsal $REHEARSAL"

# ---------------------------------------------------------------- 1. environment
T=$SECONDS
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -srm), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  free -g 2>/dev/null | sed -n 2p | awk '{print "memory: " $2 " GiB total, " $7 " GiB available"}'
  if [[ "$REHEARSAL" == 1 ]]; then
    echo "nvidia-smi: not run (rehearsal on CPU)"
  elif command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit --format=csv
    echo "other processes on the GPU (load):"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && echo "nvcc: $(nvcc --version | tail -1)" || echo "nvcc: not found"
  timeout "$(box $BOX_ENV)" "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError as err:
    print('triton: not importable:', err)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    print(f'device: {p.name}, capability {major}.{minor}, {p.multi_processor_count} SMs, '
          f'{p.total_memory / 2**30:.0f} GiB, {getattr(p, \"L2_cache_size\", 0) / 2**20:.0f} MB L2')
    # 9.0a: Hopper's arch-specific target (its own instructions); other GPUs their plain capability.
    print('ARCH', f'{major}.{minor}' + ('a' if (major, minor) == (9, 0) else ''))
else:
    print('device: no CUDA device')
"
} > "$OUT/environment.txt" 2>&1
RC=$?
cat "$OUT/environment.txt"
ARCH=$(sed -n 's/^ARCH //p' "$OUT/environment.txt")
[[ -n "$ARCH" ]] && export TORCH_CUDA_ARCH_LIST="$ARCH"
step_end environment $RC $T

# ---------------------------------------------------------------- 2. install (fatal) + carried wheels
T=$SECONDS
echo "== install ${DRY_RUN[*]}"
FUSED_CONTRASTIVE_SKIP_CUDA_BUILD=1 timeout "$(box $BOX_INSTALL)" "$PY" -m pip install --no-deps --no-build-isolation \
  --no-index "${DRY_RUN[@]}" -e . > "$OUT/install.log" 2>&1
RC=$?
if [[ $RC != 0 ]]; then
  echo "install FAILED (exit $RC): the rest cannot run. Last lines of install.log:"
  tail -30 "$OUT/install.log"
  step_end install $RC $T
  exit 2
fi
SITE=$(mktemp -d)
for pin in inf_cl-1.2.1 memeff-0.3.1; do
  wheel=$(ls .whl/${pin}-*.whl 2>/dev/null | head -1)
  if [[ -z "$wheel" ]]; then
    echo "wheel $pin: not carried (no .whl/${pin}-*.whl)" | tee -a "$OUT/install.log"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$wheel" >> "$OUT/install.log" 2>&1; then
    echo "wheel $pin: installed from $wheel" | tee -a "$OUT/install.log"
  else
    echo "wheel $pin: install FAILED (see install.log)" | tee -a "$OUT/install.log"
  fi
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
tail -3 "$OUT/install.log"
step_end install 0 $T

# ---------------------------------------------------------------- 3. CUDA extension, in the background
T_BUILD=$SECONDS
echo "== cuda build (background, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset})"
timeout -s INT -k 10 "$(box $BOX_BUILD)" "$PY" -c "
import time, torch
t = time.time()
from fused_contrastive import cuda_supcon
module, reason = cuda_supcon.extension()
print('cuda extension:', 'built' if module else 'unavailable: ' + reason, f'({time.time() - t:.0f} s)')
raise SystemExit(1 if module is None and torch.cuda.is_available() else 0)
" > "$OUT/cuda_build.log" 2>&1 &
BUILD_PID=$!

# ---------------------------------------------------------------- 4. smoke: triton, chunked
T=$SECONDS
echo "== smoke: triton, chunked"
S=$(box $BOX_SMOKE)
timeout -s INT -k 15 $((S + 15)) "$PY" bench/gpu_smoke.py --out "$OUT/smoke.txt" --backends triton,chunked \
  --time-box "$S" "${SMOKE_ARGS[@]}" > /dev/null
RC=$?
grep -E '^(FAIL|ERROR|# n/a|SUMMARY)' "$OUT/smoke.txt" | head -40
step_end smoke $RC $T

# ---------------------------------------------------------------- 5. wait for the build, smoke: cuda
T=$SECONDS
wait $BUILD_PID
RC=$?
cat "$OUT/cuda_build.log" | tail -20
step_end cuda_build $RC $T_BUILD
CUDA_OK=$RC
T=$SECONDS
if [[ $CUDA_OK == 0 ]]; then
  echo "== smoke: cuda"
  S=$(box $BOX_SMOKE_CUDA)
  timeout -s INT -k 15 $((S + 15)) "$PY" bench/gpu_smoke.py --out "$OUT/smoke.txt" --append --backends cuda \
    --time-box "$S" "${SMOKE_ARGS[@]}" "${SMOKE_CUDA_ARGS[@]}" > /dev/null
  RC=$?
  sed -n '/backends cuda/,$p' "$OUT/smoke.txt" | grep -E '^(FAIL|ERROR|# n/a|SUMMARY)' | head -40
else  # a failed build would be retried by every process that asks for the backend: leave it out
  echo "SUMMARY cuda: not run (the CUDA extension did not build, see cuda_build.log)" | tee -a "$OUT/smoke.txt"
  RC=0
fi
step_end smoke_cuda $RC $T

# ---------------------------------------------------------------- 6. headline timings
T=$SECONDS
echo "== headline"
SKIP=()
[[ $CUDA_OK == 0 ]] || SKIP=(--skip cuda)
S=$(box $BOX_HEADLINE)
timeout -s INT -k 15 $((S + 10)) "$PY" bench/headline.py --out-dir "$OUT" --time-box "$S" "${HEADLINE_ARGS[@]}" \
  "${SKIP[@]}"
step_end headline $? $T

# ---------------------------------------------------------------- 7. GPU-marked tests (SIGINT: pytest writes its summary)
T=$SECONDS
echo "== tests (-m gpu)"
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && [[ "$REHEARSAL" != 1 ]] && XDIST=(-n 8)
DESELECT=()
[[ $CUDA_OK == 0 ]] || DESELECT=(-k "not cuda")
S=$(box $BOX_TESTS)
if (( S > 5 )); then
  timeout -s INT -k 20 "$S" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rfE "${XDIST[@]}" "${DESELECT[@]}" "${TEST_PATHS[@]}" \
    > "$OUT/tests.txt" 2>&1
  RC=$?
  [[ $RC == 124 ]] && echo "(stopped by SIGINT at the ${S} s time box)" >> "$OUT/tests.txt"
else
  echo "not run: the suite's ${BUDGET} s budget was spent" > "$OUT/tests.txt"
  RC=124
fi
grep -E '^(FAILED|ERROR)' "$OUT/tests.txt" | head -20
tail -2 "$OUT/tests.txt"
step_end tests $RC $T

# ---------------------------------------------------------------- summary (last: the run tool returns the tail)
echo
echo "== summary ($((SECONDS - START)) s of ${BUDGET} s)"
printf '%s\n' "${STEPS[@]}"
grep -h '^SUMMARY' "$OUT/smoke.txt"
grep -h -E '^(wheel|cuda extension)' "$OUT/install.log" "$OUT/cuda_build.log"
sed -n '/^## /,$p' "$OUT/headline.md" 2>/dev/null | grep -E '^(## |\| [a-z]|torch.matmul|Largest)' | cut -c1-200
tail -1 "$OUT/tests.txt"
ls "$OUT"
if (( ${#FAILED[@]} )); then
  echo "steps that did not exit 0: ${FAILED[*]}"
  exit 1
fi
