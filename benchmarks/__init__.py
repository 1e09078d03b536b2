"""Benchmarks (not tests), run by ``python cli.py bench <target>``; each prints a self-describing report."""
