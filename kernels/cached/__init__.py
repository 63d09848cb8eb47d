"""Query rows against a paged KV cache, split-K (`naive.py` reference, `fused.py` Triton)."""
