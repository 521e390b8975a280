"""Benchmarks: what is known of each, their files on disk, scoring rules, evaluation runs."""
