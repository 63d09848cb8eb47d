#!/usr/bin/env bash
# Run a Python script with vLLM 0.32.0 and this plugin on a CUDA machine without vLLM or network.
#   bash scripts/gpu_vllm_run.sh scripts/gpu_vllm_e2e.py --out out
#   FA3_SO=.gpu_fa3/_vllm_fa3_C.abi3.so.xz bash scripts/gpu_vllm_run.sh ...   # with vLLM's FA3
# Needs .gpu_vllm/ship from scripts/gpu_vllm_bundle.sh in the checkout, and a python3 with torch
# (CUDA) and triton; made for torch 2.11 / Python 3.12 / sm_90. Nothing is installed system-wide:
# wheels and vLLM go to $SITE (default /tmp/vllm-site), the checkout is used in place.
#
# vLLM is run without the compiled ops that torch 2.11 cannot offer it: callers pass
# enforce_eager=True and compilation_config={"custom_ops": ["none"]} (torch versions of RMSNorm,
# RoPE, SiluAndMul); attention is the plugin's own backend. One import guard of vLLM is
# removed (see below).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SHIP=${SHIP:-$REPO/.gpu_vllm/ship}
SITE=${SITE:-/tmp/vllm-site}
PYTHON=${PYTHON:-python3}

stamp=$(sha256sum "$SHIP/MANIFEST" | cut -c1-16)
if [ "$(cat "$SITE/.bundle" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$SHIP"/wheels/*.whl
  tar -xJf "$SHIP/vllm.tar.xz" -C "$SITE"
  # The one change to vLLM. Why: on CUDA, vllm/model_executor/layers/attention/__init__.py always
  # imports fa_utils, which imports vllm.vllm_flash_attn, whose __init__ raises ImportError when
  # neither FlashAttention build is installed (480 MB, left out of the bundle). Its
  # flash_attn_interface.py already handles their absence (FA2_AVAILABLE = False); only the raise
  # goes. Without FA3_SO (below) nothing here calls FA2 or FA3: the plugin's attention backend
  # then runs its own kernels (and FA4, which is Python and needs neither build).
  # Remove when the bundle carries an FA build or vLLM makes that import optional.
  "$PYTHON" - "$SITE/vllm/vllm_flash_attn/__init__.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
guard = "if not (FA2_AVAILABLE or FA3_AVAILABLE):"
if guard not in src:
    raise SystemExit(f"{path}: expected guard not found; check the bundle's vLLM version")
open(path, "w").write(src.replace(guard, "if False:  # no FlashAttention build shipped", 1))
PY
  # The plugin is not pip-installed: give vLLM its entry point through a minimal dist-info, and
  # map kernels/ and model_executor/ into the package the way setup.py's package_dir does.
  info="$SITE/sparsed_vllm-0.1.0.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: sparsed-vllm\nVersion: 0.1.0\n' >"$info/METADATA"
  printf '[vllm.general_plugins]\nsparsed_vllm = sparsed_vllm.plugin:register\n' \
    >"$info/entry_points.txt"
  echo "$stamp" >"$SITE/.bundle"
fi
# vLLM's FlashAttention-3 build (optional, `FA3_SO`: the .so or the .so.xz of
# scripts/gpu_fa3_bundle.sh) goes where a CUDA install of vLLM has it, so `vllm.vllm_flash_attn`
# finds it (FA3_AVAILABLE) and the dense cached steps can run on it (`runner.cached_kernel`).
if [ -n "${FA3_SO:-}" ]; then
  fa3="$SITE/vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so"
  if [ ! -f "$fa3" ]; then
    case "$FA3_SO" in
      *.xz) xz -dc "$FA3_SO" >"$fa3.tmp" ;;
      *) cp "$FA3_SO" "$fa3.tmp" ;;
    esac
    mv "$fa3.tmp" "$fa3"
  fi
fi
cat >"$SITE/sitecustomize.py" <<PY
import sparsed_vllm
sparsed_vllm.__path__.append("$REPO")
PY
# The checkout's sparsed_vllm/ comes first; the bundle's packages shadow older ones of the image.
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$PYTHON" "$@"
