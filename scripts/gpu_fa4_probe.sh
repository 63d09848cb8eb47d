#!/usr/bin/env bash
# FlashAttention-4 on the GPU machine: stage the bundle, report which imports work, run the FA4
# GPU tests and the FA4 / Triton / Flex benchmark. Output under $OUT (default out).
#   FA4_BUNDLE=.gpu_fa4 bash scripts/gpu_fa4_probe.sh
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
SITE=${FA4_SITE:-/tmp/fa4-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/stage.log"
bash scripts/gpu_fa4_stage.sh 2>&1 | tail -20 | tee -a "$OUT/stage.log"
# The checkout maps into the `sparsed_vllm` namespace as setup.py's package_dir does.
SHIM=$(mktemp -d)
echo "import sparsed_vllm; sparsed_vllm.__path__.append('$PWD')" >"$SHIM/sitecustomize.py"
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$SHIM:$PWD"
python3 - <<'PY' 2>&1 | tee "$OUT/import.log"
import importlib, sys, traceback
print(sys.version)
for name in ["torch", "triton", "numpy", "cuda.bindings", "tvm_ffi", "cutlass", "cutlass.cute",
             "quack", "vllm.vllm_flash_attn.cute.interface"]:
    try:
        module = importlib.import_module(name)
        print("OK", name, getattr(module, "__version__", ""), getattr(module, "__file__", ""))
    except Exception:
        traceback.print_exc()
PY
timeout -s INT "${TEST_S:-180}" python3 -m pytest tests/kernels/test_fa4.py -q -rs 2>&1 \
  | tee "$OUT/tests.log"
timeout -s INT "${BENCH_S:-240}" python3 benchmarks/bench_fa4.py --budget-s "${BUDGET_S:-160}" \
  --varlen-check --out "$OUT/fa4.json" 2>&1 | tee "$OUT/bench.log"
