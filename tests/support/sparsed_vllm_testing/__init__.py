"""Test-only helpers, a distribution of their own (tests/support) that no install of sparsed-vllm
carries: `ray_platform` (a platform plugin that lets CPU CI run the Ray executor) and
`rank_probe` (functions that tests run on every tensor-parallel rank).
"""
