"""Block-sparse attention over per-head kept key tiles (`naive.py` reference, `fused.py` Triton)."""
