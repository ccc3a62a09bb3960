"""zchat-bench: throughput and C10K benchmarks against in-run baselines."""
