"""SparseD pattern selection for a varlen batch (`naive.py` reference, `fused.py` Triton)."""
