#!/usr/bin/env bash
# Set up (if needed), then answer long-context questions with the shipped trained checkpoint:
# published decoding, SparseD and the cached/parallel modes side by side (examples/demo.py).
#   bash scripts/run_demo.sh [--length 2048] [--n 3]
#   bash scripts/run_demo.sh --random [--arch dream]   # random-weight checkpoint, serving path only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
if [[ "${1:-}" == "--random" ]]; then
  shift
  exec .venv/bin/python examples/offline_generate.py "$@"
fi
exec .venv/bin/python examples/demo.py "$@"
