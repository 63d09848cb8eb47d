#!/usr/bin/env bash
# vLLM 0.32.0's FlashAttention-3 build, alone, for the cached-step comparison of issue 17:
#   bash scripts/gpu_fa3_bundle.sh      # -> .gpu_fa3/_vllm_fa3_C.abi3.so.xz (git-ignored), ~12 MB
# On the GPU machine (torch + triton, no vLLM needed):
#   python benchmarks/bench_fa3_cached.py --lib .gpu_fa3/_vllm_fa3_C.abi3.so.xz --out out/fa3.json
# `_vllm_fa3_C.abi3.so` (164 MB, 40 MB in the wheel) is built on PyTorch's stable ABI: it calls
# libtorch only through the `aoti_torch_*` / `torch_*` C shims, none of c10's or ATen's C++
# symbols, so it may load on a torch other than the one vLLM pins (2.13). Its device code is
# sm_90 only, which xz packs to about 12 MB. Reuses the vLLM wheel that
# scripts/gpu_vllm_bundle.sh downloads, or downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
OUT=${FA3_BUNDLE:-.gpu_fa3}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if ! grep -qx "/$OUT/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null; then
  echo "/$OUT/" >>"$(git rev-parse --git-path info/exclude)"
fi
wheel=$(ls .gpu_vllm/download/vllm-$VLLM_VERSION-*.whl "$OUT"/vllm-$VLLM_VERSION-*.whl 2>/dev/null \
  | head -1 || true)
if [[ -z "$wheel" ]]; then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d "$OUT" "vllm==$VLLM_VERSION"
  wheel=$(ls "$OUT"/vllm-$VLLM_VERSION-*.whl | head -1)
fi
"$PYTHON" - "$wheel" "$OUT" <<'PY'
import lzma, sys, zipfile
wheel, out = sys.argv[1:]
name = "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"
with zipfile.ZipFile(wheel) as z, lzma.open(f"{out}/_vllm_fa3_C.abi3.so.xz", "wb", preset=6) as f:
    f.write(z.read(name))
PY
ls -l "$OUT"
