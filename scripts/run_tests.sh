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
.venv/bin/ruff check .
.venv/bin/python -m pytest tests "$@"
