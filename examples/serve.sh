#!/usr/bin/env bash
# Serve a LLaDA (or Dream) checkpoint with vLLM's OpenAI server and SparseD.
#   bash examples/serve.sh [CHECKPOINT_DIR] [extra `vllm serve` flags...]
# Without a checkpoint it writes a small random-weight LLaDA one first (nothing is downloaded).
# `sparsed-vllm serve` is `vllm serve` with the plugin; on a CUDA install `vllm serve` works too.
set -euo pipefail
ckpt=${1:-.cache/demo/llada-small}
shift || true
if [[ ! -f "$ckpt/config.json" ]]; then
  python -m sparsed_vllm.checkpoint --arch llada --preset small --out "$ckpt"
fi
exec sparsed-vllm serve "$ckpt" --host 127.0.0.1 --port "${PORT:-8000}" --max-model-len 1024 \
  --enforce-eager "$@"
