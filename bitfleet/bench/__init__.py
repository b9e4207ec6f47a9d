"""Benchmarks behind the `bitfleet bench` commands: each prints a table and writes JSON."""
