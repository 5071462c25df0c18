"""Benchmarks that drive a running server over HTTP."""
