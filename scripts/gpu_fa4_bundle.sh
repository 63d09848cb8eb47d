#!/usr/bin/env bash
# Assemble FlashAttention-4 (CuTe DSL, as vLLM 0.32 ships it) for a GPU machine without network,
# for the kernel comparison of issue 17. Run on any x86-64 machine with pip and network access:
#   bash scripts/gpu_fa4_bundle.sh        # -> .gpu_fa4/ (git-ignored): part-aa, part-ab, ...
# On the GPU machine, once every part is there (they travel in separate transfers when one is
# too large; keep them in .gpu_fa4/ of the checkout between calls of one warm machine):
#   bash scripts/gpu_fa4_stage.sh         # unpacks into $FA4_SITE (default /tmp/fa4-site)
#   PYTHONPATH=/tmp/fa4-site python3 ...  # import vllm.vllm_flash_attn.cute
#
# What goes in:
# - nvidia-cutlass-dsl 4.8.0 with its CUDA 13 libraries (the CuTe DSL compiler, 190 MB unpacked,
#   about 60 MB as xz), its base libraries and its Python package (libs-core: `cutlass.cute`),
#   quack-kernels 0.6.5, torch-c-dlpack-ext and apache-tvm-ffi: what vLLM 0.32 pins for its CuTe
#   kernels. cuda-bindings and numpy are in the GPU image.
# - vLLM 0.32.0's `vllm/vllm_flash_attn/cute/` sources, under empty `vllm/` and
#   `vllm/vllm_flash_attn/` packages: the kernels import only their own modules and cutlass, so
#   they load without the rest of vLLM (or with the vLLM bundle on the path instead).
# The xz stream is cut into parts of PART_MB (default 40) MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
OUT=${FA4_BUNDLE:-.gpu_fa4}
PART_MB=${PART_MB:-40}
VLLM_BUNDLE=${BUNDLE:-.gpu_vllm}
WHEELS=(
  nvidia-cutlass-dsl==4.8.0 nvidia-cutlass-dsl-libs-base==4.8.0
  nvidia-cutlass-dsl-libs-core==4.8.0 nvidia-cutlass-dsl-libs-cu13==4.8.0
  quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5 apache-tvm-ffi==0.1.15.post2
)

if ! git check-ignore -q "$OUT" 2>/dev/null; then
  echo "/$OUT/" >>"$(git rev-parse --git-path info/exclude)"
fi
rm -rf "$OUT" && mkdir -p "$OUT/download" "$OUT/stage"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$OUT/download" "${WHEELS[@]}"
for wheel in "$OUT"/download/*.whl; do
  unzip -q -o "$wheel" -d "$OUT/stage"
done
# The CuTe sources from vLLM's wheel (downloaded by gpu_vllm_bundle.sh, or here).
vllm_wheel=$(ls "$VLLM_BUNDLE"/download/vllm-0.32.0-*.whl 2>/dev/null | head -1 || true)
if [ -z "$vllm_wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$OUT/download" vllm==0.32.0
  vllm_wheel=$(ls "$OUT"/download/vllm-0.32.0-*.whl | head -1)
fi
unzip -q -o "$vllm_wheel" 'vllm/vllm_flash_attn/cute/*' -d "$OUT/stage"
touch "$OUT/stage/vllm/__init__.py" "$OUT/stage/vllm/vllm_flash_attn/__init__.py"
tar -C "$OUT/stage" -cf - . | xz -T0 -6 | split -b "${PART_MB}M" - "$OUT/part-"
rm -rf "$OUT/stage" "$OUT/download"
(cd "$OUT" && sha256sum part-* >MANIFEST)
ls -l "$OUT"
