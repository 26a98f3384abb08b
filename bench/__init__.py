"""Benchmarks for pullthrough: one run measures it against distribution's proxy mode, nginx and the
upstream itself on the same machine, and prints ratios against those references."""
