# Environment for running vLLM from this checkout (sourced by the other scripts).
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# vLLM's CPU build sizes its (unused here) KV space from this, in GiB, and refuses the default
# on small machines.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
