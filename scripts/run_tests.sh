#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, then pytest (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
# Test-only helpers (Ray on CPU, rank probes) are a distribution of their own, never shipped.
if ! .venv/bin/python -c "import sparsed_vllm_testing" 2>/dev/null; then
  .venv/bin/uv pip install -q --python .venv/bin/python -e tests/support
fi
# Triton for running the kernels on the CPU through its interpreter, kept outside the venv:
# vLLM's CPU build must not find a Triton (it would take it for triton-cpu).
TRITON_DIR=.triton-interpret
if ! .venv/bin/python -c "import triton" 2>/dev/null && [[ ! -f $TRITON_DIR/.installed ]]; then
  .venv/bin/uv pip install -q --python .venv/bin/python --target "$TRITON_DIR" --no-deps \
    "triton==3.6.0"
  touch "$TRITON_DIR/.installed"
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest tests "$@"
# The Triton kernels against their references, interpreted on the CPU, in a process of their own.
if [[ -f $TRITON_DIR/.installed ]]; then
  TRITON_INTERPRET=1 PYTHONPATH="$TRITON_DIR" .venv/bin/python -m pytest \
    tests/kernels/test_interpreted.py "$@"
fi
