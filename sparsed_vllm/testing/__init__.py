"""Test-only helpers, never used when serving: `ray_platform` (a platform plugin that lets CPU CI
run the Ray executor) and `rank_probe` (functions that tests run on every tensor-parallel rank).
"""
