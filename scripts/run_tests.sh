#!/usr/bin/env bash
# Set up (if needed) and run the test suite: lint, then pytest (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest tests "$@"
