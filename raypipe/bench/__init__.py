"""Benchmarks: measured throughput and wall times of raypipe stages."""
