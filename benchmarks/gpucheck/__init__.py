"""Helpers of benchmarks/gpu_check.py (one module per section)."""
