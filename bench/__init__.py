"""``python -m bench``: latency and throughput benchmarks of calm-rt."""
