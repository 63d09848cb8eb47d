#!/usr/bin/env bash
# GPU kernel tests, then the attention- and step-level benchmarks. Logs and JSON go to $OUT.
#   OUT=out bash benchmarks/run_gpu.sh [tests] [attention] [step] [cached] [cached_sparse]
# ATTN_ARGS / STEP_ARGS / CACHED_ARGS / CACHED_SPARSE_ARGS: extra arguments; ATTN_SWEEP=0: time only the default
# launch configs.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# No package index on the GPU machine: map the repo into the `sparsed_vllm` namespace the way
# setup.py's package_dir does (kernels/ -> sparsed_vllm.kernels), through a sitecustomize.
SHIM=$(mktemp -d)
cat >"$SHIM/sitecustomize.py" <<PY
import sparsed_vllm
sparsed_vllm.__path__.append("$PWD")
PY
export PYTHONPATH="$SHIM:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda)"
for part in "${@:-tests attention step}"; do
  for p in $part; do
    case $p in
      tests) python3 -m pytest tests/test_pattern.py tests/kernels -q -rs 2>&1 \
        | tee "$OUT/tests.log" ;;
      attention) python3 benchmarks/bench_attention.py $( [ "${ATTN_SWEEP:-1}" = 1 ] && echo --sweep ) \
        --out "$OUT/attention.json" \
        ${ATTN_ARGS:-} 2>&1 | tee "$OUT/attention.log" ;;
      cached) python3 benchmarks/bench_cached_attention.py --out "$OUT/cached_attention.json" \
        ${CACHED_ARGS:-} 2>&1 | tee "$OUT/cached_attention.log" ;;
      cached_sparse) python3 benchmarks/bench_cached_sparse.py --out "$OUT/cached_sparse.json" \
        ${CACHED_SPARSE_ARGS:-} 2>&1 | tee "$OUT/cached_sparse.log" ;;
      step) python3 benchmarks/bench_step.py --out "$OUT/step.json" \
        $( [ -f "$OUT/attention.json" ] && echo --attention-json "$OUT/attention.json") \
        ${STEP_ARGS:-} 2>&1 | tee "$OUT/step.log" ;;
    esac
  done
done
