#!/usr/bin/env bash
# Set up (if needed), write a small LLaDA checkpoint and generate with it through vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
.venv/bin/python examples/offline_generate.py "$@"
