"""Helpers of `bench/cdc_bench.py`: the CDC and snapshot benchmarks of issue 3 (never run as tests)."""
