#!/usr/bin/env bash
# The whole GPU check in one command, for a GPU machine that has only this tree (no network;
# torch, triton, pytest preinstalled): install in place, run the test suite on the GPU, run the
# benchmark, and write everything under one directory. Budget: about 11 minutes in all, so on a
# machine lent with a 10-minute limit per command run it as two calls, e.g.
#   SECTIONS="tests cuda" bash bench/gpu_suite.sh OUT   then   SECTIONS="bench family" bash bench/gpu_suite.sh OUT
# (each call installs and builds again: a fresh machine keeps nothing).
#
#   bash bench/gpu_suite.sh [OUT_DIR]      (default: bench/results/gpu_<date>)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-bench/results/gpu_$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
SECTIONS=" ${SECTIONS:-tests cuda bench family} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
exec > >(tee -a "$OUT/suite.log") 2>&1

echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

echo "== install (no network: no dependencies, no build isolation; the CUDA extension is JIT-built next)"
FUSED_CONTRASTIVE_SKIP_CUDA_BUILD=1 $PY -m pip install --no-deps --no-build-isolation --no-index -e . \
  > "$OUT/install.log" 2>&1 || { echo "pip install failed, see install.log"; tail -20 "$OUT/install.log"; }

echo "== build the CUDA extension once (cached for the tests and the benchmark), for this GPU only"
timeout 240 $PY -c "
import time; t = time.time()
from fused_contrastive import cuda_supcon
module, reason = cuda_supcon.extension()
print('cuda extension:', 'built' if module else reason, f'({time.time() - t:.0f} s)')
" 2>&1 | tail -20
$PY -m fused_contrastive.info | tee "$OUT/info.txt"

want tests && {
echo "== tests (GPU present: the gpu-marked tests run too; the AOT compile check and the CPU emulation of the CUDA kernels are CI's)"
timeout 200 $PY -m pytest -q --junitxml="$OUT/tests.xml" -k "not aot_compile and not emulated" tests 2>&1 | tail -30
echo "tests exit code: ${PIPESTATUS[0]}"
}

want cuda && {
echo "== CUDA C++ against Triton at the issue's size (N = 32768, D = 128, bf16 fwd+bwd), same run"
timeout 150 $PY bench/run.py --out "$OUT" --tag cuda_vs_triton --providers triton,cuda --sizes 8192,32768 \
  --dims 128 --dtypes bfloat16
echo "cuda vs triton exit code: $?"
# The WMMA family on the same inputs, for the register-tile kernels' own comparison.
FUSED_CONTRASTIVE_CUDA_KERNELS=wmma timeout 90 $PY bench/run.py --out "$OUT" --tag cuda_wmma --providers cuda \
  --sizes 8192,32768 --dims 128 --dtypes bfloat16
echo "cuda (wmma) exit code: $?"
}

want bench && {
echo "== benchmark"
timeout 200 $PY bench/run.py --out "$OUT" --tag gpu --max-minutes 2.5 --providers "${PROVIDERS:-chunked,triton,cuda,reference,supcontrast,supcontrast-compiled,pml,infcl}"
echo "benchmark exit code: $?"
}

want family && {
echo "== the loss family and the distributed path on one rank (N = 16384, bf16)"
timeout 130 $PY bench/family.py --out "$OUT" --tag family_gpu --sizes 16384 --backends triton,chunked
echo "family benchmark exit code: $?"
}
echo "== done: $OUT"
ls -la "$OUT"
