"""SLAM: LLM serving with a compressed, bounded KV cache and fault-resilient requests."""

__version__ = "0.1.0"
