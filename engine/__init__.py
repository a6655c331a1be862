"""Metroline engine: paged KV cache, continuous batching, offline and HTTP serving."""
