"""Benchmarks run by ``make bench``.

Each prints rows with ratios against a baseline measured in the same run.
"""
