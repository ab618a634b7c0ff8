"""Benchmarks (make bench): each writes a JSON report with its figure and the baseline it is compared to."""
