#!/usr/bin/env bash
# One call on a GPU machine: build for sm_90, run the test suite on
# CUDA, run the benchmarks, write logs and JSON under $OUT, print a short summary last.
#
#   bash scripts/gpu_check.sh [build] [tests] [bench] [model-bench]     (default: all four)
#   TESTS="tests/ops/test_norm_pix_loss.py" bash scripts/gpu_check.sh build tests
#   BENCHES="bench/bench_gather_tokens.py" TEST_TIMEOUT=300 bash scripts/gpu_check.sh build tests bench
#   bash scripts/gpu_check.sh build graph-bench     (not in the default: TrainStep's GPU tests, then
#        reference / mae_fast / mae_fast+graph for ViT-B/16 and ViT-L/16, batch 256, bf16; at most 450 s)
#
# Uses the machine's python3 (torch with CUDA) as is: no venv, no installs beyond this package.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
stages=${*:-build tests bench model-bench}
summary=()
note() { summary+=("$1"); echo "== $1"; }
has() { [[ " $stages " == *" $1 "* ]]; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # optional carried wheels (e.g. xformers)
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

# At most 8 files come back from $OUT: build.log, tests.log, bench.log and the JSON results.
$PY - <<'EOF' 2>&1
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
EOF

if has build; then
  t0=$SECONDS
  if TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1; then
    note "build: ok ($((SECONDS - t0)) s), cuda_compiled=$($PY -c 'import mae_fast; print(mae_fast._C.cuda_compiled())')"
  else
    tail -40 "$OUT/build.log"
    note "build: FAILED (see build.log)"
    exit 1
  fi
fi

if has tests; then
  t0=$SECONDS
  timeout "${TEST_TIMEOUT:-420}" $PY -m pytest -q -rs -p no:randomly ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
  note "tests: $(tail -1 "$OUT/tests.log") ($((SECONDS - t0)) s)"
fi

if has bench; then
  for script in ${BENCHES:-bench/bench_*.py}; do
    name=$(basename "$script" .py)
    t0=$SECONDS
    echo "######## $script" >>"$OUT/bench.log"
    if timeout "${BENCH_TIMEOUT:-240}" $PY "$script" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1; then
      note "$name: ok ($((SECONDS - t0)) s)"
    else
      note "$name: FAILED rc=$? (see bench.log)"
    fi
    cat "$OUT/$name.txt" >>"$OUT/bench.log"; tail -25 "$OUT/$name.txt"; rm -f "$OUT/$name.txt"
  done
fi

if has model-bench; then
  t0=$SECONDS
  timeout 300 $PY -m mae_fast bench --json "$OUT/bench_model.json" --no-progress 2>&1 | tee -a "$OUT/bench.log"
  note "mae-fast bench: rc=$? ($((SECONDS - t0)) s)"
fi

if has graph-bench; then
  t0=$SECONDS
  timeout 150 $PY -m pytest -q -rs -p no:randomly -m gpu tests/test_train.py 2>&1 | tee "$OUT/train_tests.log" | tail -15
  note "TrainStep gpu tests: $(tail -1 "$OUT/train_tests.log") ($((SECONDS - t0)) s)"
  for m in vit_b16:mae_vit_base_patch16 vit_l16:mae_vit_large_patch16; do
    t0=$SECONDS
    echo "######## mae-fast bench ${m#*:} graph" >>"$OUT/bench.log"
    timeout 150 $PY -m mae_fast bench --model "${m#*:}" --batch-size 256 --dtype bf16 --no-progress \
      --variants reference,mae_fast,mae_fast+graph --json "$OUT/h200_graph_${m%%:*}_bs256_bf16.json" 2>&1 | tee -a "$OUT/bench.log"
    note "graph bench ${m#*:}: rc=${PIPESTATUS[0]} ($((SECONDS - t0)) s)"
  done
fi

echo
echo "================ summary"
printf '%s\n' "${summary[@]}"
