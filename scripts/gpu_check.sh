#!/usr/bin/env bash
# The prepared calls on a lent GPU machine (an H100 or H200; 15 minutes of device time in all, 10 a call).
#
#   bash scripts/gpu_check.sh              the first call, at most 8 minutes: build for sm_90 (about 1-2 min),
#                                          then scripts/gpu_check.py (smoke set, TrainStep, pretrain, bench
#                                          ViT-B/16 and ViT-L/16, attention backends, one table last)
#   bash scripts/gpu_check.sh --second     the second call, if time is left: the whole GPU test suite, then the
#                                          per-op benches (each capped)
#   OUT=dir bash scripts/gpu_check.sh --dry-run
#                                          every stage of the first call on a machine without a GPU (tiny sizes,
#                                          the ops through Triton's interpreter): the same files and table. CI
#                                          runs it, so this script cannot rot.
#
# Files go to $OUT (default ./out): at most 8, named after the device (torch.cuda.get_device_name()).
# Uses the machine's python3 as is (no venv; nothing is installed but this package). Set MAE_FAST_COMMIT to
# the commit being measured: the results record it (the machine's copy of the tree has no usable git).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
mode=${1:-first}
t_start=$SECONDS

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # optional carried wheels (e.g. xformers)
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

$PY - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
try:
    import setuptools; print("setuptools", setuptools.__version__)
except ImportError:
    print("setuptools missing")
EOF

build() {
  local t0=$SECONDS log
  log=$(mktemp)
  if TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-deps --no-build-isolation -e . >"$log" 2>&1; then
    echo "== build: ok ($((SECONDS - t0)) s), cuda_compiled=$($PY -c 'import mae_fast; print(mae_fast._C.cuda_compiled())')"
  else
    tail -40 "$log"
    echo "== build: FAILED ($((SECONDS - t0)) s)"
    return 1
  fi
}

case "$mode" in
  --dry-run)
    # the build is the set-up's (make); the stages run on the CPU
    $PY scripts/gpu_check.py --dry-run --out "$OUT" --budget "${BUDGET:-600}"
    ;;
  first)
    build || exit 1
    # 8 minutes for the call: what the build took is not left for the stages
    $PY scripts/gpu_check.py --out "$OUT" --budget "$(( ${BUDGET:-470} - (SECONDS - t_start) ))"
    ;;
  --second)
    build || exit 1
    slug=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '_', torch.cuda.get_device_name(0).lower()).strip('_'))")
    t0=$SECONDS
    timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rs -p no:randomly -m gpu tests 2>&1 | tee "$OUT/${slug}_gpu_tests.log" | tail -40
    echo "== gpu tests: $(tail -1 "$OUT/${slug}_gpu_tests.log") ($((SECONDS - t0)) s)"
    for script in ${BENCHES:-bench/bench_qkv_attention.py bench/bench_mlp.py bench/bench_add_layer_norm.py bench/bench_norm_pix_loss.py bench/bench_gather_tokens.py bench/bench_resized_crop.py}; do
      t0=$SECONDS
      echo "######## $script" >>"$OUT/${slug}_benches.log"
      timeout "${BENCH_TIMEOUT:-60}" $PY "$script" --no-compile >>"$OUT/${slug}_benches.log" 2>&1
      echo "== $(basename "$script" .py): rc=$? ($((SECONDS - t0)) s)"
    done
    tail -80 "$OUT/${slug}_benches.log"
    ;;
  *)
    echo "usage: bash scripts/gpu_check.sh [--second | --dry-run]" >&2
    exit 2
    ;;
esac
