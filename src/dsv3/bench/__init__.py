"""Benchmarks against peer implementations, each measured in one run on the same machine.

``train``: one full training step (forward, loss, backward, AdamW) of our model and of
``transformers``' ``DeepseekV3ForCausalLM`` with the same weights, batch and thread count.
"""

from .train import bench_train, format_bench_train

__all__ = ["bench_train", "format_bench_train"]
