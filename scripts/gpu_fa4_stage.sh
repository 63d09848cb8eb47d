#!/usr/bin/env bash
# Unpack the FlashAttention-4 bundle of scripts/gpu_fa4_bundle.sh on the GPU machine.
#   bash scripts/gpu_fa4_stage.sh && export PYTHONPATH=/tmp/fa4-site:/tmp/fa4-site/nvidia_cutlass_dsl/dsl_packages
# Needs every part listed in .gpu_fa4/MANIFEST (checked). The CuTe DSL finds its `cutlass`
# package through a .pth file, which PYTHONPATH does not read: hence its dsl_packages folder on
# the path as well. The bundle's `vllm/` holds only vllm_flash_attn.cute; with the vLLM bundle's
# site on the path too, put that one first.
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${FA4_BUNDLE:-.gpu_fa4}
SITE=${FA4_SITE:-/tmp/fa4-site}
(cd "$PARTS" && sha256sum -c --quiet MANIFEST)
if [ "$(cat "$SITE/.manifest" 2>/dev/null)" != "$(sha256sum "$PARTS/MANIFEST" | cut -c1-16)" ]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  cat "$PARTS"/part-* | xz -d | tar -C "$SITE" -xf -
  # Wheels beside the parts (bundles made before they were packed in): the CuTe DSL's Python
  # package, nvidia-cutlass-dsl-libs-core, and apache-tvm-ffi. Unpacked in place, like the rest.
  for wheel in "$PARTS"/*.whl; do
    [ -e "$wheel" ] && python3 -m zipfile -e "$wheel" "$SITE"
  done
  sha256sum "$PARTS/MANIFEST" | cut -c1-16 >"$SITE/.manifest"
fi
PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages" python3 -c \
  "import cutlass, vllm.vllm_flash_attn.cute.interface as fa4; print('FA4 importable', cutlass.__file__)"
