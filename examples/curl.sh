#!/usr/bin/env bash
# Query a running server (examples/serve.sh) with curl: diffusion and SparseD parameters travel
# in `vllm_xargs`; `stream: true` sends each block of tokens once it is committed.
set -euo pipefail
url=${URL:-http://127.0.0.1:8000}
model=$(curl -s "$url/v1/models" | python -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

curl -s "$url/v1/completions" -H 'Content-Type: application/json' -d @- <<JSON
{"model": "$model", "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0,
 "vllm_xargs": {"steps": 32, "block_length": 8, "sparsed": true}}
JSON
echo
curl -sN "$url/v1/chat/completions" -H 'Content-Type: application/json' -d @- <<JSON
{"model": "$model", "messages": [{"role": "user", "content": "Tell me a story."}],
 "max_tokens": 64, "temperature": 0, "stream": true,
 "vllm_xargs": {"steps": 64, "block_length": 16, "cfg_scale": 0.5}}
JSON
